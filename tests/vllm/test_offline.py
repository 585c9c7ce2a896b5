"""vLLM's offline `LLM` serves a hyla hybrid through the plugin and agrees with hyla's engine."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

from tests.vllm.agreement import assert_greedy_agrees, assert_prompt_logprobs_agree  # noqa: E402
from tests.vllm.conftest import MAX_TOKENS  # noqa: E402

# bf16 (vLLM's CPU Gated DeltaNet needs it) with fp32 recurrent states, as hyla's engine keeps them.
ENGINE_ARGS = dict(
    dtype="bfloat16", mamba_ssm_cache_dtype="float32", max_model_len=1024, seed=0,
    gpu_memory_utilization=0.1, enforce_eager=True,
)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=str(model_dir), **ENGINE_ARGS)


def test_greedy_matches_hyla_engine(llm, model_dir, reference):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt} for prompt, _ in reference], params)
    for (prompt, expected), out in zip(reference, outs):
        assert_greedy_agrees(model_dir, prompt, expected, list(out.outputs[0].token_ids))


def test_prompt_logprobs_match_hyla_model(llm, model_dir, reference):
    prompt, generated = reference[-1]
    ids = prompt + generated
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    got = [entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    assert_prompt_logprobs_agree(model_dir, ids, got)



def test_prefix_cache_hit_resumes_saved_states(llm, model_dir, reference):
    """A repeated prompt starts from cached KV blocks and linear states, and still agrees."""
    prompt, expected = reference[-1]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], params)
    again = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    assert again.num_cached_tokens > 0
    assert_greedy_agrees(model_dir, prompt, expected, list(again.outputs[0].token_ids))
