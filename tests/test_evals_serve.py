"""lm-eval in-process vs. through `hyla serve`, and `hyla bench serve`, against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyla.cli import app
from tests.tiny_models import tiny_teacher_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny") / "model")


def _serve(model_dir: Path):
    """`hyla serve` on ephemeral HTTP and gRPC ports; yields (http base URL, grpc target)."""
    cmd = [sys.executable, "-m", "hyla", "serve", str(model_dir), "--port", "0", "--grpc-port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    http = grpc = None
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline and not (http and grpc):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(r"HTTP \(OpenAI-compatible\)\s+(http://[\d.]+:\d+)/v1", line):
            http = m.group(1)
        if m := re.search(r"gRPC hyla\.v1\.Generation\s+([\d.]+:\d+)", line):
            grpc = m.group(1)
    if not (http and grpc):
        proc.kill()
        pytest.fail("hyla serve did not start:\n" + "".join(lines))
    yield http, grpc
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_dir: Path):
    yield from _serve(tiny_dir)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory):
    from hyla.evals.prepare import prepare_data

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLA_CACHE", str(tmp_path_factory.mktemp("cache")))
        prepare_data(["arc_easy", "lambada_openai", "winogrande"], fetch=False, quiet=True)
        yield


def test_in_process_and_served_lm_eval_agree(tiny_dir: Path, server, local_data) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hyla.evals.lm_eval_model import HylaLM
    from hyla.evals.tasks import TASKS_DIR

    tasks = ["arc_easy", "lambada_openai", "winogrande"]

    def scores(model, **kwargs) -> dict:
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=model, tasks=tasks, limit=6, task_manager=manager, bootstrap_iters=0, log_samples=False, **kwargs
        )["results"]
        return {t: {k: v for k, v in out[t].items() if "," in k and "stderr" not in k} for t in tasks}

    in_process = scores(HylaLM(pretrained=str(tiny_dir)))
    served = scores("local-completions", model_args={
        "base_url": f"{server[0]}/v1/completions", "model": str(tiny_dir), "tokenizer": str(tiny_dir),
        "tokenizer_backend": "huggingface", "max_length": 512, "num_concurrent": 1,
    })
    assert set(in_process["lambada_openai"]) == {"acc,none", "perplexity,none"}
    assert in_process == served


def _bench(*args: str):
    return CliRunner().invoke(app, ["bench", "serve", "-q", "--prompt-len", "24", "--output-len", "8", *args])


def test_bench_serve_http_three_levels(server, tmp_path: Path) -> None:
    result = _bench("--url", server[0], "--concurrency", "1,2,4", "--num-requests", "6", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["workload"]["concurrency"] for r in report["runs"]] == [1, 2, 4]
    for run in report["runs"]:
        assert run["errors"] == {} and run["completed"] == 6
        assert run["output_tokens"] > 6 and run["ttft_ms"]["p50"] > 0 and run["tpot_ms"]["p99"] is not None
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert result.output.count("| concurrency") == 3


def test_bench_serve_grpc_and_poisson(server, tmp_path: Path) -> None:
    result = _bench("--grpc", server[1], "--rate", "8", "--num-requests", "4", "--warmup", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["errors"] == {} and run["completed"] == 4 and run["output_tokens"] >= 4


def test_bench_serve_shared_prefix_chats_report_the_hit_rate(server, tmp_path: Path) -> None:
    result = _bench("--url", server[0], "--concurrency", "2", "--num-requests", "4", "--warmup", "0",
                    "--shared-prefix-len", "80", "--turns", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["errors"] == {} and run["completed"] == 8  # 4 conversations of 2 turns
    assert 0.3 < run["prefix_cache_hit_rate"] < 1
    assert run["shared_prefix_tokens"] > 80 and 0 <= run["shared_prefix_hit_rate"] <= 1
    assert "| cached | prefix cached |" in result.output


@pytest.mark.parametrize("front", ["url", "grpc"])
def test_bench_serve_reports_what_the_server_said_of_refused_requests(server, tmp_path: Path, front: str) -> None:
    target = server[0] if front == "url" else server[1]
    result = _bench(f"--{front}", target, "--concurrency", "2", "--num-requests", "3", "--warmup", "0",
                    "--prompt-len", "3000", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    kind = "http_400" if front == "url" else "grpc_invalid_argument"
    assert run["errors"] == {kind: 3} and run["completed"] == 0
    assert "context length" in run["error_messages"][kind]
    assert f"{kind}: {run['error_messages'][kind]}" in result.output


def test_bench_serve_wrong_url_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    result = _bench("--url", "http://127.0.0.1:9", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "cannot reach http://127.0.0.1:9" in result.output
    assert time.monotonic() - start < 20 and not (tmp_path / "results.json").exists()


def test_bench_serve_counts_tokens_whose_text_is_empty(tmp_path: Path) -> None:
    """A model that only ever draws a special token (its final norm zeroed: every logit 0, token 0 is
    `<|endoftext|>`) streams chunks of empty text: each is a token, timed, and no request is an error."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_teacher_dir(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(model_dir)
    for http, grpc in _serve(model_dir):
        for front, target in (("url", http), ("grpc", grpc)):
            result = _bench(f"--{front}", target, "--concurrency", "2", "--num-requests", "4", "--warmup", "0",
                            "--len-spread", "0", "--out", str(tmp_path / front))
            assert result.exit_code == 0, result.output
            run = json.loads((tmp_path / front / "results.json").read_text())["runs"][0]
            assert run["errors"] == {} and run["completed"] == 4, front
            assert run["output_tokens"] == 4 * 8 and run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["p50"] is not None
