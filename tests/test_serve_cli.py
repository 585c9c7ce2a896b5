"""`hyla serve` as a user runs it: a subprocess that prints working curl and gRPC examples and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from hyla.cli import app
from tests.tiny_models import tiny_teacher_dir

KEY = "cli-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tiny_teacher_dir(tmp_path_factory.mktemp("tiny"))


def read_banner(process: subprocess.Popen, timeout: float = 120) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"server exited early:\n{''.join(lines)}")
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C or SIGTERM"):
            return lines
    raise AssertionError("no banner")


def test_serve_prints_working_examples_and_drains_on_sigterm(model_dir):
    env = os.environ | {"HYLA_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "hyla", "serve", str(model_dir), "--port", "0", "--grpc-port", "0",
         "--served-model-name", "tiny", "--cache-memory", "64MiB", "--max-num-seqs", "4", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        banner = read_banner(process)
        text = "\n".join(banner)
        assert "KV blocks" in text  # the engine's capacity report
        curl = next(line.strip() for line in banner if line.strip().startswith("curl "))
        grpc_example = next(line.strip() for line in banner if line.strip().startswith("python -m hyla.serve.grpc_client"))
        assert any(line.strip().startswith("grpcurl ") for line in banner)

        reply = json.loads(subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, check=True).stdout)
        assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 16
        args = shlex.split(grpc_example)
        grpc_out = subprocess.run([sys.executable, *args[1:]], env=env, capture_output=True, text=True, timeout=60)
        assert grpc_out.returncode == 0, grpc_out.stderr
        assert grpc_out.stdout.strip() == reply["choices"][0]["text"].strip()  # both greedy, same prompt

        base = re.search(r"(http://\S+)/v1", curl).group(1)
        streamed: list[str] = []

        def long_stream() -> None:
            body = {"prompt": "A long story", "max_tokens": 120, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:
                streamed.extend(line for line in response.iter_lines() if line.startswith("data: "))

        reader = threading.Thread(target=long_stream)
        reader.start()
        time.sleep(1.0)  # in flight
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert process.wait(60) == 0, process.stderr.read()
        assert streamed[-1] == "data: [DONE]" and len(streamed) > 100  # drained to the end, not cut off
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_help():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})  # rich reads the width from COLUMNS
    assert result.exit_code == 0
    for option in ("--port", "--grpc-port", "--api-key", "--served-model-name", "--max-model-len", "--cache-memory",
                   "--enable-prefix-caching", "--no-enable-prefix-caching", "--prefix-checkpoint-interval"):
        assert option in result.output
