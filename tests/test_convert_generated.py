"""A corpus sampled from the teacher by the engine: resumable, de-duplicated, kept out of held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyla.convert.data import prepare_blocks
from hyla.convert.generated import (
    META, SAMPLES, GeneratedCorpus, SamplingPlan, distinct_4gram_share, document_id, engine_sampler, read_samples,
)
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from tests.test_convert_helpers import copy_corpus, single_thread, teacher_dir
from tests.test_load_errors import hyla
from tests.tiny_models import tiny_tokenizer

PLAN = dict(teacher="tiny", prompt_tokens=8, max_new_tokens=24, round_size=4, seed=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teacher_dir(tmp_path_factory.mktemp("gen") / "teacher")


@pytest.fixture(scope="module")
def engine(teacher: Path) -> LLMEngine:
    config = EngineConfig(model=str(teacher), max_num_seqs=4, max_model_len=64, cache_memory="64MiB")
    return LLMEngine.from_config(config)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [f"story {i}: " + "the cat sat on the mat and looked at the dog. " * (2 + i % 3) for i in range(12)]


def build(folder: Path, tokens: int, engine: LLMEngine, docs: list[str]) -> GeneratedCorpus:
    corpus = GeneratedCorpus(folder, SamplingPlan(tokens=tokens, **PLAN))
    with single_thread():
        corpus.build(docs, engine.tokenizer, engine_sampler(engine))
    return corpus


def test_a_resumed_corpus_equals_one_made_at_once(tmp_path: Path, engine: LLMEngine, docs: list[str]) -> None:
    part = build(tmp_path / "a", 150, engine, docs)
    assert part.done and part.meta["rounds"] >= 1
    grown = build(tmp_path / "a", 400, engine, docs)  # a larger target resumes from the last round
    whole = build(tmp_path / "b", 400, engine, docs)
    assert grown.meta == whole.meta and grown.meta["tokens"] >= 400
    assert (tmp_path / "a" / SAMPLES).read_text() == (tmp_path / "b" / SAMPLES).read_text()
    rows = list(read_samples(tmp_path / "a"))
    assert len(rows) == whole.meta["samples"] and len({r["text"] for r in rows}) == len(rows)
    by_id = {document_id(d): d for d in docs}
    assert all(r["text"][:8] in by_id[r["source"]] for r in rows)  # each sample starts inside its source


def test_a_run_killed_mid_round_drops_that_rounds_rows(tmp_path: Path, engine: LLMEngine, docs: list[str]) -> None:
    corpus = build(tmp_path, 100, engine, docs)
    meta = json.loads((tmp_path / META).read_text())
    with (tmp_path / SAMPLES).open("a") as f:
        f.write(json.dumps({"text": "half a round", "source": "x"}) + "\n")
    again = build(tmp_path, 100, engine, docs)
    assert again.meta == meta and "half a round" not in (tmp_path / SAMPLES).read_text()
    assert corpus.meta["samples"] == len(list(read_samples(tmp_path)))


def test_other_settings_need_another_folder(tmp_path: Path, engine: LLMEngine, docs: list[str]) -> None:
    build(tmp_path, 50, engine, docs)
    with pytest.raises(ValueError, match="other settings"):
        GeneratedCorpus(tmp_path, SamplingPlan(tokens=50, **{**PLAN, "temperature": 0.5}))


def test_degenerate_and_repeated_samples_are_dropped(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    loop = tok("ab ab ab ab ab ab ab ab ab ab ab ab", add_special_tokens=False)["input_ids"]
    assert distinct_4gram_share(loop) < 0.3
    fresh = iter(range(10_000))

    def generate(prompts, plan, seed):  # per round: a loop, the same continuation as always, new ones
        return [loop, [5, 6, 7, 8, 9]] + [[next(fresh) % 200 + 3 for _ in range(8)] for _ in prompts[2:]]

    doc = tok.decode(list(range(20, 28)))  # one document of exactly one prompt: every prompt is the same
    corpus = GeneratedCorpus(tmp_path, SamplingPlan(tokens=100, **{**PLAN, "round_size": 4}))
    corpus.build([doc], tok, generate)
    texts = [r["text"] for r in read_samples(tmp_path)]
    rounds = corpus.meta["rounds"]
    assert rounds > 1 and len(texts) == len(set(texts)) == 1 + 2 * rounds
    assert corpus.meta["dropped"] == rounds + rounds - 1


def test_samples_join_training_only_and_never_from_heldout_documents(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HYLA_CACHE", str(tmp_path / "cache"))
    spec = str(copy_corpus(tmp_path / "real.txt", docs=60))
    tok = tiny_tokenizer()
    real = prepare_blocks(spec, tok, 32, 256, 10_000, seed=0)
    documents = [d.strip() for d in (tmp_path / "real.txt").read_text().split("\n\n")]  # as data.py reads them
    folder = tmp_path / "gen"
    folder.mkdir()
    rows = [{"text": f"generated sample {i} zzz qqq", "source": document_id(d)} for i, d in enumerate(documents)]
    (folder / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / META).write_text(json.dumps({"plan": {}, "rounds": 1, "samples": len(rows), "tokens": 0, "dropped": 0}))
    mixed = prepare_blocks(spec, tok, 32, 256, 10_000, seed=0, extra=str(folder))
    assert torch.equal(mixed.heldout, real.heldout)
    assert mixed.train.shape[0] > real.train.shape[0]
    assert 0 < mixed.meta["extra_left_out"] < len(rows)
    assert mixed.meta["extra_samples"] + mixed.meta["extra_left_out"] == len(rows)
    train_text = tok.decode(mixed.train.flatten())
    kept = {int(w.split()[0]) for w in train_text.split("generated sample ")[1:]}
    held_text = tok.decode(real.heldout.flatten())
    left_out = {i for i, d in enumerate(documents) if d.split(" | ")[0] in held_text}
    assert left_out and not kept & left_out
    with pytest.raises(FileNotFoundError, match="hyla corpus"):
        prepare_blocks(spec, tok, 32, 256, 10_000, seed=0, extra=str(tmp_path))


def test_cli_samples_a_corpus_and_reuses_it(tmp_path: Path, teacher: Path) -> None:
    spec = str(copy_corpus(tmp_path / "real.txt", docs=20))
    args = ["corpus", "--teacher", str(teacher), "--tokens", "120", "--data", spec, "--out", str(tmp_path / "c"),
            "--prompt-tokens", "8", "--max-new-tokens", "16", "--round-size", "4", "--quiet"]
    first = hyla(*args, OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stderr
    assert "samples" in first.stdout and first.stderr.strip() == ""
    meta = json.loads((tmp_path / "c" / META).read_text())
    assert meta["tokens"] >= 120 and meta["plan"]["data"] == spec
    again = hyla(*args)
    assert again.returncode == 0 and again.stdout == first.stdout
    bad = hyla(*args[:-1], "--temperature", "0.3")
    assert bad.returncode == 2 and "other settings" in bad.stderr
