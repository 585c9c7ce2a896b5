"""The plugin as vLLM loads it: found through its entry point, cheap to import, idempotent."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm")

LOADED = "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()[-1]


def test_importing_the_plugin_imports_neither_vllm_nor_torch() -> None:
    assert python(f"import sys, hyla.vllm_plugin\n{LOADED}") == "[]"


def test_vllm_loads_the_plugin_through_its_entry_point_and_registering_again_is_harmless() -> None:
    out = python(
        "from vllm import ModelRegistry\nfrom vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import hyla.vllm_plugin as plugin\n"
        "from transformers import AutoConfig\nfrom hyla.runtime.config import HybridConfig\n"
        "def registered():\n"
        "    return (plugin.ARCHITECTURE in ModelRegistry.get_supported_archs(),\n"
        "            type(AutoConfig.for_model('hyla_hybrid')) is HybridConfig)\n"
        "first = registered()\nplugin.register()\nprint(first, registered())"
    )
    assert out == "(True, True) (True, True)"
