"""FlowDistribution: log_prob, bits/dim against a hand computation, normalisation, sampling."""

import math

import pytest
import torch

from invertnet import ConvergenceError, InvertibleSequential
from invertnet.layers import (
    ActNorm,
    InvertibleResidual,
    LipschitzMLP,
    Logit,
    UniformDequantization,
    refine_spectral_norms,
)
from invertnet.logdet import ExactLogDet
from invertnet.models import FlowDistribution, standard_normal


def _two_d_flow(n_blocks=3):
    blocks = []
    for _ in range(n_blocks):
        g = LipschitzMLP(2, 32, n_layers=3, coeff=0.9)
        for layer in g.normalized_layers():
            layer.weight.data.mul_(4.0)
        blocks.append(InvertibleResidual(g, log_det=ExactLogDet()))
    transform = InvertibleSequential(ActNorm(2), *blocks).double()
    transform(1.5 * torch.randn(256, 2, dtype=torch.float64) + 0.3)  # ActNorm initialisation
    refine_spectral_norms(transform)
    return FlowDistribution(transform.eval(), standard_normal((2,), torch.float64))


def test_bits_per_dim_matches_a_hand_computation():
    actnorm = ActNorm(2).double()
    with torch.no_grad():
        actnorm.loc.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
        actnorm.log_scale.copy_(torch.tensor([0.3, -0.5], dtype=torch.float64))
    flow = FlowDistribution(
        InvertibleSequential(UniformDequantization(4, noise="midpoint"), actnorm).eval(),
        standard_normal((2,), torch.float64),
    )
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # by hand: y = (x + 1/2) / K, z = (y - loc) e^{-s}, log p = sum N(z; 0, 1) - sum s - d log K
    y = [(1 + 0.5) / 4, (2 + 0.5) / 4]
    z = [(y[0] - 0.1) * math.exp(-0.3), (y[1] + 0.2) * math.exp(0.5)]
    log_p = sum(-0.5 * zi**2 - 0.5 * math.log(2 * math.pi) for zi in z) - (0.3 - 0.5) - 2 * math.log(4)
    assert flow.log_prob(x).item() == pytest.approx(log_p, rel=1e-12)
    assert flow.bits_per_dim(x).item() == pytest.approx(-log_p / (2 * math.log(2)), rel=1e-12)
    # the thesis' form: bits/dim of the [0, 1) density plus log2 K
    continuous_bpd = -(log_p + 2 * math.log(4)) / (2 * math.log(2))
    assert flow.bits_per_dim(x).item() == pytest.approx(continuous_bpd + math.log2(4), rel=1e-12)


def test_density_of_an_iresnet_flow_integrates_to_one():
    flow = _two_d_flow()
    grid = torch.linspace(-9, 9, 361, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        density = flow.log_prob(points).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert (density.sum() * cell).item() == pytest.approx(1.0, abs=0.02)


def test_samples_come_from_the_inverse_and_have_finite_log_prob():
    flow = _two_d_flow()
    samples = flow.sample((64,))
    assert samples.shape == (64, 2)
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(samples)).all()


def test_sampling_reports_solver_failure():
    flow = _two_d_flow()
    with pytest.raises(ConvergenceError, match="max_iter"):
        flow.sample((8,), max_iter=1)


def test_discrete_flow_samples_levels_and_bits_per_dim_is_positive():
    transform = InvertibleSequential(UniformDequantization(17), Logit(0.05), ActNorm(4)).double()
    data = torch.randint(0, 17, (128, 4)).double()
    transform(data)  # ActNorm initialisation
    flow = FlowDistribution(transform.eval(), standard_normal((4,), torch.float64))
    samples = flow.sample((32,))
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16
    with torch.no_grad():
        assert (flow.bits_per_dim(data) > 0).all()


def test_rsample_is_differentiable_with_respect_to_parameters():
    flow = _two_d_flow(n_blocks=1)
    flow.rsample((16,)).pow(2).sum().backward()
    grads = [p.grad for p in flow.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mismatched_base_shape_is_named():
    flow = FlowDistribution(ActNorm(3).double(), standard_normal((2,), torch.float64))
    with pytest.raises(ValueError, match="event shape"):
        flow.log_prob(torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "error"), [((-1,), ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_sample_shape_must_be_sizes(shape, error):
    flow = FlowDistribution(ActNorm(2).double(), standard_normal((2,), torch.float64))
    with pytest.raises(error, match="sample_shape"):
        flow.sample(shape)


def test_base_distribution_moves_and_casts_with_the_flow():
    flow = FlowDistribution(ActNorm(2), standard_normal((2,)))
    flow = flow.double()
    assert flow.base.mean.dtype == torch.float64
    x = torch.randn(3, 2, dtype=torch.float64)
    assert flow.log_prob(x).dtype == torch.float64 and flow.sample((4,)).dtype == torch.float64
    assert flow.to("cpu").base.mean.device.type == "cpu"


def test_logit_accepts_its_whole_domain_and_names_values_outside_it():
    layer = Logit(alpha=0.05)
    slightly_outside_the_data = torch.tensor([[-1e-6, 1 + 1e-6]])
    assert torch.isfinite(layer(slightly_outside_the_data)).all()  # a computed inverse may leave [0, 1] a little
    with pytest.raises(ValueError, match=r"expected data in \[0, 1\] \(the map is defined on \(-0.05556, 1.056\)\)"):
        layer(torch.tensor([[0.0, 255.0]]))


@pytest.mark.parametrize(
    ("option", "value"), [("atol", math.nan), ("rtol", math.inf), ("atol", -1e-6), ("max_iter", 0), ("max_iter", 2.5)]
)
def test_sampling_refuses_non_finite_or_meaningless_solver_options(option, value):
    flow = _two_d_flow(n_blocks=1)
    with pytest.raises(ValueError, match=f"solver options: {option}"):
        flow.sample((4,), **{option: value})
