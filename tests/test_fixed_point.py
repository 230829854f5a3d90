"""Fixed-point iteration and Anderson acceleration: tolerances, bounds, and reported failures."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from invertnet import ConvergenceError, InvertibleSequential, SolverOptions, SolverStatus
from invertnet.layers import ActNorm, InvertibleResidual, LipschitzConvNet, LipschitzMLP, Squeeze, refine_spectral_norms
from invertnet.solvers import default_tolerances, fixed_point

METHODS = ["iteration", "anderson"]


def _block(coeff=0.9, features=6, solver="anderson", scale=4.0):
    g = LipschitzMLP(features, 32, n_layers=3, coeff=coeff).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(scale)  # every layer at its cap: Lip(g) close to coeff**3
    block = InvertibleResidual(g, solver=solver).double()
    refine_spectral_norms(block)
    return block.eval()


def _per_sample_residual(block, x, y):
    with torch.no_grad():
        return torch.linalg.vector_norm((block(x) - y).flatten(1), dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_cos_fixed_point_matches_closed_form(method):
    # x = cos x on [0, 1]: |sin x| <= sin 1 < 0.85 there (the IFT tutorial's contraction example).
    result = fixed_point(torch.cos, torch.zeros(3, 1, dtype=torch.float64), lipschitz=math.sin(1.0), method=method)
    dottie = 0.7390851332151607
    assert result.success
    assert (result.value - dottie).abs().max() <= result.error_bound.max()
    assert (result.value - dottie).abs().max() < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_c09_blocks_reconstruct_below_1e8_and_the_bound_holds(method):
    block = _block(coeff=0.9, solver=method)
    x = 2 * torch.randn(64, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    result = block.inverse_result(y)
    assert result.success
    error = torch.linalg.vector_norm((result.value - x), dim=1)
    assert (result.value - x).abs().max() < 1e-8
    assert (error <= result.error_bound).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("atol, rtol", [(1e-6, 0.0), (0.0, 1e-6), (1e-9, 1e-9), (1e-3, 0.0)])
def test_tolerances_mean_what_their_names_say_per_sample(method, atol, rtol):
    block = _block(coeff=0.9, solver=method)
    x = torch.randn(16, 6, dtype=torch.float64) * torch.logspace(-2, 2, 16, dtype=torch.float64)[:, None]
    with torch.no_grad():
        y = block(x)
    result = block.inverse_result(y, atol=atol, rtol=rtol)
    assert result.success
    true_residual = _per_sample_residual(block, result.value, y)
    torch.testing.assert_close(result.residual, true_residual, atol=1e-12, rtol=1e-9)
    assert (true_residual <= atol + rtol * torch.linalg.vector_norm(y, dim=1)).all()


def test_converged_samples_are_frozen_and_stop_early():
    block = _block(coeff=0.9, solver="iteration")
    x = torch.cat([torch.zeros(1, 6), 1e6 * torch.randn(1, 6)]).double()
    with torch.no_grad():
        y = block(x)
    result = block.inverse_result(y, atol=1e-8, rtol=0)
    easy = block.inverse_result(y[:1], atol=1e-8, rtol=0)
    hard = block.inverse_result(y[1:], atol=1e-8, rtol=0)
    torch.testing.assert_close(result.value[:1], easy.value, atol=1e-14, rtol=0)  # matmul rounding only
    assert easy.iterations < hard.iterations == result.iterations


@pytest.mark.parametrize("method", METHODS)
def test_one_host_read_per_iteration(method, monkeypatch, request):
    # On a GPU every read of a tensor's value by Python waits for the device: the loop reads its stop test once
    # per iteration, and the record its status once.
    block = _block(coeff=0.9, solver=method)
    y = block(torch.randn(8, 6, dtype=torch.float64)).detach()
    reads = request.getfixturevalue("host_reads")  # counting starts here, after the setup
    result = fixed_point(lambda x: y - block.g(x), y, lipschitz=0.9, method=method, strict=False)
    monkeypatch.undo()
    assert result.success and result.iterations > 5
    assert len(reads) == result.iterations + 1, reads


def test_float64_defaults_reach_about_1e10():
    assert default_tolerances(torch.float64) == (1e-10, 1e-10)
    block = _block(coeff=0.9)
    x = torch.randn(8, 6, dtype=torch.float64)
    with torch.no_grad():
        x_back = block.inverse(block(x))
    assert (x_back - x).abs().max() < 1e-9


def test_float32_inverse_uses_float32_tolerances():
    block = _block(coeff=0.9).float()
    x = torch.randn(8, 6)
    with torch.no_grad():
        result = block.inverse_result(block(x))
    assert result.success
    assert (result.value - x).abs().max() < 1e-4


def test_anderson_never_needs_more_iterations_than_plain_on_a_fast_contraction():
    """A freshly initialised block contracts far faster than its bound: Anderson then takes plain steps."""
    block = _block(coeff=0.97, solver="iteration")
    x = torch.randn(32, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    plain = block.inverse_result(y, atol=1e-10, rtol=0)
    block.solver = "anderson"
    accelerated = block.inverse_result(y, atol=1e-10, rtol=0)
    assert plain.success and accelerated.success
    assert accelerated.iterations <= plain.iterations
    torch.testing.assert_close(accelerated.value, plain.value, atol=1e-9, rtol=0)


def test_non_contractive_block_is_reported_never_silently_returned():
    g = LipschitzMLP(4, 16, n_layers=2, coeff=3.0).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(10.0)
    block = InvertibleResidual(g).double()
    refine_spectral_norms(block)
    block.eval()
    assert block.lipschitz_bound() > 1
    y = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(ConvergenceError) as info:
        block.inverse(y)
    assert info.value.result.status in (
        SolverStatus.NOT_CONTRACTIVE,
        SolverStatus.DIVERGED,
        SolverStatus.NONFINITE,
    )
    record = block.inverse_result(y)
    assert not record.success
    assert record.error_bound is None


def test_unknown_lipschitz_and_expanding_map_is_reported_as_diverged():
    result = fixed_point(lambda x: 3 * x + 1, torch.ones(2, 3, dtype=torch.float64), strict=False)
    assert result.status is SolverStatus.DIVERGED
    assert not result.converged.any()


def test_nonfinite_iterates_are_reported():
    result = fixed_point(lambda x: torch.log(x - 1), torch.ones(2, 2, dtype=torch.float64), strict=False)
    assert result.status is SolverStatus.NONFINITE
    assert torch.isfinite(result.value).all(), "the last finite iterate is returned"


def test_max_iter_raises_with_the_record_attached():
    block = _block(coeff=0.97, solver="iteration")
    y = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="increase `max_iter`") as info:
        block.inverse(y, max_iter=3)
    record = info.value.result
    assert record.status is SolverStatus.MAX_ITER
    assert record.iterations == 3
    assert len(record.residual_history) == 3
    x = block.inverse(y, max_iter=3, strict=False)
    assert torch.isfinite(x).all()


def test_invalid_options_are_refused():
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        fixed_point(torch.cos, x0, method="newton")
    with pytest.raises(ValueError, match="atol"):
        fixed_point(torch.cos, x0, atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        fixed_point(torch.cos, x0, max_iter=0)
    with pytest.raises(ValueError, match="anderson_memory"):
        fixed_point(torch.cos, x0, method="anderson", anderson_memory=0)


def test_solver_options_travel_as_one_object_and_override_the_layer_defaults():
    block = _block(solver="iteration")
    block.solver_options = SolverOptions(atol=1e-12, rtol=0.0, max_iter=500)
    y = block(torch.randn(3, 6, dtype=torch.float64)).detach()
    default = block.inverse_result(y)
    assert default.success and (default.residual <= 1e-12).all()
    cut = block.inverse_result(y, SolverOptions(max_iter=2))  # atol, rtol still the layer's
    assert cut.status is SolverStatus.MAX_ITER and cut.iterations == 2
    assert block.inverse_result(y, max_iter=2).iterations == 2  # the same by keyword
    with pytest.raises(ConvergenceError, match="max_iter"):
        block.inverse(y, SolverOptions(max_iter=2))
    torch.testing.assert_close(block.inverse(y, SolverOptions(max_iter=2, strict=False)), cut.value)
    with pytest.raises(TypeError, match="unknown option"):
        block.inverse(y, tolerance=1e-3)


def test_default_tolerances_form_one_table():
    assert default_tolerances(torch.float32) == default_tolerances(torch.float32, "tight") == (1e-5, 1e-5)
    assert default_tolerances(torch.float64, "tight") == (1e-12, 1e-12)
    with pytest.raises(TypeError, match="unsupported dtype"):
        default_tolerances(torch.int64)


def test_conv_block_round_trip_with_error_bound():
    g = LipschitzConvNet(2, 8, coeff=0.9).double()
    block = InvertibleResidual(g).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    block(x)
    refine_spectral_norms(block)
    block.eval()
    with torch.no_grad():
        result = block.inverse_result(block(x))
    assert result.success
    assert (torch.linalg.vector_norm((result.value - x).flatten(1), dim=1) <= result.error_bound).all()


@given(coeff=st.floats(0.1, 0.95), batch=st.integers(1, 5), scale=st.floats(0.01, 100.0))
def test_round_trip_error_within_reported_bound(coeff, batch, scale):
    torch.manual_seed(2)
    block = _block(coeff=coeff, features=3)
    x = scale * torch.randn(batch, 3, dtype=torch.float64)
    with torch.no_grad():
        result = block.inverse_result(block(x))
    assert result.success
    assert (torch.linalg.vector_norm(result.value - x, dim=1) <= result.error_bound * (1 + 1e-9) + 1e-15).all()


def test_inverse_is_differentiable_by_implicit_differentiation():
    block = _block(coeff=0.9)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = block(x).detach().requires_grad_(True)
    x_hat = block.inverse(y)
    (grad_y,) = torch.autograd.grad((x_hat**2).sum(), y)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.unsqueeze(0))[0], x_hat[0].detach())
    expected = torch.linalg.solve(jac.T, 2 * x_hat[0].detach())
    torch.testing.assert_close(grad_y[0], expected, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize(
    "g, bad_shape, expected",
    [
        (LipschitzMLP(4, 8), (2, 5), r"\(B, 4\)"),
        (LipschitzMLP(4, 8), (2, 4, 1), r"\(B, 4\)"),
        (LipschitzConvNet(3, 8), (2, 4, 5, 5), r"\(B, 3, \*, \*\)"),
    ],
)
def test_wrong_input_shape_names_the_expected_shape(g, bad_shape, expected):
    block = InvertibleResidual(g)
    for call in (block, block.forward_and_log_det, block.inverse):
        with pytest.raises(ValueError, match=expected):
            call(torch.randn(*bad_shape))


def _slow_linear_block(dtype, coeff=0.97):
    """A linear branch g(x) = W x + b, W symmetric with eigenvalues spread over [-coeff, coeff].

    The iteration x <- y - g(x) then contracts at rate exactly `coeff` (the spectral radius of W).
    """
    g = LipschitzMLP(32, 32, n_layers=1, coeff=1.0).to(dtype)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    eigenvalues = torch.linspace(-coeff, coeff, 32, dtype=torch.float64)
    g[0].weight.data.copy_(basis @ torch.diag(eigenvalues) @ basis.T)
    block = InvertibleResidual(g, solver="anderson").to(dtype)
    refine_spectral_norms(block)
    return block.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anderson_handles_samples_already_at_their_fixed_point(dtype):
    block = _slow_linear_block(dtype)
    x = torch.randn(8, 32, dtype=dtype)
    x[0] = 0
    with torch.no_grad():
        y = block(x)
        y[0] = block(torch.zeros(1, 32, dtype=dtype))[0]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    result = block.inverse_result(y, atol=tolerance, rtol=0)
    assert result.success, result.summary()


def test_anderson_accelerates_a_slowly_contracting_block():
    block = _slow_linear_block(torch.float64)
    x = torch.randn(16, 32, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    accelerated = block.inverse_result(y, atol=1e-10, rtol=0)
    block.solver = "iteration"
    plain = block.inverse_result(y, atol=1e-10, rtol=0)
    assert accelerated.success and plain.success
    assert accelerated.iterations * 3 <= plain.iterations, (accelerated.iterations, plain.iterations)


def test_anderson_restarts_instead_of_stalling_on_a_float32_floor():
    block = _slow_linear_block(torch.float32)
    x = 30 * torch.randn(16, 32)
    with torch.no_grad():
        y = block(x)
    # 1e-6 absolute on |y| ~ 170 sits near float32's rounding floor: either success or an honest status.
    result = block.inverse_result(y, atol=1e-6, rtol=0, max_iter=300)
    assert result.status in (SolverStatus.SUCCESS, SolverStatus.MAX_ITER)
    assert result.residual.max() < 1e-4


def test_composed_error_bound_of_a_model_holds_and_is_finite():
    model = InvertibleSequential(
        ActNorm(2),
        InvertibleResidual(LipschitzConvNet(2, 8, coeff=0.9)),
        Squeeze(),
        InvertibleResidual(LipschitzConvNet(8, 8, coeff=0.9)),
    ).double()
    x = 2 * torch.randn(6, 2, 4, 4, dtype=torch.float64) + 1
    model(x)
    refine_spectral_norms(model)
    model.eval()
    with torch.no_grad():
        y = model(x)
    result = model.inverse_result(y, atol=1e-4, rtol=0)  # loose, so the bound has something to bound
    assert result.success and result.error_bound is not None
    error = torch.linalg.vector_norm((result.value - x).flatten(1), dim=1)
    assert (error <= result.error_bound).all()
    assert (error > 1e-9).any(), "a loose tolerance leaves an error for the bound to cover"
    assert result.error_bound.max() < 1.0


def test_composed_error_bound_is_none_when_a_block_uses_a_mixed_norm():
    mixed = InvertibleResidual(LipschitzMLP(3, 8, n_layers=2, coeff=0.9, norm_orders=(3.0, 2.0, 3.0)))
    model = InvertibleSequential(InvertibleResidual(LipschitzMLP(3, 8, coeff=0.9)), mixed).double()
    refine_spectral_norms(model)
    model.eval()
    with torch.no_grad():
        result = model.inverse_result(model(torch.randn(2, 3, dtype=torch.float64)))
    assert result.success
    assert result.error_bound is None
