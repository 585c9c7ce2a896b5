"""Benchmark scripts end to end on the CPU: their tables and JSON (the speeds themselves are not judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyla.runtime.ops import cpu_kernels

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "train_step.py"


def test_train_step_benchmark_reports_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--softmax-layers", "1", "--device", "cpu", "--batch", "2",
           "--seq-len", "32", "--steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fla | pytorch |" in done.stdout and "fla / pytorch:" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"fla", "pytorch"}
    for row in results.values():
        assert row["mixer_kernels"] == "pytorch" and not row["graphed"] and row["tokens_per_s"] > 0


def test_train_step_benchmark_refuses_a_student_without_linear_layers(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--softmax-layers", "4", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--softmax-layers must be between 1 and 3" in done.stderr


def _prefill_kernel() -> bool:
    with torch.no_grad():
        return cpu_kernels.prefill_supported(torch.zeros(1, 9, 64, dtype=torch.bfloat16))


@pytest.mark.skipif(not _prefill_kernel(), reason="needs the CPU kernels with AVX512-BF16")
def test_cpu_prefill_attention_benchmark_times_every_case(tmp_path: Path) -> None:
    out = tmp_path / "cpa.json"
    cmd = [sys.executable, str(BENCHMARKS / "cpu_prefill_attention.py"), "--reps", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and all(r["ms"] > 0 and r["gflop_s"] > 0 for r in rows)
    assert "| 8 | 64 | 1347 |" in done.stdout


def test_prefix_eval_benchmark_compares_caching_on_and_off(tmp_path: Path) -> None:
    from tests.tiny_models import tiny_teacher_dir

    model = tiny_teacher_dir(tmp_path / "tiny")
    out = tmp_path / "prefix_eval.json"
    cmd = [sys.executable, str(BENCHMARKS / "prefix_eval.py"), str(model), "--limit", "12", "--repeats", "1",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "off / on (medians):" in done.stdout and "scores identical in every run: hellaswag/acc " in done.stdout
    report = json.loads(out.read_text())
    on, off = report["runs"]
    assert (on["caching"], off["caching"]) == ("on", "off") and report["scores_identical"]
    assert 0 < on["computed_tokens"] < off["computed_tokens"]  # a context is computed once for its endings
    assert all(r["wall_s"] >= r["imports_s"] + r["load_s"] + r["tasks_s"] and r["steps"] > 0 for r in (on, off))
