"""`hyla eval prepare-data`: every benchmark extracted offline with its published item count."""

from __future__ import annotations

import pytest

from hyla.evals.data import BENCHMARKS, data_file, read_docs
from hyla.evals.prepare import ensure_data, prepare_data
from hyla.evals.tasks import TASKS_DIR

PUBLISHED = {
    "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267,
    "boolq": 3270, "lambada_openai": 5153, "mmlu": 14042, "sciq": 1000, "openbookqa": 500,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield prepare_data(fetch=False, quiet=True)


def test_every_benchmark_has_its_published_size(prepared: dict[str, int]) -> None:
    assert prepared == PUBLISHED
    for name, size in PUBLISHED.items():
        with data_file(name).open() as f:
            assert sum(1 for _ in f) == size


def test_documents_are_normalised(prepared: dict[str, int]) -> None:
    assert {d["label"] for d in read_docs("boolq")} == {0, 1}  # Google BoolQ: bool answers
    hella = read_docs("hellaswag")[0]
    assert len(hella["choices"]) == 4 and 0 <= hella["label"] < 4 and "[" not in hella["query"]
    arc = read_docs("arc_easy")
    assert all(0 <= d["label"] < len(d["choices"]) for d in arc) and not arc[0]["question"].startswith("Question:")
    wino = read_docs("winogrande")[0]
    assert len(wino["contexts"]) == 2 and wino["contexts"][0] != wino["contexts"][1] and wino["label"] in (0, 1)
    assert "_" not in wino["contexts"][0] + wino["continuation"]
    assert len({d["subject"] for d in read_docs("mmlu")}) == 57
    assert all(len(d["text"].split(" ")) > 1 for d in read_docs("lambada_openai")[:100])


def test_existing_files_are_kept_and_bad_names_rejected(prepared: dict[str, int]) -> None:
    path = data_file("sciq")
    stamp = path.stat().st_mtime_ns
    assert prepare_data(["sciq"], fetch=False, quiet=True) == {"sciq": 1000}
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown benchmark"):
        prepare_data(["nope"], fetch=False)


def test_task_yamls_build_standard_prompts(prepared: dict[str, int]) -> None:
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(list(BENCHMARKS))["tasks"]
    assert set(tasks) == set(BENCHMARKS)
    for name, task in tasks.items():
        assert len(task.eval_docs) == PUBLISHED[name]
    tasks["arc_easy"].build_all_requests(limit=1, rank=0, world_size=1)
    context, continuation = tasks["arc_easy"].instances[0].args
    assert context.startswith("Question: ") and context.endswith("\nAnswer:") and continuation.startswith(" ")
    tasks["lambada_openai"].build_all_requests(limit=1, rank=0, world_size=1)
    context, target = tasks["lambada_openai"].instances[0].args
    assert target == " " + read_docs("lambada_openai")[0]["text"].split(" ")[-1]


def test_missing_data_is_extracted_on_first_use(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYLA_CACHE", str(tmp_path))
    assert not data_file("openbookqa").is_file()
    assert ensure_data(["openbookqa", "niah_single"]) == ["openbookqa"]
    assert len(read_docs("openbookqa")) == PUBLISHED["openbookqa"]
    assert ensure_data(["openbookqa"]) == []
