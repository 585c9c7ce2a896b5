"""The engine on CUDA (fla kernels for linear layers, paged attention by gather) against HF `generate`.

``python tests/test_engine_cuda.py`` prints the comparisons.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.cuda_graphs import ChunkGraphs, DecodeGraphs
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HYBRID_TYPES = ["gdn", "attention", "gla", "gdn"]
LENGTHS = (5, 23, 1, 70, 130)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher("qwen2", hidden_size=256, intermediate_size=512, head_dim=64).cuda()
    return {"teacher": teacher, "hybrid": hybrid_from_teacher(teacher, HYBRID_TYPES, seed=1)}


def prompts(vocab: int = 128, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=MAX_TOKENS, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run(model, dtype: str = "float32", cache_memory: str = "256MiB", **kw) -> LLMEngine:
    kw.setdefault("max_num_seqs", 8)  # fewer graph buckets to capture; the prompts fit one batch
    config = EngineConfig(model="tiny", device="cuda", dtype=dtype, cache_memory=cache_memory, **kw)
    return LLMEngine(model, None, config)


@pytest.fixture(scope="module")
def engines(models):
    """One default engine per model, shared by the tests (capturing graphs is the slow part)."""
    return {kind: run(model) for kind, model in models.items()}


def greedy_ids(eng: LLMEngine, ps: list[list[int]]) -> list[list[int]]:
    outs = eng.generate(ps, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used) == (0, 0)
    return [o.outputs[0].token_ids for o in outs]


def test_hf_generate_of_hybrid_runs_cuda(models) -> None:
    """The reference path alone first, so a kernel fault is attributed to the right side."""
    assert all(len(hf_greedy(models["hybrid"], p)) == MAX_TOKENS for p in prompts())


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_greedy_matches_hf_generate_cuda(models, engines, kind, chunk) -> None:
    model = models[kind]
    ps = prompts()
    expected = [hf_greedy(model, p) for p in ps]
    eng = engines[kind] if chunk is None else run(model, max_num_batched_tokens=chunk)
    assert greedy_ids(eng, ps) == expected


def test_preemption_does_not_change_output_cuda(models, engines) -> None:
    model = models["hybrid"]
    ps = prompts(seed=1)
    alone = [greedy_ids(engines["hybrid"], [p])[0] for p in ps]
    tiny = run(model, cache_memory="3MiB", max_model_len=160, max_num_batched_tokens=32, max_num_seqs=32)
    assert greedy_ids(tiny, ps) == alone
    assert tiny.stats().num_preemptions > 0


def test_bf16_sanity_cuda(models) -> None:
    for kind in ("teacher", "hybrid"):
        model = copy.deepcopy(models[kind]).to(torch.bfloat16)
        ps = prompts(seed=2)
        expected = [hf_greedy(model, p) for p in ps]
        got = greedy_ids(run(model, dtype="bfloat16", state_dtype="bfloat16"), ps)
        assert all(len(g) == MAX_TOKENS for g in got)
        first_match = sum(g[0] == e[0] for g, e in zip(got, expected))
        print(kind, "bf16 first-token matches", first_match, "/", len(ps))
        assert first_match >= len(ps) - 1


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_graph_replay_matches_eager_cuda(models, engines, kind) -> None:
    """Decode through captured CUDA graphs (batches padded to their bucket) gives the eager tokens."""
    ps = prompts(seed=3)
    graphs = engines[kind]
    assert graphs.runner.graphs is not None and 5 not in graphs.runner.graphs.buckets  # 5 rows pad to 8
    eager = run(models[kind], max_num_seqs=8, enforce_eager=True)
    assert eager.runner.graphs is None
    assert greedy_ids(graphs, ps) == greedy_ids(eager, ps)


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_chunk_graph_replay_matches_eager_cuda(models, kind, monkeypatch) -> None:
    """Short prefill chunks (prefix-cache suffixes, chunked prompts, mixed with decode tokens) through
    captured chunk graphs: the tokens of the same padded steps run eagerly, and the prompt
    log-probabilities of unpadded eager steps. bf16 (the prefill graphs need the Triton attention);
    plain elementwise ops on both sides, so that only the capture differs."""
    monkeypatch.setenv("HYLA_FUSION", "0")
    model = copy.deepcopy(models[kind]).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 128, (40,), generator=g).tolist()
    ps = [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 9, 30, 60)] + prompts(seed=5)[:3]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, prompt_logprobs=0)

    def outputs(eng: LLMEngine) -> tuple[list[list[int]], torch.Tensor]:
        outs = eng.generate(ps[:2], params) + eng.generate(ps, params)  # the second batch hits the prefix cache
        lps = [next(iter(lp.values()))[0] for o in outs for lp in o.prompt_logprobs[1:]]
        return [o.outputs[0].token_ids for o in outs], torch.tensor(lps)

    kw = dict(dtype="bfloat16", max_num_batched_tokens=48)
    graphs = run(model, **kw)
    assert graphs.runner.chunk_graphs is not None
    padded = run(model, enforce_eager=True, **kw)
    # the same padded steps, never captured: they run eagerly
    padded.runner.graphs = DecodeGraphs(padded.runner, padded.max_num_seqs)
    padded.runner.chunk_graphs = ChunkGraphs(padded.runner, padded.max_num_seqs, padded.config.max_num_batched_tokens)
    plain = run(model, enforce_eager=True, **kw)
    got, got_lp = outputs(graphs)
    assert graphs.runner.chunk_graphs.replays > 5
    want, _ = outputs(padded)
    assert got == want
    _, plain_lp = outputs(plain)
    assert torch.allclose(got_lp, plain_lp, atol=0.05)


def test_start_up_runs_the_chunked_linear_kernels_cuda(models, monkeypatch) -> None:
    """Start-up runs fla's chunked Gated DeltaNet (compiled and autotuned then, not in the first long
    prompt's time to first token), on the scratch slot: the engine's output is unchanged."""
    import fla.ops.gated_delta_rule as gdn_ops

    calls = []
    chunked = gdn_ops.chunk_gated_delta_rule

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens"))
        return chunked(*args, **kwargs)

    monkeypatch.setattr(gdn_ops, "chunk_gated_delta_rule", counted)
    eng = run(models["hybrid"], enforce_eager=True)
    assert len(calls) == HYBRID_TYPES.count("gdn") and all(c is not None and len(c) == 3 for c in calls)
    assert eng.runner.warm_up_seconds > 0 and "warmed up" in eng.capacity_report
    ps = prompts()
    assert greedy_ids(eng, ps) == [hf_greedy(models["hybrid"], p) for p in ps]
