"""Fixtures of the vLLM plugin tests: a tiny hybrid on disk and hyla's own bf16 answers for it.

The tests need vLLM (`make test-vllm` runs them in a separate venv); each test module skips when
vLLM is not importable, so plain `make test` passes over them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm.tiny_hybrid import hyla_greedy, prompts, tiny_hybrid_dir

MAX_TOKENS = 32


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hybrid_dir(tmp_path_factory.mktemp("tiny-hybrid"))


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> list[tuple[list[int], list[int]]]:
    """hyla's engine: (prompt ids, 32 greedy ids) for 8 prompts of mixed lengths."""
    return hyla_greedy(model_dir, prompts(), MAX_TOKENS)
