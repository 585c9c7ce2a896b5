"""The C++ CPU kernels against the PyTorch layer code they stand in for, on fresh random inputs
(decode attention is tested in `test_cpu_attention`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyla.runtime.layers.norm import rms_norm
from hyla.runtime.layers.rotary import apply_rotary
from hyla.runtime.ops import cpu_kernels

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernels():
    assert cpu_kernels.available(), "the CPU kernels must build on a machine with a compiler"
    with torch.no_grad():
        yield


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding of the dtype (summation order differs from PyTorch's)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if got.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 576), (37, 2048), (3, 50)])
def test_rms_norm_and_the_residual_add_before_it(rows: int, width: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * width)
    x, a = (torch.randn(rows, width, generator=gen).mul(3).to(dtype) for _ in range(2))
    w = torch.randn(width, generator=gen).to(dtype)
    close(cpu_kernels.rms_norm(x, w, 1e-5), rms_norm.plain(x, w, 1e-5))
    h, y = cpu_kernels.add_rms_norm(x, a, w, 1e-6)
    assert torch.equal(h, x + a)
    close(y, rms_norm.plain(x + a, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 18])
def test_rotary_in_place_on_views_of_a_qkv_row(head_dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    T, Hq, Hkv = 11, 6, 2
    qkv = torch.randn(T, (Hq + 2 * Hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : Hq * head_dim].view(T, Hq, head_dim)
    k = qkv[:, Hq * head_dim : (Hq + Hkv) * head_dim].view(T, Hkv, head_dim)
    v_before = qkv[:, (Hq + Hkv) * head_dim :].clone()
    angles = torch.rand(T, head_dim // 2, generator=gen) * 1000
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q = apply_rotary.plain(q[None], cos[None], sin[None])[0]
    want_k = apply_rotary.plain(k[None], cos[None], sin[None])[0]
    cpu_kernels.rotary_(q, k, cos, sin)
    close(q, want_q)
    close(k, want_k)
    assert torch.equal(qkv[:, (Hq + Hkv) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_the_slots_index_copy_writes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    pool_k, pool_v = (torch.randn(64, 3, 32, generator=gen).to(dtype) for _ in range(2))
    kv = torch.randn(5, 2 * 3 * 32, generator=gen).to(dtype)  # k and v as views of one row
    k, v = kv[:, :96].view(5, 3, 32), kv[:, 96:].view(5, 3, 32)
    slots = torch.randperm(64, generator=gen)[:5]
    want_k, want_v = pool_k.clone().index_copy_(0, slots, k), pool_v.clone().index_copy_(0, slots, v)
    cpu_kernels.store_kv(k, v, pool_k, pool_v, slots)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels.store_kv(k, v, pool_k, pool_v, slots + 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_the_halves_of_a_gate_up_row(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(9, 2 * 1536, generator=gen) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gate_up[:, :1536], gate_up[:, 1536:]
    close(cpu_kernels.silu_mul(gate, up), F.silu(gate) * up)


def test_kernels_refuse_what_they_cannot_run() -> None:
    x = torch.randn(2, 8, dtype=torch.float16)
    assert not cpu_kernels.usable(x)
    assert not cpu_kernels.usable(torch.randn(2, 8), torch.randn(8, dtype=torch.bfloat16))
    with torch.enable_grad():
        assert not cpu_kernels.usable(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.rms_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.bfloat16), 1e-6)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype, conv_dtype, tol", [
    (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2), (torch.bfloat16, torch.float32, 2e-2),
])
def test_gdn_decode_steps_match_the_unfused_ops(dtype: torch.dtype, conv_dtype: torch.dtype, tol: float) -> None:
    """Six decode steps of one GDN layer: the fused kernel against the ops it replaces, on strided
    rows of one projection, permuted slots and fp32 states (in bf16 both round the same values, not
    always to the same side)."""
    from hyla.runtime.layers.gated_deltanet import gdn_gates, l2_normalize
    from hyla.runtime.layers.linear_mixer import gated_rms_norm
    from hyla.runtime.ops.state_decode import gdn_decode_, short_conv_decode_

    gen = torch.Generator().manual_seed(11)
    N, H, D, W, slots = 3, 4, 64, 4, 5

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(dtype)

    conv_w, a_log, dt_bias, norm_w = rand(3 * H * D, W), rand(H, dtype=torch.float32), rand(H), rand(D)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    fused = (rand(slots, 3 * H * D, W - 1, dtype=conv_dtype), rand(slots, H, D, D, dtype=torch.float32) * 0.1)
    unfused = tuple(p.clone() for p in fused)
    initial = fused[1].clone()
    for _ in range(6):
        proj = rand(N, 4 * H * D + 2 * H + 8)[:, 8:]  # strided rows, as split views of a stacked product
        qkv, gate, a, b = proj.split([3 * H * D, H * D, H, H], -1)
        got = cpu_kernels.gdn_forward_(qkv, gate, a, b, conv_w, *fused, idx, torch.arange(N + 1), a_log, dt_bias, norm_w,
                                       1e-6, D**-0.5)
        conv_state, state = unfused
        y = short_conv_decode_(qkv, conv_w.to(dtype), conv_state, idx)
        q, k, v = y.view(N, 3, H, D).unbind(1)
        g, beta = gdn_gates.plain(a, b, a_log, dt_bias)
        o = gdn_decode_(l2_normalize.plain(q), l2_normalize.plain(k), v, g, beta, state, idx, D**-0.5)
        want = gated_rms_norm.plain(o, norm_w, 1e-6, gate.view(N, H, D)).reshape(N, -1)
        assert got.dtype == dtype and rel(got, want) <= tol
    assert torch.equal(fused[0], unfused[0])
    assert rel(fused[1], unfused[1]) <= tol
    untouched = [1, 3]
    assert torch.equal(fused[1][untouched], initial[untouched])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gdn_forward_on_packed_chunks_matches_the_chunked_reference(dtype: torch.dtype, tol: float) -> None:
    """Prefill chunks of several lengths (one empty) continuing from their slots' states: the
    kernel's token-by-token recurrence against the varlen conv and the chunked delta rule."""
    from hyla.runtime.layers.gated_deltanet import gdn_gates, l2_normalize
    from hyla.runtime.layers.linear_mixer import gated_rms_norm
    from hyla.runtime.ops import gated_delta_rule, short_conv

    gen = torch.Generator().manual_seed(12)
    H, D, W, slots = 3, 64, 4, 6
    lens = [5, 0, 37, 1, 70]
    T, N = sum(lens), len(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(dtype)

    conv_w, a_log, dt_bias, norm_w = rand(3 * H * D, W), rand(H, dtype=torch.float32), rand(H), rand(D)
    idx = torch.tensor([5, 1, 0, 3, 2])
    conv_pool, state_pool = rand(slots, 3 * H * D, W - 1), rand(slots, H, D, D, dtype=torch.float32) * 0.1
    proj = rand(T, 4 * H * D + 2 * H)
    qkv, gate, a, b = proj.split([3 * H * D, H * D, H, H], -1)
    y, conv_want = short_conv(qkv[None], conv_w.to(dtype), conv_state=conv_pool[idx], cu_seqlens=cu)
    q, k, v = y[0].view(T, 3, H, D).unbind(1)
    g, beta = gdn_gates.plain(a, b, a_log, dt_bias)
    o, state_want = gated_delta_rule(
        l2_normalize.plain(q)[None], l2_normalize.plain(k)[None], v[None], g[None], beta[None],
        scale=D**-0.5, initial_state=state_pool[idx], cu_seqlens=cu, mode="chunk",
    )
    want = gated_rms_norm.plain(o[0], norm_w, 1e-6, gate.view(T, H, D)).reshape(T, -1)
    got = cpu_kernels.gdn_forward_(qkv, gate, a, b, conv_w, conv_pool, state_pool, idx, cu, a_log, dt_bias, norm_w,
                                   1e-6, D**-0.5)
    assert rel(got, want) <= tol
    torch.testing.assert_close(conv_pool[idx].float(), conv_want.float(), atol=tol, rtol=tol)
    assert rel(state_pool[idx], state_want) <= tol


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_layer_halves_match_the_layer_modules_in_the_engine(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 engine runs (prefill, a cached-prefix suffix, decode) with each decoder layer's halves as
    one C++ op each, against the same runs through the layer modules."""
    from hyla.convert.transfer import hybrid_from_teacher
    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig
    from hyla.runtime.layers import cpu_halves
    from hyla.runtime.sampling_params import SamplingParams
    from tests.tiny_models import tiny_teacher

    teacher = tiny_teacher("llama")
    model = teacher if kind == "teacher" else hybrid_from_teacher(teacher, ["gdn", "attention", "gdn", "gdn"], seed=2)
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 128, (40,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 17)] + [prefix[:9]]
    params = SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=0)
    calls = {"mixer": 0, "mlp": 0}
    mixer_half, mlp_residual = cpu_halves.mixer_half, cpu_halves.mlp_residual

    def counted(name, fn):
        def run(*args):
            out = fn(*args)
            calls[name] += out is not None
            return out
        return run

    def generate() -> tuple[list, list]:
        import copy

        eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(model="tiny", dtype="bfloat16", cache_memory="32MiB"))
        outs = eng.generate(prompts[:2], params) + eng.generate(prompts[2:], params)
        return ([o.outputs[0].token_ids for o in outs],
                [[next(iter(lp.values()))[0] for lp in o.prompt_logprobs[1:]] for o in outs])

    monkeypatch.setattr(cpu_halves, "mixer_half", counted("mixer", mixer_half))
    monkeypatch.setattr(cpu_halves, "mlp_residual", counted("mlp", mlp_residual))
    tokens, logprobs = generate()
    assert calls["mlp"] > 0 and calls["mixer"] > 0
    monkeypatch.setattr(cpu_halves, "mixer_half", lambda *args: None)
    monkeypatch.setattr(cpu_halves, "mlp_residual", lambda *args: None)
    want_tokens, want_logprobs = generate()
    assert tokens == want_tokens
    for a, b in zip(logprobs, want_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-2, rtol=0)


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_layer_halves_follow_parameters_that_change(kind: str) -> None:
    """A half keeps its resolved kernel arguments between steps only while the parameters they came
    from are unchanged: after an in-place update and after a replaced parameter, the halves give
    the layer modules' outputs for the new weights."""
    from hyla.convert.transfer import hybrid_from_teacher
    from hyla.runtime.engine import LLMEngine
    from hyla.runtime.engine_config import EngineConfig
    from hyla.runtime.layers import cpu_halves
    from hyla.runtime.sampling_params import SamplingParams
    from tests.tiny_models import tiny_teacher

    teacher = tiny_teacher("llama")
    model = teacher if kind == "teacher" else hybrid_from_teacher(teacher, ["gdn", "attention", "gdn", "gdn"], seed=2)
    eng = LLMEngine(model, None, EngineConfig(model="tiny", dtype="bfloat16", cache_memory="32MiB"))
    layers = eng.runner.model.model.layers
    g = torch.Generator().manual_seed(3)

    def halves_and_modules(layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP half against the module path, on the same fresh input (the mixer half needs a step)."""
        x = torch.randn(5, layer.mlp.gate_proj.in_features, generator=g).bfloat16()
        a = torch.randn(x.shape, generator=g).bfloat16()
        with torch.inference_mode():
            half = cpu_halves.mlp_residual(layer.mlp, layer.post_attention_layernorm, x, a)
            h, normed = layer.post_attention_layernorm.add_forward(x, a)
            return half, h + layer.mlp(normed)

    eng.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2))  # every half makes its plan
    assert all("_cpu_half_plan" in layer.mlp.__dict__ for layer in layers)
    for layer in layers:
        half, want = halves_and_modules(layer)
        torch.testing.assert_close(half, want, atol=2e-2, rtol=0)
    with torch.no_grad():
        layers[0].mlp.down_proj.weight.mul_(-2.0)  # in place
        layers[1].mlp.gate_proj.weight = torch.nn.Parameter(layers[1].mlp.gate_proj.weight.flip(0))  # replaced
        layers[2].post_attention_layernorm.weight.add_(1.0)
    for layer in layers:
        half, want = halves_and_modules(layer)
        torch.testing.assert_close(half, want, atol=2e-2, rtol=0)
