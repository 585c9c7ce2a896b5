"""Prefix caching: the same tokens and log-probabilities with caching on and off, for a teacher and a
hybrid, across shared prefixes, chats, short prompts, mid-block hits, n > 1, preemption and eviction;
afterwards only evictable cached content remains and the counters match what was sent."""

from __future__ import annotations

import dataclasses

import pytest

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.cache_manager import CacheManager
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.prefix_cache import PrefixCache, Point, model_salt
from hyla.runtime.request import Request, Sequence
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import random_tokens as tokens, tiny_teacher

KINDS = ["teacher", "hybrid"]
GREEDY = SamplingParams(max_tokens=6, temperature=0, logprobs=2)


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher("qwen2")
    return {"teacher": teacher, "hybrid": hybrid_from_teacher(teacher, ["gdn", "attention", "gla", "gdn"], seed=1)}


def engine(model, caching: bool, **kw) -> LLMEngine:
    config = {"cache_memory": "32MiB", "block_size": 16, "prefix_checkpoint_interval": 32, **kw}
    return LLMEngine(model, None, EngineConfig(model="tiny", enable_prefix_caching=caching, **config))


def assert_same(on, off) -> None:
    """Same tokens; log-probabilities equal up to float noise from a different chunking."""
    assert [c.token_ids for c in on.outputs] == [c.token_ids for c in off.outputs]
    for a, b in zip(on.outputs, off.outputs):
        for pa, pb in zip(a.logprobs, b.logprobs):
            assert pa.keys() == pb.keys()
            assert all(abs(pa[t][0] - pb[t][0]) < 1e-4 for t in pa)


def assert_only_cached_left(eng: LLMEngine, outputs) -> None:
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    assert s.prefix_cache_queries_total == sum(len(o.prompt_token_ids) for o in outputs)
    assert s.prefix_cache_hits_total == sum(o.num_cached_tokens for o in outputs)
    cache = eng.scheduler.cache
    assert cache.blocks.num_used == len({p.block for p in cache.cache.points() if p.block is not None})
    assert s.prefix_cache_snapshots == sum(1 for p in cache.cache.points() if p.row is not None)


def run_waves(model, waves, caching: bool, **kw):
    """Run each wave (a list of (prompt, params)) to completion in turn on one engine."""
    eng = engine(model, caching, **kw)
    outputs = []
    for wave in waves:
        outputs += eng.generate([p for p, _ in wave], [sp for _, sp in wave])
    return eng, outputs


def compare(model, waves, **kw):
    """Outputs with caching on equal those with it off; returns the caching engine and its outputs."""
    eng, on = run_waves(model, waves, True, **kw)
    _, off = run_waves(model, waves, False, **kw)
    for a, b in zip(on, off):
        assert_same(a, b)
    assert_only_cached_left(eng, on)
    return eng, on


@pytest.mark.parametrize("kind", KINDS)
def test_shared_system_prompt_different_questions(models, kind) -> None:
    system = tokens(60, 1)
    first = [(system + tokens(7, 2), GREEDY)]
    rest = [(system + tokens(n, 10 + n), GREEDY) for n in (3, 9, 20)]
    eng, outs = compare(models[kind], [first, rest])
    assert outs[0].num_cached_tokens == 0
    hit = 48 if kind == "teacher" else 32  # teacher: the shared full blocks; hybrid: the last checkpoint
    # the first of the wave keeps a point where its companions diverge from it, and they start there
    assert [o.num_cached_tokens for o in outs[1:]] == [hit, 60, 60]
    assert eng.stats().prefix_cache_hits_total == hit + 120


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix_len", [40, 100])
def test_a_shared_prefix_of_any_length_is_kept_where_prompts_diverge(models, kind, prefix_len) -> None:
    """The second prompt sharing a prefix keeps a point where it stops agreeing with the first (not a
    checkpoint, not a block end); from the third on, the whole prefix comes from the cache."""
    prefix = tokens(prefix_len, 7)
    waves = [[(prefix + tokens(n, 30 + i), GREEDY)] for i, n in enumerate((5, 40, 1, 70))]
    _, on = compare(models[kind], waves)
    assert [o.num_cached_tokens for o in on[2:]] == [prefix_len, prefix_len]


@pytest.mark.parametrize("kind", KINDS)
def test_three_turn_chat_hits_mid_block(models, kind) -> None:
    model = models[kind]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=1)
    prompt, results = tokens(13, 3), {}
    for caching in (True, False):
        eng = engine(model, caching)
        history, outs = list(prompt), []
        for turn in range(3):
            out = eng.generate([history], params)[0]
            outs.append(out)
            history = history + out.outputs[0].token_ids + tokens(4 + turn, 20 + turn)
        results[caching] = (eng, outs)
    (eng, on), (_, off) = results[True], results[False]
    for a, b in zip(on, off):
        assert_same(a, b)
    assert_only_cached_left(eng, on)
    # each turn resumes where the previous one stopped computing (prompt + answer but its last token)
    expected = [0] + [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in on[:-1]]
    assert [o.num_cached_tokens for o in on] == expected
    assert any(n % 16 for n in expected)  # a hit ending mid-block


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_shorter_than_a_block_and_exact_repeat(models, kind) -> None:
    short = tokens(5, 4)
    waves = [[(short, GREEDY)], [(short + tokens(2, 5), GREEDY)], [(short, GREEDY)], [(tokens(50, 6), GREEDY)],
             [(tokens(50, 6), GREEDY)]]
    _, outs = compare(models[kind], waves)
    assert outs[1].num_cached_tokens == 5  # the end-of-prompt point of a one-block-short prompt
    assert outs[2].num_cached_tokens == 0  # one token is always computed: no point before position 5
    assert outs[4].num_cached_tokens == (48 if kind == "teacher" else 32)  # hybrid: last checkpoint


@pytest.mark.parametrize("kind", KINDS)
def test_n_greater_than_one_shares_the_cached_prefix(models, kind) -> None:
    system = tokens(40, 7)
    sampled = SamplingParams(max_tokens=6, temperature=0.8, n=2, seed=5, logprobs=1)
    waves = [[(system + tokens(3, 8), GREEDY)],
             [(system + tokens(6, 9), sampled), (system + tokens(5, 11), dataclasses.replace(GREEDY, n=2))]]
    _, outs = compare(models[kind], waves)
    assert all(o.num_cached_tokens >= 32 for o in outs[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_preemption_of_a_request_sharing_a_prefix_and_eviction(models, kind) -> None:
    system = tokens(40, 12)
    waves = [[(system + tokens(4, 13), GREEDY)],
             [(system + tokens(4 + i, 14 + i), SamplingParams(max_tokens=24, temperature=0, logprobs=1))
              for i in range(4)],
             [(tokens(60, 30 + i), GREEDY) for i in range(3)],
             [(system + tokens(3, 40), GREEDY)]]
    kw = {"cache_memory": "160KiB", "max_num_seqs": 4, "max_num_batched_tokens": 24, "max_model_len": 96}
    eng, outs = compare(models[kind], waves, **kw)
    assert eng.scheduler.num_preemptions > 0
    # the full blocks of the shared prefix, or all of it once one of them kept a point where it ends
    assert outs[1].num_cached_tokens == 32 and all(o.num_cached_tokens in (32, 40) for o in outs[2:5])
    assert outs[-1].num_cached_tokens == 0  # the long prompts of the third wave evicted the shared prefix


def test_prompt_logprobs_match_with_a_cached_prefix(models) -> None:
    model = models["hybrid"]
    system = tokens(40, 15)
    scored = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1)
    waves = [[(system + tokens(5, 16), GREEDY)], [(system + tokens(6, 17), scored)]]
    _, on = run_waves(model, waves, True)
    _, off = run_waves(model, waves, False)
    assert on[1].num_cached_tokens == 0  # prompt log-probabilities need every position computed
    for a, b in zip(on[1].prompt_logprobs[1:], off[1].prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[t][0] - b[t][0]) < 1e-5 for t in a)
    assert on[1].outputs[0].token_ids == off[1].outputs[0].token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_only_continuations_reuses_the_cached_context(models, kind) -> None:
    """As lm-eval's multiple choice does: one context, several endings, log-probabilities wanted only
    for the endings (`prompt_logprobs_from`): from the third ending on, the context comes from the cache."""
    context = tokens(45, 18)
    waves = [[(context + tokens(4 + i, 19 + i),
               SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1, prompt_logprobs_from=45))]
             for i in range(4)]
    eng, on = run_waves(models[kind], waves, True)
    _, off = run_waves(models[kind], waves, False)
    assert_only_cached_left(eng, on)
    assert [o.num_cached_tokens for o in on[2:]] == [44, 44]  # the row predicting token 45 is computed
    for a, b in zip(on, off):
        assert a.prompt_logprobs[:45] == [None] * 45
        for x, y in zip(a.prompt_logprobs[45:], b.prompt_logprobs[45:]):
            assert x.keys() == y.keys() and all(abs(x[t][0] - y[t][0]) < 1e-5 for t in x)


@pytest.mark.parametrize("kind", KINDS)
def test_endings_sent_together_wait_for_the_first_to_keep_the_context(models, kind) -> None:
    """lm-eval sends a context's endings at once: the first computes the context and keeps a point
    where they diverge, the others wait for it and start there (a shared prefix of a system prompt
    sent in a burst works the same way). Requests that share nothing are not held back."""
    context = tokens(45, 18)
    scoring = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1, prompt_logprobs_from=45)
    wave = [(context + tokens(4 + i, 19 + i), scoring) for i in range(4)] + [(tokens(30, 40), GREEDY)]
    eng, on = run_waves(models[kind], [wave], True)
    _, off = run_waves(models[kind], [wave], False)
    assert_only_cached_left(eng, on)
    assert [o.num_cached_tokens for o in on] == [0, 44, 44, 44, 0]
    assert_same(on[4], off[4])
    for a, b in zip(on[:4], off):
        for x, y in zip(a.prompt_logprobs[45:], b.prompt_logprobs[45:]):
            assert x.keys() == y.keys() and all(abs(x[t][0] - y[t][0]) < 1e-5 for t in x)


def test_a_teacher_shares_a_context_shorter_than_a_block_without_a_step_more(models) -> None:
    """lm-eval's short contexts: one of 12 tokens (less than a block) sent with its endings is computed
    once. A model without linear layers keeps the point there after the chunk that passed it, so the
    first request still takes one step; the others start from it in the next."""
    context = tokens(12, 21)
    scoring = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1, prompt_logprobs_from=12)
    prompts = [context + tokens(5 + i, 22 + i) for i in range(4)]
    eng = engine(models["teacher"], True)
    for i, prompt in enumerate(prompts):
        eng.add_request(f"r{i}", prompt, scoring)
    finished, step = {}, 0
    while eng.has_unfinished_requests():
        step += 1
        finished.update({o.request_id: (step, o.num_cached_tokens, o) for o in eng.step() if o.finished})
    assert [finished[f"r{i}"][:2] for i in range(4)] == [(1, 0), (2, 11), (2, 11), (2, 11)]
    off = engine(models["teacher"], False).generate(prompts, [scoring] * 4)
    for i, b in enumerate(off):
        a = finished[f"r{i}"][2]
        for x, y in zip(a.prompt_logprobs[12:], b.prompt_logprobs[12:]):
            assert x.keys() == y.keys() and all(abs(x[t][0] - y[t][0]) < 1e-5 for t in x)
    assert_only_cached_left(eng, [finished[f"r{i}"][2] for i in range(4)])


def test_abort_keeps_computed_blocks_cached(models) -> None:
    eng = engine(models["hybrid"], True, max_num_batched_tokens=16)
    prompt = tokens(50, 18)
    eng.add_request("a", prompt, GREEDY)
    for _ in range(2):
        eng.step()
    eng.abort_request("a")
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used) == (0, 0) and (s.prefix_cache_blocks, s.prefix_cache_snapshots) == (2, 1)
    out = eng.generate([prompt], GREEDY)[0]
    assert out.num_cached_tokens == 32
    assert_same(out, engine(models["hybrid"], False).generate([prompt], GREEDY)[0])


def test_hashed_blocks_are_never_written_and_idle_blocks_are_evicted_lru() -> None:
    cache = CacheManager(num_blocks=4, block_size=4, num_slots=2, prefix_cache=PrefixCache(model_salt("m")))
    seqs = []
    for i, prompt in enumerate([list(range(10)), list(range(10)) + [99]]):
        request = Request(str(i), None, prompt, SamplingParams(max_tokens=1), i)
        seqs.append(Sequence(request, 0, list(prompt), None))
    first, second = seqs
    assert cache.admit(first, 10, cache.lookup(first)) == []
    first.num_computed = 10
    cache.computed(first)
    table = list(first.block_table)
    cache.release(first)
    assert cache.num_cached_blocks == 3 and cache.num_used_blocks == 0  # 2 full blocks + the prompt-end point
    hit = cache.lookup(second)
    assert hit.position == 10 and hit.blocks == table
    copies = cache.admit(second, 1, hit)
    assert len(copies) == 1 and copies[0][0] == hit.blocks[-1]  # the shared partial block is copied first
    assert second.block_table[:2] == hit.blocks[:2] and second.block_table[2] != hit.blocks[2]
    cache.release(second)
    other = Sequence(Request("x", None, list(range(50, 66)), SamplingParams(max_tokens=1), 3), 0,
                     list(range(50, 66)), None)
    other.request.seqs.append(other)
    assert cache.can_admit(other, 16, cache.lookup(other))
    cache.admit(other, 16, cache.lookup(other))  # needs every block: cached ones and the point go
    assert cache.num_cached_blocks == 0 and cache.cache.num_points == 0


@pytest.mark.parametrize("seed", range(3))
def test_indexed_continuations_and_points_match_a_scan_of_everything_cached(seed: int) -> None:
    import random

    rng = random.Random(seed)
    cache, parents, blocks, points = PrefixCache(b"m"), [b"m", b"a", b"b"], {}, []
    word = lambda n: tuple(rng.randrange(4) for _ in range(n))  # noqa: E731 (a 4-token alphabet: many shared prefixes)
    for i in range(300):
        if rng.random() < 0.6:
            parent, tokens = rng.choice(parents), word(4)
            cache.register(i, bytes([i % 256, i // 256]), parent, tokens)
            if cache.is_cached(i):
                blocks[i] = (parent, tokens)
                cache.park(i)
        elif rng.random() < 0.5:
            point = Point(rng.choice(parents), word(rng.randrange(4)), 0, None, None)
            if cache.find_point(point.key, point.tail) is None:
                cache.add_point(point)
                points.append(point)
        elif blocks and rng.random() < 0.5:
            del blocks[cache.evict_block()]
        elif points:
            cache.remove_point(points.pop(rng.randrange(len(points))))
        parent, mine = rng.choice(parents), word(4)
        conts = [t for p, t in blocks.values() if p == parent] + [pt.tail for pt in points if pt.key == parent]
        want = max((next((j for j, (x, y) in enumerate(zip(c, mine)) if x != y), min(len(c), len(mine)))
                    for c in conts), default=0)
        assert cache.longest_shared(parent, mine) == want
        along = [pt for pt in points if pt.key == parent and mine[: len(pt.tail)] == pt.tail]
        assert cache.points_along(parent, list(mine[:3])) == sorted(along, key=lambda pt: len(pt.tail))
