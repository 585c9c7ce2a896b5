"""`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from hyla.runtime.outputs import CompletionOutput
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import bad_request
from hyla.serve.http_common import (
    ERROR_RESPONSES, STREAM_RESPONSE, include_usage, sampling_params, served_model, usage,
)
from hyla.serve.logprobs import chat_logprobs
from hyla.serve.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs,
)
from hyla.serve.served_model import ServedModel, new_id
from hyla.serve.sse import ClientGone, EventStreamResponse, unless_disconnected, with_done

router = APIRouter()


def logprobs_of(served: ServedModel, body: ChatCompletionRequest, ids: list[int], entries: list) -> ChatLogprobs | None:
    if not body.logprobs:
        return None
    return chat_logprobs(ids, entries, served.token_text, body.top_logprobs or 0)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**STREAM_RESPONSE, **ERROR_RESPONSES},
    summary="Create a chat completion",
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, served: ServedModel = Depends(served_model)
) -> Response | ChatCompletionResponse:
    served.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
    prompt = served.chat_prompt(body.messages)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = limit if limit is not None else max(served.max_model_len - len(prompt), 1)
    params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    chat_id = new_id("chatcmpl")
    engine_request = served.request(prompt, params, chat_id, param="messages")
    created = int(time.time())
    try:
        await unless_disconnected(request, engine_request.open())
        if body.stream:
            return EventStreamResponse(with_done(stream_chunks(served, body, engine_request, chat_id, created)))
        final = await unless_disconnected(request, engine_request.final())
    except ClientGone:
        return Response(status_code=499)
    choices = [
        ChatChoice(
            index=out.index,
            message=AssistantMessage(content=out.text),
            logprobs=logprobs_of(served, body, out.token_ids, list(out.logprobs or [])),
            finish_reason=out.finish_reason,
        )
        for out in final.outputs
    ]
    return ChatCompletionResponse(
        id=chat_id, created=created, model=served.name, choices=choices,
        usage=usage(len(final.prompt_token_ids), sum(len(out.token_ids) for out in final.outputs)),
    )


async def stream_chunks(
    served: ServedModel, body: ChatCompletionRequest, engine_request: EngineRequest, chat_id: str, created: int
) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chat_id, created=created, model=served.name, choices=choices)

    def delta(out: CompletionOutput) -> ChatChunkChoice:
        new_ids = list(out.token_ids_delta)
        start = len(out.token_ids) - len(new_ids)
        entries = list(out.logprobs or [])[start : len(out.token_ids)]
        return ChatChunkChoice(index=out.index, delta=ChatDelta(content=out.text_delta),
                               logprobs=logprobs_of(served, body, new_ids, entries), finish_reason=out.finish_reason)

    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(body.n)])
    finished: set[int] = set()
    async for output in engine_request:
        fresh = [out for out in output.outputs if out.index not in finished]
        choices = [delta(out) for out in fresh if out.token_ids_delta or out.text_delta or out.finished]
        finished.update(out.index for out in fresh if out.finished)
        if choices:
            yield chunk(choices)
        if output.finished and include_usage(body):
            completion_tokens = sum(len(out.token_ids) for out in output.outputs)
            yield ChatCompletionChunk(id=chat_id, created=created, model=served.name, choices=[],
                                      usage=usage(len(output.prompt_token_ids), completion_tokens))
