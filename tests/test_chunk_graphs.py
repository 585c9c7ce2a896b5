"""The padded packed steps that CUDA chunk graphs capture, run eagerly on the CPU (where nothing is
captured): the same tokens and log-probabilities as the unpadded eager steps. On the GPU,
`test_engine_cuda` compares their captured replays with eager steps."""

from __future__ import annotations

import pytest
import torch

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.cuda_graphs import CHUNK_MAX_LEN, ChunkGraphs, pieces
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.model_runner import ModelRunner
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher

HYBRID_TYPES = ["gdn", "attention", "gla", "gdn"]


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher("qwen2")
    return {"teacher": teacher, "hybrid": hybrid_from_teacher(teacher, HYBRID_TYPES, seed=1)}


def workload(seed: int) -> list[list[int]]:
    """A shared 40-token prefix with suffixes of 1 to 24 tokens, and three prompts of their own."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    prefix = tokens(40)
    return [prefix + tokens(n) for n in (1, 9, 24)] + [tokens(5), tokens(60), tokens(70)]


def run(model, padded: bool, batches: list[list[list[int]]] | None = None,
        **kw) -> tuple[list[list[int]], list[list[float]], int]:
    """Greedy tokens and prompt log-probabilities, and how many steps took the padded form."""
    eng = LLMEngine(model, None, EngineConfig(model="tiny", cache_memory="32MiB", max_num_seqs=4, **kw))
    if padded:
        eng.runner.chunk_graphs = ChunkGraphs(eng.runner, eng.max_num_seqs, eng.config.max_num_batched_tokens)
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0)
    outs = []
    # by default the last batch hits the prefix cache
    for batch in batches or (workload(0)[:3], workload(0)[3:], workload(0)[:2]):
        outs += eng.generate(batch, params)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[next(iter(lp.values()))[0] for lp in o.prompt_logprobs[1:]] for o in outs]
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used) == (0, 0)
    return tokens, logprobs, eng.runner.chunk_graphs.replays if padded else 0


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
@pytest.mark.parametrize("chunk", [16, 48, 512])  # 512: padding of more than one scratch sequence
def test_padded_chunk_steps_match_eager(models, kind, chunk) -> None:
    tokens, logprobs, _ = run(models[kind], padded=False, max_num_batched_tokens=chunk)
    got_tokens, got_logprobs, steps = run(models[kind], padded=True, max_num_batched_tokens=chunk)
    assert steps > 5
    assert got_tokens == tokens
    for a, b in zip(got_logprobs, logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_long_chunks_of_small_steps_run_as_rounds_of_padded_steps(models, kind, monkeypatch) -> None:
    """Steps of at most the graphs' 512 tokens whose chunks pass `CHUNK_MAX_LEN` (prompts of 300
    and 150 tokens, a 40-token one, then a prefix hit with a 200-token suffix) run as rounds of
    padded steps, never eagerly, with the unpadded eager steps' tokens and log-probabilities."""
    g = torch.Generator().manual_seed(3)
    tokens = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    first = [tokens(300), tokens(150), tokens(40)]
    batches = [first, [first[1] + tokens(200)]]
    want_tokens, want_logprobs, _ = run(models[kind], padded=False, batches=batches, max_num_batched_tokens=512)
    eager, _eager = [], ModelRunner._eager
    monkeypatch.setattr(ModelRunner, "_eager", lambda self, *a: eager.append(a) or _eager(self, *a))
    got_tokens, got_logprobs, steps = run(models[kind], padded=True, batches=batches, max_num_batched_tokens=512)
    assert not eager and steps > 8
    assert got_tokens == want_tokens
    for a, b in zip(got_logprobs, want_logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_graph_keys_hold_every_step_they_take(models) -> None:
    """A step's graph has room for its chunks and padding; steps with a chunk too long for the
    recurrent form, or too many tokens, have none."""
    eng = LLMEngine(models["teacher"], None, EngineConfig(model="tiny", cache_memory="32MiB", max_num_seqs=8))
    graphs = ChunkGraphs(eng.runner, 8, 2048)
    assert graphs.token_buckets == [16, 32, 64, 128, 256, 512] and graphs.seq_buckets == [2, 4, 8, 16]
    for chunks in range(1, 9):
        for tokens in range(chunks, min(512, chunks * CHUNK_MAX_LEN) + 1):
            key = graphs.key(chunks, tokens, min(tokens, CHUNK_MAX_LEN))
            if key is None:
                continue
            t, n = key
            assert key in graphs.inputs and t >= tokens
            assert n >= chunks + len(pieces(t - tokens)) and max(pieces(t - tokens)) <= CHUNK_MAX_LEN
    with torch.inference_mode():  # what capturing runs: every graph's initial (scratch) step
        assert all(graphs.forward(key).shape[0] == key[0] for key in graphs.keys)
    assert graphs.key(1, 129, 129) is None and graphs.key(9, 513, 64) is None
    assert graphs.key(16, 300, 64) is None  # 16 chunks and 4 scratch sequences do not fit 16
