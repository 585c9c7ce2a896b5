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
