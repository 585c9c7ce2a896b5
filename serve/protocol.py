"""Request and response bodies of the OpenAI-compatible HTTP API (pydantic; they drive /openapi.json).

Requests are strict like OpenAI's: unknown fields and wrongly typed values are rejected (no "3" -> 3
coercion), and so is text that is not valid Unicode (lone surrogates). `top_k`, `ignore_eos` and
`stop_token_ids` are extensions in the style of other OpenAI-compatible servers. Documented OpenAI
fields that change nothing here are accepted and ignored; features this server lacks are accepted by
the parser and refused by the routes with `unsupported_parameter`, and the published schema only
allows their supported values (`only()`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, model_validator,
)

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_PROMPTS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

LONE_SURROGATE = re.compile("[\ud800-\udfff]")

TokenId = Annotated[int, Field(ge=0, title="TokenId")]  # the served spec adds the vocabulary bound
TokenIdList = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]


def one_message(message: str) -> WrapValidator:
    """Replace pydantic's per-union-member errors with one message saying what is accepted."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(message) from None

    return WrapValidator(validate)


Prompt = Annotated[
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)]
    | TokenIdList
    | Annotated[list[TokenIdList], Field(min_length=1, max_length=MAX_PROMPTS)],
    one_message(
        "prompt must be a string, a list of strings, a list of token ids (ints >= 0), "
        f"or a list of token-id lists, none of them empty, at most {MAX_PROMPTS} prompts"
    ),
]
Stop = Annotated[
    NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None,
    one_message(f"stop must be a string or a list of at most {MAX_STOP} non-empty strings"),
]


def only(**schema: Any) -> dict[str, Any]:
    """`json_schema_extra` publishing the values a field supports, narrower than what parses."""
    return {"json_schema_extra": schema}


def lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """Where in a JSON value a string (or key) holds a lone surrogate, as a dotted path; None if nowhere."""
    if isinstance(value, str):
        return ".".join(path) or "body" if LONE_SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and LONE_SURROGATE.search(key):
            return ".".join((*path, "key"))
        found = lone_surrogate(item, (*path, str(key)))
        if found:
            return found
    return None


class RequestBody(BaseModel):
    """Strict: unknown fields, wrong types and invalid Unicode are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where:
            raise ValueError(f"{where}: text must be valid Unicode (it holds a lone UTF-16 surrogate)")
        return data


class StreamOptions(RequestBody):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, description="Served model name; defaults to the only model served.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off (extension).")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop = None
    stop_token_ids: list[TokenId] | None = Field(None, description="Extension: token ids that end a continuation.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past EOS.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Only 0 is supported.", **only(minimum=0, maximum=0))
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Only 0 is supported.", **only(minimum=0, maximum=0))
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.",
                                                **only(maxProperties=0))
    # Accepted and ignored: they change nothing on this server.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int = Field(16, ge=0, description="0 scores the prompt only (with echo).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported; must be empty.", **only(maxLength=0))


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    """A turn; missing or null `content` (an assistant turn with `tool_calls`, a tool result) reads as ""."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="Passed to the chat template.")
    tool_call_id: str | None = Field(None, description="Passed to the chat template.")
    refusal: str | None = None

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"] = Field(..., **only(enum=["text"]))
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0, description="Default: the rest of the context.")
    max_tokens: int | None = Field(None, ge=0, description="Deprecated alias of max_completion_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Requires logprobs: true.")
    response_format: ResponseFormat | None = Field(None, description="Only type text is supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported; must be empty.", **only(maxItems=0))
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="Only none and auto (without tools) are supported.", **only(enum=["none", "auto", None])
    )
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")


class TokenizeRequest(RequestBody):
    """Either `prompt` (plain text) or `messages` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]})

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


# ----------------------------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length", "abort"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens served from the prefix cache instead of computed."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


def absent_if_none(value: object) -> bool:
    return value is None


class CompletionResponse(BaseModel):
    """A whole completion, or (object the same) one streamed chunk: `usage` only in the last chunk, and only
    when `stream_options.include_usage` asks for it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=absent_if_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """`role` only in a choice's first chunk: left out of the JSON elsewhere, as OpenAI does."""

    role: Literal["assistant"] | None = Field(None, exclude_if=absent_if_none)
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """`usage` only in the last chunk, and only when `stream_options.include_usage` asks for it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=absent_if_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hyla"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
