"""Stacked input projections: one product over views, exact against the layers run one by one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.layers.projections import project_groups, stack_linears, stack_projections
from tests.tiny_models import tiny_teacher

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def hybrid(family: str) -> nn.Module:
    return hybrid_from_teacher(tiny_teacher(family), ["gdn", "attention", "gla", "gdn"], seed=3).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases beside bias-less gates
def test_stacked_model_same_outputs_and_state_dict(family: str) -> None:
    model = hybrid(family)
    stacked = copy.deepcopy(model)
    assert stack_projections(stacked) == 8  # four token mixers, four MLPs
    weights = [p.data_ptr() for p in stacked.parameters()]
    stack_projections(stacked)  # again (a second engine on the model): nothing moves
    assert [p.data_ptr() for p in stacked.parameters()] == weights
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, stacked(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sd, ref = stacked.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


@pytest.mark.parametrize("device", DEVICES)
def test_project_groups_on_a_stack(device: str) -> None:
    g = torch.Generator().manual_seed(7)
    layers = tuple(nn.Linear(40, n, bias=b) for n, b in ((24, True), (8, False), (3, True)))
    for m in layers:
        nn.init.normal_(m.weight, generator=g)
    layers = tuple(m.to(device) for m in layers)
    plain = copy.deepcopy(layers)
    stack_linears(layers)
    x = torch.randn(5, 40, generator=g).to(device)
    with torch.no_grad():
        both, last = project_groups(x, layers[:2], layers[2:])
        torch.testing.assert_close(both, torch.cat([plain[0](x), plain[1](x)], -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, plain[2](x), rtol=1e-5, atol=1e-5)
        layers[1].weight.mul_(-3)  # an in-place change reaches the stack: they share storage
        plain[1].weight.mul_(-3)
        torch.testing.assert_close(project_groups(x, layers)[0], torch.cat([m(x) for m in plain], -1))
        layers[0].weight = nn.Parameter(torch.zeros_like(layers[0].weight))  # replaced: stack no longer serves
        assert torch.equal(project_groups(x, layers)[0][:, :24], layers[0].bias.expand(5, 24))


def test_training_through_a_stack_reaches_the_parameters() -> None:
    layers = (nn.Linear(16, 8), nn.Linear(16, 4, bias=False))
    stack_linears(layers)
    out = project_groups(torch.randn(3, 16), layers)[0]
    out.sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)


@pytest.mark.parametrize("seed", range(2))
def test_training_runs_the_linears_as_one_product_with_their_gradients(seed: int) -> None:
    """Autograd on: one product over the concatenated weights, the same outputs and gradients as
    the linears one by one (fresh random layers, a bias on some only)."""
    g = torch.Generator().manual_seed(seed)
    layers = tuple(nn.Linear(40, n, bias=b) for n, b in ((24, True), (8, False), (3, True), (5, False)))
    for m in layers:
        nn.init.normal_(m.weight, generator=g)
    plain = copy.deepcopy(layers)
    x = torch.randn(2, 7, 40, generator=g)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    w = [torch.randn(2, 7, n, generator=g) for n in (32, 3, 5)]
    got = project_groups(xs[0], layers[:2], (layers[2],), (layers[3],))
    want = (torch.cat([plain[0](xs[1]), plain[1](xs[1])], -1), plain[2](xs[1]), plain[3](xs[1]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    sum((o * k).sum() for o, k in zip(got, w)).backward()
    sum((o * k).sum() for o, k in zip(want, w)).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    for m, p in zip(layers, plain):
        torch.testing.assert_close(m.weight.grad, p.weight.grad, rtol=1e-5, atol=1e-5)
        assert (m.bias is None) == (p.bias is None)
        if m.bias is not None:
            torch.testing.assert_close(m.bias.grad, p.bias.grad, rtol=1e-5, atol=1e-5)
