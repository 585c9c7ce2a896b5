"""Models that cannot load: one line on stderr and a non-zero exit from the CLIs, typed errors underneath."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.hub import check_hub_id
from hyla.runtime.load_errors import ModelLoadError, ModelNotFound
from hyla.runtime.loading import check_model, load_model, load_tokenizer
from tests.tiny_models import tiny_teacher, tiny_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny hybrid with its tokenizer."""
    path = tmp_path_factory.mktemp("models") / "good"
    tok = tiny_tokenizer()
    hybrid = hybrid_from_teacher(tiny_teacher("qwen2", vocab_size=len(tok)), ["gdn", "attention", "gla", "gdn"])
    hybrid.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def broken(good: Path, tmp_path: Path, kind: str) -> Path:
    """A copy of `good` broken one way."""
    path = tmp_path / kind
    shutil.copytree(good, path)
    weights, config_file = path / "model.safetensors", path / "config.json"
    config = json.loads(config_file.read_text())
    if kind == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif kind == "garbled":
        data = bytearray(weights.read_bytes())
        data[8:24] = b"\x00not a header!\x00\x00"
        weights.write_bytes(bytes(data))
    elif kind == "shape":
        config["intermediate_size"] *= 2
    elif kind == "layer_types":
        config["layer_types"][2] = "mamba"
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink(missing_ok=True)
    config_file.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated safetensors file"),
        ("garbled", "garbled safetensors header"),
        ("shape", "model.layers.0.mlp.gate_proj.weight has shape [128, 64], the config needs [256, 64]"),
        ("layer_types", "unknown layer types ['mamba']"),
        ("no_weights", "no weights (model.safetensors"),
    ],
)
def test_broken_checkpoints_raise_one_line(good: Path, tmp_path: Path, kind: str, message: str) -> None:
    path = broken(good, tmp_path, kind)
    for load in (check_model, load_model):
        with pytest.raises(ModelLoadError) as caught:
            load(path)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_tokenizer_files_are_named(good: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_tokenizer(broken(good, tmp_path, "no_tokenizer"))


def test_good_model_passes_the_checks(good: Path) -> None:
    assert check_model(good).layer_types == ["gdn", "attention", "gla", "gdn"]


def hyla(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hyla", *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(good: Path, tmp: Path) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """Each failing CLI call, run side by side (they spend most of their time importing); result and seconds."""
    teacher = tmp / "teacher"
    tiny_teacher("llama", layers=2).save_pretrained(teacher)
    calls = {
        "info-truncated": (["info", str(broken(good, tmp, "truncated"))], {}),
        "generate-layer-types": (["generate", str(broken(good, tmp, "layer_types")), "--max-new-tokens", "2"], {}),
        "missing-path": (["info", str(tmp / "nowhere")], {}),
        "serve-shape": (["serve", str(broken(good, tmp, "shape")), "--port", "0"], {}),
        "hub-unreachable": (
            ["info", "no-such-org/no-such-model"], {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
        ),
        "convert-no-tokenizer": (["convert", "--teacher", str(teacher), "--out", str(tmp / "out"), "--quiet"], {}),
    }

    def timed(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
        began = time.monotonic()
        return hyla(*args, **env), time.monotonic() - began

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(timed, *call) for name, call in calls.items()}
    return {name: future.result() for name, future in futures.items()}


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
    assert message in result.stderr


def test_info_on_truncated_weights_fails_in_one_line(runs) -> None:
    assert_one_line_error(runs["info-truncated"][0], 1, "truncated safetensors file")


def test_generate_on_bad_layer_types_fails_in_one_line(runs) -> None:
    assert_one_line_error(runs["generate-layer-types"][0], 1, "unknown layer types ['mamba']")


def test_serve_on_a_shape_mismatch_fails_in_one_line(runs) -> None:
    assert_one_line_error(runs["serve-shape"][0], 1, "the config needs [256, 64]")


def test_missing_path_is_named(runs, tmp: Path) -> None:
    assert_one_line_error(runs["missing-path"][0], 2, f"{tmp / 'nowhere'}: no such file or directory")


def test_unknown_hub_id_fails_fast_when_the_hub_is_unreachable() -> None:
    from huggingface_hub import constants

    began = time.monotonic()
    with pytest.raises(ModelNotFound, match="no such local path, and the Hugging Face hub"):
        check_hub_id("no-such-org/no-such-model", endpoint="http://127.0.0.1:9")
    assert time.monotonic() - began < 5
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        check_model("no-such-org/no-such-model")


def test_cli_on_unknown_hub_id_fails_in_one_line(runs) -> None:
    result, seconds = runs["hub-unreachable"]
    assert_one_line_error(result, 2, "no-such-org/no-such-model: no such local path, and the Hugging Face hub")
    assert seconds < 60  # importing torch and transformers, side by side with the other calls


def test_convert_without_tokenizer_files_says_so(runs, tmp: Path) -> None:
    assert_one_line_error(runs["convert-no-tokenizer"][0], 1, f"{tmp / 'teacher'} has no tokenizer files")


@pytest.mark.parametrize(("kind", "code"), [("missing_path", 2), ("no_weights", 1), ("truncated", 1)])
def test_cli_fails_before_importing_torch(good: Path, tmp_path: Path, kind: str, code: int) -> None:
    target = tmp_path / "nowhere" if kind == "missing_path" else broken(good, tmp_path, kind)
    script = (
        f"import sys\nfrom hyla.cli import main\nsys.argv = ['hyla', 'info', {str(target)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout == f"{code} False\n", done.stderr[-2000:]
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
