"""Shared fixtures: tiny random teachers of each supported family, and the real SmolLM2 teacher."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_teacher


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def teacher(request: pytest.FixtureRequest):
    """A tiny random teacher per family (GQA on; fp32)."""
    return tiny_teacher(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct teacher (fp32) and its tokenizer."""
    from hyla.runtime.loading import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
