"""CPU tests of the linear-attention ops: chunked vs recurrent, state carry, varlen, naive loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.ops import gated_delta_rule, gated_linear_attention, short_conv

TOL = {"atol": 1e-5, "rtol": 1e-5}
H, K, V, W = 2, 16, 12, 4


def gdn_inputs(B: int, T: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "q": F.normalize(rand(B, T, H, K), dim=-1),
        "k": F.normalize(rand(B, T, H, K), dim=-1),
        "v": rand(B, T, H, V),
        "g": F.logsigmoid(rand(B, T, H)),
        "beta": rand(B, T, H).sigmoid(),
    }


def gla_inputs(B: int, T: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "q": rand(B, T, H, K),
        "k": rand(B, T, H, K),
        "v": rand(B, T, H, V),
        "gk": F.logsigmoid(rand(B, T, H, K)),
    }


OPS = {"gdn": (gated_delta_rule, gdn_inputs), "gla": (gated_linear_attention, gla_inputs)}


def random_state(N: int, seed: int) -> torch.Tensor:
    return torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed))


def slice_t(x: dict, start: int, end: int) -> dict:
    return {name: t[:, start:end] for name, t in x.items()}


def naive_gdn(q, k, v, g, beta, scale, state):
    B, T = q.shape[:2]
    o = torch.zeros(B, T, H, V)
    S = state.clone()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                s = s * torch.exp(g[b, t, h])
                s = s + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - s.T @ k[b, t, h])
                o[b, t, h] = scale * (s.T @ q[b, t, h])
            S[b, h] = s
    return o, S


def naive_gla(q, k, v, gk, scale, state):
    B, T = q.shape[:2]
    o = torch.zeros(B, T, H, V)
    S = state.clone()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                s = torch.diag(torch.exp(gk[b, t, h])) @ s + torch.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * (s.T @ q[b, t, h])
            S[b, h] = s
    return o, S


def naive_conv(x, weight, state, activation):
    B, T, C = x.shape
    xs = torch.cat([state.transpose(1, 2), x], 1)
    y = torch.zeros(B, T, C)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                y[b, t, c] = (weight[c] * xs[b, t : t + W, c]).sum()
    y = F.silu(y) if activation == "silu" else y
    return y, xs[:, -(W - 1) :].transpose(1, 2)


@pytest.mark.parametrize("op", OPS)
def test_recurrent_matches_naive_loop(op):
    fn, make = OPS[op]
    x, h0 = make(2, 9, seed=1), random_state(2, seed=2)
    naive = naive_gdn if op == "gdn" else naive_gla
    o_ref, s_ref = naive(*x.values(), K**-0.5, h0)
    o, s = fn(**x, initial_state=h0, mode="recurrent")
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gate_scale", [1.0, 8.0])
@pytest.mark.parametrize("length", [40, 157])  # chunks of 16 and of 32 on the CPU
def test_chunk_matches_recurrent(op, with_state, gate_scale, length):
    fn, make = OPS[op]
    x = make(2, length, seed=3)
    gate = "g" if op == "gdn" else "gk"
    x[gate] = x[gate] * gate_scale  # 8: decays far below exp(-88) within a chunk
    h0 = random_state(2, seed=4) if with_state else None
    o_c, s_c = fn(**x, initial_state=h0, mode="chunk")
    o_r, s_r = fn(**x, initial_state=h0, mode="recurrent")
    torch.testing.assert_close(o_c, o_r, **TOL)
    torch.testing.assert_close(s_c, s_r, **TOL)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_split_with_carried_state_equals_whole(op, mode):
    fn, make = OPS[op]
    x, h0 = make(2, 150, seed=5), random_state(2, seed=6)
    o, s = fn(**x, initial_state=h0, mode=mode)
    o1, s1 = fn(**slice_t(x, 0, 67), initial_state=h0, mode=mode)
    o2, s2 = fn(**slice_t(x, 67, 150), initial_state=s1, mode=mode)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **TOL)
    torch.testing.assert_close(s2, s, **TOL)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent", "auto"])
def test_varlen_equals_per_sequence(op, mode):
    fn, make = OPS[op]
    lens = [5, 70, 0, 1, 131]  # padded in two groups on the CPU ({131, 70} and {5, 1}); an empty one
    x, h0 = make(1, sum(lens), seed=7), random_state(len(lens), seed=8)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o, s = fn(**x, initial_state=h0, cu_seqlens=cu, mode=mode)
    for n in range(len(lens)):
        if not lens[n]:
            torch.testing.assert_close(s[n], h0[n].float())  # an empty sequence keeps its state
            continue
        o_n, s_n = fn(**slice_t(x, cu[n], cu[n + 1]), initial_state=h0[n : n + 1], mode=mode)
        torch.testing.assert_close(o[:, cu[n] : cu[n + 1]], o_n, **TOL)
        torch.testing.assert_close(s[n : n + 1], s_n, **TOL)


@pytest.mark.parametrize("op", OPS)
def test_decode_steps_equal_prefill(op):
    fn, make = OPS[op]
    x = make(3, 20, seed=9)
    o, s = fn(**x)  # auto: chunked for T=20
    state, outs = None, []
    for t in range(20):
        o_t, state = fn(**slice_t(x, t, t + 1), initial_state=state)  # auto: recurrent
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, 1), o, **TOL)
    torch.testing.assert_close(state, s, **TOL)


@pytest.mark.parametrize("op", OPS)
def test_dtypes_and_optional_state(op):
    fn, make = OPS[op]
    x = {name: t.bfloat16() for name, t in make(1, 10, seed=10).items()}
    o, s = fn(**x)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert s.shape == (1, H, K, V)
    assert fn(**x, output_final_state=False)[1] is None
    with pytest.raises(ValueError):
        fn(**x, mode="fast")


def conv_inputs(B: int, T: int, C: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=gen), torch.randn(C, W, generator=gen)


@pytest.mark.parametrize("activation", ["silu", None])
def test_short_conv_matches_naive_loop(activation):
    x, w = conv_inputs(2, 7, 5, seed=11)
    state = torch.randn(2, 5, W - 1)
    y, s = short_conv(x, w, conv_state=state, activation=activation)
    y_ref, s_ref = naive_conv(x, w, state, activation)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)
    y0, _ = short_conv(x, w, activation=activation)
    torch.testing.assert_close(y0, naive_conv(x, w, torch.zeros(2, 5, W - 1), activation)[0], **TOL)


def test_short_conv_split_with_carried_state_equals_whole():
    x, w = conv_inputs(3, 12, 6, seed=12)
    y, s = short_conv(x, w)
    state, outs = None, []
    for a, b in [(0, 5), (5, 6), (6, 8), (8, 12)]:  # pieces shorter than W - 1 included
        y_p, state = short_conv(x[:, a:b], w, conv_state=state)
        outs.append(y_p)
    torch.testing.assert_close(torch.cat(outs, 1), y, **TOL)
    torch.testing.assert_close(state, s, **TOL)


def test_short_conv_varlen_equals_per_sequence():
    lens = [4, 1, 2, 9, 0, 3]
    x, w = conv_inputs(1, sum(lens), 6, seed=13)
    state = torch.randn(len(lens), 6, W - 1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    y, s = short_conv(x, w, conv_state=state, cu_seqlens=cu)
    for n in range(len(lens)):
        y_n, s_n = short_conv(x[:, cu[n] : cu[n + 1]], w, conv_state=state[n : n + 1])
        torch.testing.assert_close(y[:, cu[n] : cu[n + 1]], y_n, **TOL)
        torch.testing.assert_close(s[n : n + 1], s_n, **TOL)
