r"""Implicit functions y = g(x) of F(x, y) = 0 and what rests on them (formalML notes "Inverse and Implicit
Function Theorems": Theorem 3, Proposition 2, Remark 4, Theorem 4, Theorem 5 and Example 13).

* :func:`implicit_function` solves F(x, y) = 0 for y near a guess by Newton and returns y differentiable in x
  (and in every tensor F uses): dy/dx = -F_y^{-1} F_x (Theorem 3), one transposed linear solve per backward.
* :func:`implicit_derivatives` gives the first and second derivatives of g at a solution (Proposition 2 and
  Remark 4) from the derivatives of F alone.
* :func:`lagrange_multipliers` solves the first-order conditions of min f(x) subject to h(x) = 0,
  grad f + J_h^T lambda = 0 and h = 0 (Theorem 4), and checks the constraint qualification.
* :func:`follow_solutions` continues the solution curve of F(t, y) = 0 in a scalar parameter t by
  pseudo-arclength steps, which pass turning points, and reports the folds where F_y is singular: there
  the implicit function y = g(t) ceases to exist (Example 13).

Functions act per sample: x (B, n...), y (B, m...), F(x, y) of the shape of y.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from invertnet.core import InverseResult, SolverStatus
from invertnet.solvers.common import batched_jacobian, resolve_max_condition
from invertnet.solvers.newton import newton

__all__ = [
    "LagrangeSolution",
    "SolutionPath",
    "follow_solutions",
    "implicit_derivatives",
    "implicit_function",
    "lagrange_multipliers",
]

Equation = Callable[[Tensor, Tensor], Tensor]


def implicit_function(F: Equation, x: Tensor, y0: Tensor, **newton_options: object) -> InverseResult:
    r"""y = g(x) with F(x, y) = 0, by Newton from ``y0``, differentiable in x (Theorem 3, Proposition 2):

    .. math:: \frac{\partial g}{\partial x} = -F_y(x, g(x))^{-1} F_x(x, g(x)).

    The gradient reaches x and every tensor F uses (parameters, closure variables) through one solve with
    F_y^T in the backward pass (:func:`~invertnet.solvers.implicit_step.differentiable_solution`); the record's
    ``condition_number`` is that of F_y at the solution, so a point where the theorem's hypothesis fails
    (F_y singular) is reported ``SINGULAR`` and, with ``strict`` (the default), raised.

    Arguments:
        F: (x, y) -> F(x, y), the shape of y, per sample.
        x: Inputs (B, n...).
        y0: Starting guess (B, m...) on the branch wanted.
        **newton_options: Options of :func:`~invertnet.solvers.newton` (``jacobian``, ``atol``, ``strict``, ...).

    Examples:
        >>> x = torch.tensor([[0.6]], dtype=torch.float64, requires_grad=True)
        >>> circle = lambda x, y: x**2 + y**2 - 1  # the upper semicircle y = sqrt(1 - x^2) near y = 1
        >>> y = implicit_function(circle, x, torch.ones_like(x)).value
        >>> round(y.item(), 12), round(torch.autograd.grad(y.sum(), x)[0].item(), 12)  # -x / y
        (0.8, -0.75)
    """
    # newton attaches the implicit gradient to every tensor its map uses (x too), with the F_y it formed at the
    # solution for the record's condition number: one dense Jacobian there, not two.
    return newton(lambda y: F(x, y), y0.detach(), **newton_options)  # type: ignore[arg-type]


def _per_sample(F: Equation, x: Tensor, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """F on one flattened sample: (n,), (m,) -> (m,)."""
    x_shape, y_shape = x.shape[1:], y.shape[1:]
    return lambda xs, ys: F(xs.view(1, *x_shape), ys.view(1, *y_shape)).reshape(-1)


def implicit_derivatives(F: Equation, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""The first and second derivatives of the implicit function g at a solution y = g(x) of F(x, y) = 0.

    Differentiating F(x, g(x)) = 0 once gives Proposition 2, F_y g' = -F_x; twice gives (Remark 4, for any
    dimensions) F_y g'' = -T^T (d^2 F) T with T = [I; g'] stacking the identity on x and g', i.e.

    .. math:: F_y\, g''_{ab} = -\big(F_{x_a x_b} + F_{x_a y} g'_b + F_{x_b y} g'_a + F_{yy}[g'_a, g'_b]\big),

    which in one variable is Remark 4's g'' = -(F_xx + 2 F_xy g' + F_yy g'^2) / F_y. The derivatives of F come
    from ``torch.func`` (exact, per sample); F_y is solved, not inverted.

    Arguments:
        F: (x, y) -> F(x, y), per sample, differentiable twice.
        x: Points (B, n...).
        y: Solutions (B, m...), e.g. ``implicit_function(F, x, y0).value``.

    Returns:
        ``(first, second)`` with shapes (B, m, n) and (B, m, n, n) over the flattened coordinates.

    Examples:
        >>> x, y = torch.tensor([[0.6]], dtype=torch.float64), torch.tensor([[0.8]], dtype=torch.float64)
        >>> first, second = implicit_derivatives(lambda x, y: x**2 + y**2 - 1, x, y)
        >>> round(first.item(), 12), round(second.item(), 12)  # -x / y and -1 / y^3
        (-0.75, -1.953125)
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"implicit_derivatives: x {tuple(x.shape)} and y {tuple(y.shape)} need one batch size")
    n, m = x[0].numel(), y[0].numel()
    single = _per_sample(F, x, y)
    joint = lambda z: single(z[:n], z[n:])  # noqa: E731 - F of the stacked (x, y)
    flat_x, flat_y = x.detach().reshape(len(x), n), y.detach().reshape(len(y), m)
    jacobian = vmap(jacrev(joint))(torch.cat([flat_x, flat_y], dim=1))  # (B, m, n + m)
    F_x, F_y = jacobian[..., :n], jacobian[..., n:]
    first = -torch.linalg.solve(F_y, F_x)  # (B, m, n)
    curvature = vmap(hessian(joint))(torch.cat([flat_x, flat_y], dim=1))  # (B, m, n + m, n + m)
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(len(x), n, n)
    tangent = torch.cat([eye, first], dim=1)  # (B, n + m, n): T = [I; g']
    projected = torch.einsum("bpa,bipq,bqc->biac", tangent, curvature, tangent)  # (B, m, n, n)
    second = -torch.linalg.solve(F_y, projected.reshape(len(x), m, n * n)).reshape(len(x), m, n, n)
    return first, second


@dataclass(frozen=True)
class LagrangeSolution:
    """A critical point of f on {h = 0} with its multipliers (formalML notes, Theorem 4).

    Attributes:
        x: The point (B, n).
        multipliers: lambda (B, k), with grad f(x) + J_h(x)^T lambda = 0.
        record: Newton's record of the KKT system (its ``condition_number`` is that of the KKT Jacobian).
        constraint_rank: The rank of J_h(x) (B,): k where the constraint qualification holds.
    """

    x: Tensor
    multipliers: Tensor
    record: InverseResult
    constraint_rank: Tensor


def lagrange_multipliers(
    objective: Callable[[Tensor], Tensor],
    constraints: Callable[[Tensor], Tensor],
    x0: Tensor,
    multipliers0: Tensor | None = None,
    **newton_options: object,
) -> LagrangeSolution:
    r"""A critical point of f(x) subject to h(x) = 0 and its Lagrange multipliers, by Newton on the first-order
    (KKT) system of Theorem 4,

    .. math:: \nabla f(x) + J_h(x)^\top \lambda = 0, \qquad h(x) = 0,

    whose Jacobian [[H_f + sum_i lambda_i H_{h_i}, J_h^T], [J_h, 0]] is invertible at a nondegenerate critical
    point where J_h has full rank (the constraint qualification). The rank of J_h is checked at the solution,
    and a rank-deficient point is reported ``SINGULAR`` (raised with ``strict``): there Theorem 4 gives no
    multipliers, or not unique ones.

    Arguments:
        objective: f, (n,) -> scalar for one sample (vectorised over the batch with ``torch.func.vmap``).
        constraints: h, (n,) -> (k,) for one sample.
        x0: Starting points (B, n).
        multipliers0: Starting multipliers (B, k) (default zero).
        **newton_options: Options of :func:`~invertnet.solvers.newton`.

    Examples:
        >>> entropy = lambda p: (p * p.log()).sum()  # minimise -H(p) on the simplex (Example 10)
        >>> simplex = lambda p: p.sum(dim=0, keepdim=True) - 1
        >>> solution = lagrange_multipliers(entropy, simplex, torch.tensor([[0.2, 0.3, 0.5]]).double())
        >>> solution.x.round(decimals=12), round(solution.multipliers.item(), 12)  # uniform, lambda = log 3 - 1
        (tensor([[0.3333, 0.3333, 0.3333]], dtype=torch.float64), 0.098612288668)
    """
    if x0.dim() != 2:
        raise ValueError(f"lagrange_multipliers: expected x0 of shape (B, n), got {tuple(x0.shape)}")
    n = x0.shape[1]
    k = constraints(x0[0].detach()).numel()
    if multipliers0 is None:
        multipliers0 = x0.new_zeros(x0.shape[0], k)
    gradient = torch.func.grad(objective)
    constraint_jacobian = jacrev(constraints)

    def kkt_single(z: Tensor) -> Tensor:
        x, multipliers = z[:n], z[n:]
        return torch.cat([gradient(x) + constraint_jacobian(x).T @ multipliers, constraints(x)])

    kkt = vmap(kkt_single)
    with torch.no_grad():
        record = newton(kkt, torch.cat([x0.detach(), multipliers0.detach()], dim=1), **newton_options)  # type: ignore[arg-type]
    x, multipliers = record.value[:, :n], record.value[:, n:]
    singular_values = torch.linalg.svdvals(vmap(constraint_jacobian)(x.detach()))  # (B, min(k, n))
    tolerance = singular_values.amax(dim=1, keepdim=True) * max(n, k) * torch.finfo(x.dtype).eps
    rank = (singular_values > tolerance).sum(dim=1)
    if bool((rank < k).any()) and record.status is SolverStatus.SUCCESS:
        record = dataclasses.replace(record, status=SolverStatus.SINGULAR, converged=record.converged & (rank == k))
        if newton_options.get("strict", True):
            record.raise_if_failed()
    return LagrangeSolution(x=x, multipliers=multipliers, record=record, constraint_rank=rank)


@dataclass(frozen=True)
class SolutionPath:
    """The solution curve of F(t, y) = 0 followed by :func:`follow_solutions` (one problem, m unknowns).

    Attributes:
        parameters: t at every point (N,).
        solutions: y at every point (N, m).
        determinants: det F_y at every point (N,): the test function of folds.
        folds: Points located where det F_y = 0 between two steps, as (t, y) pairs: there F_y is singular
            and the implicit function y = g(t) does not exist (the curve turns back in t).
        status: ``SUCCESS`` when the path has no fold, ``SINGULAR`` when it crossed one (a fold is where the
            implicit function theorem's hypothesis fails), or the status of a corrector that failed.
        records: Newton's record of every corrector step.
    """

    parameters: Tensor
    solutions: Tensor
    determinants: Tensor
    folds: list[tuple[float, Tensor]]
    status: SolverStatus
    records: list[InverseResult]


def _tangent(jacobian: Tensor, previous: Tensor | None) -> Tensor:
    """The unit null vector of the m x (m + 1) matrix [F_t F_y], oriented along ``previous``."""
    _, _, vh = torch.linalg.svd(jacobian)
    tangent = vh[-1]
    if previous is not None and torch.dot(tangent, previous) < 0:
        tangent = -tangent
    return tangent


@torch.no_grad()
def follow_solutions(
    F: Equation,
    t0: float,
    y0: Tensor,
    *,
    step: float = 0.05,
    n_steps: int = 100,
    t_range: tuple[float, float] = (-math.inf, math.inf),
    max_condition: float | None = None,
    **newton_options: object,
) -> SolutionPath:
    r"""Follow the solutions of F(t, y) = 0 in t from a solution y0 at t0 by pseudo-arclength continuation
    (Keller's method), which passes the folds that stop natural continuation in t, and locate the folds.

    Each step predicts along the unit tangent tau of the curve in (t, y) (the null vector of [F_t F_y]) and
    corrects by Newton on the square system [F(t, y); tau . ((t, y) - prediction)] = 0, whose Jacobian stays
    regular at a fold. The test function det F_y changes sign at a simple fold; there F_y is singular, so the
    implicit function theorem (Theorem 3) does not give y = g(t): the fold is located by bisection on the
    step and reported, and the path's status is ``SINGULAR`` (Example 13: the critical points of x^3 - t x,
    F(t, x) = 3 x^2 - t, fold at t = 0 where the two branches x = +-sqrt(t / 3) meet).

    Arguments:
        F: (t, y) -> F(t, y) with t of shape (1, 1) and y (1, m...), values of y's shape.
        t0: The starting parameter.
        y0: A solution at t0, shape (1, m...) (refined by Newton first).
        step: Arclength h of a step; its sign sets the initial direction in t.
        n_steps: Most steps.
        t_range: Stop when t leaves this interval.
        max_condition: Corrector steps whose Jacobian is worse conditioned are ``SINGULAR`` (Newton's option).
        **newton_options: Further options of the corrector's :func:`~invertnet.solvers.newton`.

    Examples:
        >>> fold = lambda t, x: 3 * x**2 - t  # Example 13: critical points of x^3 - t x
        >>> path = follow_solutions(fold, 1.0, torch.tensor([[0.58]]).double(), step=-0.1, n_steps=30)
        >>> path.status.name, abs(path.folds[0][0]) < 1e-8, path.parameters.min().item() >= -1e-8
        ('SINGULAR', True, True)
    """
    if y0.shape[0] != 1:
        raise ValueError(f"follow_solutions: follows one problem, y0 of shape (1, m...), got {tuple(y0.shape)}")
    shape = y0.shape[1:]
    m = y0[0].numel()
    dtype, device = y0.dtype, y0.device
    options = {"strict": False, **newton_options}
    if max_condition is not None:
        options["max_condition"] = resolve_max_condition(dtype, max_condition, "follow_solutions")

    def equation(z: Tensor) -> Tensor:  # z = (t, y) flattened, (B, 1 + m) -> (B, m)
        return F(z[:, :1], z[:, 1:].view(-1, *shape)).reshape(len(z), m)

    start = newton(lambda y: F(torch.full((1, 1), t0, dtype=dtype, device=device), y), y0, **options)  # type: ignore[arg-type]
    if not start.success:
        return SolutionPath(
            torch.tensor([t0], dtype=dtype), y0.reshape(1, m), torch.full((1,), math.nan), [], start.status, [start]
        )
    z = torch.cat([torch.full((1, 1), t0, dtype=dtype, device=device), start.value.reshape(1, m)], dim=1)

    def jacobian_at(point: Tensor) -> Tensor:  # [F_t F_y] at one point (1, 1 + m), shape (m, 1 + m)
        return batched_jacobian(equation, point)[1][0]

    def determinant(point: Tensor) -> Tensor:
        return torch.linalg.det(jacobian_at(point)[:, 1:])

    jacobian = jacobian_at(z)  # formed once per point: its determinant now, its tangent at the next step
    points, determinants, records, folds = [z[0]], [torch.linalg.det(jacobian[:, 1:])], [start], []
    tangent: Tensor | None = None
    status = SolverStatus.SUCCESS
    for _ in range(n_steps):
        tangent = _tangent(jacobian, tangent)
        if len(points) == 1 and tangent[0] * step < 0:  # the first step goes the way the sign of step says
            tangent = -tangent
        prediction = z + abs(step) * tangent
        direction = tangent

        def corrector(w: Tensor, prediction: Tensor = prediction, direction: Tensor = direction) -> Tensor:
            return torch.cat([equation(w), ((w - prediction) @ direction).unsqueeze(1)], dim=1)

        record = newton(corrector, prediction, **options)  # type: ignore[arg-type]
        records.append(record)
        if not record.success:
            status = record.status
            break
        z_next = record.value
        jacobian = jacobian_at(z_next)
        det_next = torch.linalg.det(jacobian[:, 1:])
        if torch.sign(det_next) != torch.sign(determinants[-1]) and determinants[-1] != 0:
            folds.append(_locate_fold(equation, determinant, z, z_next, options))
            status = SolverStatus.SINGULAR
        points.append(z_next[0])
        determinants.append(det_next)
        z = z_next
        if not t_range[0] <= z[0, 0].item() <= t_range[1]:
            break
    path = torch.stack(points)
    return SolutionPath(path[:, 0], path[:, 1:], torch.stack(determinants).reshape(-1), folds, status, records)


def _locate_fold(
    equation: Callable[[Tensor], Tensor],
    determinant: Callable[[Tensor], Tensor],
    left: Tensor,
    right: Tensor,
    options: dict[str, object],
    bisections: int = 40,
) -> tuple[float, Tensor]:
    """(t, y) where det F_y = 0 between two points of the curve: bisection on the chord, each midpoint
    projected back onto the curve by Newton orthogonally to the chord."""
    chord = (right - left)[0]
    chord = chord / chord.norm()
    sign_left = torch.sign(determinant(left))
    for _ in range(bisections):
        middle = (left + right) / 2

        def projection(w: Tensor, middle: Tensor = middle) -> Tensor:
            return torch.cat([equation(w), ((w - middle) @ chord).unsqueeze(1)], dim=1)

        middle = newton(projection, middle, **options).value  # type: ignore[arg-type]
        if torch.sign(determinant(middle)) == sign_left:
            left = middle
        else:
            right = middle
    point = (left + right) / 2
    return point[0, 0].item(), point[0, 1:]
