"""The gRPC front end: `hyla.v1.Generation` plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hyla.runtime.outputs import RequestOutput, TokenLogprobs
from hyla.serve.auth import ApiKeyCheck
from hyla.serve.deltas import DeltaTracker
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import APIError, internal_error, unauthorized
from hyla.serve.proto import hyla_pb2 as pb
from hyla.serve.proto import hyla_pb2_grpc
from hyla.serve.served_model import ServedModel, new_id

logger = logging.getLogger(__name__)
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
        409: grpc.StatusCode.ALREADY_EXISTS,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }.get(error.status, grpc.StatusCode.INTERNAL)


class GenerationService(hyla_pb2_grpc.GenerationServicer):
    def __init__(self, served: ServedModel, check: ApiKeyCheck) -> None:
        self.served = served
        self.check = check

    # ---- RPCs -----------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._call("Generate", context):
            engine_request = await self._submit(request)
            final = await engine_request.final()
            return pb.GenerateResponse(
                request_id=final.request_id,
                prompt_token_ids=final.prompt_token_ids,
                prompt_logprobs=self._prompt_logprobs(final),
                completions=[self._completion(out.index, out.text, out.token_ids, list(out.logprobs or []),
                                              out.finish_reason) for out in final.outputs],
                usage=self._usage(final),
            )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._call("GenerateStream", context):
            engine_request = await self._submit(request)
            deltas, first = DeltaTracker(), True
            async for output in engine_request:
                completions = [self._completion(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason)
                               for d in deltas(output)]
                yield pb.GenerateStreamResponse(
                    request_id=output.request_id,
                    prompt_token_ids=output.prompt_token_ids if first else [],
                    prompt_logprobs=self._prompt_logprobs(output) if first else [],
                    completions=completions,
                    usage=self._usage(output) if output.finished else None,
                )
                first = False

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async with self._call("Tokenize", context):
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await self.served.encode(request.text, add_special)
            return pb.TokenizeResponse(token_ids=ids, tokens=await self.served.token_texts(ids))

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        async with self._call("ModelInfo", context):
            served, stats = self.served, await self.served.engine.current_stats()
            return pb.ModelInfoResponse(
                model=served.name, max_model_len=served.max_model_len, vocab_size=served.vocab_size,
                layer_types=served.layer_types, eos_token_ids=served.engine.engine.eos_token_ids,
                max_num_seqs=served.engine.engine.max_num_seqs,
                kv_blocks_total=stats.kv_blocks_total, kv_blocks_used=stats.kv_blocks_used,
                state_slots_total=stats.state_slots_total, state_slots_used=stats.state_slots_used,
                num_running=stats.num_running, num_waiting=stats.num_waiting,
            )

    # ---- helpers --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Authorize, then map errors to statuses: count every call with its status, log server failures."""
        code = grpc.StatusCode.OK
        try:
            if not self.check.accepts_metadata(context.invocation_metadata()):
                raise unauthorized()
            yield
        except APIError as error:
            code = status_code(error)
            log = logger.error if code == grpc.StatusCode.INTERNAL else logger.info
            log("%s -> %s: %s", method, code.name, error.message)
            metadata = tuple((k.lower(), v) for k, v in error.headers().items())
            await context.abort(code, error.message, trailing_metadata=metadata)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s failed", method)
            await context.abort(code, internal_error().message)
        finally:
            self.served.metrics.count("grpc", method, code.name)

    async def _submit(self, request: pb.GenerateRequest) -> EngineRequest:
        """Tokenise, check and open an engine request (its first output is in)."""
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
        ids = await self.served.prompt_ids(request.text if kind == "text" else list(request.token_ids.ids))
        self.served.check_cost([len(ids)], params, echo=params.prompt_logprobs is not None)
        engine_request = self.served.request(ids, params, request.request_id or new_id("grpc"))
        await engine_request.open()
        return engine_request

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
        self, index: int, text: str, token_ids: list[int], entries: list[TokenLogprobs], finish_reason: str | None
    ) -> pb.Completion:
        return pb.Completion(
            index=index,
            text=text,
            token_ids=token_ids,
            logprobs=[self._position(t, e) for t, e in zip(token_ids, entries)],
            finish_reason=FINISH_REASONS.get(finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        )

    @staticmethod
    def _usage(output: RequestOutput) -> pb.Usage:
        prompt, generated = len(output.prompt_token_ids), sum(len(out.token_ids) for out in output.outputs)
        return pb.Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated,
                        prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=output.num_cached_tokens))


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

    async def not_serving(self) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
