"""What each engine step added to each continuation of one request: the one place streams are cut into deltas
(SSE for completions and chat, the gRPC stream)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyla.runtime.outputs import CompletionOutput, RequestOutput, TokenLogprobs


@dataclass
class ChoiceDelta:
    """New text, token ids and their logprob entries (empty without logprobs) of one continuation."""

    out: CompletionOutput
    first: bool
    token_ids: list[int]
    logprobs: list[TokenLogprobs]

    @property
    def index(self) -> int:
        return self.out.index

    @property
    def text(self) -> str:
        return self.out.text_delta

    @property
    def finish_reason(self) -> str | None:
        return self.out.finish_reason


@dataclass
class DeltaTracker:
    """Deltas of one request's outputs, step by step: a continuation's first delta is marked `first` (even
    when empty), later ones come only when something changed, and none after it finished."""

    started: set[int] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)

    def __call__(self, output: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for out in output.outputs:
            first = out.index not in self.started
            new_ids = list(out.token_ids_delta)
            if out.index in self.finished or not (first or new_ids or out.text_delta or out.finished):
                continue
            start = len(out.token_ids) - len(new_ids)
            deltas.append(ChoiceDelta(out, first, new_ids, list(out.logprobs or [])[start : len(out.token_ids)]))
            self.started.add(out.index)
            if out.finished:
                self.finished.add(out.index)
        return deltas
