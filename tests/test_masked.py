"""MintNet layers (Song, Meng & Ermon 2019): triangular masks, the exact diagonal, the Newton / sequential inverses."""

import pytest
import torch

from invertnet import ConvergenceError, SolverStatus
from invertnet.layers import MaskedConv2d, MintBlock, MintLayer, triangular_mask
from invertnet.models import mintnet_classifier, mintnet_flow
from invertnet.models.mintnet_flows import squeeze_positions
from invertnet.solvers import sequential_solve, triangular_newton
from tests.tolerances import FLOAT64_INVERSE_ATOL, assert_close


def _jacobian(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Brute-force Jacobian of one sample, (n, n) over the flattened (C, H, W) positions."""
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: module(v.view(1, *shape)).flatten(), x.flatten())


def _random_layer(direction: str, channels: int = 2, k: int = 3, kernel: int = 3, std: float = 0.5) -> MintLayer:
    layer = MintLayer(channels, k, kernel, direction).double()
    with torch.no_grad():
        for conv in (layer.conv1, layer.conv2, layer.conv3):
            conv.raw_weight.normal_(0.0, std)  # diagonal taps of both signs in the raw parameters
            conv.bias.normal_(0.0, 0.3)
        layer.log_t.normal_(-1.0, 0.3)
    return layer


@pytest.mark.parametrize("direction", ["lower", "upper"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_jacobian_is_triangular_with_positive_diagonal(direction, kernel):
    layer = _random_layer(direction, kernel=kernel)
    for _ in range(3):
        x = 2.0 * torch.randn(2, 3, 4, dtype=torch.float64)
        jacobian = _jacobian(layer, x)
        off_triangle = jacobian.triu(1) if direction == "lower" else jacobian.tril(-1)
        assert off_triangle.abs().max() == 0.0
        on_triangle = jacobian.tril(-1) if direction == "lower" else jacobian.triu(1)
        assert on_triangle.abs().max() > 1e-3  # the mask keeps real dependencies
        assert jacobian.diagonal().min() >= layer.t.min() * (1 - 1e-12)


@pytest.mark.parametrize("direction", ["lower", "upper"])
def test_analytic_diagonal_matches_brute_force(direction):
    layer = _random_layer(direction, channels=3, k=2)
    x = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    _, diagonal = layer.map_and_diagonal(x)
    assert_close(diagonal.flatten(), _jacobian(layer, x[0]).diagonal())


def test_grouped_block_is_not_triangular_and_log_det_is_exact():
    block = MintBlock(1, 2).double()
    for layer in block:
        with torch.no_grad():
            for conv in (layer.conv1, layer.conv2, layer.conv3):
                conv.raw_weight.normal_(0.0, 0.5)
    x = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    jacobian = _jacobian(block, x[0])
    assert jacobian.triu(1).abs().max() > 1e-3 and jacobian.tril(-1).abs().max() > 1e-3
    assert_close(block.forward_and_log_det(x)[1][0], torch.linalg.slogdet(jacobian)[1])


def test_mask_layout_and_errors():
    mask, diagonal = triangular_mask(4, 2, 3, 2)  # 2 copies per data channel in the output
    assert mask[0, 1].sum() == 0  # copy 0 of channel 0 cannot see channel 1
    assert mask[2, 0].sum() == 9 and mask[3, 0].sum() == 9  # channel 1 sees all of channel 0
    assert diagonal.sum() == 4 and bool(diagonal[1, 0, 1, 1]) and not bool(diagonal[2, 0, 1, 1])
    upper, _ = triangular_mask(1, 1, 3, 1, "upper")
    assert torch.equal(upper[0, 0], mask[0, 0].flip(0, 1))
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d(1, 2, 2)
    with pytest.raises(ValueError, match="multiple of data_channels"):
        MaskedConv2d(3, 4, 3, data_channels=2)
    with pytest.raises(ValueError, match="direction"):
        MintLayer(1, direction="diagonal")
    with pytest.raises(ValueError, match=r"expected \(B, 2, H, W\)"):
        MintLayer(2)(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("direction", ["lower", "upper"])
def test_newton_inverse_is_accurate_and_agrees_with_sequential(direction):
    layer = _random_layer(direction, channels=2, k=4, std=0.6)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        newton = layer.inverse_result(y)
        layer.solver = "sequential"
        sequential = layer.inverse_result(y)
    assert newton.success and sequential.success
    assert (newton.value - x).abs().max() < 1e-8
    assert_close(newton.value, sequential.value, atol=FLOAT64_INVERSE_ATOL, rtol=0)
    assert newton.iterations < 30 < sequential.iterations  # parallel Newton is far cheaper than the proof's order
    assert newton.residual_history[-1] == newton.residual.max().item()


def test_cut_iteration_budget_is_reported():
    layer = _random_layer("lower", std=0.6)
    y = layer(torch.randn(2, 2, 4, 4, dtype=torch.float64)).detach()
    needed = layer.inverse_result(y).iterations
    cut = layer.inverse_result(y, max_iter=needed - 1)
    assert cut.status is SolverStatus.MAX_ITER and not cut.converged.any()
    assert len(cut.residual_history) == needed - 1
    with pytest.raises(ConvergenceError, match="max_iter") as caught:
        layer.inverse(y, max_iter=needed - 1)
    assert caught.value.result.iterations == needed - 1
    layer.inverse(y, max_iter=needed)


def test_safeguard_converges_where_plain_newton_diverges():
    # r(x) = t x + tanh(x): plain Newton from y = 0 at x = 3 jumps to -16, then 20, ... (slope ~ t far out)
    slope = torch.tensor(0.05, dtype=torch.float64)

    def map_and_diagonal(x):
        return slope * x + torch.tanh(x), slope + 1 - torch.tanh(x) ** 2

    y = torch.zeros(1, 1, dtype=torch.float64)
    x = torch.full_like(y, 3.0)
    for _ in range(3):
        value, diagonal = map_and_diagonal(x)
        x = x - value / diagonal
    assert x.abs().item() > 10  # plain Newton runs away
    result = triangular_newton(map_and_diagonal, y, slope, x0=torch.full_like(y, 3.0))
    assert result.success and result.value.abs().item() < 1e-12


def test_solver_reports_nonfinite_and_rejects_bad_settings():
    def blows_up(x):
        return x * torch.inf, torch.ones_like(x)

    y = torch.ones(2, 3, dtype=torch.float64)
    result = triangular_newton(blows_up, y, 1.0, strict=False)
    assert result.status is SolverStatus.NONFINITE and not result.converged.any()
    with pytest.raises(ConvergenceError, match="nonfinite"):
        triangular_newton(blows_up, y, 1.0)
    with pytest.raises(ValueError, match="min_slope must be positive"):
        triangular_newton(blows_up, y, 0.0)
    with pytest.raises(ValueError, match="max_iter"):
        sequential_solve(blows_up, y, 1.0, max_iter_per_coordinate=0)


def test_inverse_gradient_matches_unrolled_newton():
    layer = _random_layer("upper", std=0.5)
    y = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    (implicit,) = torch.autograd.grad((layer.inverse(y) * weights).sum(), y)
    x = y.detach().clone()
    with torch.no_grad():
        for _ in range(50):
            value, diagonal = layer.map_and_diagonal(x)
            x = x - (value - y) / diagonal
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 2, 3, 3)).flatten(), x[0].flatten())
    expected = torch.linalg.solve(jacobian.T, weights[0].flatten())
    assert_close(implicit[0].flatten(), expected)


def test_mintnet_flow_layout_and_density():
    assert squeeze_positions(20, 2) == [6, 12] and squeeze_positions(16, 2) == [5, 10]
    flow = mintnet_flow((1, 8, 8), n_blocks=3, hidden_factor=2, n_squeezes=2, levels=17)
    assert flow.base.event_shape == (16, 2, 2)
    levels = torch.randint(0, 17, (5, 1, 8, 8)).float()
    bits = flow.bits_per_dim(levels)
    assert bits.shape == (5,) and torch.isfinite(bits).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        mintnet_flow((1, 6, 6), n_squeezes=2)
    with pytest.raises(ValueError, match="grouped layers"):
        squeeze_positions(2, 2)


def test_mintnet_classifier_features_invert_to_the_input():
    model = mintnet_classifier((1, 8, 8), n_classes=3, n_blocks=3, hidden_factor=2, n_squeezes=1, pad_channels=2)
    model = model.double()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # batch-norm running statistics
            model(torch.randn(16, 1, 8, 8, dtype=torch.float64))
    model.eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z = model.features(x)
        assert z.shape == (4, 8, 4, 4) and model(x).shape == (4, 3)
        assert (model.invert_features(z) - x).abs().max() < 1e-8
    layers = [type(part).__name__ for part in model.body]
    assert layers[:3] == ["InjectivePad", "InvertibleBatchNorm", "MintLayer"] and layers.count("Squeeze") == 1
    with pytest.raises(ValueError, match="pad_channels"):
        mintnet_classifier((3, 8, 8), pad_channels=2)


def _strongly_coupled(hidden_factor: int, log_t: float, solver: str = "newton") -> MintLayer:
    """A layer far from identity: Xavier gain 5 and t = e^log_t, so that J's off-diagonal part dominates."""
    torch.manual_seed(0)
    layer = MintLayer(1, hidden_factor=hidden_factor, init_gain=5.0, solver=solver).double()
    with torch.no_grad():
        layer.log_t.fill_(log_t)
    return layer


def test_a_strongly_coupled_layer_is_reported_diverged_not_max_iter():
    """t = e^-5, gain 5, a 1x16x16 input: the parallel Newton's later coordinates overshoot by orders of
    magnitude before the earlier ones settle (measured: residual 1e-0 to 4e12 in 4 evaluations)."""
    from invertnet.solvers import triangular_newton

    layer = _strongly_coupled(4, -5.0)
    y = layer(torch.randn(1, 1, 16, 16, dtype=torch.float64)).detach()
    record = triangular_newton(layer.map_and_diagonal, y, layer.t.detach(), strict=False)
    assert record.status is SolverStatus.DIVERGED and not record.converged.any()
    assert max(record.residual_history) > 1e8 * record.residual_history[0]
    assert record.condition_number is None  # no solution to judge the conditioning at
    with pytest.raises(ConvergenceError, match="diverged"):
        triangular_newton(layer.map_and_diagonal, y, layer.t.detach())
    fallback = layer.inverse_result(y, strict=False)  # the layer solves again, sequentially
    assert fallback.status is not SolverStatus.DIVERGED and fallback.residual.item() < 1e-8


def test_an_ill_conditioned_layer_is_not_called_a_success():
    """t = e^-5, gain 5, 1x10x10, sequential solve: residual 1e-11 but cond_inf(J) ~ 2e17, so the unique
    solution is off by more than 1 (measured 10.8): ILL_CONDITIONED with estimates that say so, not SUCCESS."""
    layer = _strongly_coupled(2, -5.0, solver="sequential")
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    y = layer(x).detach()
    record = layer.inverse_result(y)
    assert record.status is SolverStatus.ILL_CONDITIONED and not record.converged.any()
    assert record.residual.item() < 1e-10
    error = (record.value - x).abs().max()
    assert error > 1.0
    exact = torch.linalg.cond(_jacobian(layer, record.value[0]), p=float("inf"))
    assert record.condition_kind == "estimate" and exact / 10 <= record.condition_number.item() <= 10 * exact
    assert record.forward_error_estimate.item() >= error
    with pytest.raises(ConvergenceError, match="ill_conditioned") as caught:
        layer.inverse(y)
    assert "forward error estimate" in str(caught.value)


def test_a_well_conditioned_layer_reports_its_condition_estimate():
    layer = _random_layer("upper")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    record = layer.inverse_result(layer(x).detach())
    assert record.success and record.condition_kind == "estimate"
    for sample in range(2):
        exact = torch.linalg.cond(_jacobian(layer, record.value[sample]), p=float("inf"))
        assert exact / 3 <= record.condition_number[sample] <= exact * (1 + 1e-9)  # Hager: a lower estimate
    assert (record.forward_error_estimate >= (record.value - x).flatten(1).abs().amax(1)).all()


def test_a_strongly_coupled_layer_is_inverted_where_parallel_newton_diverges():
    from invertnet.solvers import triangular_newton

    torch.manual_seed(0)
    layer = MintLayer(2, 4).double()
    with torch.no_grad():
        for conv in (layer.conv1, layer.conv2, layer.conv3):
            conv.raw_weight.normal_(0.0, 0.5)
        layer.log_t.fill_(-3.0)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = layer(x).detach()
    parallel = triangular_newton(layer.map_and_diagonal, y, layer.t.detach(), strict=False)
    assert parallel.status is SolverStatus.DIVERGED  # measured: residual ~1e10
    result = layer.inverse_result(y)
    assert result.success and (result.value - x).abs().max() < 1e-5
