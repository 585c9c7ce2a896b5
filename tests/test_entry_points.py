"""`import hyla` and `hyla --help` stay light; the Auto classes still load converted dirs after `import hyla`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hyla.convert.transfer import hybrid_from_teacher
from tests.tiny_models import tiny_teacher

HEAVY = "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_import_hyla_imports_neither_torch_nor_transformers() -> None:
    assert python(f"import sys, hyla\n{HEAVY}") == "[]\n"


def test_help_lists_every_command_without_importing_them() -> None:
    out = python(
        "import sys\nfrom hyla.cli import main\nsys.argv = ['hyla', '--help']\n"
        f"try:\n    main()\nexcept SystemExit:\n    pass\n{HEAVY}"
    )
    for command in ("info", "generate", "serve", "convert", "eval", "bench", "fetch-assets"):
        assert f" {command} " in out
    assert out.rstrip().endswith("[]")


def test_import_hyla_then_auto_model_loads_a_hybrid(tmp_path: Path) -> None:
    hybrid_from_teacher(tiny_teacher("llama"), ["gdn", "attention", "gla", "gdn"]).save_pretrained(tmp_path)
    out = python(
        "import hyla\nfrom transformers import AutoModelForCausalLM\n"
        f"print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)"
    )
    assert out == "HybridForCausalLM\n"
