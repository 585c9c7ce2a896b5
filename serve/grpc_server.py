"""The gRPC front end: `hyla.v1.Generation` plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hyla.runtime.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from hyla.serve.auth import ApiKeyCheck
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import APIError, unauthorized
from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc
from hyla.serve.served_model import ServedModel, new_id

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def status_code(error: APIError) -> grpc.StatusCode:
    if error.code == "shutting_down":
        return grpc.StatusCode.UNAVAILABLE
    return {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }.get(error.status, grpc.StatusCode.INTERNAL)


class GenerationService(hyla_pb2_grpc.GenerationServicer):
    def __init__(self, served: ServedModel, check: ApiKeyCheck) -> None:
        self.served = served
        self.check = check

    # ---- RPCs -----------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def work() -> pb.GenerateResponse:
            engine_request = self._submit(request)
            await engine_request.open()
            final = await engine_request.final()
            return pb.GenerateResponse(
                request_id=final.request_id,
                prompt_token_ids=final.prompt_token_ids,
                prompt_logprobs=self._prompt_logprobs(final),
                completions=[self._completion(out, out.token_ids, list(out.logprobs or [])) for out in final.outputs],
                usage=self._usage(final),
            )

        return await self._unary("Generate", context, work)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            engine_request = self._submit(request)
            await engine_request.open()
            first, finished = True, set()
            async for output in engine_request:
                completions = []
                for out in output.outputs:
                    if out.index in finished or not (out.token_ids_delta or out.text_delta or out.finished):
                        continue
                    start = len(out.token_ids) - len(out.token_ids_delta)
                    entries = list(out.logprobs or [])[start : len(out.token_ids)]
                    completions.append(self._completion(out, out.token_ids_delta, entries, delta=True))
                    if out.finished:
                        finished.add(out.index)
                yield pb.GenerateStreamResponse(
                    request_id=output.request_id,
                    prompt_token_ids=output.prompt_token_ids if first else [],
                    prompt_logprobs=self._prompt_logprobs(output) if first else [],
                    completions=completions,
                    usage=self._usage(output) if output.finished else None,
                )
                first = False
        except APIError as error:
            code = status_code(error)
            await self._abort(context, error)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.served.metrics.count("grpc", "GenerateStream", code.name)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def work() -> pb.TokenizeResponse:
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = self.served.encode(request.text, add_special)
            return pb.TokenizeResponse(token_ids=ids, tokens=[self.served.token_text(t) for t in ids])

        return await self._unary("Tokenize", context, work)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        async def work() -> pb.ModelInfoResponse:
            served, stats = self.served, self.served.engine.stats()
            return pb.ModelInfoResponse(
                model=served.name, max_model_len=served.max_model_len, vocab_size=served.vocab_size,
                layer_types=served.layer_types, max_num_seqs=served.engine.engine.max_num_seqs,
                kv_blocks_total=stats.kv_blocks_total, kv_blocks_used=stats.kv_blocks_used,
                state_slots_total=stats.state_slots_total, state_slots_used=stats.state_slots_used,
                num_running=stats.num_running, num_waiting=stats.num_waiting,
            )

        return await self._unary("ModelInfo", context, work)

    # ---- helpers --------------------------------------------------------------------------------

    async def _unary(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        code = grpc.StatusCode.OK
        try:
            self._authorize(context)
            return await work()
        except APIError as error:
            code = status_code(error)
            await self._abort(context, error)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.served.metrics.count("grpc", method, code.name)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, error: APIError) -> None:
        metadata = tuple((k.lower(), v) for k, v in error.headers().items())
        await context.abort(status_code(error), error.message, trailing_metadata=metadata)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.check.accepts_metadata(context.invocation_metadata()):
            raise unauthorized()

    def _submit(self, request: pb.GenerateRequest) -> EngineRequest:
        s = request.sampling

        def opt(name: str, default: object = None) -> object:
            return getattr(s, name) if s.HasField(name) else default

        params = self.served.sampling_params(
            max_tokens=opt("max_tokens", 16), temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0),
            top_k=opt("top_k", 0), n=opt("n", 1), stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
            seed=opt("seed"), logprobs=opt("logprobs"), prompt_logprobs=opt("prompt_logprobs"),
            ignore_eos=s.ignore_eos,
        )
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise APIError(400, "give a prompt: text or token_ids", param="prompt")
        prompt = request.text if kind == "text" else list(request.token_ids.ids)
        return self.served.request(prompt, params, request.request_id or new_id("grpc"))

    def _logprob(self, token_id: int, logprob: float, rank: int) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=token_id, token=self.served.token_text(token_id), logprob=logprob, rank=rank)

    def _position(self, token_id: int, entry: TokenLogprobs | None) -> pb.PositionLogprobs:
        if entry is None:
            return pb.PositionLogprobs()
        top = [self._logprob(t, lp, rank) for t, (lp, rank) in sorted(entry.items(), key=lambda item: item[1][1])]
        return pb.PositionLogprobs(chosen=self._logprob(token_id, *entry[token_id]), top=top)

    def _prompt_logprobs(self, output: RequestOutput) -> list[pb.PositionLogprobs]:
        if output.prompt_logprobs is None:
            return []
        return [self._position(t, e) for t, e in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True)]

    def _completion(
        self, out: CompletionOutput, token_ids: list[int], entries: list[TokenLogprobs], delta: bool = False
    ) -> pb.Completion:
        return pb.Completion(
            index=out.index,
            text=out.text_delta if delta else out.text,
            token_ids=token_ids,
            logprobs=[self._position(t, e) for t, e in zip(token_ids, entries)],
            finish_reason=FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        )

    @staticmethod
    def _usage(output: RequestOutput) -> pb.Usage:
        prompt, generated = len(output.prompt_token_ids), sum(len(out.token_ids) for out in output.outputs)
        return pb.Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


class GrpcFrontEnd:
    """A `grpc.aio` server with the generation, health and reflection services."""

    def __init__(self, served: ServedModel, api_key: str | None = None) -> None:
        self.server = grpc.aio.server()
        hyla_pb2_grpc.add_GenerationServicer_to_server(GenerationService(served, ApiKeyCheck(api_key)), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )

    async def start(self, host: str, port: int) -> int:
        """Bind and start; returns the port (useful with port 0)."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"could not bind gRPC to {host}:{port}")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
