"""What the engine streams back for a request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# One position's log-probabilities: token id -> (logprob, rank among the vocabulary (1 = best)).
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class CompletionOutput:
    """One of the `n` continuations of a request, cumulative so far.

    `text` / `token_ids` hold everything generated up to now; `text_delta` / `token_ids_delta`
    what this engine step added. `finish_reason` is None while running, then "stop" (EOS, stop
    token or stop string), "length" (max_tokens or the context limit) or "abort" (also when the
    engine failed the request: `RequestOutput.error` then says why).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after an engine step; `finished` once every continuation is."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    """arrival / first_token / finished timestamps (time.monotonic()) for latency metrics."""
    error: str | None = None
    """Set when the engine failed this request (it is finished, its cache freed; others carry on)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache instead of computed."""


def coalesced(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer`, a later step's output of the same request, with each continuation's deltas joined to
    `older`'s: one output for the steps a slow consumer had not taken yet."""
    before = {c.index: c for c in older.outputs}
    outputs = []
    for c in newer.outputs:
        o = before.get(c.index)
        if o is not None:
            c = replace(c, text_delta=o.text_delta + c.text_delta, token_ids_delta=o.token_ids_delta + c.token_ids_delta)
        outputs.append(c)
    return replace(newer, outputs=outputs)
