"""Recall probes: reproducible, within the length budget, with the answer actually in the haystack."""

from __future__ import annotations

import pytest

from hyla.evals.recall import PROBES, default_lengths, make_sample, make_samples, summarize
from hyla.runtime.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("length", [512, 1024])
def test_samples_fit_and_hold_the_answer(tokenizer, probe: str, length: int) -> None:
    sample = make_sample(probe, length, 3, tokenizer, seed=7)
    n = len(tokenizer.encode(sample.prompt, add_special_tokens=False))
    assert length - 200 < n <= length - 48
    body = sample.prompt[: sample.prompt.rindex("\n")]
    assert all(a in body for a in sample.answers)
    assert sample.score(" ".join(sample.answers)) == 1.0 and sample.score("nothing") == 0.0


def test_seeded_and_distinct(tokenizer) -> None:
    a = make_samples(PROBES, [512], 2, tokenizer, seed=1)
    b = make_samples(PROBES, [512], 2, tokenizer, seed=1)
    c = make_samples(PROBES, [512], 2, tokenizer, seed=2)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, c))
    assert len({s.prompt for s in a}) == len(a)


def test_lengths_and_summary() -> None:
    assert default_lengths(8192) == [512, 1024, 2048, 4096, 8192]
    assert default_lengths(700) == [512]
    with pytest.raises(ValueError, match="unknown recall probe"):
        make_sample("nope", 512, 0, None)


def test_summary_groups_by_probe_and_length(tokenizer) -> None:
    samples = make_samples(["niah_single"], [512, 1024], 2, tokenizer)
    table = summarize(samples, [1.0, 0.0, 1.0, 1.0])
    assert table == {"niah_single": {512: 0.5, 1024: 1.0}}


def test_lm_eval_recall_task_data() -> None:
    import importlib.util

    from hyla.evals.tasks import TASKS_DIR

    spec = importlib.util.spec_from_file_location("recall_loaders", TASKS_DIR / "loaders.py")
    loaders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaders)
    data = loaders.recall("niah_multikey", pretrained="smollm2-135m", max_seq_lengths=[512, 1024], num_samples=2)
    docs = list(data["test"])
    assert [d["length"] for d in docs] == [512, 512, 1024, 1024]
    result = loaders.recall_results(docs[2], [f"is {docs[2]['answers'][0]}."])
    assert result["score"] == 1.0 and result["len_1024"] == 1.0 and result["len_512"] == -1.0
    assert loaders.mean_present([1.0, -1.0, 0.0]) == 0.5 and loaders.mean_present([-1.0]) == -1.0
    with pytest.raises(ValueError, match="tokenizer"):
        loaders.recall("niah_single")
