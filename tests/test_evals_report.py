"""`hyla eval report` on a tiny teacher and a tiny hybrid; held-out perplexity and KL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyla.cli import app
from hyla.evals.perplexity import heldout_blocks, score_blocks, text_blocks
from hyla.runtime.loading import load_model, load_tokenizer
from tests.tiny_models import tiny_teacher_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from hyla.convert.transfer import hybrid_from_teacher

    root = tmp_path_factory.mktemp("models")
    teacher_dir = tiny_teacher_dir(root / "teacher")
    hybrid = hybrid_from_teacher(load_model(teacher_dir), ["attention", "gdn"], seed=0)
    hybrid.save_pretrained(root / "hybrid")
    load_tokenizer(teacher_dir).save_pretrained(root / "hybrid")
    return teacher_dir, root / "hybrid"


def test_report_writes_table_and_plots(models: tuple[Path, Path], tmp_path: Path) -> None:
    from hyla.evals.prepare import prepare_data

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLA_CACHE", str(tmp_path / "cache"))
        prepare_data(["arc_easy", "lambada_openai"], fetch=False, quiet=True)
        result = CliRunner().invoke(app, [
            "eval", "report", str(models[0]), str(models[1]), "--tasks", "arc_easy,lambada_openai",
            "--limit", "3", "--contexts", "32,64", "--batches", "1,2", "--new-tokens", "3",
            "--cache-memory", "16MiB", "--out", str(tmp_path / "out"),
        ])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith((f"| {models[0].name} ", f"| {models[1].name} "))]
    assert len(rows) == 2 and "`AA`" in rows[0] and "`AD`" in rows[1]
    assert "decode tok/s b2@64" in text and "arc_easy/acc_norm" in text
    for png in ("quality_vs_throughput.png", "memory_vs_context.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    teacher, hybrid = json.loads((tmp_path / "out" / "report.json").read_text())
    assert hybrid["kv_bytes_per_token"] * 2 == teacher["kv_bytes_per_token"]
    assert teacher["state_bytes_per_sequence"] == 0 < hybrid["state_bytes_per_sequence"]
    assert all(v > 0 for v in teacher["decode_tps"].values()) and set(teacher["ttft_ms"]) == {"32", "64"}
    assert hybrid["max_seqs"]["64"] > teacher["max_seqs"]["64"]  # half the KV, small fixed state


def test_perplexity_and_kl(models: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, hybrid = load_model(models[0]), load_model(models[1])
    text = tmp_path / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    blocks = text_blocks(text, load_tokenizer(models[0]), seq_len=64)
    assert blocks.shape[1] == 64 and len(blocks) >= 3
    same = score_blocks(teacher, blocks, teacher=teacher, quiet=True)
    assert abs(same.kl) < 1e-5 and math.isfinite(same.perplexity) and same.tokens == blocks.numel() - len(blocks)
    other = score_blocks(hybrid, blocks, teacher=teacher, quiet=True)
    assert other.kl > 1e-3 and other.nll != same.nll
    import torch

    torch.save(blocks, tmp_path / "heldout.pt")
    assert torch.equal(heldout_blocks(tmp_path, max_blocks=2), blocks[:2])
    with pytest.raises(FileNotFoundError):
        heldout_blocks(tmp_path / "missing")


def test_perplexity_cli(models: tuple[Path, Path], tmp_path: Path) -> None:
    text = tmp_path / "held.txt"
    text.write_text("Held-out text for the command line. " * 40)
    args = ["eval", "perplexity", str(models[1]), "--teacher", str(models[0]), "--seq-len", "32", "-q"]
    result = CliRunner().invoke(app, [*args, "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "KL(teacher‖model)" in result.output
    missing = CliRunner().invoke(app, [*args, "--heldout", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no held-out split" in missing.output
