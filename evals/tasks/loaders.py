"""Dataset loaders the task YAMLs call through `custom_dataset: !function loaders.<name>`."""

from __future__ import annotations

from typing import Any

import datasets

from hyla.evals.data import read_docs


def benchmark(task: str, **_: Any) -> datasets.DatasetDict:
    """A locally extracted benchmark as a one-split (`test`) DatasetDict."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_docs(task))})


RECALL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def recall(
    probe: str,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    max_seq_lengths: list[int] | None = None,
    num_samples: int = 20,
    seed: int = 0,
    **_: Any,
) -> datasets.DatasetDict:
    """Synthetic recall samples; lengths are counted in the tokens of `tokenizer` (or `pretrained`'s)."""
    from hyla.evals.recall import make_samples
    from hyla.runtime.loading import load_tokenizer

    source = tokenizer or pretrained
    if source is None:
        raise ValueError("recall tasks need the tokenizer: pass metadata tokenizer=<model> (or model_args pretrained=)")
    lengths = [int(n) for n in (max_seq_lengths or [512, 1024, 2048, 4096])]
    bad = sorted(set(lengths) - set(RECALL_LENGTHS))
    if bad:
        raise ValueError(f"unsupported recall lengths {bad}; choose from {list(RECALL_LENGTHS)}")
    samples = make_samples([probe], lengths, int(num_samples), load_tokenizer(source), int(seed))
    rows = [{"prompt": s.prompt, "answers": s.answers, "length": s.length} for s in samples]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def recall_results(doc: dict, results: list[str]) -> dict[str, float]:
    """`score` (fraction of expected strings in the output) and the same under this sample's length."""
    score = sum(a in results[0] for a in doc["answers"]) / len(doc["answers"])
    per_length = {f"len_{n}": (score if n == doc["length"] else -1.0) for n in RECALL_LENGTHS}
    return {"score": score, **per_length}


def mean_present(values: list[float]) -> float:
    """Mean over the samples that ran at this length (-1 when none did)."""
    present = [v for v in values if v >= 0]
    return sum(present) / len(present) if present else -1.0
