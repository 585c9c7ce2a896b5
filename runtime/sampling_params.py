"""Per-request sampling parameters, validated at construction (bad values raise `InvalidRequest`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hyla.runtime.errors import InvalidRequest


@dataclass
class SamplingParams:
    """How to continue one prompt.

    temperature 0 (or below `GREEDY_BELOW`) means greedy. top_k 0 (or -1) and top_p 1 disable those
    filters. `seed` is any integer. `logprobs` asks for the top-N log-probabilities of every generated
    token (the sampled token always included); `prompt_logprobs` the same for every prompt token
    (first one None), or from prompt index `prompt_logprobs_from` on (earlier ones None, so a cached
    prefix before it can be reused). `max_tokens` 0 only scores the prompt. Stop strings are not included in the returned text; stop token ids are not either.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_from: int = 0
    skip_special_tokens: bool = True

    MAX_N = 16
    MAX_LOGPROBS = 20
    GREEDY_BELOW = 1e-5
    """Temperatures below this sample greedily (dividing logits by less overflows them)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
             f"seed must be an integer, got {self.seed!r}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= -1, f"top_k must be >= -1, got {self.top_k}"),
            ("n", 1 <= self.n <= self.MAX_N, f"n must be in [1, {self.MAX_N}], got {self.n}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
             f"logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            ("prompt_logprobs_from", self.prompt_logprobs_from >= 0,
             f"prompt_logprobs_from must be >= 0, got {self.prompt_logprobs_from}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidRequest(message, param)

    @property
    def greedy(self) -> bool:
        return self.temperature < self.GREEDY_BELOW
