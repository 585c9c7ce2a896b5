"""Pieces the OpenAI routes share: the served model dependency, sampling fields, documented errors."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from hyla.runtime.outputs import RequestOutput
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.errors import unsupported
from hyla.serve.protocol import ErrorResponse, PromptTokensDetails, SamplingFields, Usage
from hyla.serve.served_model import ServedModel

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (bad JSON, wrong types, unknown fields, limits)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server has one)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    503: {"model": ErrorResponse, "description": "Queue full or shutting down; see Retry-After"},
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response, or with `stream: true` server-sent events ending in `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


def sampling_params(
    served: ServedModel,
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Engine sampling parameters of a request; unsupported OpenAI knobs with non-default values are errors."""
    if body.frequency_penalty:
        raise unsupported("frequency_penalty", "a non-zero frequency penalty")
    if body.presence_penalty:
        raise unsupported("presence_penalty", "a non-zero presence penalty")
    if body.logit_bias:
        raise unsupported("logit_bias", "logit bias")
    if body.stream_options is not None and not body.stream:
        raise unsupported("stream_options", "stream_options without stream: true")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return served.sampling_params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        n=body.n,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def usage(finals: list[RequestOutput]) -> Usage:
    """Token counts of finished engine requests (cached prompt tokens included in the prompt's)."""
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(out.token_ids) for f in finals for out in f.outputs)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.num_cached_tokens for f in finals)),
    )
