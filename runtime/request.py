"""Request and sequence state inside the engine.

A request holds one prompt and its sampling parameters; each of its `n` continuations is a
`Sequence` with its own tokens, KV block table and state slot. With `n > 1` only the first
sequence prefills the prompt; the others are forked from it once the prompt is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hyla.runtime.detokenizer import IncrementalDetokenizer
from hyla.runtime.outputs import TokenLogprobs
from hyla.runtime.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One continuation: prompt + generated tokens and where its cache lives."""

    request: Request
    index: int
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer | None
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    slot: int | None = None
    spare_slots: list[int] = field(default_factory=list)
    """Slots reserved for the siblings a not-yet-forked sequence will spawn."""
    synced_blocks: int = 0
    """Leading entries of `block_table` already written to the runner's device block table."""
    block_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the leading full blocks of `token_ids` (extended as they are needed)."""
    keep_at: int = 0
    """A position past the prefix-cache hit (and past the first block) where this prompt stops
    agreeing with cached tokens or with a request waiting behind it: a point is kept there (0: none)."""
    registered_blocks: int = 0
    """Leading blocks of `block_table` already offered to the prefix cache."""
    seed: int = 0
    """Seed of this continuation's random draws (with the position, it fixes every draw)."""
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    pending: int = 0
    """Tokens drawn on the device whose values the host does not know yet (they follow `token_ids`)."""
    input_row: int = 0
    """Row of the runner's draw buffer that holds the newest pending token."""
    final_pending: bool = False
    """The newest pending token is the last the length limits allow: nothing more is scheduled."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.pending

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def order(self) -> tuple[int, int]:
        """Scheduling priority: older requests first, then completion index."""
        return self.request.order, self.index

    @property
    def slots_needed(self) -> int:
        """State slots admission must find: the whole family before a fork, else one."""
        return self.request.params.n if self.request.needs_fork else 1


@dataclass(eq=False)
class Request:
    """A prompt, its parameters and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    order: int
    seed: int = 0
    """Seed of the request's random draws (its continuations derive theirs from it)."""
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None
    """Why the engine failed this request, if it did."""
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache when the request was first admitted."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_fork(self) -> bool:
        return self.params.n > 1 and self.params.max_tokens > 0 and not self.forked

    @property
    def finished(self) -> bool:
        return self.finished_time is not None
