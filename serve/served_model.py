"""`ServedModel`: the async engine, its tokenizer and metrics, as both front ends use them."""

from __future__ import annotations

import time
import uuid
from typing import Any

from jinja2 import TemplateError

from hyla.runtime.async_engine import AsyncEngine
from hyla.runtime.info import layer_pattern
from hyla.runtime.sampling_params import SamplingParams
from hyla.serve.engine_request import EngineRequest
from hyla.serve.errors import bad_request, model_not_found, shutting_down
from hyla.serve.metrics import ServerMetrics
from hyla.serve.protocol import ChatMessage


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServedModel:
    """One model under one name; `accepting` turns False while the server drains."""

    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.name = name
        self.max_model_len: int = engine.engine.max_model_len
        self.config = engine.engine.model.config
        self.vocab_size: int = self.config.vocab_size
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.stats)
        self.accepting = True
        self._pieces: dict[int, str] = {}

    @property
    def layer_types(self) -> str:
        return layer_pattern(self.config)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise model_not_found(model, self.name)

    def request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, param: str | None = "prompt"
    ) -> EngineRequest:
        if not self.accepting:
            raise shutting_down()
        return EngineRequest(self.engine, self.metrics, prompt, params, request_id, param)

    @staticmethod
    def sampling_params(**fields: Any) -> SamplingParams:
        try:
            return SamplingParams(**fields)
        except ValueError as error:
            param = str(error).split(" ", 1)[0]
            raise bad_request(str(error), param=param if param in fields else None) from None

    # ---- text <-> tokens ------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The text of one token (cached; what logprobs report)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return piece

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int], param: str = "tokens") -> str:
        self.check_token_ids(token_ids, param)
        return self.tokenizer.decode(token_ids)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}", param=param)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        rendered = [
            {"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
             else "\n".join(part.text for part in m.content)}
            | ({"name": m.name} if m.name else {})
            for m in messages
        ]
        try:
            encoded = self.tokenizer.apply_chat_template(
                rendered, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )
        except TemplateError as error:
            raise bad_request(f"the chat template rejected these messages: {error}", param="messages") from None
        return list(encoded["input_ids"])
