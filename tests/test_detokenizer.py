"""Incremental detokenisation: multi-byte characters split across byte-level tokens, and stop strings."""

from __future__ import annotations

import pytest

from hyla.runtime.detokenizer import IncrementalDetokenizer
from tests.tiny_models import tiny_tokenizer

TEXT = "Hi 🙂 there, café 日本語 and 🚀!"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Texts visible after each token."""
    seen = []
    for t in ids:
        if detok.add(t) is not None:
            break
        seen.append(detok.visible(False))
    return seen


def test_multibyte_characters_are_never_split(tok) -> None:
    ids = tok(TEXT)["input_ids"]
    emoji = tok("🙂")["input_ids"]
    assert len(emoji) > 1  # the emoji spans several byte tokens
    prompt = tok("Prompt:")["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    seen = feed(detok, ids)
    assert detok.text == TEXT == tok.decode(ids)
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows


def test_truncated_character_is_flushed_at_the_end(tok) -> None:
    ids = tok("ok 🙂")["input_ids"][:-1]
    detok = IncrementalDetokenizer(tok, [])
    feed(detok, ids)
    assert detok.text.startswith("ok") and "\ufffd" not in detok.text
    detok.flush()
    assert detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")


def test_stop_string_across_tokens_ends_the_text(tok) -> None:
    ids = tok("one two three four")["input_ids"]
    detok = IncrementalDetokenizer(tok, [], stop=["o th", "zzz"])
    seen = []
    stopped = None
    for t in ids:
        stopped = detok.add(t)
        seen.append(detok.visible(False))
        if stopped:
            break
    assert stopped == "o th" and detok.text == "one tw" and detok.visible(False) == "one tw"
    # while running, a tail that could begin a stop string is held back
    assert all(not s.endswith("o t") and "o th" not in s for s in seen)


def test_skip_special_tokens(tok) -> None:
    ids = tok("hello")["input_ids"] + [tok.eos_token_id]
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    feed(kept, ids)
    feed(skipped, ids)
    assert skipped.text == "hello" and kept.text == "hello</s>"


def test_a_bpe_tokenizer_asking_for_clean_up_decodes_as_is_without_warning(capfd) -> None:
    """SmolLM2's config asks for `clean_up_tokenization_spaces`, which its BPE tokenizer ignores with
    a warning on the first decode; the loaded tokenizer has it off, so text and silence agree."""
    from hyla.runtime.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    assert tok.clean_up_tokenization_spaces is False
    text = "Hello , world ! It 's here ."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert "clean_up_tokenization_spaces" not in capfd.readouterr().err
