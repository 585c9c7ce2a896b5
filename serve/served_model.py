"""`ServedModel`: the async engine, its tokenizer, limits and metrics, as both front ends use them.

Tokenising and chat templating run in worker threads, so a huge prompt never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.info import layer_pattern
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import APIError, bad_request, model_not_found, shutting_down, too_costly
from hyla.serve.metrics import ServerMetrics
from hyla.serve.protocol import MAX_STOP, ChatMessage

DEFAULT_MAX_REQUEST_TOKENS = 2**19
PREFIX_CHARS_PER_TOKEN = 32  # texts longer than the context x this are measured by a prefix first
CUT_MARGIN = 16  # tokens a cut at the prefix's end might add


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServedModel:
    """One model under one name; `accepting` turns False while the server drains, `alive` when the engine dies.

    `max_request_tokens` bounds what one request may cost: prompts x n x (logprobs + 1) x (max_tokens +
    echoed prompt tokens), which is also what bounds the size of its response.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        name: str,
        max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.name = name
        self.aliases = aliases  # also accepted in requests, never shown
        self.max_request_tokens = max_request_tokens
        self.max_model_len: int = engine.engine.max_model_len
        self.config = engine.engine.model.config
        self.vocab_size: int = self.config.vocab_size
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        self.accepting = True
        self.alive = True
        self._live: weakref.WeakSet[EngineRequest] = weakref.WeakSet()
        self._pieces: dict[int, str] = {}

    @property
    def layer_types(self) -> str:
        return layer_pattern(self.config)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name and model not in self.aliases:
            raise model_not_found(model, self.name)

    def request(
        self, prompt: list[int], params: SamplingParams, request_id: str, param: str = "prompt"
    ) -> EngineRequest:
        """An engine request for tokenised `prompt`; `param` names the request field it came from."""
        if not self.accepting:
            raise shutting_down()
        request = EngineRequest(self.engine, self.metrics, prompt, params, request_id, param)
        self._live.add(request)
        return request

    async def cut_off(self) -> None:
        """End every request still running: each answers that the server shut down before it finished."""
        for request in list(self._live):
            await request.cut_off()

    def sampling_params(self, **fields: Any) -> SamplingParams:
        """Engine sampling parameters, with the same limits for both front ends (a top_k past the vocabulary
        filters nothing, and is passed on as off)."""
        if len(fields.get("stop") or ()) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} stop strings", param="stop")
        if fields.get("top_k", 0) >= self.vocab_size:
            fields["top_k"] = 0
        try:
            return SamplingParams(**fields)
        except ValueError as error:
            raise bad_request(str(error), param=getattr(error, "param", None)) from None

    def check_cost(self, prompt_lengths: Sequence[int], params: SamplingParams, echo: bool) -> None:
        """Refuse a request that does not fit the context, or whose token positions (see the class docstring)
        exceed `max_request_tokens`."""
        longest = max(prompt_lengths)
        if longest + params.max_tokens > self.max_model_len:
            raise bad_request(
                f"max_tokens: {params.max_tokens} tokens after a {longest}-token prompt exceed this model's context "
                f"length {self.max_model_len}", param="max_tokens", code="context_length_exceeded",
            )
        per_position = params.n * (max(params.logprobs or 0, params.prompt_logprobs or 0) + 1)
        cost = sum(per_position * (params.max_tokens + (length if echo else 0)) for length in prompt_lengths)
        if cost > self.max_request_tokens:
            raise too_costly(cost, self.max_request_tokens)

    # ---- text <-> tokens ------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The text of one token (cached; what logprobs report)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return piece

    async def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a text or token-id prompt, checked against the vocabulary and the context length."""
        return await asyncio.to_thread(self._prompt_ids, prompt, param)

    def _prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self._encode_within_context(prompt, True, param)
        else:
            self.check_token_ids(prompt, param)
            ids = self._within_context(list(prompt), param)
        if not ids:
            raise bad_request(f"{param} is empty", param=param)
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _encode_within_context(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of `text`, refused over the context length. A long text's prefix is tokenised first: when it
        alone overflows (with a margin for the cut), so does the text, which then is not tokenised in full."""
        cut = (self.max_model_len + CUT_MARGIN) * PREFIX_CHARS_PER_TOKEN
        if len(text) > cut:
            head = self._encode(text[:cut], add_special_tokens)
            if len(head) > self.max_model_len + CUT_MARGIN:
                raise self._too_long(param, f"more than {len(head)}")
        return self._within_context(self._encode(text, add_special_tokens), param)

    def _within_context(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.max_model_len:
            raise self._too_long(param, str(len(ids)))
        return ids

    def _too_long(self, param: str, tokens: str) -> APIError:
        return bad_request(f"{param} has {tokens} tokens, more than this model's context length {self.max_model_len}",
                           param=param, code="context_length_exceeded")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self._encode, text, add_special_tokens)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        return await asyncio.to_thread(lambda: [self.token_text(t) for t in token_ids])

    async def decode(self, token_ids: list[int], param: str = "tokens") -> str:
        self.check_token_ids(token_ids, param)
        return await asyncio.to_thread(self.tokenizer.decode, token_ids)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}", param=param)

    async def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True, within_context: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template (checked against the
        context length unless `within_context` is False)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        return await asyncio.to_thread(self._chat_prompt, messages, add_generation_prompt, within_context)

    def _chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, within_context: bool) -> list[int]:
        rendered = [
            {"role": m.role, "content": m.text}
            | {key: value for key, value in (("name", m.name), ("tool_calls", m.tool_calls),
                                             ("tool_call_id", m.tool_call_id)) if value}
            for m in messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as error:  # a template is code of its own: whatever it raises on these messages
            raise bad_request(f"the chat template rejected these messages: {error}", param="messages") from None
        # The template writes the special tokens itself (as apply_chat_template's own tokenising assumes).
        if within_context:
            return self._encode_within_context(text, False, "messages")
        return self._encode(text, False)
