"""The first-order error estimate of a computed inverse (invertnet.solvers.linearized_inverse_error)."""

from __future__ import annotations

import pytest
import torch

from invertnet.layers import InvertibleResidual, LipschitzConvNet, LipschitzMLP
from invertnet.models import dense_iresnet_flow, mintnet_flow, multiscale_iresnet_flow
from invertnet.solvers import batched_jacobian, jacobian_solve, linearized_inverse_error


def _relative_gap(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return ((estimate - truth).norm() / truth.norm()).item()


def _started(flow, x):
    """The continuous part (after dequantisation) with ActNorm and the power iterations started, in eval mode."""
    transform = flow.transform
    with torch.no_grad():
        transform.train()(x)
    return transform.eval()


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: dense_iresnet_flow(3, n_blocks=3, hidden_features=16, coeff=0.9), (3,)),
        (lambda: multiscale_iresnet_flow((1, 4, 4), n_scales=2, n_blocks=2, hidden_channels=4), (1, 4, 4)),
        (lambda: mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=2, n_squeezes=1), (1, 4, 4)),
    ],
    ids=["dense", "multiscale", "mintnet"],
)
def test_estimate_recovers_a_known_perturbation_of_the_inverse(build, shape):
    torch.manual_seed(0)
    x = torch.rand(5, *shape, dtype=torch.float64) * 0.8 + 0.1
    transform = _started(build().double(), x)
    with torch.no_grad():
        y = transform(x)
    perturbation = 1e-6 * torch.randn_like(x)
    delta = linearized_inverse_error(transform, x + perturbation, y)
    assert delta.shape == x.shape
    assert _relative_gap(delta, perturbation) < 0.05


def test_estimate_tracks_the_error_of_an_inexact_solve():
    torch.manual_seed(1)
    block = InvertibleResidual(LipschitzConvNet(2, 8, kernel_sizes=(3, 1, 3), coeff=0.9)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        block.train()(x)
    block.eval()
    with torch.no_grad():
        y = block(x)
        x_hat = block.inverse(y, rtol=1e-4, atol=0.0)  # a loose solve: its error is what the estimate must see
    error = x_hat - x
    assert error.abs().max() > 1e-7
    assert _relative_gap(linearized_inverse_error(block, x_hat, y), error) < 0.05


def test_jacobian_solve_inverts_the_jacobian_of_a_block():
    torch.manual_seed(2)
    block = InvertibleResidual(LipschitzMLP(3, 16, n_layers=2, coeff=0.7)).double().eval()
    x, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    jacobian = batched_jacobian(block, x)[1]
    u = jacobian_solve(block, x, v)
    assert _relative_gap(torch.einsum("bij,bj->bi", jacobian, u), v) < 2e-2


def test_mismatched_batches_are_named():
    block = InvertibleResidual(LipschitzMLP(2, 8, n_layers=2)).eval()
    with pytest.raises(ValueError, match="x_hat has 3 samples but y has 2"):
        linearized_inverse_error(block, torch.zeros(3, 2), torch.zeros(2, 2))
