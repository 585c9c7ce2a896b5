"""`benchmarks/train_step.py` end to end on the CPU (a tiny shape): both backends' rows and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_reports_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--softmax-layers", "1", "--device", "cpu", "--batch", "2",
           "--seq-len", "32", "--steps", "2", "--warmup", "1", "--out", str(out)]
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
