"""The control variate of the series' first term, tr(J_g), from a dense branch's factored Jacobian."""

import math

import pytest
import torch

from invertnet.layers import LipschitzConvNet, LipschitzMLP, refine_spectral_norms
from invertnet.logdet import ExactLogDet, PowerSeriesLogDet, UnbiasedLogDet
from invertnet.logdet.dense import _dense_jacobian
from invertnet.logdet.trace import trace_control

N_STANDARD_ERRORS = 4


def _branch(n_layers=3, preactivation=True, coeff=0.9, features=4, activation="elu"):
    g = LipschitzMLP(
        features, 12, n_layers=n_layers, coeff=coeff, preactivation=preactivation, activation=activation
    ).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(4.0)  # every layer at its cap: a Jacobian far from the identity
    refine_spectral_norms(g)
    return g.eval()


def _averaged_jacobian(factors, batch, features):
    """C_x by brute force: the Jacobian with every activation derivative after the first two at its batch mean."""
    diagonals = [i for i, factor in enumerate(factors) if not isinstance(factor, tuple)]
    averaged = [
        factor.mean(0, keepdim=True).expand_as(factor) if i in diagonals[2:] else factor
        for i, factor in enumerate(factors)
    ]
    return _dense_jacobian(averaged, batch, features)


@pytest.mark.parametrize(
    "n_layers, preactivation", [(1, False), (2, False), (2, True), (3, False), (3, True), (4, False), (4, True)]
)
def test_trace_and_products_match_the_brute_force_matrices(n_layers, preactivation):
    g = _branch(n_layers, preactivation)
    x = 2 * torch.randn(6, 4, dtype=torch.float64)
    linearization = g.linearize(x)
    control = trace_control(linearization)
    assert control is not None
    jacobian = _dense_jacobian(linearization.factors, 6, 4)
    averaged = _averaged_jacobian(linearization.factors, 6, 4)
    v = torch.randn(6, 4, dtype=torch.float64)
    jv, cv = control.jvp_pair(v)
    torch.testing.assert_close(control.trace.expand(6), torch.diagonal(averaged, dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jacobian, v))
    torch.testing.assert_close(cv, torch.einsum("bij,bj->bi", averaged, v))
    n_activations = n_layers - 1 + preactivation
    assert torch.allclose(averaged, jacobian) == (n_activations <= 2)  # with two or fewer: C_x = J_g


def test_first_term_is_exact_with_two_activation_layers():
    """g = A_3 phi(A_2 phi(A_1 x)): tr(J_g) is one bilinear form per sample, so the one-term series has no noise."""
    g = _branch(n_layers=3, preactivation=False)
    x = 2 * torch.randn(5, 4, dtype=torch.float64)
    jacobian = _dense_jacobian(g.linearize(x).factors, 5, 4)
    with torch.no_grad():
        draws = torch.stack([PowerSeriesLogDet(1, control_variate=True)(g, x)[1] for _ in range(5)])
    torch.testing.assert_close(draws, torch.diagonal(jacobian, dim1=1, dim2=2).sum(-1).expand(5, 5))


@pytest.mark.parametrize("n_samples", [1, 2])
def test_first_term_gradient_is_exact_with_two_activation_layers(n_samples):
    """The gradient surrogate carries the correction too: with C_x = J_g the one-term series' gradient with
    respect to the parameters and the input is the gradient of tr(J_g) itself, for every probe (the roulette's
    gradient has one Neumann term more than its value, by design, so it is not the trace's)."""
    estimator = PowerSeriesLogDet(1, n_samples=n_samples, control_variate=True)
    g = _branch(n_layers=3, preactivation=False)
    x = 2 * torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    exact = torch.diagonal(_dense_jacobian(g.linearize(x).factors, 5, 4), dim1=1, dim2=2).sum()
    expected = torch.autograd.grad(exact, [x, *g.parameters()], allow_unused=True, materialize_grads=True)
    for seed in range(3):
        torch.manual_seed(seed)
        _, log_det = estimator(g, x)
        got = torch.autograd.grad(log_det.sum(), [x, *g.parameters()], allow_unused=True, materialize_grads=True)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_an_empty_batch_gets_no_control_variate():
    """The batch mean of no samples is undefined (NaN in the gradients): the plain probe takes an empty batch."""
    g = _branch(n_layers=4, preactivation=True)
    x = torch.zeros(0, 4, dtype=torch.float64)
    assert trace_control(g.linearize(x)) is None
    _, log_det = PowerSeriesLogDet(3, control_variate=True)(g, x)
    log_det.sum().backward()
    assert log_det.shape == (0,)
    assert all(torch.isfinite(p.grad).all() for p in g.parameters() if p.grad is not None)


def test_a_batch_of_one_gets_the_exact_trace():
    """The batch mean of one sample's derivatives is the sample's own: C_x = J_g for any depth."""
    g = _branch(n_layers=4, preactivation=True)
    x = torch.randn(1, 4, dtype=torch.float64)
    jacobian = _dense_jacobian(g.linearize(x).factors, 1, 4)
    with torch.no_grad():
        _, estimate = PowerSeriesLogDet(1, control_variate=True)(g, x)
    torch.testing.assert_close(estimate, torch.diagonal(jacobian, dim1=1, dim2=2).sum(-1))


def _probe_draws(estimator, g, x, n_draws):
    """(n_draws, B) estimates; every draw sees the same batch, so C_x is the same in all of them."""
    with torch.no_grad():
        return torch.stack([estimator(g, x)[1] for _ in range(n_draws)])


@pytest.mark.parametrize("estimator", [PowerSeriesLogDet, UnbiasedLogDet])
def test_control_variate_is_unbiased_and_spreads_less(estimator):
    """Three activation layers: C_x (the last derivative at its batch mean) differs from J_g, and the estimate
    of the log-det stays unbiased for its target (the series' expectation) with a smaller spread."""
    g = _branch(n_layers=3, preactivation=True, coeff=0.8)
    x = 2 * torch.randn(4, 4, dtype=torch.float64)
    torch.manual_seed(0)
    with_control = _probe_draws(estimator(control_variate=True), g, x, 3000)
    without = _probe_draws(estimator(), g, x, 3000)
    if estimator is PowerSeriesLogDet:  # the target is PS(J_g, 10); the brute-force Jacobian gives it exactly
        jacobian = _dense_jacobian(g.linearize(x).factors, 4, 4)
        power, target = torch.eye(4, dtype=torch.float64).expand(4, 4, 4), 0
        for k in range(1, 11):
            power = power @ jacobian
            target = target + (-1) ** (k + 1) / k * torch.diagonal(power, dim1=1, dim2=2).sum(-1)
    else:  # unbiased for the log-det itself
        target = ExactLogDet()(g, x)[1].detach()
    for draws in (with_control, without):
        standard_error = draws.std(0) / math.sqrt(draws.shape[0])
        assert ((draws.mean(0) - target).abs() <= N_STANDARD_ERRORS * standard_error).all()
    assert (with_control.var(0) < 0.7 * without.var(0)).all()


def _gradient_projections(g, loss, directions):
    g.zero_grad()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in g.parameters()]  # the last bias: none
    return directions @ torch.cat([grad.flatten() for grad in grads])


def test_control_variate_gradient_is_unbiased():
    """The gradient of tr(C_x) - v^T C_x v (through the batch mean too) has mean zero over probes, so the
    estimator's gradient is the exact one's in expectation (12 terms: truncation bias < 1e-8)."""
    g = _branch(n_layers=3, preactivation=True, coeff=0.6)
    x = torch.randn(3, 4, dtype=torch.float64)
    directions = torch.randn(3, sum(p.numel() for p in g.parameters()), dtype=torch.float64)
    exact = _gradient_projections(g, ExactLogDet()(g, x)[1].sum(), directions)
    estimator = PowerSeriesLogDet(12, control_variate=True)
    samples = torch.stack([_gradient_projections(g, estimator(g, x)[1].sum(), directions) for _ in range(1500)])
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mean - exact).abs() <= N_STANDARD_ERRORS * standard_error + 1e-8).all()
    assert standard_error.max() < 0.05 * exact.abs().max(), "the test must be able to see a wrong gradient"


def test_branches_without_dense_factors_get_no_control_variate():
    conv = LipschitzConvNet(2, 3, coeff=0.9).double()
    image = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert trace_control(conv.linearize(image)) is None
    concatenated = _branch(activation="clipswish")
    assert trace_control(concatenated.linearize(torch.randn(2, 4, dtype=torch.float64))) is None
