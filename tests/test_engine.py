"""The serving engine: greedy equality with HF `generate`, independence from batching, chunking and
preemption, cache accounting, validation, sampling options and logprobs."""

from __future__ import annotations

import pytest
import torch

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher, tiny_tokenizer

HYBRID_TYPES = ["gdn", "attention", "gla", "gdn"]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def models():
    teacher = tiny_teacher("qwen2")
    return {"teacher": teacher, "hybrid": hybrid_from_teacher(teacher, HYBRID_TYPES, seed=1)}


def prompts(lengths=(5, 23, 1, 70, 12), seed=0, vocab=128) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine(model, tokenizer=None, **kw) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(model="tiny", **{"cache_memory": "32MiB", **kw}))


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_free(eng: LLMEngine) -> None:
    s = eng.stats()
    assert (s.kv_blocks_used, s.state_slots_used, s.num_running, s.num_waiting) == (0, 0, 0, 0)
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_greedy_matches_hf_generate(models, kind) -> None:
    model = models[kind]
    ps = prompts()
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in ps]
    eng = engine(model)
    assert token_ids(eng.generate(ps, GREEDY)) == expected
    assert_all_free(eng)


def test_output_independent_of_batch_chunks_and_preemption(models) -> None:
    model = models["hybrid"]
    ps = prompts((9, 40, 3, 65, 17, 30), seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [token_ids(engine(model).generate([p], params))[0] for p in ps]
    assert token_ids(engine(model).generate(ps, params)) == alone
    assert token_ids(engine(model, max_num_batched_tokens=7).generate(ps, params)) == alone
    # ~7 blocks of 16 tokens for six sequences of up to 89 tokens: preemption is forced
    tiny = engine(model, cache_memory="200KiB", max_model_len=96, max_num_batched_tokens=16)
    assert token_ids(tiny.generate(ps, params)) == alone
    assert tiny.stats().num_preemptions > 0
    assert_all_free(tiny)


def test_sampled_output_independent_of_companions_and_preemption(models) -> None:
    model = models["hybrid"]
    ps = prompts((9, 40, 3, 65), seed=2)
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=i, ignore_eos=True) for i in range(4)]
    alone = [token_ids(engine(model).generate([p], [sp]))[0] for p, sp in zip(ps, params)]
    tiny = engine(model, cache_memory="200KiB", max_model_len=96, max_num_batched_tokens=16)
    assert token_ids(tiny.generate(ps, params)) == alone
    assert tiny.stats().num_preemptions > 0


def test_cache_freed_after_finish_and_abort(models) -> None:
    eng = engine(models["hybrid"], max_num_batched_tokens=16)
    for i, p in enumerate(prompts((30, 4, 50, 8), seed=3)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0, n=2 if i == 1 else 1))
    eng.step()
    eng.step()
    assert eng.stats().kv_blocks_used > 0 and eng.stats().state_slots_used > 0
    eng.abort_request("2")  # mid-prefill
    eng.abort_request("nope")  # unknown: no-op
    eng.step()
    eng.abort_request("1")  # decoding, forked
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert sorted(finished) == ["0", "3"]
    assert_all_free(eng)


def test_reused_slot_does_not_leak_state(models) -> None:
    model = models["hybrid"]
    first, second = prompts((40, 25), seed=4)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0)
    fresh = engine(model).generate([second], params)[0]
    eng = engine(model, max_num_seqs=1)
    assert eng.scheduler.cache.num_slots == 1
    eng.generate([first], params)
    reused = eng.generate([second], params)[0]
    assert reused.outputs[0].token_ids == fresh.outputs[0].token_ids
    for a, b in zip(reused.prompt_logprobs[1:], fresh.prompt_logprobs[1:]):
        (ta, (la, _)), (tb, (lb, _)) = next(iter(a.items())), next(iter(b.items()))
        assert ta == tb and abs(la - lb) <= 1e-5


def test_bad_input_rejected_and_engine_keeps_working(models) -> None:
    model = models["teacher"]
    eng = engine(model, max_model_len=64, max_num_seqs=8)
    eng.add_request("ok", [5, 6, 7], GREEDY)
    bad = [
        ("a", [], GREEDY, "empty"),
        ("b", [5, 128], GREEDY, "vocabulary"),
        ("c", [5, -1], GREEDY, "vocabulary"),
        ("d", [5] * 65, GREEDY, "max_model_len"),
        ("e", [5] * 60, SamplingParams(max_tokens=5), "max_tokens"),
        ("ok", [5], GREEDY, "already in use"),
        ("f", "text needs a tokenizer", GREEDY, "tokenizer"),
        ("g", [5, "x"], GREEDY, "token ids"),
        ("h", [5], SamplingParams(n=16), "max_num_seqs"),
    ]
    for request_id, prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            eng.add_request(request_id, prompt, params)
    assert list(eng.requests) == ["ok"]
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "ok" and outs[-1].finished
    assert outs[-1].outputs[0].token_ids == hf_greedy(model, [5, 6, 7], GREEDY.max_tokens)
    assert_all_free(eng)


def test_n_greater_than_one_and_seeds(models) -> None:
    model = models["hybrid"]
    p = prompts((20,), seed=5)[0]
    sampled = SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7, ignore_eos=True)
    out = engine(model).generate([p], sampled)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # siblings sample independently
    other = engine(model, max_num_batched_tokens=5).generate([prompts((33,))[0], p], [GREEDY, sampled])[1]
    assert [c.token_ids for c in other.outputs] == [c.token_ids for c in out.outputs]
    greedy = engine(model).generate([p], SamplingParams(max_tokens=8, temperature=0, n=2))[0]
    assert [c.token_ids for c in greedy.outputs] == [hf_greedy(model, p, 8)] * 2
    scored = engine(model).generate([p], SamplingParams(max_tokens=0, n=2, prompt_logprobs=0))[0]
    assert [(c.index, c.token_ids, c.finish_reason) for c in scored.outputs] == [(0, [], "length"), (1, [], "length")]
    assert len(scored.prompt_logprobs) == len(p)


def test_prompt_logprobs_match_hf_forward(models) -> None:
    model = models["hybrid"]
    p = prompts((45,), seed=6)[0]
    with torch.no_grad():
        ref = model(torch.tensor([p])).logits[0].float().log_softmax(-1)
    for chunk in (7, 1024):
        out = engine(model, max_num_batched_tokens=chunk).generate(
            [p], SamplingParams(max_tokens=0, prompt_logprobs=3)
        )[0]
        assert out.finished and out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            token = p[pos]
            assert token in entry and len(entry) >= 3
            logprob, rank = entry[token]
            assert abs(logprob - ref[pos - 1, token].item()) <= 1e-4
            assert rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
            top = ref[pos - 1].topk(3)
            for r, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                assert abs(entry[tid][0] - lp) <= 1e-4 and (tid == token or entry[tid][1] == r)


def test_scoring_only_steps_run_the_lm_head_on_scored_rows_alone(models) -> None:
    """lm-eval's requests draw nothing: the head computes exactly the rows they score, in order."""
    eng = engine(models["hybrid"], max_num_batched_tokens=64)
    rows = []
    hook = eng.model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    try:
        ps = prompts((30, 9, 50), seed=8)
        params = [SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_from=len(p) // 2) for p in ps]
        outs = eng.generate(ps, params)
    finally:
        hook.remove()
    scored = sum(len(p) - max(len(p) // 2, 1) for p in ps)
    assert sum(rows) == scored
    assert all(sum(e is not None for e in o.prompt_logprobs) == len(p) - max(len(p) // 2, 1) for o, p in zip(outs, ps))


def test_generated_logprobs(models) -> None:
    out = engine(models["teacher"]).generate([[4, 5, 6]], SamplingParams(max_tokens=5, temperature=0, logprobs=2))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids)
    for token, entry in zip(comp.token_ids, comp.logprobs):
        assert entry[token][1] == 1  # greedy picks the top token
        assert len(entry) == 2 and all(lp <= 0 for lp, _ in entry.values())


@pytest.fixture(scope="module")
def text_model():
    tok = tiny_tokenizer()
    return tiny_teacher("llama", vocab_size=len(tok), seed=3), tok


def test_streaming_text_stop_strings_and_stop_ids(text_model) -> None:
    model, tok = text_model
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    eng = engine(model, tok)
    eng.add_request("r", "Hello world! 🙂", params)
    deltas, text, ids = [], "", []
    while eng.has_unfinished_requests():
        for out in eng.step():
            c = out.outputs[0]
            deltas.append(c.text_delta)
            ids += c.token_ids_delta
            text = c.text
    assert "".join(deltas) == text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) == 24

    stop_text = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop_text.strip()
    stopped = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop_text])
    out = engine(model, tok).generate(["Hello world! 🙂"], stopped)[0]
    comp = out.outputs[0]
    assert comp.text == text[: text.index(stop_text)]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop_text)

    stop_id = ids[5]
    by_id = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id])
    out = engine(model, tok).generate(["Hello world! 🙂"], by_id)[0]
    comp = out.outputs[0]
    assert comp.token_ids == ids[: ids.index(stop_id) + 1]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop_id)
    assert comp.text == tok.decode(ids[: ids.index(stop_id)], skip_special_tokens=True)


def test_capacity_report_and_clamps(models) -> None:
    eng = engine(models["hybrid"], cache_memory="100KiB", max_num_seqs=64, max_model_len=512)
    report = eng.capacity_report
    assert "clamped" in report and "max_num_seqs" in report and "max_model_len" in report
    assert eng.max_num_seqs < 64 and eng.max_model_len < 512
    plan = eng.plan
    assert plan.kv_bytes + plan.state_bytes <= 100 * 1024
    assert token_ids(eng.generate([[5, 6, 7]], GREEDY)) == [hf_greedy(models["hybrid"], [5, 6, 7], 10)]


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2) -> None:
    model, tok = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    eng = LLMEngine(model, tok, EngineConfig(model="smollm2-135m", cache_memory="256MiB", max_num_batched_tokens=8))
    outs = eng.generate(texts, SamplingParams(max_tokens=8, temperature=0))
    for text, out in zip(texts, outs):
        ids = tok(text)["input_ids"]
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(model, ids, 8)
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert_all_free(eng)
