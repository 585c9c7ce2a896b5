"""Prepacked bf16 CPU linears: hyla's kernel within one rounding of an fp32 product, oneDNN's bitwise
equal to `F.linear`; both transparent to the model around them."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.layers.cpu_linear import PackedLinear, pack_linears, pack_weight, packed_linear
from hyla.runtime.layers.projections import project, project_groups
from hyla.runtime.loading import as_hybrid
from hyla.runtime.ops import cpu_kernels
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher


@pytest.mark.parametrize("rows", [1, 3, 8, 300, 2048])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(96, 80), (960, 576), (50, 64)])
@pytest.mark.parametrize("backend", ["hyla", "onednn"])
def test_packed_linear_matches_f_linear(
    backend: str, shape: tuple[int, int], rows: int, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "onednn":
        monkeypatch.setenv("HYLA_CPU_KERNELS", "0")
    elif not cpu_kernels.linear_supported():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(rows)
    out_features, in_features = shape
    w = torch.randn(shape, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    packed = pack_weight(w)
    assert packed.hyla == (backend == "hyla")
    got = packed_linear(x, packed, b)
    assert torch.equal(packed_linear(x.view(1, rows, -1), packed, b), got.view(1, rows, -1))
    if backend == "onednn":
        assert torch.equal(got, F.linear(x, w, b))
        return
    exact = x.float() @ w.float().T + (0 if b is None else b.float())
    # fp32 sums in another order than the exact product: at most one bf16 rounding apart, rarely
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-5)
    assert (got != exact.bfloat16()).float().mean() < 1e-2


def packed_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    pack_linears(model)
    return model


def test_packed_model_keeps_state_dict_tying_and_outputs() -> None:
    model = as_hybrid(tiny_teacher("qwen2")).bfloat16()  # tied lm_head
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    packed = packed_copy(model)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == sum(
        type(m) is nn.Linear for m in model.modules()
    )
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    sd, ref_sd = packed.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, want)
        gen = packed.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(gen, model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0))
    pickle.loads(pickle.dumps(packed))  # the packed weights stay out of copies


def test_packed_weight_follows_weight_changes_and_training() -> None:
    layer = nn.Linear(32, 16).bfloat16()
    pack_linears(layer)  # the module itself is swapped in place
    assert isinstance(layer, PackedLinear)
    x = torch.randn(4, 32).bfloat16()
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2)  # in place: a new version
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight = nn.Parameter(torch.randn(16, 32).bfloat16())  # replaced
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer(x).float().sum().backward()  # with autograd on it is plain F.linear
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        xf = x.float()
        assert torch.equal(layer.float()(xf), F.linear(xf, layer.weight, layer.bias))  # fp32: not packed


def test_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYLA_CPU_PACKED_LINEAR", "0")
    model = nn.Sequential(nn.Linear(4, 4))
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


def test_engine_bf16_same_with_and_without_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing changes a product by at most its last bit (hyla's kernel) or not at all (oneDNN), so the
    engine's bf16 tokens and log-probabilities on this model do not change with it."""
    model = hybrid_from_teacher(tiny_teacher("qwen2"), ["gdn", "attention", "gla", "gdn"], seed=1)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 40, 1)]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, prompt_logprobs=2)

    def run(packed: bool) -> list:
        monkeypatch.setenv("HYLA_CPU_PACKED_LINEAR", "1" if packed else "0")
        eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(model="tiny", dtype="bfloat16", cache_memory="32MiB"))
        assert any(isinstance(m, PackedLinear) for m in eng.model.modules()) == packed
        outs = eng.generate(prompts, params)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]

    assert run(True) == run(False)


def test_project_stacks_packed_linears_exactly() -> None:
    torch.manual_seed(5)
    layers = [nn.Linear(48, 32, bias=True), nn.Linear(48, 16, bias=False), nn.Linear(48, 8, bias=True)]
    plain = [copy.deepcopy(m).bfloat16() for m in layers]
    packed = [copy.deepcopy(m).bfloat16() for m in layers]
    for m in packed:
        pack_linears(m)
    for rows in (1, 8, 333):
        x = torch.randn(1, rows, 48).bfloat16()
        with torch.no_grad():
            want = [m(x) for m in plain]
            got = project(x, *packed)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            stacked, last = project_groups(x, tuple(packed[:2]), (packed[2],))
            assert torch.equal(stacked, torch.cat(want[:2], -1)) and torch.equal(last, want[2])
    with torch.no_grad():
        packed[1].weight.add_(1)  # the stacked copy follows the change
        plain[1].weight.add_(1)
        assert all(torch.equal(a, m(x)) for a, m in zip(project(x, *packed), plain))
    got = project(x, *packed)  # autograd on: one plain call per layer
    got[0].float().sum().backward()
    assert packed[0].weight.grad is not None
