"""`hyla bench engine` end to end on a tiny teacher saved to disk."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hyla.cli import app
from tests.tiny_models import tiny_teacher, tiny_tokenizer


def test_bench_engine_writes_throughput_and_capacity(tmp_path) -> None:
    tok = tiny_tokenizer()
    tiny_teacher("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "engine", str(tmp_path / "model"), "--batch-sizes", "1,3", "--prompt-len", "5",
        "--max-tokens", "4", "--cache-memory", "64MiB", "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["throughput"]] == [1, 3]
    assert all(r["engine_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in data["throughput"])
    teacher, hybrid = data["capacity"]
    assert teacher["layers"] == "AAAA" and hybrid["layers"].count("A") == 1
    assert hybrid["max_seqs_4096"] > teacher["max_seqs_4096"] > 0
    assert "capacity" in result.output and "engine tok/s" in result.output
