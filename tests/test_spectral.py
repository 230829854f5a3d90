"""Spectral normalisation of the linear operator (thesis 4.2.1, Eq. 4.9, Remark 4.9)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save

from invertnet import ConvergenceError, SolverStatus
from invertnet.layers import (
    LipschitzConvNet,
    LipschitzMLP,
    SpectralNormConv2d,
    SpectralNormLinear,
    operator_norms,
    refine_spectral_norms,
    spectral,
)

#: Relative agreement of a converged power iteration with the exact 2-norm.
NORM_RTOL = 1e-6


def _conv_operator_matrix(conv, weight, input_shape):
    """The explicit matrix of v -> conv2d(v, weight) on inputs of the given (C, H, W) shape."""
    size = torch.Size(input_shape).numel()

    def apply(v):
        return F.conv2d(v.view(1, *input_shape), weight, stride=conv.stride, padding=conv.padding).flatten()

    return torch.autograd.functional.jacobian(apply, torch.zeros(size, dtype=weight.dtype))


@pytest.mark.parametrize("stride, kernel_size, padding", [(1, 3, 1), (2, 3, 1), (1, 5, 2), (2, 4, 0)])
def test_conv_operator_norm_matches_explicit_matrix(stride, kernel_size, padding):
    conv = SpectralNormConv2d(2, 3, kernel_size, stride=stride, padding=padding, coeff=1e6).double()
    conv(torch.randn(1, 2, 6, 6, dtype=torch.float64))
    record = conv.refine_spectral_norm()
    assert record.success
    exact = torch.linalg.matrix_norm(_conv_operator_matrix(conv, conv.weight, (2, 6, 6)), ord=2)
    assert abs(record.estimate - exact.item()) <= NORM_RTOL * exact.item()
    assert record.estimate <= exact.item() * (1 + 1e-12) <= record.bound
    reshaped_kernel_norm = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
    assert not torch.isclose(reshaped_kernel_norm, exact, rtol=1e-3), "must not be the reshaped kernel's norm"


@pytest.mark.parametrize("coeff", [0.5, 0.9, 0.97])
def test_every_conv_block_layer_is_within_coeff_after_convergence(coeff):
    g = LipschitzConvNet(3, 8, kernel_sizes=(3, 1, 3), coeff=coeff).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(5.0)  # far above the cap, so the normalisation must act
    g(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    refine_spectral_norms(g)
    g.eval()
    shapes = [(3, 5, 5), (8, 5, 5), (8, 5, 5)]
    for layer, shape in zip(g.normalized_layers(), shapes, strict=True):
        matrix = _conv_operator_matrix(layer, layer.normalized_weight(), shape)
        norm = torch.linalg.matrix_norm(matrix, ord=2).item()
        assert norm <= layer.operator_norm_bound() <= coeff, "certified within the cap after refinement"
        assert norm >= coeff * (1 - 2 * NORM_RTOL), "scaled to the cap (up to the certified gap) when above it"


def test_every_mlp_layer_is_within_coeff_after_convergence():
    g = LipschitzMLP(6, 32, n_layers=4, coeff=0.9).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(5.0)
    refine_spectral_norms(g)
    for layer in g.eval().normalized_layers():
        assert torch.linalg.matrix_norm(layer.normalized_weight(), ord=2).item() <= 0.9
    assert 0.9**4 * (1 - 8 * NORM_RTOL) <= g.lipschitz_bound() <= 0.9**4


def test_layers_below_the_cap_are_not_scaled_up():
    layer = SpectralNormLinear(4, 4, coeff=0.9).double()
    layer.weight.data.mul_(0.01)
    layer.refine_spectral_norm()
    torch.testing.assert_close(layer.normalized_weight(), layer.weight, atol=0, rtol=0)


def test_training_mode_runs_power_iterations_and_eval_does_not():
    layer = SpectralNormLinear(5, 5, coeff=0.9, n_power_iterations=2).double()
    v_before = layer.v.clone()
    layer(torch.randn(3, 5, dtype=torch.float64))
    assert not torch.equal(layer.v, v_before)
    layer.eval()
    v_eval = layer.v.clone()
    layer(torch.randn(3, 5, dtype=torch.float64))
    assert torch.equal(layer.v, v_eval)


@pytest.mark.parametrize("in_features, out_features", [(16, 40), (40, 16), (24, 24)])
@pytest.mark.parametrize("steps", [8, 13, 32])
def test_gram_squaring_gives_the_vectors_of_one_power_step_at_a_time(in_features, out_features, steps):
    squared = SpectralNormLinear(in_features, out_features, n_power_iterations=steps).double()
    stepwise = SpectralNormLinear(in_features, out_features, n_power_iterations=1).double()
    stepwise.load_state_dict(squared.state_dict())
    x = torch.randn(3, in_features, dtype=torch.float64)
    assert spectral.gram_power_pays(squared.weight.shape, steps)
    squared(x)
    for _ in range(steps):
        stepwise(x)
    torch.testing.assert_close(squared.v, stepwise.v, rtol=0, atol=1e-12)
    torch.testing.assert_close(squared.u, stepwise.u, rtol=0, atol=1e-12)
    torch.testing.assert_close(squared.sigma, stepwise.sigma, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gram_squaring_without_intermediate_normalisation_stays_accurate_in_low_precision(dtype, atol):
    torch.manual_seed(0)
    squared = SpectralNormLinear(64, 128, n_power_iterations=32)
    squared.weight.data.mul_(1e-3)  # a small weight: its powers would underflow unless rescaled
    stepwise = SpectralNormLinear(64, 128, n_power_iterations=1)
    stepwise.load_state_dict(squared.state_dict())
    squared.to(dtype)(torch.randn(3, 64, dtype=dtype))
    stepwise.double()(torch.randn(3, 64, dtype=torch.float64))
    for _ in range(31):
        stepwise(torch.randn(3, 64, dtype=torch.float64))
    assert torch.isfinite(squared.v).all() and abs(torch.linalg.vector_norm(squared.v.double()) - 1) < atol
    torch.testing.assert_close(squared.v.double(), stepwise.v, rtol=0, atol=atol)
    torch.testing.assert_close(squared.sigma.double(), stepwise.sigma, rtol=atol, atol=0)


def test_gram_squaring_is_chosen_only_where_it_saves_operations():
    assert not spectral.gram_power_pays((128, 128), 5)  # too few steps: the plain loop
    assert spectral.gram_power_pays((128, 64), 8)
    assert spectral.gram_power_pays((256, 256), 64)
    assert not spectral.gram_power_pays((256, 256), 16)  # side^3 multiply-adds outweigh 16 steps' overhead
    assert not spectral.gram_power_pays((4096, 1024), 64)


def test_gram_squaring_neither_overflows_nor_underflows_in_float32():
    layer = SpectralNormLinear(64, 64, n_power_iterations=64)
    with torch.no_grad():
        layer.weight.mul_(1e4)  # eigenvalues of W^T W near 1e8: (1e8)^64 would overflow unscaled
        layer.weight[:, 0].mul_(3)  # a clear top singular vector
    layer(torch.randn(2, 64))
    assert torch.isfinite(layer.v).all() and torch.isfinite(layer.u).all()
    exact = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)
    torch.testing.assert_close(layer.sigma.double(), exact, rtol=1e-4, atol=0)


def test_a_mixed_norm_estimate_that_no_longer_moves_is_stalled_not_max_iter():
    """The loose mixed-norm bound leaves a gap the estimate cannot close; an estimate converged to the last bit
    (two unchanged steps) is STALLED at once, not iterated until max_iter."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(4, 16, coeff=0.9, n_power_iterations=200, domain_order=1.5, codomain_order=3.0)
    layer = layer.double()
    layer(torch.randn(3, 4, dtype=torch.float64))  # 200 steps: converged
    record = layer.refine_spectral_norm(max_iter=100)
    assert record.status is SolverStatus.STALLED and record.iterations < 10
    assert layer.operator_norm_bound() <= 0.9


def test_power_iteration_reports_non_convergence(monkeypatch):
    monkeypatch.setattr(operator_norms, "EXACT_MATRIX_ENTRIES", 0)  # no exact SVD to start from
    layer = SpectralNormLinear(20, 20, coeff=0.9).double()
    with pytest.raises(ConvergenceError, match="max_iter") as error:
        refine_spectral_norms(layer, tol=1e-12, max_iter=2)
    assert "still rising" in str(error.value) and "residual" not in str(error.value)


def test_gradient_flows_through_the_normalisation():
    layer = SpectralNormLinear(3, 3, coeff=0.5).double()
    layer.weight.data.mul_(10)
    layer.refine_spectral_norm()
    layer(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@given(p=st.floats(1.2, 4.0), q=st.floats(1.2, 4.0))
def test_mixed_norm_estimate_is_a_tight_lower_bound_and_the_bound_an_upper_one(p, q):
    torch.manual_seed(1)
    layer = SpectralNormLinear(3, 3, coeff=1e6, domain_order=p, codomain_order=q).double()
    record = layer.refine_spectral_norm(tol=1e-9)
    sigma = record.estimate
    directions = torch.randn(200_000, 3, dtype=torch.float64)
    ratios = torch.linalg.vector_norm(directions @ layer.weight.T, ord=q, dim=1) / torch.linalg.vector_norm(
        directions, ord=p, dim=1
    )
    # The estimate is attained by a vector, so it cannot exceed the true norm; dense random search of the
    # 3-D sphere gets within 1e-3 of the maximum, and the power method should find it.
    assert sigma <= ratios.max().item() * (1 + 1e-3)
    assert sigma >= ratios.max().item() * (1 - 1e-3)
    assert record.bound >= ratios.max().item() and layer.operator_norm_bound() >= ratios.max().item()


def test_mixed_norm_with_p_equal_q_equal_2_is_the_spectral_norm():
    layer = SpectralNormLinear(4, 3, coeff=1e6, domain_order=2.0, codomain_order=2.0).double()
    exact = torch.linalg.matrix_norm(layer.weight, ord=2).item()
    assert layer.refine_spectral_norm().estimate == pytest.approx(exact, rel=NORM_RTOL)


def test_invalid_norm_orders_and_coeff_are_refused():
    with pytest.raises(ValueError, match="orders"):
        SpectralNormLinear(2, 2, domain_order=1.0)
    with pytest.raises(ValueError, match="coeff"):
        SpectralNormLinear(2, 2, coeff=0.0)
    with pytest.raises(ValueError, match="first and last"):
        LipschitzMLP(2, 4, n_layers=2, norm_orders=(2.0, 3.0, 4.0))


def test_conv_refuses_a_new_input_size_in_eval_mode():
    conv = SpectralNormConv2d(2, 2, 3).double()
    conv(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    conv.eval()
    with pytest.raises(ValueError, match="refine_spectral_norm"):
        conv(torch.randn(1, 2, 6, 6, dtype=torch.float64))


def test_conv_power_vectors_load_into_a_fresh_layer():
    conv = SpectralNormConv2d(2, 3, 3).double()
    conv(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    conv.refine_spectral_norm()
    fresh = SpectralNormConv2d(2, 3, 3).double()
    fresh.load_state_dict(load(save(conv.state_dict())))
    fresh.eval()
    conv.eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), conv(x), atol=0, rtol=0)
