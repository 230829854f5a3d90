"""Implicit functions and what rests on them (formalML IFT notes: Theorems 2-5, Proposition 2, Remark 4,
Example 13): differentiable Newton solutions, y = g(x) of F(x, y) = 0 with its first and second derivatives,
Lagrange multipliers with the constraint qualification, continuation through folds, Theorem 2's iteration bound."""

import math

import pytest
import torch

from invertnet import ConvergenceError, SolverStatus
from invertnet.solvers import (
    a_priori_iterations,
    fixed_point,
    follow_solutions,
    implicit_derivatives,
    implicit_function,
    lagrange_multipliers,
    newton,
)

DOUBLE = torch.float64


@pytest.mark.parametrize("jacobian", ["dense", "krylov"])
def test_newton_solutions_are_differentiable_in_the_target_and_in_parameters(jacobian):
    scale = torch.tensor(2.0, dtype=DOUBLE, requires_grad=True)
    target = torch.tensor([[8.0], [27.0]], dtype=DOUBLE, requires_grad=True)
    x = newton(lambda x: scale * x**3, torch.ones(2, 1, dtype=DOUBLE), target, jacobian=jacobian, atol=1e-14).value
    d_target, d_scale = torch.autograd.grad(x.sum(), (target, scale))
    expected = (target / scale) ** (1 / 3)  # x = (y / a)^(1/3)
    torch.testing.assert_close(d_target, expected / (3 * target), atol=1e-8, rtol=0)
    torch.testing.assert_close(d_scale, (-expected / (3 * scale)).sum(), atol=1e-8, rtol=0)
    y = torch.randn(2, 3, dtype=DOUBLE, requires_grad=True)

    def solve(y):
        return newton(lambda x: x**3 + x, torch.zeros(2, 3, dtype=DOUBLE), y, jacobian=jacobian, atol=1e-13).value

    assert torch.autograd.gradcheck(solve, (y,), atol=1e-6)
    with torch.no_grad():
        assert not newton(lambda x: x**3 + x, torch.zeros(2, 3, dtype=DOUBLE), y).value.requires_grad


def test_the_implicit_function_and_its_derivatives_in_several_dimensions():
    """F(x, y) = A tanh(y) + y - B x for x in R^3, y in R^2: dg/dx = -F_y^{-1} F_x, and g'' against finite
    differences of g'."""
    torch.manual_seed(0)
    A, B = 0.5 * torch.randn(2, 2, dtype=DOUBLE), torch.randn(2, 3, dtype=DOUBLE)

    def F(x, y):
        return torch.tanh(y) @ A.T + y - x @ B.T

    x = torch.randn(4, 3, dtype=DOUBLE, requires_grad=True)
    result = implicit_function(F, x, torch.zeros(4, 2, dtype=DOUBLE))
    assert result.success and result.condition_kind == "exact"
    assert torch.autograd.gradcheck(lambda x: implicit_function(F, x, torch.zeros(4, 2, dtype=DOUBLE)).value, (x,))
    y = result.value.detach()
    first, second = implicit_derivatives(F, x.detach(), y)
    assert first.shape == (4, 2, 3) and second.shape == (4, 2, 3, 3)
    jacobian = torch.autograd.functional.jacobian(lambda x: implicit_function(F, x, y).value, x.detach())
    torch.testing.assert_close(first, torch.einsum("bibj->bij", jacobian), atol=1e-10, rtol=0)
    step = 1e-5
    for a in range(3):
        shift = torch.zeros_like(x).detach()
        shift[:, a] = step
        up = implicit_derivatives(F, x.detach() + shift, implicit_function(F, x.detach() + shift, y).value)[0]
        down = implicit_derivatives(F, x.detach() - shift, implicit_function(F, x.detach() - shift, y).value)[0]
        torch.testing.assert_close(second[..., a], (up - down) / (2 * step), atol=1e-6, rtol=0)


def test_the_implicit_function_theorem_failing_is_reported():
    curve = lambda x, y: y**2 - x**3 + x  # noqa: E731 - Example 9: F_y = 2 y = 0 at the origin
    origin = torch.zeros(1, 1, dtype=DOUBLE)
    with pytest.raises(ConvergenceError, match="singular"):
        implicit_function(curve, origin, origin.clone())
    assert implicit_function(curve, origin, origin.clone(), strict=False).status is SolverStatus.SINGULAR


def test_lagrange_multipliers_and_the_constraint_qualification():
    entropy = lambda p: (p * p.log()).sum()  # noqa: E731 - Example 10
    simplex = lambda p: p.sum(dim=0, keepdim=True) - 1  # noqa: E731
    solution = lagrange_multipliers(
        entropy, simplex, torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]).double()
    )
    torch.testing.assert_close(solution.x, torch.full((2, 4), 0.25, dtype=DOUBLE), atol=1e-12, rtol=0)
    torch.testing.assert_close(solution.multipliers, torch.full((2, 1), math.log(4) - 1, dtype=DOUBLE))
    assert solution.constraint_rank.tolist() == [1, 1] and solution.record.success
    two_constraints = lagrange_multipliers(
        lambda x: (x**2).sum(),
        lambda x: torch.stack([x.sum() - 1, x[0] - x[1]]),
        torch.rand(1, 3, dtype=DOUBLE),
    )
    torch.testing.assert_close(two_constraints.x, torch.full((1, 3), 1 / 3, dtype=DOUBLE), atol=1e-12, rtol=0)
    squared = lambda x: ((x**2).sum(dim=0, keepdim=True) - 1) ** 2  # noqa: E731 - J_h = 0 on the sphere
    with pytest.raises(ConvergenceError):
        lagrange_multipliers(lambda x: x[0], squared, torch.tensor([[-0.9, 0.1, 0.1]], dtype=DOUBLE))
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        lagrange_multipliers(entropy, simplex, torch.ones(3, dtype=DOUBLE))


def test_continuation_passes_the_fold_and_locates_it():
    fold = lambda t, x: 3 * x**2 - t  # noqa: E731 - Example 13
    path = follow_solutions(fold, 1.0, torch.tensor([[0.6]], dtype=DOUBLE), step=-0.1, n_steps=30)
    assert path.status is SolverStatus.SINGULAR and len(path.folds) == 1
    t_fold, x_fold = path.folds[0]
    assert abs(t_fold) < 1e-8 and abs(x_fold.item()) < 1e-4
    torch.testing.assert_close(path.solutions[:, 0] ** 2 * 3, path.parameters, atol=1e-10, rtol=0)
    assert path.solutions.min() < -0.5 < 0.5 < path.solutions.max()  # both branches, through the turn
    assert bool((path.determinants[path.solutions[:, 0] < 0] < 0).all())
    regular = follow_solutions(lambda t, y: y**3 + y - t, 0.0, torch.zeros(1, 1, dtype=DOUBLE), step=0.2, n_steps=10)
    assert regular.status is SolverStatus.SUCCESS and not regular.folds
    torch.testing.assert_close(regular.solutions[:, 0] ** 3 + regular.solutions[:, 0], regular.parameters)
    assert regular.parameters[-1] > 1.5  # stepped forward in t
    bounded = follow_solutions(lambda t, y: y - t, 0.0, torch.zeros(1, 1, dtype=DOUBLE), step=0.3, t_range=(-1, 1))
    assert bounded.parameters[-1] > 1 and bounded.parameters[-2] <= 1
    with pytest.raises(ValueError, match="one problem"):
        follow_solutions(fold, 1.0, torch.ones(2, 1, dtype=DOUBLE))


def test_the_implicit_gradient_reuses_the_jacobian_newton_formed_at_the_solution(monkeypatch):
    import importlib

    newton_module, step_module = (
        importlib.import_module(f"invertnet.solvers.{name}") for name in ("newton", "implicit_step")
    )
    calls = []
    original = newton_module.batched_jacobian
    for module in (newton_module, step_module):
        monkeypatch.setattr(module, "batched_jacobian", lambda *args: calls.append(1) or original(*args))
    x = torch.tensor([[0.6], [0.3]], dtype=DOUBLE, requires_grad=True)
    result = implicit_function(lambda x, y: x**2 + y**2 - 1, x, torch.ones_like(x))
    assert len(calls) == result.iterations + 1  # one per Newton step, one at the solution
    (gradient,) = torch.autograd.grad(result.value.sum(), x)
    torch.testing.assert_close(gradient, -x.detach() / result.value.detach())  # dy/dx = -x / y on the circle


def test_newton_reads_the_device_twice_per_step(monkeypatch, request):
    # On a GPU every read of a tensor's value by Python waits for the device: a dense Newton step reads its stop
    # test and its line search's acceptance; the start reads one and the record three (its status).
    torch.manual_seed(0)
    A = 0.3 * torch.randn(3, 3, dtype=DOUBLE)
    y = torch.randn(8, 3, dtype=DOUBLE)
    reads = request.getfixturevalue("host_reads")  # counting starts here, after the setup
    with torch.no_grad():
        result = newton(lambda x: x + torch.tanh(x @ A.T), torch.zeros_like(y), y=y, jacobian="dense")
    monkeypatch.undo()
    assert result.success and result.iterations >= 3
    assert len(reads) <= 2 * result.iterations + 4, reads


def test_continuation_forms_the_jacobian_once_per_point(monkeypatch):
    import importlib

    module = importlib.import_module("invertnet.solvers.implicit_function")  # the package exports a function so named
    calls = []
    original = module.batched_jacobian
    monkeypatch.setattr(module, "batched_jacobian", lambda *args: calls.append(1) or original(*args))
    path = follow_solutions(lambda t, y: y**3 + y - t, 0.0, torch.zeros(1, 1, dtype=DOUBLE), step=0.2, n_steps=6)
    assert path.status is SolverStatus.SUCCESS and len(path.parameters) == 7
    assert len(calls) == 7  # the corrector's Newton solves form their own


def test_the_a_priori_iteration_bound_of_theorem_2_holds():
    rate = math.sin(1.0)  # x = cos x on [0, 1]
    start = torch.zeros(2, 1, dtype=DOUBLE)
    record = fixed_point(torch.cos, start, atol=1e-10, rtol=0.0, lipschitz=rate)
    bound = int(record.iteration_bound[0])
    assert record.iterations <= bound + 1  # the a-priori count is never smaller than what was needed
    x = start.clone()
    for _ in range(bound):
        x = torch.cos(x)
    assert (x - 0.7390851332151607).abs().max() <= 1e-10
    assert a_priori_iterations(0.5, torch.tensor([1.0]), 1e-3).item() == 11  # 0.5^n / 0.5 <= 1e-3
    assert fixed_point(torch.cos, start, lipschitz=None).iteration_bound is None
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        a_priori_iterations(1.0, torch.tensor([1.0]), 1e-3)


def test_newton_gradients_equal_the_implicit_function_formula_on_a_coupled_3d_map():
    """f(x) = A tanh(x) + x + b in R^3: dx/dy = J_f(x)^{-1} and dx/db = -J_f(x)^{-1}, against brute force."""
    torch.manual_seed(3)
    A = 0.6 * torch.randn(3, 3, dtype=DOUBLE)
    b = torch.randn(3, dtype=DOUBLE, requires_grad=True)
    y = torch.randn(1, 3, dtype=DOUBLE, requires_grad=True)

    def f(x):
        return torch.tanh(x) @ A.T + x + b

    x = newton(f, torch.zeros(1, 3, dtype=DOUBLE), y, atol=1e-14).value
    jacobian = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], x[0].detach())
    inverse = torch.linalg.inv(jacobian)
    rows_y = torch.stack([torch.autograd.grad(x[0, i], y, retain_graph=True)[0][0] for i in range(3)])
    rows_b = torch.stack([torch.autograd.grad(x[0, i], b, retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(rows_y, inverse, atol=1e-10, rtol=0)
    torch.testing.assert_close(rows_b, -inverse, atol=1e-10, rtol=0)


def _finite_difference(solve, x, step=1e-6):
    """Central differences of solve (B, n) -> (B, m) as (B, m, n)."""
    columns = []
    for a in range(x.shape[1]):
        shift = torch.zeros_like(x)
        shift[:, a] = step
        columns.append((solve(x + shift) - solve(x - shift)) / (2 * step))
    return torch.stack(columns, dim=2)


def _autograd_derivative(solve, x):
    x = x.clone().requires_grad_(True)
    y = solve(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("problem", ["circle", "three_dimensional", "lagrange"])
def test_implicit_function_derivatives_against_finite_differences(problem):
    if problem == "circle":
        F = lambda x, y: x**2 + y**2 - 1  # noqa: E731
        x, y0 = torch.tensor([[0.3], [-0.7]], dtype=DOUBLE), torch.ones(2, 1, dtype=DOUBLE)
    elif problem == "three_dimensional":
        M = torch.tensor([[1.0, 0.2, -0.3], [0.1, 0.8, 0.4], [-0.2, 0.3, 1.1]], dtype=DOUBLE)
        F = lambda x, y: y + 0.5 * torch.sin(y) @ M.T - x  # noqa: E731 - y in R^3 given x in R^3
        x, y0 = torch.tensor([[0.4, -1.0, 0.7]], dtype=DOUBLE), torch.zeros(1, 3, dtype=DOUBLE)
    else:  # the nearest point of the plane sum(p) = t to c: KKT in (p, lambda), parameter t
        c = torch.tensor([0.5, -1.0, 2.0], dtype=DOUBLE)

        def F(t, z):
            p, multiplier = z[:, :3], z[:, 3:]
            return torch.cat([2 * (p - c) + multiplier, p.sum(dim=1, keepdim=True) - t], dim=1)

        x, y0 = torch.tensor([[1.0], [2.5]], dtype=DOUBLE), torch.zeros(2, 4, dtype=DOUBLE)

    def solve(x):
        return implicit_function(F, x, y0, atol=1e-14).value

    derivative = _autograd_derivative(solve, x)
    with torch.no_grad():
        reference = _finite_difference(solve, x)
    torch.testing.assert_close(derivative, reference, atol=1e-7, rtol=0)
    if problem == "lagrange":  # p = c + (t - sum c) / 3, lambda = -2 (t - sum c) / 3
        expected = torch.tensor([1 / 3, 1 / 3, 1 / 3, -2 / 3], dtype=DOUBLE).expand(2, 4).unsqueeze(2)
        torch.testing.assert_close(derivative, expected, atol=1e-12, rtol=0)
