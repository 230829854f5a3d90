r"""Inverses of maps with triangular Jacobians and a positive diagonal (Song et al. 2019, Theorem 1).

Let r: R^n -> R^n have a lower (or upper) triangular Jacobian whose diagonal is at least t > 0 everywhere.
Then r_p depends only on x_1..x_p (Lemma 1 in the proof of Song et al. 2019) and is strictly increasing in x_p with
slope >= t, hence onto R: given the earlier coordinates, x_p is the unique root of a monotone univariate
equation, and x = r^{-1}(y) follows by solving the n equations in order (the proof of Theorem 1).

Two solvers share one safeguarded Newton update, applied to every coordinate p at once:

* the Newton step x_p - (r_p(x) - y_p) / d_p(x) with the Jacobian's diagonal d_p, taken whole when it stays
  inside the coordinate's bracket [lo_p, hi_p], otherwise replaced by the bracket's midpoint (bisection);
* the bracket comes from the sign of the residual (r_p(x) > y_p puts the root below x_p) and from the slope
  bound (the root is within |r_p(x) - y_p| / t of x_p); a coordinate's bracket is dropped when an earlier
  coordinate moved by more than the tolerance, since its equation then changed, and when it collapsed
  while the residual is still above the tolerance.

:func:`triangular_newton` updates all coordinates in parallel (Song et al. 2019 sample with 5 Newton
iterations; the bracket needs no step size to tune). Parallel updates can still run away on strongly coupled
layers, which :class:`~invertnet.layers.MintLayer` then solves again with :func:`sequential_solve`.
:func:`sequential_solve` solves one coordinate at a time in the triangular order, the exact
procedure of the proof, as a reference for small inputs. Both report iterations, per-sample residuals
max_p |r_p(x) - y_p| and a :class:`~invertnet.SolverStatus`, and never fail silently.

A small residual does not make x accurate when J_r(x) is badly conditioned: the (unique) solution then moves
by up to cond(J) times the relative residual (Higham 2002, Theorem 7.2). Both solvers therefore end with
:func:`triangular_condition`: an estimate of the infinity-norm condition number of J_r at the returned x, from
the diagonal ratio max|d| / min|d| (a lower bound for triangular matrices, whose eigenvalues are the diagonal)
and Hager's 1-norm estimator (Hager 1984; Higham 2002, section 15.3) applied to J^T and J^{-T}, whose
triangular solves are Jacobi iterations, exact after at most n steps. Beyond ``max_condition`` the status is
``ILL_CONDITIONED``; the record carries the estimate and the forward-error estimate |J^{-1}|_inf |r(x) - y|_inf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from invertnet.core import InverseResult, SolverStatus, TransposedProduct, TransposedSolve
from invertnet.solvers.common import (
    DIVERGENCE_FACTOR,
    FIXED_POINT_MAX_ITER,
    TRIANGULAR_MAX_ITER,
    check_max_iter,
    decide_status,
    finish,
    resolve_max_condition,
    resolve_tolerances,
)
from invertnet.solvers.fixed_point import fixed_point

__all__ = [
    "ESTIMATE_RTOL",
    "HAGER_ITERATIONS",
    "MapAndDiagonal",
    "sequential_solve",
    "triangular_condition",
    "triangular_newton",
    "triangular_transposed_solve",
]

#: Most iterations of Hager's estimator per norm (LAPACK's xLACON stops after 5; it rarely needs more than 2).
HAGER_ITERATIONS = 4
#: Relative size of the Jacobi correction at which a triangular solve of the condition estimate stops: the
#: estimate needs a few digits, not the solve's tolerance.
ESTIMATE_RTOL = 1e-6

#: x -> (r(x), diagonal of the Jacobian of r at x), both with the shape of x.
MapAndDiagonal = Callable[[Tensor], tuple[Tensor, Tensor]]


class _Brackets:
    """Per-coordinate brackets [lo, hi] of the root and the safeguarded Newton update."""

    def __init__(self, like: Tensor, min_slope: Tensor) -> None:
        self.lo = torch.full_like(like, -torch.inf)
        self.hi = torch.full_like(like, torch.inf)
        self.min_slope = min_slope

    def forget(self, stale: Tensor) -> None:
        """Drop the brackets of coordinates whose equation changed (an earlier coordinate moved)."""
        self.lo = torch.where(stale, -torch.inf, self.lo)
        self.hi = torch.where(stale, torch.inf, self.hi)

    def step(self, x: Tensor, residual: Tensor, diagonal: Tensor) -> Tensor:
        """The next iterate from x, given r(x) - y and the Jacobian's diagonal at x."""
        above, below = residual > 0, residual < 0
        # the root is within |r - y| / t of x; twice that keeps the Newton step (at most |r - y| / t long)
        # strictly inside the bracket even where the diagonal equals t
        reach = 2 * residual.abs() / self.min_slope
        self.hi = torch.where(above, torch.minimum(self.hi, x), torch.minimum(self.hi, x + reach))
        self.lo = torch.where(below, torch.maximum(self.lo, x), torch.maximum(self.lo, x - reach))
        newton = x - residual / diagonal
        inside = (newton > self.lo) & (newton < self.hi)
        return torch.where(inside, newton, 0.5 * (self.lo + self.hi))


def _after_moved(moved: Tensor, lower: bool) -> Tensor:
    """Per coordinate: did a coordinate before it in the triangular order move? Shape of ``moved``."""
    flat = moved.flatten(1).long()
    if not lower:
        flat = flat.flip(1)
    before = (flat.cumsum(dim=1) - flat) > 0
    if not lower:
        before = before.flip(1)
    return before.view_as(moved)


def _resolve(y: Tensor, atol: float | None, rtol: float | None, max_iter: int) -> tuple[float, float]:
    """Tolerances, by default the ``tight`` ones of :func:`~invertnet.solvers.default_tolerances`: Newton
    converges quadratically, so float64 solves go 100x below the fixed-point default for about one more
    iteration (the error is the residual times the condition number of J)."""
    check_max_iter(max_iter, "triangular solver")
    return resolve_tolerances(y.dtype, atol, rtol, "tight")


def _per_sample_max(v: Tensor) -> Tensor:
    return v.flatten(1).amax(dim=1)


def triangular_newton(
    map_and_diagonal: MapAndDiagonal,
    y: Tensor,
    min_slope: Tensor | float,
    *,
    lower: bool = True,
    x0: Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = TRIANGULAR_MAX_ITER,
    max_condition: float | None = None,
    strict: bool = True,
) -> InverseResult:
    r"""Solve r(x) = y for r with a triangular Jacobian and diagonal >= ``min_slope`` by parallel Newton.

    Every coordinate takes the safeguarded Newton step of the module docstring at every iteration. The
    first coordinate in the triangular order is a monotone scalar equation, on which the safeguarded step
    converges; each later one becomes such an equation once its predecessors have settled. Converged
    samples are frozen.

    Arguments:
        map_and_diagonal: x -> (r(x), diagonal of J_r(x)), both shaped like x; evaluated without gradients.
        y: Targets with shape (B, ...).
        min_slope: A lower bound t > 0 on the diagonal, broadcastable to y (e.g. shape (C, 1, 1)).
        lower: The Jacobian is lower triangular over the flattened coordinates of a sample (``False``: upper).
        x0: Initial iterate (default: y).
        atol, rtol: Per-sample tolerance max_p |r_p(x) - y_p| - rtol |y_p| <= atol; defaults by dtype
            (1e-12 for float64; :func:`~invertnet.solvers.default_tolerances` otherwise, 1e-5 for float32).
        max_iter: Most evaluations of ``map_and_diagonal`` (default
            :data:`~invertnet.solvers.common.TRIANGULAR_MAX_ITER`).
        max_condition: Condition estimate beyond which the status is ``ILL_CONDITIONED`` (default
            :func:`~invertnet.solvers.default_max_condition`, 1 / (1000 eps)).
        strict: Raise :class:`~invertnet.ConvergenceError` (carrying the record) unless the solve succeeded.

    Returns:
        An :class:`~invertnet.InverseResult`; ``residual`` is the per-sample max-abs residual and
        ``error_bound`` is ``None`` (a bound would need a certified bound on |J^{-1}|). Unless the solve
        produced non-finite values or diverged, ``condition_number`` is :func:`triangular_condition`'s estimate
        at the returned x (``condition_kind`` ``"estimate"``) and ``forward_error_estimate`` its
        |J^{-1}|_inf estimate times the residual. The status is ``NONFINITE`` for NaN or infinite values,
        ``DIVERGED`` when the largest residual grew :data:`~invertnet.solvers.common.DIVERGENCE_FACTOR`-fold
        (e.g. a ``min_slope`` that is not a lower bound of the diagonal, or a coupling so strong that later
        coordinates overshoot by orders of magnitude before earlier ones settle), ``ILL_CONDITIONED`` when the
        condition estimate exceeds ``max_condition`` (ill-conditioned samples do not count as converged),
        ``SUCCESS`` or ``MAX_ITER``.

    Raises:
        ConvergenceError: With ``strict=True``, when the status is not ``SUCCESS``.

    Examples:
        >>> slope = torch.tensor(0.5, dtype=torch.float64)
        >>> def r(x):  # lower triangular: r_0 = x_0 / 2 + tanh(x_0), r_1 = x_1 / 2 + tanh(x_1 + x_0)
        ...     shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        ...     inner = torch.tanh(x + shifted)
        ...     return slope * x + inner, slope + 1 - inner**2
        >>> result = triangular_newton(r, torch.tensor([[3.0, -2.0]], dtype=torch.float64), slope)
        >>> result.status.name, bool((r(result.value)[0] - torch.tensor([[3.0, -2.0]])).abs().max() < 1e-9)
        ('SUCCESS', True)
    """
    limit = resolve_max_condition(y.dtype, max_condition, "triangular_newton")
    record = _solve(map_and_diagonal, y, min_slope, x0, atol, rtol, max_iter, lower)
    return finish(_conditioned(record, map_and_diagonal, limit), strict)


def sequential_solve(
    map_and_diagonal: MapAndDiagonal,
    y: Tensor,
    min_slope: Tensor | float,
    *,
    lower: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter_per_coordinate: int = TRIANGULAR_MAX_ITER,
    max_condition: float | None = None,
    strict: bool = True,
) -> InverseResult:
    """Solve r(x) = y one coordinate at a time in the triangular order (the proof of Song et al. 2019, Theorem 1).

    The coordinates of a sample, flattened, are visited in ascending order for a lower triangular Jacobian
    and descending for an upper one; each is solved by the safeguarded scalar Newton iteration with the
    others fixed, for every sample at once. It costs about (number of coordinates) x (iterations per
    coordinate) evaluations of r, so it is a reference for small inputs, not a sampler.

    Arguments:
        map_and_diagonal, y, min_slope, lower, atol, rtol, max_condition, strict: As for
            :func:`triangular_newton`.
        max_iter_per_coordinate: Iteration budget of each scalar solve.

    Returns:
        An :class:`~invertnet.InverseResult`, with the status of the first scalar solve that failed, if any,
        and the condition and forward-error estimates of :func:`triangular_newton`.
    """
    check_max_iter(max_iter_per_coordinate, "sequential_solve")
    limit = resolve_max_condition(y.dtype, max_condition, "sequential_solve")
    n = y[0].numel()
    x = y.detach().clone()
    total = 0
    history: list[float] = []
    for index in range(n) if lower else reversed(range(n)):
        active = torch.zeros(n, dtype=torch.bool, device=y.device)
        active[index] = True
        record = _solve(
            map_and_diagonal, y, min_slope, x, atol, rtol, max_iter_per_coordinate, lower, active.view(y.shape[1:])
        )
        x, total = record.value, total + record.iterations
        history.extend(record.residual_history)
        if not record.success:
            failed = InverseResult(x, record.converged, total, record.residual, None, record.status, history)
            return finish(_conditioned(failed, map_and_diagonal, limit), strict)
    final = _solve(map_and_diagonal, y, min_slope, x, atol, rtol, 1, lower)
    history = history + final.residual_history
    record = InverseResult(final.value, final.converged, total + 1, final.residual, None, final.status, history)
    return finish(_conditioned(record, map_and_diagonal, limit), strict)


def _solve(
    map_and_diagonal: MapAndDiagonal,
    y: Tensor,
    min_slope: Tensor | float,
    x0: Tensor | None,
    atol: float | None,
    rtol: float | None,
    max_iter: int,
    lower: bool,
    active: Tensor | None = None,
) -> InverseResult:
    """The safeguarded Newton loop; with ``active`` (a bool mask over one sample), only those coordinates move
    and only their residuals decide convergence.

    A coordinate's bracket is dropped when an earlier coordinate moved by more than the tolerance (its
    equation changed), and when it has shrunk below the tolerance while the residual is still above it
    (earlier coordinates' smaller moves made it stale), so a bracket never traps a coordinate.
    """
    atol, rtol = _resolve(y, atol, rtol, max_iter)
    y = y.detach()
    slope = torch.as_tensor(min_slope, dtype=y.dtype, device=y.device)
    if not bool((slope > 0).all()):
        raise ValueError("triangular solver: min_slope must be positive (the diagonal bound t of Eq. 3)")
    x = y.clone() if x0 is None else x0.detach().clone()
    brackets = _Brackets(x, slope)
    tolerance = atol + rtol * y.abs()
    history: list[float] = []
    nonfinite = diverged = False
    with torch.no_grad():
        for iteration in range(1, max_iter + 1):
            value, diagonal = map_and_diagonal(x)
            residual = value - y
            excess = residual.abs() - tolerance
            if active is not None:
                excess = torch.where(active, excess, -tolerance)
            per_sample = _per_sample_max(residual.abs() if active is None else residual.abs() * active)
            history.append(per_sample.max().item())
            nonfinite = not bool(torch.isfinite(residual).all() and torch.isfinite(diagonal).all())
            diverged = history[-1] > DIVERGENCE_FACTOR * max(history[0], torch.finfo(y.dtype).tiny)
            converged = _per_sample_max(excess) <= 0
            if nonfinite or diverged or bool(converged.all()) or iteration == max_iter:
                break
            proposal = brackets.step(x, residual, diagonal)
            if active is not None:
                proposal = torch.where(active, proposal, x)
            moved_before = _after_moved((proposal - x).abs() > tolerance, lower)
            collapsed = (brackets.hi - brackets.lo <= tolerance) & (excess > 0)  # stale by sub-tolerance moves
            brackets.forget(moved_before | collapsed)
            x = proposal
    status = decide_status(converged=converged, nonfinite=nonfinite, diverged=diverged)
    return InverseResult(
        value=x,
        converged=torch.zeros_like(converged) if nonfinite else converged,
        iterations=iteration,
        residual=per_sample,
        error_bound=None,
        status=status,
        residual_history=history,
    )


def _conditioned(record: InverseResult, map_and_diagonal: MapAndDiagonal, max_condition: float) -> InverseResult:
    """``record`` with the condition and forward-error estimates at its value and the status re-decided with
    ``ILL_CONDITIONED`` beyond ``max_condition``; non-finite and diverged records are returned unchanged
    (the Jacobian there says nothing about the solution)."""
    if record.status in (SolverStatus.NONFINITE, SolverStatus.DIVERGED):
        return record
    condition, inverse_norm = triangular_condition(map_and_diagonal, record.value)
    ill_conditioned = ~(condition <= max_condition)  # NaN counts as ill-conditioned
    assert record.residual is not None  # the triangular solves always measure it
    return dataclasses.replace(
        record,
        converged=record.converged & ~ill_conditioned,
        status=decide_status(converged=record.converged, ill_conditioned=ill_conditioned),
        condition_number=condition,
        condition_kind="estimate",
        forward_error_estimate=inverse_norm * record.residual,
    )


def triangular_condition(map_and_diagonal: MapAndDiagonal, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Estimates of cond_inf(J) and |J^{-1}|_inf per sample for the triangular Jacobian J of r at x.

    With J = D + N (D its diagonal, N strictly triangular), |J|_inf = |J^T|_1 and |J^{-1}|_inf = |J^{-T}|_1 are
    estimated by Hager's method (Hager 1984; Higham 2002, section 15.3, with its extra alternating-sign test
    vector), which needs products with the matrix and its transpose: Jacobian-vector and vector-Jacobian
    products of r for J, and for J^{-1} the Jacobi iterations w <- w + D^{-1}(v - J w), exact after at
    most n steps because D^{-1} N is nilpotent, stopped when the correction is :data:`ESTIMATE_RTOL` of w.
    Each of Hager's values is |B z|_1 / |z|_1 for some z, so in exact arithmetic both are lower bounds. The
    condition estimate is their product, and at least max|d| / min|d|, which bounds cond_inf(J) from below
    (J and J^{-1} contain the entries d_p and 1 / d_p). On MintNet layers it was within 1.2x of the exact
    cond_inf up to about 1e15 and within 70x beyond, where the Jacobi solves themselves lose digits (in
    either direction). It costs at most
    2 (:data:`HAGER_ITERATIONS` + 1) triangular solves and as many products with J and J^T, never forming J.

    Arguments:
        map_and_diagonal: x -> (r(x), diagonal of J_r(x)) as for :func:`triangular_newton`; r is
            differentiated by autograd (forward and reverse mode) and its diagonal must be non-zero.
        x: The point with shape (B, ...).

    Returns:
        (condition estimate, |J^{-1}|_inf estimate), both (B,); inf where a solve overflowed.

    Examples:
        >>> J = torch.tensor([[1.0, 0.0], [-100.0, 1.0]], dtype=torch.float64)
        >>> def r(x):
        ...     return x @ J.T, torch.ones_like(x)
        >>> condition, _ = triangular_condition(r, torch.ones(1, 2, dtype=torch.float64))
        >>> round(condition.item(), 6), round(torch.linalg.cond(J, p=float("inf")).item(), 6)
        (10201.0, 10201.0)
    """
    x = x.detach()
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        value, diagonal = map_and_diagonal(leaf)
    diagonal = diagonal.detach()

    def product(v: Tensor) -> Tensor:
        with torch.enable_grad(), forward_ad.dual_level():
            return forward_ad.unpack_dual(map_and_diagonal(forward_ad.make_dual(x, v))[0]).tangent

    def transposed_product(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(value, leaf, v, retain_graph=True)[0]

    inverse = _jacobi_inverse(product, diagonal)
    inverse_transposed = _jacobi_inverse(transposed_product, diagonal)
    norm = _hager_norm(transposed_product, product, x)
    inverse_norm = _hager_norm(inverse_transposed, inverse, x)
    magnitude = diagonal.abs().flatten(1)
    ratio = magnitude.amax(dim=1) / magnitude.amin(dim=1)
    condition = torch.maximum(norm * inverse_norm, ratio)
    return torch.nan_to_num(condition, nan=math.inf), torch.nan_to_num(inverse_norm, nan=math.inf)


def _jacobi_inverse(product: Callable[[Tensor], Tensor], diagonal: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> T^{-1} v for a triangular T with the given diagonal (shaped like v), known through ``product``
    (v -> T v), by Jacobi iterations from D^{-1} v: at most n steps (exact), fewer once every sample's
    correction is :data:`ESTIMATE_RTOL` of its iterate in max-abs, or once a value is not finite."""

    def solve(v: Tensor) -> Tensor:
        w = v / diagonal
        for _ in range(v[0].numel()):
            correction = (v - product(w)) / diagonal
            w = w + correction
            if not bool(torch.isfinite(w).all()):
                return torch.full_like(w, math.inf)
            if bool((_per_sample_max(correction.abs()) <= ESTIMATE_RTOL * _per_sample_max(w.abs())).all()):
                break
        return w

    return solve


def _hager_norm(
    apply: Callable[[Tensor], Tensor], apply_transposed: Callable[[Tensor], Tensor], like: Tensor
) -> Tensor:
    """Hager's lower estimate of |B|_1 per sample (B,) from v -> B v and v -> B^T v on tensors shaped like
    ``like`` (B, ...): from z = (1/n, ..., 1/n), |B z|_1 with z moved to the unit vector e_j, j = argmax
    |B^T sign(B z)|_j, until no sample can improve or :data:`HAGER_ITERATIONS` are done; then the
    alternating-sign vector b_i = (-1)^i (1 + i / (n - 1)) of Higham 2002, section 15.3, whose
    |B b|_1 / |b|_1 catches matrices on which the iteration stops early."""
    batch, n = like.shape[0], like[0].numel()
    z = torch.full_like(like, 1.0 / n)
    estimate = torch.zeros(batch, dtype=like.dtype, device=like.device)
    for _ in range(HAGER_ITERATIONS):
        image = apply(z)
        estimate = torch.maximum(estimate, image.abs().flatten(1).sum(dim=1))
        signs = torch.where(image >= 0, 1.0, -1.0).to(like.dtype)
        gradient = apply_transposed(signs).flatten(1)
        largest = gradient.abs().argmax(dim=1)
        improvable = gradient.abs().amax(dim=1) > (gradient * z.flatten(1)).sum(dim=1)
        if not bool(improvable.any()):
            break
        z = torch.nn.functional.one_hot(largest, n).to(like.dtype).view_as(like)
    index = torch.arange(n, dtype=like.dtype, device=like.device)
    alternating = (1 - 2 * (index % 2)) * (1 + index / max(n - 1, 1))
    probe = alternating.expand(batch, n).reshape(like.shape).clone()
    tail = apply(probe).abs().flatten(1).sum(dim=1) / alternating.abs().sum()
    return torch.maximum(estimate, tail)


def triangular_transposed_solve(
    diagonal: Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = FIXED_POINT_MAX_ITER,
) -> TransposedSolve:
    r"""The transposed solve of a triangular inverse: v = J^{-T} u at the solution x* of r(x*) = y.

    With J = J_r(x*) = D + N (D its diagonal, N strictly triangular), backpropagating a cotangent u needs
    v = J^{-T} u (formalML, "Inverse and Implicit Function Theorems", Proposition 1: solve, never invert).
    The Jacobi iteration v <- v + D^{-1}(u - J^T v) has the nilpotent error map -D^{-1} N^T, so it is exact
    after at most n steps and in practice stops far earlier, at the per-sample tolerance
    |D^{-1}(u - J^T v)|_max <= atol + rtol |D^{-1} u|_max of :func:`~invertnet.solvers.fixed_point`. Each step
    is one vector-Jacobian product of r; memory does not depend on the forward solve's iterations. A
    backward solve that does not converge raises :class:`~invertnet.ConvergenceError`.

    Arguments:
        diagonal: The diagonal of J_r(x*), shaped like x*.
        atol, rtol, max_iter: The backward solve's tolerance (default: the ``tight`` ones by dtype) and budget.

    Returns:
        (u, vjp) -> v, for :func:`~invertnet.solvers.attach_implicit_gradient` with h = r.
    """
    diagonal = diagonal.detach()
    atol, rtol = _resolve(diagonal, atol, rtol, max_iter)

    def solve(cotangent: Tensor, vjp: TransposedProduct) -> Tensor:
        start = cotangent / diagonal
        reference = _per_sample_max(start.abs())
        options = dict(atol=atol, rtol=rtol, max_iter=max_iter, reference=reference, norm=math.inf)
        return fixed_point(lambda v: v + (cotangent - vjp(v)) / diagonal, start, **options).value  # type: ignore[arg-type]

    return solve
