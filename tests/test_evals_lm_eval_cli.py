"""lm-eval's own CLI with the in-process `hyla` model type, as the evals README runs it, on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_teacher_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hyla.evals.prepare import prepare_data

    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLA_CACHE", str(root))
        prepare_data(["arc_easy"], fetch=False, quiet=True)
    return root


def test_readme_command_runs_on_cpu(tiny_dir: Path, cache: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "hyla.evals", "run", "--model", "hyla",
        "--model_args", f"pretrained={tiny_dir},dtype=float32,device=cpu,max_num_batched_tokens=2048",
        "--tasks", "arc_easy", "--limit", "4", "--batch_size", "4", "--output_path", str(tmp_path),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HYLA_CACHE": str(cache)}, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not a git repository" not in done.stderr
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]["arc_easy"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_lm_eval_default_device_falls_back_to_cpu(tiny_dir: Path) -> None:
    from hyla.evals.lm_eval_model import HylaLM

    lm = HylaLM.create_from_arg_string(f"pretrained={tiny_dir}", {"device": "cuda:0", "batch_size": 2})
    assert lm.engine.config.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert lm.engine.config.max_num_seqs == 2
    explicit = HylaLM.create_from_arg_string(f"pretrained={tiny_dir},device=cpu", {"device": "cuda:0"})
    assert explicit.engine.config.device == "cpu"


def test_hyla_eval_run_outside_a_git_repository_prints_no_git_error_or_lm_eval_cli_advice(
    tiny_dir: Path, cache: Path, tmp_path: Path
) -> None:
    cmd = [sys.executable, "-m", "hyla", "eval", "run", str(tiny_dir), "--tasks", "arc_easy", "--limit", "4",
           "--enforce-eager", "--output", str(tmp_path / "out.json")]
    env = {**os.environ, "HYLA_CACHE": str(cache)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not a git repository" not in done.stderr + done.stdout
    assert "--metadata" not in done.stderr + done.stdout  # lm-eval's advice for its own command line
    assert "arc_easy" in json.loads((tmp_path / "out.json").read_text())["results"]
    assert re.search(r"model loaded in \d+\.\d s, tasks evaluated in \d+\.\d s", done.stdout)
