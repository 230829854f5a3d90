"""Batched spectral normalisation of same-shaped linear layers: the same numbers as the layers' own calls."""

import copy

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

import invertnet.models.flows as flows_module
from invertnet.layers import LipschitzMLP, MemorySavingSequential, SpectralNormLinear
from invertnet.layers.spectral import linear_power_steps
from invertnet.layers.spectral_groups import normalize_together, release_together
from invertnet.models import dense_iresnet_flow


def _flow(n_power_iterations):
    torch.manual_seed(0)
    return dense_iresnet_flow(6, n_blocks=4, hidden_features=12, n_power_iterations=n_power_iterations).double()


def _layers(module):
    return [m for m in module.modules() if isinstance(m, SpectralNormLinear)]


@pytest.mark.parametrize("n_power_iterations", [0, 1, 16])
def test_grouped_training_steps_match_the_layers_own_calls(n_power_iterations, monkeypatch):
    """Two training steps of a flow, grouped and layer by layer: log-probs, gradients and power vectors agree."""
    grouped, alone = _flow(n_power_iterations), _flow(n_power_iterations)
    x = torch.randn(7, 6, dtype=torch.float64)
    records = []
    for flow, group in ((grouped, True), (alone, False)):
        if not group:
            monkeypatch.setattr(flows_module, "normalize_together", lambda module: [])
        optimizer = torch.optim.SGD(flow.parameters(), lr=0.1)
        values = []
        for _ in range(2):
            torch.manual_seed(1)
            optimizer.zero_grad()
            log_prob = flow.log_prob(x)
            (-log_prob.mean()).backward()
            values.append(log_prob.detach())
            optimizer.step()
        gradients = [p.grad.clone() for p in flow.parameters()]
        buffers = [(m.u.clone(), m.v.clone(), m.sigma.clone()) for m in _layers(flow)]
        records.append((values, gradients, buffers))
    (values, gradients, buffers), (values_alone, gradients_alone, buffers_alone) = records
    for mine, theirs in zip(values + gradients, values_alone + gradients_alone, strict=True):
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in zip(buffers, buffers_alone, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b)


def test_groups_are_same_shaped_training_layers_in_the_two_norm():
    net = nn.Sequential(
        LipschitzMLP(4, 8, n_layers=2),  # 8x4 and 4x8
        LipschitzMLP(4, 8, n_layers=2),
        LipschitzMLP(4, 8, n_layers=2, coeff=0.9),  # another coefficient: its own group of one per shape
        LipschitzMLP(4, 8, n_layers=2, norm_orders=[2.0, 3.0, 2.0]),  # mixed norms: left to the layers
        MemorySavingSequential(),  # nothing inside memory-saving parts is grouped
    )
    evaluated = LipschitzMLP(4, 8, n_layers=2).eval()
    net.append(evaluated)
    grouped = normalize_together(net)
    assert set(map(id, grouped)) == {id(layer) for layer in _layers(net[0]) + _layers(net[1])}
    assert all(layer._grouped_weight is not None for layer in grouped)
    release_together(grouped)
    assert all(layer._grouped_weight is None for layer in _layers(net))


def test_a_layer_grouped_once_is_not_grouped_again_until_released():
    net = nn.Sequential(*(LipschitzMLP(4, 8, n_layers=2) for _ in range(2)))
    grouped = normalize_together(net)
    before = [layer.v.clone() for layer in grouped]
    assert normalize_together(net) == []  # nested: no second power step
    for layer, v in zip(grouped, before, strict=True):
        torch.testing.assert_close(layer.v, v)
    release_together(grouped)
    assert len(normalize_together(net)) == 4


def test_a_failing_forward_pass_releases_the_group():
    flow = _flow(1)
    with pytest.raises(ValueError, match="NaN|finite"):
        flow.log_prob(torch.full((3, 6), float("nan"), dtype=torch.float64))
    assert all(layer._grouped_weight is None for layer in _layers(flow))


def test_power_vectors_of_a_grouped_step_save_as_safetensors():
    """Each layer's vectors own their storage (views of one stacked tensor would not save)."""
    flow = _flow(16)
    flow.log_prob(torch.randn(5, 6, dtype=torch.float64)).mean().backward()
    state = {name: tensor for name, tensor in flow.state_dict().items()}
    restored = load(save(state))
    fresh = copy.deepcopy(flow)
    fresh.load_state_dict(restored)
    for layer, loaded in zip(_layers(flow), _layers(fresh), strict=True):
        torch.testing.assert_close(layer.v, loaded.v)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (9, 9)])
@pytest.mark.parametrize("steps", [1, 3, 16])
def test_batched_power_steps_equal_one_layer_at_a_time(shape, steps):
    torch.manual_seed(2)
    weights = torch.randn(3, *shape, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(3, shape[1], dtype=torch.float64), dim=-1)
    u_all, v_all = linear_power_steps(weights, v, steps)
    for index in range(3):
        u_one, v_one = linear_power_steps(weights[index], v[index], steps)
        torch.testing.assert_close(u_all[index], u_one)
        torch.testing.assert_close(v_all[index], v_one)
    with pytest.raises(ValueError, match="steps"):
        linear_power_steps(weights, v, 0)
