"""`POST /v1/completions`: one or many prompts, `n` continuations each, optional echo and logprobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from hyla.runtime.outputs import CompletionOutput, RequestOutput
from hyla.serve.engine_request import EngineRequest, merged, open_all
from hyla.serve.errors import unsupported
from hyla.serve.http_common import (
    ERROR_RESPONSES, STREAM_RESPONSE, include_usage, sampling_params, served_model, usage,
)
from hyla.serve.logprobs import completion_logprobs
from hyla.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from hyla.serve.served_model import ServedModel, new_id
from hyla.serve.sse import ClientGone, EventStreamResponse, unless_disconnected, with_done

router = APIRouter()


def prompts_of(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


@dataclass
class ChoiceBuilder:
    """Turns engine outputs of one prompt into choices (whole, or streamed deltas)."""

    served: ServedModel
    body: CompletionRequest
    prompt_index: int
    offsets: dict[int, int] = field(default_factory=dict)  # streamed: characters sent per choice
    finished: set[int] = field(default_factory=set)

    def index(self, out: CompletionOutput) -> int:
        return self.prompt_index * self.body.n + out.index

    def prompt_part(self, output: RequestOutput) -> tuple[str, list[int], list]:
        """Echoed prompt text, ids and logprob entries (empty without echo)."""
        if not self.body.echo:
            return "", [], []
        ids = output.prompt_token_ids
        text = output.prompt if output.prompt is not None else self.served.tokenizer.decode(ids)
        entries = output.prompt_logprobs or [None] * len(ids)
        return text, list(ids), list(entries)

    def whole(self, output: RequestOutput, out: CompletionOutput) -> CompletionChoice:
        text, ids, entries = self.prompt_part(output)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(ids + out.token_ids, entries + list(out.logprobs or []), self.served.token_text)
        return CompletionChoice(index=self.index(out), text=text + out.text, logprobs=logprobs,
                                finish_reason=out.finish_reason)

    def delta(self, output: RequestOutput, out: CompletionOutput) -> CompletionChoice | None:
        """What this step added to one choice; None when nothing new (or it already finished)."""
        index = self.index(out)
        if index in self.finished:
            return None
        first = index not in self.offsets
        text, ids, entries = self.prompt_part(output) if first else ("", [], [])
        new_ids = list(out.token_ids_delta)
        if not (first or new_ids or out.text_delta or out.finished):
            return None
        logprobs = None
        if self.body.logprobs is not None:
            start = len(out.token_ids) - len(new_ids)
            new_entries = list(out.logprobs or [])[start : len(out.token_ids)]
            logprobs = completion_logprobs(ids + new_ids, entries + new_entries, self.served.token_text,
                                           offset=self.offsets.get(index, 0))
        text += out.text_delta
        self.offsets[index] = self.offsets.get(index, 0) + len(text)
        if out.finished:
            self.finished.add(index)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=out.finish_reason)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**STREAM_RESPONSE, **ERROR_RESPONSES},
    summary="Create a completion",
)
async def create_completion(
    body: CompletionRequest, request: Request, served: ServedModel = Depends(served_model)
) -> Response | CompletionResponse:
    served.check_model(body.model)
    if body.suffix:
        raise unsupported("suffix", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise unsupported("best_of", "best_of other than n")
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = sampling_params(body, body.max_tokens, body.logprobs, prompt_logprobs)
    completion_id = new_id("cmpl")
    prompts = prompts_of(body)
    for prompt in prompts:
        if isinstance(prompt, list):
            served.check_token_ids(prompt, "prompt")
    requests = [served.request(p, params, f"{completion_id}-{i}") for i, p in enumerate(prompts)]
    builders = [ChoiceBuilder(served, body, i) for i in range(len(prompts))]
    created = int(time.time())
    try:
        await unless_disconnected(request, open_all(requests))
        if body.stream:
            chunks = stream_chunks(served, body, requests, builders, completion_id, created)
            return EventStreamResponse(with_done(chunks))
        finals = await unless_disconnected(request, asyncio.gather(*(r.final() for r in requests)))
    except ClientGone:
        return Response(status_code=499)
    choices = [b.whole(final, out) for b, final in zip(builders, finals) for out in final.outputs]
    return CompletionResponse(
        id=completion_id, created=created, model=served.name, choices=choices,
        usage=usage(sum(len(f.prompt_token_ids) for f in finals),
                    sum(len(out.token_ids) for f in finals for out in f.outputs)),
    )


async def stream_chunks(
    served: ServedModel,
    body: CompletionRequest,
    requests: list[EngineRequest],
    builders: list[ChoiceBuilder],
    completion_id: str,
    created: int,
) -> AsyncIterator[CompletionResponse]:
    prompt_tokens = completion_tokens = 0
    async for i, output in merged(requests):
        choices = [c for c in (builders[i].delta(output, out) for out in output.outputs) if c is not None]
        if choices:
            yield CompletionResponse(id=completion_id, created=created, model=served.name, choices=choices)
        if output.finished:
            prompt_tokens += len(output.prompt_token_ids)
            completion_tokens += sum(len(out.token_ids) for out in output.outputs)
    if include_usage(body):
        yield CompletionResponse(id=completion_id, created=created, model=served.name, choices=[],
                                 usage=usage(prompt_tokens, completion_tokens))
