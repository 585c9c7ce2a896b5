"""Fixtures of the vLLM plugin tests: a tiny hybrid on disk and hyla's own bf16 answers for it.

The tests need vLLM (`make test-vllm` runs them in a separate venv); each test module skips when
vLLM is not importable, so plain `make test` passes over them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vllm.tiny_hybrid import hyla_greedy, prompts, tiny_hybrid_dir

MAX_TOKENS = 32


FAMILIES = ("llama", "qwen2", "qwen3")
"""Teachers whose hybrids differ in what the plugin maps: llama3 RoPE scaling and an untied head
(llama), q/k/v biases in every mixer (qwen2), q/k RMSNorm and a tied head (qwen3)."""


CONVERTED = Path(os.environ.get("HYLA_VLLM_CHECKPOINT", Path(__file__).parents[2] / "runs" / "smollm2-hybrid"))
"""A really converted hybrid (`make run` writes the SmolLM2 one here): the tests run on it too when it
exists, and skip it otherwise."""


def converted_dir() -> Path:
    if not (CONVERTED / "config.json").is_file():
        pytest.skip(f"no converted checkpoint at {CONVERTED} (`make run` writes one; HYLA_VLLM_CHECKPOINT names another)")
    return CONVERTED


@pytest.fixture(scope="module", params=(*FAMILIES, "converted"))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if family == "converted":
        return converted_dir()
    return tiny_hybrid_dir(tmp_path_factory.mktemp(f"tiny-{family}"), family)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    """hyla's engine: (prompt ids, 32 greedy ids) for 8 prompts of mixed lengths."""
    return hyla_greedy(model_dir, prompts(), MAX_TOKENS)
