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
from hyla.serve.deltas import DeltaTracker
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
    prompt_text: str | None  # as sent, echoed as is; None for token ids
    deltas: DeltaTracker = field(default_factory=DeltaTracker)
    offsets: dict[int, int] = field(default_factory=dict)  # streamed: characters sent per choice

    def index(self, choice: int) -> int:
        return self.prompt_index * self.body.n + choice

    def prompt_part(self, output: RequestOutput) -> tuple[str, list[int], list]:
        """Echoed prompt text, ids and logprob entries (empty without echo)."""
        if not self.body.echo:
            return "", [], []
        ids = output.prompt_token_ids
        text = self.prompt_text if self.prompt_text is not None else self.served.tokenizer.decode(ids)
        entries = output.prompt_logprobs or [None] * len(ids)
        return text, list(ids), list(entries)

    def choice(self, index: int, text: str, ids: list[int], entries: list, finish_reason: str | None,
               offset: int = 0) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = completion_logprobs(ids, entries, self.served.token_text, offset=offset)
        return CompletionChoice(index=self.index(index), text=text, logprobs=logprobs, finish_reason=finish_reason)

    def whole(self, output: RequestOutput, out: CompletionOutput) -> CompletionChoice:
        text, ids, entries = self.prompt_part(output)
        return self.choice(out.index, text + out.text, ids + out.token_ids, entries + list(out.logprobs or []),
                           out.finish_reason)

    def streamed(self, output: RequestOutput) -> list[CompletionChoice]:
        """What this step added to each choice (the echoed prompt leads a choice's first delta)."""
        choices = []
        for delta in self.deltas(output):
            text, ids, entries = self.prompt_part(output) if delta.first else ("", [], [])
            offset = self.offsets.get(delta.index, 0)
            text += delta.text
            self.offsets[delta.index] = offset + len(text)
            choices.append(self.choice(delta.index, text, ids + delta.token_ids, entries + delta.logprobs,
                                       delta.finish_reason, offset))
        return choices


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
    params = sampling_params(served, body, body.max_tokens, body.logprobs, prompt_logprobs)
    prompts = prompts_of(body)
    completion_id = new_id("cmpl")
    created = int(time.time())
    try:
        ids = await unless_disconnected(request, asyncio.gather(*(served.prompt_ids(p) for p in prompts)))
        served.check_cost([len(i) for i in ids], params, body.echo)
        requests = [served.request(p, params, f"{completion_id}-{i}") for i, p in enumerate(ids)]
        builders = [ChoiceBuilder(served, body, i, p if isinstance(p, str) else None) for i, p in enumerate(prompts)]
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
        usage=usage(finals),
    )


async def stream_chunks(
    served: ServedModel,
    body: CompletionRequest,
    requests: list[EngineRequest],
    builders: list[ChoiceBuilder],
    completion_id: str,
    created: int,
) -> AsyncIterator[CompletionResponse]:
    finals = []
    async for i, output in merged(requests):
        choices = builders[i].streamed(output)
        if choices:
            yield CompletionResponse(id=completion_id, created=created, model=served.name, choices=choices)
        if output.finished:
            finals.append(output)
    if include_usage(body):
        yield CompletionResponse(id=completion_id, created=created, model=served.name, choices=[], usage=usage(finals))
