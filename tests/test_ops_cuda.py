"""fla-core CUDA kernels against the CPU reference: bf16 on the GPU vs fp32 on the CPU.

``python tests/test_ops_cuda.py`` prints the relative errors of every case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.ops import gated_delta_rule, gated_linear_attention, short_conv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_REL = 1e-2
H, K, V = 4, 64, 64
LENS = [37, 300, 1, 129]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


def offsets(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])


def make_inputs(op: str, B: int, T: int, seed: int) -> dict:
    """bf16 inputs on the CPU (the reference upcasts exactly these values)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if op == "gdn":
        x = {
            "q": F.normalize(rand(B, T, H, K), dim=-1),
            "k": F.normalize(rand(B, T, H, K), dim=-1),
            "v": rand(B, T, H, V),
            "g": F.logsigmoid(rand(B, T, H)),
            "beta": rand(B, T, H).sigmoid(),
        }
    else:
        x = {
            "q": rand(B, T, H, K),
            "k": rand(B, T, H, K),
            "v": rand(B, T, H, V),
            "gk": F.logsigmoid(rand(B, T, H, K)),
        }
    return {name: t.bfloat16() for name, t in x.items()}


def compare(
    op: str, x: dict, h0: torch.Tensor | None, cu: torch.Tensor | None, mode: str, ref_mode: str,
    dtype: torch.dtype = torch.bfloat16,
):
    """Relative errors (output, final state) of the CUDA run (inputs in `dtype`) against the fp32 CPU reference."""
    fn = gated_delta_rule if op == "gdn" else gated_linear_attention
    o_ref, s_ref = fn(
        **{n: t.float() for n, t in x.items()}, initial_state=h0, cu_seqlens=cu, mode=ref_mode
    )
    o, s = fn(
        **{n: t.cuda().to(dtype) for n, t in x.items()},
        initial_state=None if h0 is None else h0.cuda(),
        cu_seqlens=None if cu is None else cu.cuda(),
        mode=mode,
    )
    assert o.dtype == dtype and o.is_cuda and s.dtype == torch.float32
    return rel(o, o_ref), rel(s, s_ref)


def prefill_case(
    op: str, with_state: bool, varlen: bool, mode: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[float, float]:
    B, T, cu = (1, sum(LENS), offsets(LENS)) if varlen else (2, 300, None)
    N = len(LENS) if varlen else B
    h0 = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(1)) if with_state else None
    return compare(op, make_inputs(op, B, T, seed=2), h0, cu, mode, ref_mode="chunk", dtype=dtype)


def decode_case(op: str, varlen: bool) -> tuple[float, float]:
    N = 6
    B, T, cu = (1, N, torch.arange(N + 1)) if varlen else (N, 1, None)
    h0 = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(3))
    return compare(op, make_inputs(op, B, T, seed=4), h0, cu, mode="auto", ref_mode="recurrent")


def conv_case(varlen: bool, with_state: bool = True) -> tuple[float, float]:
    """Rows of x are strided (a slice of a wider projection), as the layers pass them."""
    gen = torch.Generator().manual_seed(5)
    C, W = 96, 4
    lens = [3, 50, 1, 20, 130, 2]
    B, T, cu = (1, sum(lens), offsets(lens)) if varlen else (3, 40, None)
    N = len(lens) if varlen else B
    x = torch.randn(B, T, C + 8, generator=gen).bfloat16()[..., :C]
    w = torch.randn(C, W, generator=gen)
    state = torch.randn(N, C, W - 1, generator=gen).bfloat16() if with_state else None
    y_ref, s_ref = short_conv(x.float(), w, conv_state=None if state is None else state.float(), cu_seqlens=cu)
    cu_cuda = None if cu is None else cu.cuda()
    y, s = short_conv(x.cuda(), w.cuda(), conv_state=None if state is None else state.cuda(), cu_seqlens=cu_cuda)
    assert y.dtype == torch.bfloat16 and y.is_cuda
    return rel(y, y_ref), rel(s, s_ref)


@pytest.mark.parametrize("op", ["gdn", "gla"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("mode", ["auto", "recurrent"])
def test_prefill_matches_cpu(op, with_state, varlen, mode):
    err_o, err_s = prefill_case(op, with_state, varlen, mode)
    assert err_o <= MAX_REL and err_s <= MAX_REL, (err_o, err_s)


@pytest.mark.parametrize("op", ["gdn", "gla"])
def test_fp32_prefill_matches_cpu(op):
    """fp32 inputs (fp32 serving): GLA must not take fla's chunked kernel, which faults on fp32."""
    err_o, err_s = prefill_case(op, with_state=True, varlen=True, mode="auto", dtype=torch.float32)
    assert err_o <= MAX_REL and err_s <= MAX_REL, (err_o, err_s)


@pytest.mark.parametrize("op", ["gdn", "gla"])
@pytest.mark.parametrize("varlen", [False, True])
def test_decode_matches_cpu(op, varlen):
    err_o, err_s = decode_case(op, varlen)
    assert err_o <= MAX_REL and err_s <= MAX_REL, (err_o, err_s)


@pytest.mark.parametrize("op", ["gdn", "gla"])
def test_training_gradients_match_cpu(op):
    """bf16 forward + backward on the GPU (fla, or the reference where fla cannot train) vs fp32 on the CPU."""
    x = make_inputs(op, B=2, T=200, seed=6)
    fn = gated_delta_rule if op == "gdn" else gated_linear_attention
    weight = torch.randn(2, 200, H, V, generator=torch.Generator().manual_seed(7))
    grads = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        leaves = {n: t.to(device, dtype).requires_grad_() for n, t in x.items()}
        o, _ = fn(**leaves, output_final_state=False)
        (o.float() * weight.to(device)).sum().backward()
        grads[device] = {"o": o, **{n: t.grad for n, t in leaves.items()}}
    errors = {n: rel(grads["cuda"][n], grads["cpu"][n]) for n in grads["cpu"]}
    assert max(errors.values()) <= 2e-2, errors


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_matches_cpu(varlen, with_state):
    err_y, err_s = conv_case(varlen, with_state)
    assert err_y <= MAX_REL and err_s == 0.0, (err_y, err_s)


if __name__ == "__main__":
    for op in ("gdn", "gla"):
        for with_state in (False, True):
            for varlen in (False, True):
                for mode in ("auto", "recurrent"):
                    errs = prefill_case(op, with_state, varlen, mode)
                    case = f"prefill {op} state={with_state} varlen={varlen} mode={mode}"
                    print(f"{case}: o {errs[0]:.2e} state {errs[1]:.2e}")
        for varlen in (False, True):
            errs = decode_case(op, varlen)
            print(f"decode  {op} varlen={varlen}: o {errs[0]:.2e} state {errs[1]:.2e}")
    for varlen in (False, True):
        errs = conv_case(varlen)
        print(f"short_conv varlen={varlen}: y {errs[0]:.2e} state {errs[1]:.2e}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_gdn_step_matches_unfused_ops(dtype, tol):
    """Six decode steps of one GDN layer: the fused kernel against the ops it replaces, on strided
    rows of one projection, permuted slots and fp32 states. In bf16 both sides round the same
    values, but not always to the same side, so they agree to a few bf16 steps."""
    from hyla.runtime.layers.gated_deltanet import gdn_gates, l2_normalize
    from hyla.runtime.layers.linear_mixer import gated_rms_norm
    from hyla.runtime.ops.gdn_step_cuda import fused_gdn_step_
    from hyla.runtime.ops.state_decode import gdn_decode_, short_conv_decode_

    gen = torch.Generator().manual_seed(11)
    N, Hh, D, W, slots = 3, 4, 64, 4, 5

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    conv_w, a_log, dt_bias, norm_w = rand(3 * Hh * D, W), rand(Hh, dtype=torch.float32), rand(Hh), rand(D)
    idx = torch.tensor([4, 0, 2], device="cuda", dtype=torch.int32)
    pools = {name: (rand(slots, 3 * Hh * D, W - 1), rand(slots, Hh, D, D, dtype=torch.float32) * 0.1)
             for name in ("fused", "unfused")}
    pools["unfused"] = tuple(p.clone() for p in pools["fused"])
    for _ in range(6):
        proj = rand(N, 4 * Hh * D + 2 * Hh + 8)[:, 8:]  # strided rows, as split views of a stacked product
        qkv, gate, a, b = proj.split([3 * Hh * D, Hh * D, Hh, Hh], -1)
        got = fused_gdn_step_(qkv, gate, a, b, conv_w, *pools["fused"], idx, a_log, dt_bias, norm_w, 1e-6, D**-0.5)
        conv_state, state = pools["unfused"]
        y = short_conv_decode_(qkv, conv_w, conv_state, idx)
        q, k, v = y.view(N, 3, Hh, D).unbind(1)
        g, beta = gdn_gates.plain(a, b, a_log, dt_bias)
        o = gdn_decode_(l2_normalize.plain(q), l2_normalize.plain(k), v, g, beta, state, idx, D**-0.5)
        want = gated_rms_norm.plain(o, norm_w, 1e-6, gate.view(N, Hh, D)).reshape(N, -1)
        assert rel(got, want) <= tol
    assert torch.equal(pools["fused"][0], pools["unfused"][0])
    assert rel(pools["fused"][1], pools["unfused"][1]) <= tol
