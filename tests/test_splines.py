"""Rational-quadratic splines, spline couplings and spline flows (Durkan et al. 2019) beyond the generic suite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from invertnet.layers import ActNorm, LULinear, SplineCoupling, rational_quadratic_spline
from invertnet.layers.splines import MIN_BIN_FRACTION, MIN_DERIVATIVE, spline_parameter_count
from invertnet.models import spline_flow


def _raw(shape: tuple[int, ...], bins: int, scale: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, spline_parameter_count(bins), generator=generator, dtype=torch.float64)


def test_zero_parameters_give_the_identity() -> None:
    x = torch.linspace(-5, 5, 41, dtype=torch.float64)
    y, log_derivative = rational_quadratic_spline(x, torch.zeros(41, spline_parameter_count(6), dtype=torch.float64))
    assert torch.allclose(y, x, atol=1e-12)
    assert torch.allclose(log_derivative, torch.zeros_like(x), atol=1e-12)


@given(bins=st.integers(2, 12), scale=st.floats(0.1, 3.0), bound=st.floats(0.5, 6.0), seed=st.integers(0, 100))
def test_spline_is_increasing_maps_the_interval_onto_itself_and_inverts(
    bins: int, scale: float, bound: float, seed: int
) -> None:
    x = torch.linspace(-1.2 * bound, 1.2 * bound, 301, dtype=torch.float64)
    raw = _raw((1,), bins, scale, seed).expand(301, -1)
    y, log_derivative = rational_quadratic_spline(x, raw, bound)
    assert bool((y[1:] > y[:-1]).all())
    ends, _ = rational_quadratic_spline(torch.tensor([-bound, bound], dtype=torch.float64), raw[:2], bound)
    assert torch.allclose(ends, torch.tensor([-bound, bound], dtype=torch.float64), atol=1e-10)
    outside = x.abs() > bound
    assert torch.equal(y[outside], x[outside]) and bool((log_derivative[outside] == 0).all())
    back, inverse_log_derivative = rational_quadratic_spline(y, raw, bound, inverse=True)
    assert torch.allclose(back, x, atol=1e-8)
    assert torch.allclose(inverse_log_derivative, log_derivative, atol=1e-7)


def test_log_derivative_is_the_derivative_and_floors_hold() -> None:
    bins = 5
    x = (3 * torch.rand(200, dtype=torch.float64) - 1.5).requires_grad_()
    raw = _raw((200,), bins, 6.0)  # extreme raw parameters: the floors keep every slope positive and finite
    y, log_derivative = rational_quadratic_spline(x, raw, bound=2.0)
    (slope,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(slope.log(), log_derivative, atol=1e-8)
    assert bool(torch.isfinite(log_derivative).all())
    assert MIN_DERIVATIVE > 0 and MIN_BIN_FRACTION > 0


def test_spline_gradients_match_finite_differences() -> None:
    x = (2 * torch.randn(12, dtype=torch.float64)).requires_grad_()
    raw = _raw((12,), 4, 0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rational_quadratic_spline(a, b), (x, raw))
    y = rational_quadratic_spline(x, raw)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rational_quadratic_spline(a, b, inverse=True), (y, raw))


def test_spline_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"raw must have shape \(3,\) \+ \(3K - 1,\)"):
        rational_quadratic_spline(torch.zeros(3), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="raw must have shape"):
        rational_quadratic_spline(torch.zeros(3), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="bound must be positive"):
        rational_quadratic_spline(torch.zeros(3), torch.zeros(3, 8), bound=0.0)


def test_coupling_starts_at_the_identity_and_keeps_the_conditioning_part() -> None:
    layer = SplineCoupling((4,), "half", hidden=8, bins=6).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y, log_det = layer.forward_and_log_det(x)
    assert torch.allclose(y, x, atol=1e-12) and torch.allclose(log_det, torch.zeros(10, dtype=torch.float64))
    nn.init.normal_(layer.conditioner[-1].weight, std=0.5)
    y, log_det = layer.forward_and_log_det(x)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])
    assert layer.conditioner[-1].out_features == 2 * spline_parameter_count(6)
    assert "bins=6, bound=3" in repr(layer)


def test_checkerboard_layout_leaves_conditioning_pixels_unchanged() -> None:
    layer = SplineCoupling((1, 4, 4), "checkerboard", hidden=4, bins=3).double()
    for parameter in layer.conditioner.parameters():
        nn.init.normal_(parameter, std=0.5)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y[:, layer.mask], x[:, layer.mask])
    assert not torch.allclose(y[:, ~layer.mask], x[:, ~layer.mask])
    assert torch.allclose(layer.inverse(y), x, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bins": 1}, "bins must be an integer of at least 2"),
        ({"bins": 2.5}, "bins must be an integer"),
        ({"bound": 0.0}, "bound must be a positive finite number"),
        ({"bound": float("inf")}, "bound must be a positive finite number"),
        ({"hidden": 0}, "SplineCoupling: hidden must be positive"),
    ],
)
def test_coupling_refuses_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplineCoupling((4,), "half", **options)


def test_coupling_names_itself_in_input_and_conditioner_errors() -> None:
    with pytest.raises(ValueError, match=r"SplineCoupling.forward: expected input of shape \(B, 4\)"):
        SplineCoupling((4,), "half")(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"SplineCoupling: the conditioner maps \(2, 2\) to \(2, 3\)"):
        SplineCoupling((4,), "half", conditioner=nn.Linear(2, 3), bins=4)(torch.randn(2, 4))


def test_spline_flow_structure_and_errors() -> None:
    flow = spline_flow(3, n_steps=2, hidden=8, bins=5, bound=2.5)
    kinds = [type(part) for part in flow.transform]
    assert kinds == [ActNorm, LULinear, SplineCoupling] * 2
    assert {(part.bins, part.bound) for part in flow.transform if isinstance(part, SplineCoupling)} == {(5, 2.5)}
    assert flow.sample((4,)).shape == (4, 3)
    image = spline_flow((1, 4, 4), n_steps=1, hidden=4, levels=17)
    levels = torch.randint(0, 17, (5, 1, 4, 4)).float()
    assert image.bits_per_dim(levels).shape == (5,)
    with pytest.raises(ValueError, match="spline_flow: n_steps must be positive"):
        spline_flow(2, n_steps=0)
    with pytest.raises(ValueError, match="spline_flow: a coupling needs at least 2 features, got 1"):
        spline_flow(1)


def test_conditional_spline_flow_depends_on_its_context() -> None:
    flow = spline_flow(2, n_steps=2, hidden=8, context_features=3).double()
    for part in flow.transform:
        if isinstance(part, SplineCoupling):
            nn.init.normal_(part.conditioner[-1].weight, std=0.5)
    x = torch.randn(6, 2, dtype=torch.float64)
    first = flow.log_prob(x, context=torch.zeros(6, 3, dtype=torch.float64))
    second = flow.log_prob(x, context=torch.ones(6, 3, dtype=torch.float64))
    assert not torch.allclose(first, second)
