"""CPU linear-attention paths on bf16 activations (decode steps, packed short conv) against the fp32 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.ops.delta_rule import recurrent_gated_delta_rule
from hyla.runtime.ops.gla import recurrent_gla
from hyla.runtime.ops.short_conv import short_conv
from hyla.runtime.ops.state_decode import gdn_decode_, gla_decode_, short_conv_decode_

N, H, K, V, SLOTS, STEPS = 4, 3, 32, 16, 9, 4
IDX = torch.tensor([7, 2, 0, 5])


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("op", ["gdn", "gla"])
def test_recurrent_steps_bf16_inputs(op: str) -> None:
    gen = torch.Generator().manual_seed(len(op))
    q, k = (F.normalize(rand(gen, N, STEPS, H, K), dim=-1).bfloat16() for _ in range(2))
    v = rand(gen, N, STEPS, H, V).bfloat16()
    pool = rand(gen, SLOTS, H, K, V)
    state = pool.clone()
    if op == "gdn":
        g, beta = F.logsigmoid(rand(gen, N, STEPS, H)), rand(gen, N, STEPS, H).sigmoid()
        outs = [gdn_decode_(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, IDX, 0.3) for t in range(STEPS)]
        o_ref, s_ref = recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, 0.3, pool[IDX])
    else:
        gk = F.logsigmoid(rand(gen, N, STEPS, H, K))
        outs = [gla_decode_(q[:, t], k[:, t], v[:, t], gk[:, t], state, IDX, 0.3) for t in range(STEPS)]
        o_ref, s_ref = recurrent_gla(q.float(), k.float(), v.float(), gk, 0.3, pool[IDX])
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.stack(outs, 1).float(), o_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state[IDX], s_ref, atol=1e-5, rtol=1e-5)
    others = torch.ones(SLOTS, dtype=torch.bool)
    others[IDX] = False
    assert torch.equal(state[others], pool[others])


def test_short_conv_steps_bf16() -> None:
    gen = torch.Generator().manual_seed(3)
    C, W = 40, 4
    x = rand(gen, N, STEPS, C).bfloat16()
    weight = rand(gen, C, W).bfloat16()
    pool = rand(gen, SLOTS, C, W - 1).bfloat16()
    state = pool.clone()
    ys = [short_conv_decode_(x[:, t], weight, state, IDX) for t in range(STEPS)]
    y_ref, s_ref = short_conv(x, weight, conv_state=pool[IDX])
    torch.testing.assert_close(torch.stack(ys, 1), y_ref)
    assert torch.equal(state[IDX], s_ref)


def test_packed_short_conv_bf16_matches_fp32_per_sequence() -> None:
    gen = torch.Generator().manual_seed(4)
    C, W, lens = 24, 4, [1, 2, 37, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = rand(gen, 1, sum(lens), C).bfloat16()
    weight = rand(gen, C, W)
    state = rand(gen, len(lens), C, W - 1).bfloat16()
    y, new_state = short_conv(x, weight, conv_state=state, cu_seqlens=cu)
    assert y.dtype == torch.bfloat16
    for n in range(len(lens)):
        y_n, s_n = short_conv(x[:, cu[n] : cu[n + 1]].float(), weight, conv_state=state[n : n + 1].float())
        torch.testing.assert_close(y[:, cu[n] : cu[n + 1]].float(), y_n, atol=3e-2, rtol=2e-2)
        assert torch.equal(new_state[n : n + 1].float(), s_n)
