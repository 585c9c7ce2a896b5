"""Pieces of the conversion: head-wise GQA transfer, stage-1 alignment, chunked KL, data, selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

from hyla.convert.budgets import BUDGETS, get_budget
from hyla.convert.corpus import SOURCES
from hyla.convert.data import BatchStream, prepare_blocks
from hyla.convert.distributed import Dist
from hyla.convert.evaluate import TeacherReference
from hyla.convert.kl import chunked_kl
from hyla.convert.loop import LoopSettings
from hyla.convert.probes import ProbeRunner
from hyla.convert.selection import parse_selection, uniform_layers
from hyla.convert.stage1 import run_stage1
from hyla.convert.students import make_student, save_mixers
from tests.test_convert_helpers import single_thread
from tests.tiny_models import tiny_teacher, tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_gqa_transfer_is_head_wise(family: str) -> None:
    """Every query head of a linear layer gets the K/V of the KV head GQA pairs it with."""
    teacher = tiny_teacher(family)
    student = make_student(teacher, [], "gdn", seed=0)
    cfg = teacher.config
    x = torch.randn(2, 5, cfg.hidden_size)
    t_attn, s_attn = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    for proj in ("k_proj", "v_proj"):
        t = getattr(t_attn, proj)(x).view(2, 5, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        expected = repeat_kv(t, cfg.num_attention_heads // cfg.num_key_value_heads)  # HF's own GQA pairing
        got = getattr(s_attn, proj)(x).view(2, 5, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(s_attn.q_proj(x), t_attn.q_proj(x))


def test_new_parameters_follow_the_paper_init() -> None:
    student = make_student(tiny_teacher("llama"), [], "gdn", seed=0)
    mixer = student.model.layers[0].self_attn
    a = mixer.A_log.exp()
    assert bool((a > 0).all() and (a <= 16).all())
    dt = F.softplus(mixer.dt_bias)
    assert bool((dt >= 1e-3 - 1e-6).all() and (dt <= 0.1 + 1e-6).all())
    assert bool((mixer.conv_weight[:, -1] == 1).all() and (mixer.conv_weight[:, :-1] == 0).all())


def test_stage1_loss_falls() -> None:
    teacher = tiny_teacher("qwen3")
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = make_student(teacher, [], "gdn", seed=0)
    blocks = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    result = run_stage1(teacher, student, BatchStream(blocks, 4, 0), 3e-3, LoopSettings(40, Dist(), warmup=2, quiet=True))
    first, last = result.curve[0][1], sum(v for _, v in result.curve[-5:]) / 5
    assert last < 0.5 * first, result.curve
    # only linear-attention parameters changed
    fresh = make_student(teacher, [], "gdn", seed=0)
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, fresh.model.layers[0].mlp.up_proj.weight)
    q_new, q_old = student.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_new, q_old)


def test_zero_step_probe_prefix_reuse_scores_like_a_full_forward(tmp_path) -> None:
    teacher = tiny_teacher("llama")
    base = make_student(teacher, [], "gdn", seed=0)
    save_mixers(base, tmp_path / "mixers.safetensors")
    blocks = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    budget = get_budget("quick", {"batch_size": "2", "probe_tokens": "0", "kl_chunk_tokens": "16"})
    runner = ProbeRunner(
        teacher, tmp_path / "mixers.safetensors", "gdn", 0, budget, blocks, TeacherReference.build(teacher, blocks, 2),
        Dist(), quiet=True,
    )
    full, reused = runner.probe([2]), runner.probe([2], layer=2, base=[])
    assert runner._prefix is not None
    assert reused["kl"] == pytest.approx(full["kl"], rel=1e-5) and reused["kl"] > 0


def test_chunked_kl_matches_full_and_its_gradient() -> None:
    torch.manual_seed(0)
    s = torch.randn(37, 16, requires_grad=True)
    t, ws, wt = torch.randn(37, 16), torch.randn(50, 16), torch.randn(50, 16)
    full = F.kl_div(F.log_softmax(s @ ws.T, -1), F.log_softmax(t @ wt.T, -1), log_target=True, reduction="batchmean")
    (g_full,) = torch.autograd.grad(full, s)
    chunked = chunked_kl(s, t, ws, wt, chunk=8)
    (g_chunk,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunk, g_full)


def test_heldout_split_is_by_whole_documents(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HYLA_CACHE", str(tmp_path / "cache"))
    docs = [f"document number {i} " + "word " * (20 + i % 7) for i in range(60)]
    (tmp_path / "d.jsonl").write_text("\n".join(f'{{"text": "{d}"}}' for d in docs))
    tok = tiny_tokenizer()
    blocks = prepare_blocks(str(tmp_path / "d.jsonl"), tok, 32, 128, 10_000, seed=0)
    assert blocks.heldout.shape == (4, 32) and blocks.train.shape[1] == 32
    held_text, train_text = tok.decode(blocks.heldout.flatten()), tok.decode(blocks.train.flatten())
    held_ids = {int(w) for w in held_text.split("document number ")[1:-1] for w in [w.split()[0]]}
    train_ids = {int(w.split()[0]) for w in train_text.split("document number ")[1:-1]}
    assert held_ids and train_ids and not held_ids & train_ids
    again = prepare_blocks(str(tmp_path / "d.jsonl"), tok, 32, 128, 10_000, seed=0)
    assert torch.equal(again.train, blocks.train)
    with pytest.raises(FileNotFoundError):
        prepare_blocks(str(tmp_path / "missing.txt"), tok, 32, 128, 10_000)


def test_builtin_corpus_ships_with_the_packages() -> None:
    sizes = {s.name: sum(len(d) for d in s.documents()) for s in SOURCES}
    assert len(sizes) >= 2 and all(v > 100_000 for v in sizes.values()), sizes
    assert sum(sizes.values()) > 3_000_000


def test_budget_overrides_and_selection_specs() -> None:
    b = get_budget("quick", {"stage2_tokens": "2e6", "seq_len": "512"})
    assert b.stage2_tokens == 2_000_000 and b.seq_len == 512
    with pytest.raises(ValueError, match="unknown budget field"):
        get_budget("quick", {"nope": "1"})
    with pytest.raises(ValueError):
        get_budget("huge")
    assert parse_selection("layers:3,1", 4) == ("layers", [1, 3])
    with pytest.raises(ValueError):
        parse_selection("layers:9", 4)
    with pytest.raises(ValueError):
        parse_selection("random", 4)
    assert uniform_layers(4, 1) == [2] and uniform_layers(30, 8) == [1, 5, 9, 13, 16, 20, 24, 28]


def test_every_stage_of_every_budget_checkpoints_a_few_times() -> None:
    for name, b in BUDGETS.items():
        stage3 = b.steps(b.stage3_tokens, b.stage3_seq_len or b.seq_len)
        for tokens_steps in (b.steps(b.stage1_tokens), b.steps(b.probe_tokens), b.steps(b.stage2_tokens), stage3):
            if tokens_steps:
                interval = b.checkpoint_interval(tokens_steps)
                written = -(-tokens_steps // interval)  # every `interval` steps, and after the last
                assert written >= min(tokens_steps, b.min_checkpoints), (name, tokens_steps)
                assert interval <= b.checkpoint_every, name
    assert BUDGETS["quick"].checkpoint_interval(16) == 4


def test_background_checkpoints_hold_the_state_as_saved_and_report_a_failed_write(tmp_path) -> None:
    from hyla.convert.checkpoint_writer import BackgroundSaver

    weights = torch.randn(4, 3)
    before = weights.clone()
    saver = BackgroundSaver()
    saver.save(tmp_path / "a" / "checkpoint.pt", {"model": {"w": weights}, "step": 7, "curve": [(0, 1.5)]})
    weights.add_(1)  # training goes on: the file keeps the values at `save`
    saver.save(tmp_path / "b.pt", {"model": {"w": weights}, "step": 8})
    saver.close()
    first = torch.load(tmp_path / "a" / "checkpoint.pt")
    assert torch.equal(first["model"]["w"], before) and first["step"] == 7 and first["curve"] == [(0, 1.5)]
    assert torch.equal(torch.load(tmp_path / "b.pt")["model"]["w"], weights)
    assert not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "file").write_text("x")
    saver = BackgroundSaver()
    saver.save(tmp_path / "file" / "checkpoint.pt", {"step": 1})  # its folder cannot be made
    with pytest.raises(OSError):
        saver.close()
