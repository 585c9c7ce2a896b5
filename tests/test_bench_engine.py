"""`hyla bench engine` on the tiny random shape, and the floor / FLOP arithmetic against a hand count."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hyla.cli import app
from hyla.runtime.bench_floor import decode_bytes, param_counts, prefill_flops
from hyla.runtime.bench_models import bench_configs, shape_config
from tests.tiny_models import tiny_teacher, tiny_tokenizer

METRICS = ("ttft_ms", "prefill_s", "prefill_tok_s", "prefill_tflops", "prefill_mfu", "decode_step_ms",
           "decode_tok_s", "output_tok_s", "total_s", "floor_ratio")

# The tiny shape: hidden 64, 4 layers, 4 query heads, 2 KV heads, head_dim 16, intermediate 128,
# vocab 128 (tied), conv width 4. Per layer: MLP 3·64·128 and two norms of 64.
MLP_AND_NORMS = 3 * 64 * 128 + 2 * 64
ATTENTION_LAYER = 64 * 64 + 2 * (32 * 64) + 64 * 64 + MLP_AND_NORMS  # q, k, v, o
GDN_LAYER = (4 * 64 * 64 + 64 * 64  # q, k, v, g, o (K/V on every query head)
             + 3 * 64 * 4 + 16 + 2 * 4 * 64 + 2 * 4  # conv, o_norm, a/b proj, A_log + dt_bias
             + MLP_AND_NORMS)
LM_HEAD = 128 * 64


def test_bench_engine_random_shape_writes_every_field(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "engine", "--random", "tiny", "--contexts", "8,20", "--batch-sizes", "1,3", "--max-tokens", "4",
        "--dtype", "float32", "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["copy_bandwidth_gb_s"] > 0 and data["peak_tflops"] > 0
    points = data["points"]
    assert [(p["model"], p["context"], p["batch"]) for p in points] == [
        (m, c, b) for m in ("tiny teacher", "tiny hybrid") for c in (8, 20) for b in (1, 3)
    ]
    assert {p["layers"] for p in points} == {"AAAA", "DDAD"}
    for p in points:
        for runner in ("engine", "hf"):
            m = p[runner]
            assert all(m[k] > 0 for k in METRICS), (runner, m)
            assert m["decode_timing"] == "steps"
            assert m["ttft_ms"] / 1e3 <= m["prefill_s"] <= m["total_s"]
            assert m["prefill_tok_s"] == pytest.approx(p["batch"] * p["context"] / m["prefill_s"])
            assert m["floor_ratio"] >= 1 and p["floor"]["ms"] <= m["decode_step_ms"]
        assert p["floor"]["total"] == sum(p["floor"][k] for k in ("weights", "kv", "linear_state", "conv_state"))
        assert p["vs_hf"]["output_tok_s"] > 0 and p["vs_hf"]["decode"] > 0
        assert "vllm" not in p
    hybrid = [p for p in points if p["layers"] == "DDAD"]
    assert all(p["floor"]["linear_state"] > 0 for p in hybrid)
    assert data["capacity"][1]["max_seqs_4096"] > data["capacity"][0]["max_seqs_4096"] > 0
    assert "xfloor" in result.output and "capacity" in result.output


def test_bench_engine_checkpoint_dir(tmp_path) -> None:
    tok = tiny_tokenizer()
    tiny_teacher("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "engine", str(tmp_path / "model"), "--contexts", "6", "--batch-sizes", "2", "--max-tokens", "3",
        "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    (point,) = json.loads(out.read_text())["points"]
    assert point["model"] == "model" and point["layers"] == "AAAA"
    assert point["engine"]["output_tok_s"] > 0 and point["hf"]["output_tok_s"] > 0


def test_bench_engine_needs_one_model_source(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "engine", "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "--random" in result.output


def test_floor_and_flops_match_a_hand_count() -> None:
    configs = bench_configs(shape_config("tiny"), softmax_ratio=0.25)
    teacher, hybrid = configs["teacher"], configs["hybrid"]
    assert hybrid.layer_types == ["gdn", "gdn", "attention", "gdn"]
    assert param_counts(teacher).decoder == 4 * ATTENTION_LAYER + 64
    assert param_counts(hybrid).decoder == 3 * GDN_LAYER + ATTENTION_LAYER + 64
    assert param_counts(teacher).lm_head == LM_HEAD

    batch, context = 2, 10
    got = decode_bytes(teacher, batch, context, torch.float32)
    assert got.weights == (4 * ATTENTION_LAYER + 64 + LM_HEAD) * 4
    assert got.kv == batch * 4 * 2 * 2 * 16 * (context + 1) * 4  # 4 layers, K and V, 2 KV heads, D 16
    assert got.linear_state == got.conv_state == 0

    got = decode_bytes(hybrid, batch, context, torch.bfloat16)
    assert got.weights == (3 * GDN_LAYER + ATTENTION_LAYER + 64 + LM_HEAD) * 2
    assert got.kv == batch * 1 * 2 * 2 * 16 * (context + 1) * 2
    assert got.linear_state == batch * 3 * 2 * (4 * 16 * 16) * 4  # read + write, fp32
    assert got.conv_state == batch * 3 * 2 * (3 * 64 * 3) * 2  # read + write, bf16
    assert got.total == got.weights + got.kv + got.linear_state + got.conv_state

    tokens = batch * context
    assert prefill_flops(teacher, batch, context) == (
        2 * (4 * ATTENTION_LAYER + 64) * tokens + 2 * LM_HEAD * batch + 4 * 2 * context**2 * 4 * 16 * batch
    )
    assert prefill_flops(hybrid, batch, context) == (
        2 * (3 * GDN_LAYER + ATTENTION_LAYER + 64) * tokens + 2 * LM_HEAD * batch
        + 1 * 2 * context**2 * 4 * 16 * batch + 3 * 6 * 4 * 16 * 16 * tokens
    )
