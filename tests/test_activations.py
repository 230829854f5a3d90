"""The 1-Lipschitz activations: closed-form derivatives, Lipschitz constants, the concatenated CLipSwish."""

import pytest
import torch

from invertnet.layers import LipschitzConvNet, LipschitzMLP
from invertnet.layers.activations import (
    CLIPSWISH_DIVISOR,
    CLipSwish,
    ConcatenatedDerivative,
    make_activation,
    width_factor,
)

ELEMENTWISE = ["elu", "softplus", "lipswish"]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_derivative_is_the_autograd_one_and_at_most_one(name):
    activation = make_activation(name).double()
    x = torch.linspace(-8, 8, 401, dtype=torch.float64, requires_grad=True)
    y, derivative = activation.forward_and_derivative(x)
    (autograd,) = torch.autograd.grad(activation(x).sum(), x)
    torch.testing.assert_close(y, activation(x))
    torch.testing.assert_close(derivative, autograd)
    assert derivative.abs().max() <= activation.lipschitz_constant


def _clipswish_jacobian_norms(u: torch.Tensor) -> torch.Tensor:
    """sqrt(s(u)^2 + s(-u)^2) / (1.1 * divisor): the 2-norm of CLipSwish's Jacobian at a coordinate, with s the
    swish's derivative at u = beta x."""
    s = torch.sigmoid(u)
    s_neg = torch.sigmoid(-u)
    positive = s * (1 + u * (1 - s))
    negative = s_neg * (1 - u * (1 - s_neg))
    return torch.sqrt(positive**2 + negative**2) / (1.1 * CLIPSWISH_DIVISOR)


def test_clipswish_is_one_lipschitz_for_every_beta():
    """The Jacobian norm depends on u = beta x only. Its maximum on a fine grid plus the grid spacing times a bound
    on its slope stays below 1: the swish's second derivative is at most 0.5 in absolute value, so the norm of
    (s(u), s(-u)) changes at most sqrt(2) 0.5 per unit of u. Beyond |u| = 20 the norm is within 1e-6 of its
    limit 1 / (1.1 * 1.004) (the swish's derivative there is 1 + O(u e^-u) or O(u e^-u))."""
    spacing = 1e-5
    u = torch.arange(-20.0, 20.0 + spacing, spacing, dtype=torch.float64)
    norms = _clipswish_jacobian_norms(u)
    assert norms.max() + spacing * 2**0.5 * 0.5 / 1.1 < 1.0
    tails = _clipswish_jacobian_norms(torch.tensor([-1e3, -20.0, 20.0, 1e3], dtype=torch.float64))
    assert (tails - 1 / (1.1 * CLIPSWISH_DIVISOR)).abs().max() < 1e-6
    assert float(norms.max()) == pytest.approx(1.003965 / CLIPSWISH_DIVISOR, abs=1e-6)


@pytest.mark.parametrize("beta", [0.2, 1.0, 5.0])
def test_clipswish_derivative_is_its_autograd_jacobian(beta):
    activation = CLipSwish(beta).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, derivative = activation.forward_and_derivative(x)
    assert y.shape == (3, 8) and isinstance(derivative, ConcatenatedDerivative)
    torch.testing.assert_close(y, activation(x))
    jacobian = torch.func.vmap(torch.func.jacrev(lambda row: activation(row[None])[0]))(x)  # (3, 8, 4)
    v, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(derivative.apply(v), torch.einsum("bij,bj->bi", jacobian, v))
    torch.testing.assert_close(derivative.adjoint(w), torch.einsum("bij,bi->bj", jacobian, w))
    torch.testing.assert_close(derivative.rows(torch.eye(4, dtype=torch.float64)), jacobian)
    assert torch.linalg.matrix_norm(jacobian, ord=2).max() <= 1.0


def test_clipswish_doubles_the_inputs_of_the_layers_after_it():
    assert width_factor("clipswish") == 2 and width_factor("ELU") == 1
    mlp = LipschitzMLP(3, 10, n_layers=3, activation="clipswish", preactivation=True)
    assert [tuple(layer.weight.shape) for layer in mlp.normalized_layers()] == [(10, 6), (10, 20), (3, 20)]
    assert mlp(torch.randn(5, 3)).shape == (5, 3)
    conv = LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), activation="clipswish")
    assert [layer.in_channels for layer in conv.normalized_layers()] == [4, 8, 8]
    assert conv(torch.randn(2, 2, 5, 5)).shape == (2, 2, 5, 5)


def test_clipswish_is_refused_with_mixed_norms_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="only in the 2-norm"):
        LipschitzMLP(4, 8, activation="clipswish", norm_orders=(2.0, 1.5, 1.5, 2.0))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        width_factor("relu")
