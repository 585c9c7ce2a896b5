"""`POST /v1/chat/completions`: messages rendered with the tokenizer's chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from hyla.serve.deltas import DeltaTracker
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import bad_request, unsupported
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


def check_supported(body: ChatCompletionRequest) -> None:
    """Refuse what this server cannot do rather than silently doing something else."""
    if body.tools:
        raise unsupported("tools", "tool calling")
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "a tool_choice other than none or auto")
    if body.response_format is not None and body.response_format.type != "text":
        raise unsupported("response_format", f"response_format {body.response_format.type}")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")


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
    check_supported(body)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    chat_id = new_id("chatcmpl")
    created = int(time.time())
    try:
        prompt = await unless_disconnected(request, served.chat_prompt(body.messages))
        max_tokens = limit if limit is not None else max(served.max_model_len - len(prompt), 1)
        params = sampling_params(served, body, max_tokens, top)
        served.check_cost([len(prompt)], params, echo=False)
        engine_request = served.request(prompt, params, chat_id, param="messages")
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
        usage=usage([final]),
    )


async def stream_chunks(
    served: ServedModel, body: ChatCompletionRequest, engine_request: EngineRequest, chat_id: str, created: int
) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chat_id, created=created, model=served.name, choices=choices, **extra)

    deltas = DeltaTracker()
    async for output in engine_request:
        choices = [
            ChatChunkChoice(index=d.index, delta=ChatDelta(role="assistant" if d.first else None, content=d.text),
                            logprobs=logprobs_of(served, body, d.token_ids, d.logprobs), finish_reason=d.finish_reason)
            for d in deltas(output)
        ]
        if choices:
            yield chunk(choices)
        if output.finished and include_usage(body):
            yield chunk([], usage=usage([output]))
