"""Engine log-probabilities in the OpenAI shapes: legacy completions and chat `logprobs.content`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hyla.runtime.outputs import TokenLogprobs
from hyla.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

TokenText = Callable[[int], str]


def by_rank(entry: TokenLogprobs) -> list[tuple[int, float]]:
    """(token id, logprob) pairs of one position, most likely first."""
    return [(tid, lp) for tid, (lp, _rank) in sorted(entry.items(), key=lambda item: item[1][1])]


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], text: TokenText, offset: int = 0
) -> CompletionLogprobs:
    """`tokens`, `token_logprobs` (None where the engine has none: the first prompt token), `top_logprobs`
    (dicts, the actual token included) and `text_offset` (characters into the returned text, from `offset`)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for tid, entry in zip(token_ids, entries, strict=True):
        piece = text(tid)
        tokens.append(piece)
        text_offset.append(offset)
        offset += len(piece)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry[tid][0])
        top_logprobs.append({text(t): lp for t, lp in by_rank(entry)})
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=text_offset
    )


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs], text: TokenText, top: int) -> ChatLogprobs:
    """`content`: one item a generated token with its `top` best alternatives."""

    def item(tid: int, lp: float) -> TopLogprob:
        piece = text(tid)
        return TopLogprob(token=piece, logprob=lp, bytes=list(piece.encode()))

    content = []
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = item(tid, entry[tid][0])
        alternatives = [item(t, lp) for t, lp in by_rank(entry)[:top]]
        content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)
