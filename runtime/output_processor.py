"""`OutputProcessor`: what happens to a sequence after the model ran — prompt log-probabilities,
new tokens, stop conditions, text — and the `RequestOutput`s the engine streams back."""

from __future__ import annotations

import time

from hyla.runtime.detokenizer import IncrementalDetokenizer
from hyla.runtime.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from hyla.runtime.request import Request, Sequence


class OutputProcessor:
    """Applies sampled tokens to sequences and reports what changed."""

    def __init__(self, eos_ids: set[int], max_model_len: int) -> None:
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.generation_tokens = 0

    def prompt_logprobs(self, request: Request, start: int, rows: list[int], entries: list[TokenLogprobs]) -> None:
        """Record the entries scored at chunk-relative `rows` of a chunk at `start` (each for the
        prompt token after its row) that extend the request's prompt log-probabilities."""
        for row, entry in zip(rows, entries, strict=True):
            pos = start + row
            if pos + 1 < request.num_prompt_tokens and pos + 1 == len(request.prompt_logprobs):
                request.prompt_logprobs.append(entry)

    def append(self, seq: Sequence, token: int, entry: TokenLogprobs | None) -> bool:
        """Add a generated token; True if it finished the sequence (the caller frees its cache)."""
        params = seq.request.params
        seq.token_ids.append(token)
        self.generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(entry)
        if token in params.stop_token_ids:
            return self.finish(seq, "stop", token)
        if token in self.eos_ids and not params.ignore_eos:
            return self.finish(seq, "stop")
        if seq.detokenizer is not None:
            stop = seq.detokenizer.add(token)
            if stop is not None:
                return self.finish(seq, "stop", stop)
        if len(seq.output_ids) >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return self.finish(seq, "length")
        return False

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> bool:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.flush()
        if all(s.finished for s in seq.request.seqs):
            seq.request.finished_time = time.monotonic()
        return True

    def output(self, request: Request) -> RequestOutput:
        """The request's state now; each completion's deltas cover what was not reported before."""
        completions = [self._completion(seq) for seq in request.seqs]
        completions += [  # n > 1 with max_tokens 0 (or a failure before the fork): siblings never ran
            CompletionOutput(index=i, logprobs=completions[0].logprobs, finish_reason=completions[0].finish_reason)
            for i in range(len(completions), request.params.n)
        ]
        metrics = {"arrival": request.arrival}
        if request.first_token_time is not None:
            metrics["first_token"] = request.first_token_time
        if request.finished_time is not None:
            metrics["finished"] = request.finished_time
        done = request.prompt_logprobs is not None and len(request.prompt_logprobs) == request.num_prompt_tokens
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,  # shared, not copied: read-only for consumers
            outputs=completions,
            prompt_logprobs=list(request.prompt_logprobs) if done else None,
            finished=request.finished,
            metrics=metrics,
            error=request.error,
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    @staticmethod
    def _completion(seq: Sequence) -> CompletionOutput:
        ids = seq.output_ids
        text = seq.detokenizer.visible(seq.finished) if seq.detokenizer is not None else ""
        out = CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=ids,
            text_delta=text[seq.sent_text :],
            token_ids_delta=ids[seq.sent_tokens :],
            logprobs=None if seq.logprobs is None else list(seq.logprobs),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        seq.sent_tokens, seq.sent_text = len(ids), len(text)
        return out


def new_detokenizer(tokenizer, request: Request) -> IncrementalDetokenizer | None:
    """A detokenizer for one continuation of `request`, or None without a tokenizer."""
    if tokenizer is None:
        return None
    params = request.params
    return IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens, params.stop)
