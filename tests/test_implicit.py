"""Seed 002 machinery: GMRES, Newton (dense and Newton-Krylov), derivatives of inverses (Proposition 1), implicit
differentiation of fixed points (Theorem 3, DEQ), and the seed's worked examples."""

import math

import pytest
import torch

from invertnet import ConvergenceError, SolverStatus
from invertnet.layers import (
    DEQ,
    ActNorm,
    ContractiveCell,
    InvertibleResidual,
    LipschitzMLP,
    MintLayer,
    saved_activation_bytes,
)
from invertnet.solvers import (
    batched_jacobian,
    gmres,
    implicit_fixed_point,
    inverse_jvp,
    inverse_vjp,
    newton,
)
from tests.scripts import load_script

DOUBLE = torch.float64


def _matvec(matrices):
    return lambda v: (matrices @ v.unsqueeze(-1)).squeeze(-1)


def test_gmres_solves_batched_systems_and_reports_singular_ones():
    torch.manual_seed(0)
    matrices = torch.randn(5, 30, 30, dtype=DOUBLE) + 12 * torch.eye(30, dtype=DOUBLE)
    b = torch.randn(5, 30, dtype=DOUBLE)
    for restart in (30, 8):
        result = gmres(_matvec(matrices), b, restart=restart)
        torch.testing.assert_close(result.value, torch.linalg.solve(matrices, b), atol=1e-9, rtol=0)
        assert result.success and result.iterations <= 10 * 30
        exact = torch.linalg.cond(matrices)
        assert (result.condition_number <= exact * (1 + 1e-8)).all()  # a lower bound on cond(A)
    warm = gmres(_matvec(matrices), b, x0=torch.linalg.solve(matrices, b), condition_probe=0)
    assert warm.iterations == 1  # the starting residual is already within tolerance
    probed = gmres(_matvec(matrices), b, x0=torch.linalg.solve(matrices, b))
    assert probed.iterations == 1 + 10 and probed.condition_kind == "lower_bound"  # the probe's 10 products
    singular = matrices.clone()
    singular[:, :, 0] = 0  # column 0 gone: b is (almost surely) outside the range
    record = gmres(_matvec(singular), b, strict=False)
    assert record.status in (SolverStatus.SINGULAR, SolverStatus.STALLED) and not record.converged.all()
    with pytest.raises(ConvergenceError):
        gmres(_matvec(singular), b)
    nan = b.clone()
    nan[0, 0] = float("nan")
    assert gmres(_matvec(matrices), nan, strict=False).status is SolverStatus.NONFINITE
    with pytest.raises(ValueError, match="max_iter"):
        gmres(_matvec(matrices), b, max_iter=0)


def _residual_block(features=6, seed=0):
    torch.manual_seed(seed)
    block = InvertibleResidual(LipschitzMLP(features, 16, n_layers=2, coeff=0.9)).double()
    block(torch.randn(4, features, dtype=DOUBLE))  # size the power iterations
    return block.eval()


@pytest.mark.parametrize("jacobian", ["dense", "krylov"])
def test_newton_inverts_a_residual_block(jacobian):
    block = _residual_block()
    x = torch.randn(8, 6, dtype=DOUBLE)
    y = block(x).detach()
    result = newton(block, y, y, jacobian=jacobian)
    assert result.success and result.iterations <= 8  # quadratic: a handful of steps (fixed point: about 30)
    torch.testing.assert_close(result.value, x, atol=1e-9, rtol=0)
    assert (result.condition_number >= 1).all() and (result.condition_number < 20).all()
    assert result.residual_history[-1] < 1e-9


def test_newton_solves_a_mint_layer_like_its_own_solver():
    torch.manual_seed(0)
    layer = MintLayer(1, hidden_factor=2, kernel_size=3).double().eval()
    x = torch.randn(3, 1, 4, 4, dtype=DOUBLE)
    y = layer(x).detach()
    result = newton(layer, y, y, jacobian="krylov")
    assert result.success
    torch.testing.assert_close(result.value, x, atol=1e-9, rtol=0)


def test_newton_reports_singular_jacobians_and_failures_instead_of_garbage():
    def polar(q):
        return torch.stack([q[:, 0] * torch.cos(q[:, 1]), q[:, 0] * torch.sin(q[:, 1])], dim=1)

    origin = torch.zeros(1, 2, dtype=DOUBLE)
    record = newton(polar, torch.tensor([[1.0, 0.3]], dtype=DOUBLE), origin, strict=False)
    assert record.status is SolverStatus.SINGULAR and not record.converged.any()  # theta is arbitrary at r = 0
    assert record.condition_number.item() > 1e12
    with pytest.raises(ConvergenceError, match="singular"):
        newton(polar, torch.tensor([[1.0, 0.3]], dtype=DOUBLE), origin)
    no_root = newton(lambda x: x**2, torch.ones(1, 1, dtype=DOUBLE), -torch.ones(1, 1, dtype=DOUBLE), strict=False)
    assert not no_root.success and not no_root.converged.any()
    nan = newton(lambda x: x**3, torch.full((1, 1), float("nan"), dtype=DOUBLE), strict=False)
    assert nan.status is SolverStatus.NONFINITE
    with pytest.raises(ValueError, match="same shape"):
        newton(torch.sin, torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="jacobian"):
        newton(torch.sin, torch.ones(2, 2), jacobian="exact")  # type: ignore[arg-type]


def test_newton_line_search_rescues_atan():
    """Plain Newton on atan x = 0 diverges from |x0| > 1.39; backtracking converges."""
    start = torch.tensor([[3.0], [-2.0]], dtype=DOUBLE)
    result = newton(torch.atan, start)
    assert result.success and result.value.abs().max() < 1e-10
    history = result.residual_history
    assert all(later <= earlier for earlier, later in zip(history, history[1:], strict=False))
    plain = newton(torch.atan, start, line_search=False, max_iter=10, strict=False)
    assert not plain.success


def test_batched_jacobian_matches_autograd():
    block = _residual_block()
    x = torch.randn(3, 6, dtype=DOUBLE)
    value, jacobians = batched_jacobian(block, x)
    torch.testing.assert_close(value, block(x))
    assert not value.requires_grad and not jacobians.requires_grad
    for b in range(3):
        torch.testing.assert_close(jacobians[b], torch.autograd.functional.jacobian(lambda v: block(v[None])[0], x[b]))


def test_batched_jacobian_with_graph_is_differentiable():
    """d/dx of sum J(x) against autograd's Hessian-vector route, for a map with a non-constant Jacobian."""
    x = torch.randn(2, 3, dtype=DOUBLE, requires_grad=True)
    _, jacobians = batched_jacobian(lambda v: torch.sin(v).cumsum(dim=1), x, create_graph=True)
    (gradient,) = torch.autograd.grad(jacobians.sum(), x)
    # J_ij = cos(x_j) for j <= i: the sum over i >= j counts d - j rows, so d/dx_j = -(d - j) sin(x_j)
    expected = -torch.sin(x) * torch.arange(3, 0, -1, dtype=DOUBLE)
    torch.testing.assert_close(gradient, expected)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_inverse_derivatives_match_autograd_through_the_inverse(method):
    """Proposition 1: J_{F^{-1}}(y) = J_F(x)^{-1}; compared with autograd through the (implicitly
    differentiated) fixed-point inverse and with finite differences of the inverse."""
    block = _residual_block()
    y = torch.randn(4, 6, dtype=DOUBLE)
    v = torch.randn(4, 6, dtype=DOUBLE)
    tangent = inverse_jvp(block, y, v, method=method)
    assert tangent.success and (tangent.condition_number >= 1).all()
    step = 1e-6
    finite_difference = (block.inverse(y + step * v) - block.inverse(y - step * v)) / (2 * step)
    torch.testing.assert_close(tangent.value, finite_difference, atol=1e-7, rtol=0)
    leaf = y.clone().requires_grad_(True)
    (pulled,) = torch.autograd.grad(block.inverse(leaf), leaf, v)
    torch.testing.assert_close(inverse_vjp(block, y, v, method=method).value, pulled, atol=1e-9, rtol=0)
    layer = ActNorm(6).double().eval()
    exact = inverse_jvp(layer, y, v, method=method).value
    torch.testing.assert_close(exact, v * torch.exp(-layer.log_scale), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        inverse_jvp(block, y, v[:, :3])


def _contractive_map(seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(5, 5, dtype=DOUBLE)
    weight = (0.6 * weight / torch.linalg.matrix_norm(weight, ord=2)).requires_grad_(True)
    return weight, lambda z, x: torch.tanh(z @ weight.T + x)


@pytest.mark.parametrize("backward", ["iteration", "gmres"])
def test_implicit_gradients_match_unrolled_backpropagation_and_finite_differences(backward):
    weight, f = _contractive_map()
    x = torch.randn(3, 5, dtype=DOUBLE, requires_grad=True)
    z, record = implicit_fixed_point(f, x, backward=backward)
    assert record.success
    target = torch.randn(3, 5, dtype=DOUBLE)
    implicit_grads = torch.autograd.grad((z * target).sum(), (x, weight))
    unrolled = torch.zeros(3, 5, dtype=DOUBLE)
    for _ in range(200):  # backpropagation through every iteration
        unrolled = f(unrolled, x)
    unrolled_grads = torch.autograd.grad((unrolled * target).sum(), (x, weight))
    for implicit, explicit in zip(implicit_grads, unrolled_grads, strict=True):
        torch.testing.assert_close(implicit, explicit, atol=1e-9, rtol=0)
    torch.autograd.gradcheck(
        lambda inputs: implicit_fixed_point(f, inputs, backward=backward)[0], (x,), nondet_tol=1e-8
    )


def test_implicit_backward_that_fails_raises():
    weight, f = _contractive_map()
    x = torch.randn(3, 5, dtype=DOUBLE, requires_grad=True)
    z, _ = implicit_fixed_point(f, x, backward="iteration", backward_max_iter=2)
    with pytest.raises(ConvergenceError):
        z.sum().backward()
    with pytest.raises(ValueError, match="backward"):
        implicit_fixed_point(f, x, backward="neumann")  # type: ignore[arg-type]


def test_memory_of_implicit_gradients_does_not_grow_with_the_iteration_count():
    block = _residual_block(features=32)
    y = torch.randn(16, 32, dtype=DOUBLE, requires_grad=True)
    _, loose = saved_activation_bytes(lambda: block.inverse(y, atol=1e-3, rtol=0.0))
    _, tight = saved_activation_bytes(lambda: block.inverse(y, atol=1e-13, rtol=0.0))
    assert (
        block.inverse_result(y.detach(), atol=1e-13, rtol=0.0).iterations
        > 3 * block.inverse_result(y.detach(), atol=1e-3, rtol=0.0).iterations
    )
    assert 0 < loose == tight
    torch.manual_seed(0)
    layer = MintLayer(2, hidden_factor=2, kernel_size=3).double().eval()
    image = torch.randn(4, 2, 6, 6, dtype=DOUBLE, requires_grad=True)
    _, loose = saved_activation_bytes(lambda: layer.inverse(image, atol=1e-3, rtol=0.0))
    _, tight = saved_activation_bytes(lambda: layer.inverse(image, atol=1e-13, rtol=0.0))
    assert 0 < loose == tight
    weight, f = _contractive_map()
    x = torch.randn(64, 5, dtype=DOUBLE, requires_grad=True)
    _, few = saved_activation_bytes(lambda: implicit_fixed_point(f, x, atol=1e-3, rtol=0.0)[0])
    _, many = saved_activation_bytes(lambda: implicit_fixed_point(f, x, atol=1e-13, rtol=0.0)[0])
    assert 0 < few == many

    def unrolled(iterations):
        z = torch.zeros_like(x)
        for _ in range(iterations):
            z = f(z, x)
        return z

    _, short = saved_activation_bytes(lambda: unrolled(10))
    _, long = saved_activation_bytes(lambda: unrolled(40))
    assert long > 3 * short > 0  # backpropagating through the iterations stores every one


def test_deq_layer_trains_with_implicit_gradients():
    torch.manual_seed(0)
    layer = DEQ(ContractiveCell(6, 3, coeff=0.5)).double()
    x = torch.randn(8, 3, dtype=DOUBLE)
    z = layer(x)
    assert z.shape == (8, 6) and layer.last_result.success
    assert layer.last_result.error_bound.max() < 1e-8  # Lemma 4.5 with the cell's Lipschitz bound
    z.pow(2).sum().backward()
    implicit = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    layer.eval()  # the same normalised weights, now unrolled
    state = torch.zeros(8, 6, dtype=DOUBLE)
    for _ in range(100):
        state = layer.cell(state, x)
    state.pow(2).sum().backward()
    for name, parameter in layer.named_parameters():
        torch.testing.assert_close(implicit[name], parameter.grad, atol=1e-9, rtol=0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.train()
    target = torch.randn(8, 6, dtype=DOUBLE).tanh()
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((2, 3), float("nan"), dtype=DOUBLE))
    with pytest.raises(ValueError, match="state_shape"):
        DEQ(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="coeff"):
        ContractiveCell(3, 3, coeff=1.0)


def _example_module():
    return load_script("examples/implicit_functions.py")


def test_seed_002_worked_examples():
    examples = _example_module()
    contraction = examples.cosine_contraction(20)  # Example 12
    assert contraction["rate"] == pytest.approx(math.sin(1.0))
    assert contraction["error"] <= contraction["a_posteriori_bound"] <= contraction["a_priori_bound"]
    assert 1e-5 < contraction["error"] < 1e-3  # "about 3 digits": slow, the rate is close to 1
    x = torch.tensor([[0.5], [0.8], [-0.3]], dtype=DOUBLE)
    y, slope = examples.circle_branch(x.clone())  # Examples 6 and 8
    torch.testing.assert_close(y, torch.sqrt(1 - x**2), atol=1e-12, rtol=0)
    torch.testing.assert_close(slope, -x / torch.sqrt(1 - x**2), atol=1e-9, rtol=0)
    points = torch.tensor([[1.0, 1.0], [0.0, 2.0], [-1.0, 0.5]], dtype=DOUBLE)
    from_solves, direct = examples.polar_inverse_jacobian(points)  # Example 4, Proposition 1
    torch.testing.assert_close(from_solves, direct, atol=1e-12, rtol=0)
    torch.testing.assert_close(from_solves[0], torch.tensor([[0.5**0.5, 0.5**0.5], [-0.5, 0.5]], dtype=DOUBLE))


def test_seed_002_remaining_worked_examples():
    """Examples 1-3, 5, 7, 9-11, 13, 14 and Remark 4 of the formalML notes, as examples/implicit_functions.py
    runs them, against the notes' closed forms."""
    examples = _example_module()
    q = torch.tensor([[0.5, 1.0], [2.0, 0.3]], dtype=DOUBLE)
    torch.testing.assert_close(examples.polar_determinant(q), q[:, 0])  # Example 1: det J = r
    preimages, images, determinants = examples.exponential_preimages()  # Example 2
    torch.testing.assert_close(images, torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DOUBLE), atol=1e-9, rtol=0)
    assert abs((preimages[1, 1] - preimages[0, 1]).item() - 2 * math.pi) < 1e-9 and bool((determinants > 0).all())
    inverse = examples.squaring_inverse_jacobian(torch.ones(1, 2, dtype=DOUBLE))[0]  # Example 3
    torch.testing.assert_close(inverse, torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=DOUBLE) / 4)
    from_solve, direct = examples.coupling_inverse_jacobian()  # Example 5
    torch.testing.assert_close(from_solve, direct, atol=1e-12, rtol=0)
    x = torch.tensor([[0.6], [-0.3]], dtype=DOUBLE)
    y, first, second = examples.circle_curvature(x)  # Examples 6, 8 and Remark 4
    torch.testing.assert_close(first, -x / y)
    torch.testing.assert_close(second, -1 / y**3)
    g, derivative, formula = examples.two_equations_in_four_variables()  # Example 7
    torch.testing.assert_close(g, torch.ones(1, 2, dtype=DOUBLE))
    torch.testing.assert_close(derivative, formula)
    curve = examples.elliptic_curve()  # Example 9
    assert curve["y"] == pytest.approx(math.sqrt(6)) and curve["slope"] == pytest.approx(11 / (2 * math.sqrt(6)))
    assert curve["origin_status"] is SolverStatus.SINGULAR
    p, multiplier = examples.maximum_entropy()  # Example 10
    torch.testing.assert_close(p, torch.full((1, 3), 1 / 3, dtype=DOUBLE))
    assert multiplier.item() == pytest.approx(math.log(3) - 1)
    nearest = examples.nearest_points()  # Example 11
    torch.testing.assert_close(nearest["point"], torch.full((1, 3), 1 / 3, dtype=DOUBLE))
    assert nearest["multiplier"].item() == pytest.approx(-2 / 3)
    assert nearest["degenerate_status"] is SolverStatus.SINGULAR
    t_fold, t_min = examples.fold()  # Example 13
    assert abs(t_fold) < 1e-8 and t_min > -1e-8
    landscape = examples.relu_landscape()  # Example 14
    w1, w2 = landscape["point"].tolist()
    assert w1 * w2 == pytest.approx(1.0) and landscape["hessian_rank"] == 1
    assert landscape["status"] is SolverStatus.SINGULAR
    contraction = examples.cosine_contraction(20)  # Example 12, Theorem 2's iteration count
    assert contraction["iterations_for_1e-10"] <= contraction["a_priori_iterations_for_1e-10"] + 1


def test_implicit_fixed_point_raises_on_a_failed_forward_solve_unless_told_not_to():
    x = torch.ones(2, 3, dtype=torch.float64)
    expanding = lambda z, x: 2 * z + x  # noqa: E731 - no fixed point reachable by iteration
    with pytest.raises(ConvergenceError):
        implicit_fixed_point(expanding, x, method="iteration", max_iter=50)
    z, record = implicit_fixed_point(expanding, x, method="iteration", max_iter=50, strict=False)
    assert record.status in (SolverStatus.DIVERGED, SolverStatus.MAX_ITER, SolverStatus.NONFINITE)
    assert not record.converged.any() and z.shape == x.shape
