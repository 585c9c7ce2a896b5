"""Incremental detokenisation with stop strings.

Text is produced token by token without re-decoding the whole output, and held back while the
last tokens end inside a multi-byte character (byte-level BPE splits emojis and CJK across tokens)
or could still grow into a stop string. A stop string ends the text before it.
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

CONTEXT_TOKENS = 6
"""Prompt tokens decoded before the output, so tokenizers that drop a leading space still see it."""
INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of one sequence's generated tokens, grown one token at a time."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self.stopped_by: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any (the text then ends before it)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(INCOMPLETE):
            return None
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._find_stop(before)

    def flush(self) -> None:
        """At the end, keep bytes still waiting for the rest of a character (as replacement chars)."""
        if self.stopped_by is None and self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            self.text += self._decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._read = len(self._ids)

    def visible(self, finished: bool) -> str:
        """Text safe to show: while running, minus a tail that may still become a stop string."""
        if finished or self.stopped_by is not None or not self._holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self._holdback)]

    def _find_stop(self, before: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        self.stopped_by = best[1]
        return best[1]
