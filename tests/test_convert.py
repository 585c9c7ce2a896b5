"""End-to-end conversion of tiny teachers: export, report, resume, determinism and selection quality."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import hyla  # noqa: F401  (registers the hybrid with the Auto classes)
from hyla.cli import app
from hyla.convert.pipeline import ConvertOptions, convert
from hyla.runtime.loading import load_model
from tests.test_convert_helpers import (
    ESSENTIAL, TINY_BUDGET, copy_corpus, run_convert, single_thread, single_thread_env, teacher_dir, tiny_overrides,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("convert")
    before = os.environ.get("HYLA_CACHE")
    os.environ["HYLA_CACHE"] = str(root / "cache")
    teacher_dir(root / "teacher", essential=ESSENTIAL)
    copy_corpus(root / "corpus.txt")
    with single_thread():
        yield root
    if before is None:
        os.environ.pop("HYLA_CACHE")
    else:
        os.environ["HYLA_CACHE"] = before


def _options(root: Path, out: str, **kw) -> ConvertOptions:
    base = dict(
        teacher=str(root / "teacher"), out=root / out, data=str(root / "corpus.txt"), softmax_layers=1,
        overrides=tiny_overrides(), quiet=True,
    )
    return ConvertOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def converted(workdir: Path) -> Path:
    """One full kl-guided conversion of the essential-layer teacher (reused by several tests)."""
    began = time.perf_counter()
    convert(_options(workdir, "kl"))
    assert time.perf_counter() - began < 120
    return workdir / "kl"


def test_checkpoint_loads_and_generates(converted: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.model_type == "hyla_hybrid"
    assert model.config.layer_types.count("attention") == 1
    assert load_model(converted).config.layer_types == model.config.layer_types
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)
    info = CliRunner().invoke(app, ["info", str(converted), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["softmax_layers"] == [ESSENTIAL]


def test_report_has_everything(converted: Path) -> None:
    report = json.loads((converted / "conversion_report.json").read_text())
    assert (converted / "conversion_report.png").stat().st_size > 10_000
    assert len(report["selection"]["probes"][0]) == 4
    for stage in ("stage1", "stage2"):
        assert report["stages"][stage]["tokens"] > 0 and report["stages"][stage]["curve"]
        assert report["stages"][stage]["tokens_per_s"] > 0
        assert report["stages"][stage]["mixer_kernels"] == "pytorch"
        if len(report["stages"][stage]["curve"]) >= 2:
            assert report["stages"][stage]["steady_tokens_per_s"] > 0
    leftovers = [*converted.glob("*/checkpoint.pt"), *converted.glob("*/student.pt"), *converted.glob("probes/*.pt")]
    assert not leftovers, "a finished conversion keeps no training state"
    held = report["heldout"]
    assert set(held) == {"teacher", "untrained_transfer", "result"}
    assert held["result"]["kl"] < held["untrained_transfer"]["kl"]
    assert held["teacher"]["ppl"] > 1


def test_kl_guided_ranks_essential_layer_first_and_uniform_misses_it(converted: Path, workdir: Path) -> None:
    report = json.loads((converted / "conversion_report.json").read_text())
    scores = {int(k): v["kl"] for k, v in report["selection"]["probes"][0].items()}
    assert min(scores, key=scores.get) == ESSENTIAL, scores
    assert report["selection"]["selected"] == [ESSENTIAL]
    convert(_options(workdir, "uniform", selection="uniform"))
    uniform = json.loads((workdir / "uniform" / "conversion_report.json").read_text())
    assert uniform["selection"]["selected"] != [ESSENTIAL]
    # keeping the essential layer is what makes the hybrid close to the teacher
    assert report["heldout"]["result"]["kl"] < uniform["heldout"]["result"]["kl"]


def test_rerun_is_a_noop_and_other_settings_are_refused(converted: Path, workdir: Path) -> None:
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    began = time.perf_counter()
    convert(_options(workdir, "kl"))
    assert time.perf_counter() - began < 5
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        convert(_options(workdir, "kl", seed=1))


def test_stage1_from_serves_other_budgets_and_methods(converted: Path, workdir: Path) -> None:
    """A second K and the greedy method start from the first run's stage 1 and probes; a run whose
    stage 1 would differ is refused before anything is written."""
    source = json.loads((converted / "conversion_report.json").read_text())
    began = time.perf_counter()
    convert(_options(workdir, "kl2", softmax_layers=2, stage1_from=str(converted)))
    two = json.loads((workdir / "kl2" / "conversion_report.json").read_text())
    assert two["stage1_from"] == str(converted)
    assert two["stages"]["stage1"] == source["stages"]["stage1"]  # taken over, not trained again
    assert two["selection"]["probes"] == source["selection"]["probes"]
    ranked = sorted(source["selection"]["probes"][0], key=lambda k: source["selection"]["probes"][0][k]["kl"])
    assert two["selection"]["selected"] == sorted(int(k) for k in ranked[:2])
    assert (workdir / "kl2" / "stage1" / "mixers.safetensors").read_bytes() == (
        converted / "stage1" / "mixers.safetensors").read_bytes()

    convert(_options(workdir, "greedy", selection="greedy-iterative", stage1_from=str(converted)))
    greedy = json.loads((workdir / "greedy" / "conversion_report.json").read_text())
    assert greedy["selection"]["probes"][0] == source["selection"]["probes"][0]  # round 1 = the same probes
    assert greedy["selection"]["selected"] == [ESSENTIAL]
    assert time.perf_counter() - began < 120

    trimmed = workdir / "trimmed"  # what moves between machines: no teacher reference, no checkpoints
    for rel in ("convert_settings.json", "stage1/mixers.safetensors", "state", "probes"):
        copy = shutil.copytree if (converted / rel).is_dir() else shutil.copy2
        (trimmed / rel).parent.mkdir(parents=True, exist_ok=True)
        copy(converted / rel, trimmed / rel)
    convert(_options(workdir, "kl2-trimmed", softmax_layers=2, stage1_from=str(trimmed)))
    again = json.loads((workdir / "kl2-trimmed" / "conversion_report.json").read_text())
    assert (workdir / "kl2-trimmed" / "teacher" / "heldout_hidden.pt").is_file()  # recomputed
    assert again["selection"]["selected"] == two["selection"]["selected"]
    assert again["heldout"]["teacher"]["ppl"] == pytest.approx(two["heldout"]["teacher"]["ppl"], rel=1e-4)
    assert again["heldout"]["result"]["kl"] == pytest.approx(two["heldout"]["result"]["kl"], rel=1e-3)

    with pytest.raises(ValueError, match="other settings.*seed"):
        convert(_options(workdir, "seed1", seed=1, stage1_from=str(converted)))
    assert not (workdir / "seed1" / "stage1").exists()
    with pytest.raises(ValueError, match="not a conversion"):
        convert(_options(workdir, "nothing", stage1_from=str(workdir / "teacher")))


def test_same_seed_same_layers_and_multiprocess_matches(converted: Path, workdir: Path) -> None:
    """Two processes (gloo): probes fan out, stage 2 under DDP; the selection equals the single run's."""
    args = [
        "--teacher", str(workdir / "teacher"), "--out", str(workdir / "ddp"), "--data", str(workdir / "corpus.txt"),
        "--softmax-layers", "1", "--quiet", "--nproc", "2", *TINY_BUDGET,
    ]
    proc = subprocess.run([sys.executable, "-m", "hyla", "convert", *args], capture_output=True, text=True,
                          env=single_thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((converted / "conversion_report.json").read_text())
    multi = json.loads((workdir / "ddp" / "conversion_report.json").read_text())
    assert multi["processes"] == 2
    assert multi["selection"]["selected"] == single["selection"]["selected"]
    ranks = {int(k) for k in multi["selection"]["probes"][0]}
    assert ranks == {0, 1, 2, 3}
    s_kl = {k: v["kl"] for k, v in single["selection"]["probes"][0].items()}
    m_kl = {k: v["kl"] for k, v in multi["selection"]["probes"][0].items()}
    assert all(abs(s_kl[k] - m_kl[k]) <= 1e-3 * max(1.0, abs(s_kl[k])) for k in s_kl), (s_kl, m_kl)


def test_killed_mid_selection_resumes_without_redoing_probes(workdir: Path) -> None:
    out = workdir / "killed"
    args = [
        "--teacher", str(workdir / "teacher"), "--out", str(out), "--data", str(workdir / "corpus.txt"),
        "--softmax-layers", "1", "--quiet", *TINY_BUDGET, "--set", "probe_tokens=1024",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "hyla.convert", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=single_thread_env())
    probes = out / "probes"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(probes.glob("layer_*.json"))) < 1 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in probes.glob("layer_*.json")}
    assert 1 <= len(finished) < 4, "the kill should land mid-selection"
    result = run_convert(args)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (mtime, text) in finished.items():
        assert (probes / name).stat().st_mtime_ns == mtime and (probes / name).read_text() == text
    assert len(list(probes.glob("layer_*.json"))) == 4
    assert (out / "conversion_report.json").is_file()


def test_killed_in_a_quick_sized_stage1_resumes_from_its_checkpoint(workdir: Path) -> None:
    """Stage 1 of 16 steps (as in `quick`) with the default `checkpoint_every` still checkpoints."""
    out = workdir / "killed-stage1"
    budget = TINY_BUDGET[: TINY_BUDGET.index("checkpoint_every=4") - 1]
    args = [
        "--teacher", str(workdir / "teacher"), "--out", str(out), "--data", str(workdir / "corpus.txt"),
        "--softmax-layers", "1", "--selection", "uniform", "--quiet", *budget, "--set", "stage1_tokens=4096",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "hyla.convert", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=single_thread_env())
    checkpoint = out / "stage1" / "checkpoint.pt"
    deadline = time.time() + 180
    while time.time() < deadline and not checkpoint.is_file() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(checkpoint, weights_only=False)["step"]
    assert 1 <= saved < 16, "the kill should land mid-stage-1"
    result = run_convert(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[stage 1] step {saved + 1}/16 " in result.stderr
    assert not any(f"[stage 1] step {n}/16 " in result.stderr for n in range(1, saved + 1))
    assert (out / "conversion_report.json").is_file()
