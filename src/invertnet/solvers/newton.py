r"""Newton's method for square maps f(x) = y, batched per sample, with a backtracking line search and the
condition number of the Jacobian at the solution reported, exact for dense Jacobians and a lower bound for
Newton-Krylov (formalML IFT notes: Remark 5, Newton as a super-contraction; Remark 7, the
condition number decides whether an invertible map is numerically invertible).

Small dimensions use the dense per-sample Jacobian (d vector-Jacobian products, then an LU solve and an SVD
for the condition number); large ones use Jacobian-free Newton-Krylov: each step solves J dx = y - f(x) by
GMRES with Jacobian-vector products, never forming J.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor
from torch.func import jvp

from invertnet.core import InverseResult, check_tolerance
from invertnet.solvers.common import (
    NEWTON_MAX_ITER,
    batched_jacobian,
    check_max_iter,
    condition_numbers,
    conditioned_result,
    per_sample_norm,
    read_stop_test,
    resolve_max_condition,
    resolve_tolerances,
)
from invertnet.solvers.implicit_step import differentiable_solution
from invertnet.solvers.krylov import gmres

__all__ = ["DENSE_LIMIT", "newton"]

#: Largest per-sample dimension for which ``jacobian="auto"`` forms dense Jacobians.
DENSE_LIMIT = 256
#: Armijo constant of the line search: a step t is accepted when |r(x + t dx)| <= (1 - ARMIJO t) |r(x)|.
ARMIJO = 1e-4
#: Halvings of the step before the line search gives up.
MAX_HALVINGS = 30


def newton(
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    y: Tensor | None = None,
    *,
    jacobian: Literal["auto", "dense", "krylov"] = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = NEWTON_MAX_ITER,
    line_search: bool = True,
    max_condition: float | None = None,
    krylov_rtol: float = 1e-3,
    krylov_restart: int = 50,
    strict: bool = True,
) -> InverseResult:
    r"""Solve f(x) = y per sample by Newton's method, x <- x + t dx with J_f(x) dx = y - f(x).

    Sample b has converged when |f(x_b) - y_b|_2 <= atol + rtol |y_b|_2. With ``line_search`` the step t is
    the largest of 1, 1/2, 1/4, ... with |f(x + t dx) - y| <= (1 - 1e-4 t) |f(x) - y| (Armijo backtracking),
    so the residual decreases monotonically and near a regular root the full step gives quadratic convergence
    (the Newton map has derivative 0 at the root, formalML IFT notes, Remark 5).

    Jacobians: ``"dense"`` forms J per sample (:func:`batched_jacobian`), solves by LU and reports the exact
    2-norm condition number from its singular values (``condition_kind`` ``"exact"``); ``"krylov"`` solves by
    :func:`~invertnet.solvers.gmres` with Jacobian-vector products to relative accuracy ``krylov_rtol``
    (inexact Newton) and reports GMRES's lower bound on the 2-norm condition number (``condition_kind``
    ``"lower_bound"``: a Jacobian can be worse conditioned than it says); ``"auto"`` is dense up to
    :data:`DENSE_LIMIT` dimensions per sample. A Jacobian whose condition number exceeds ``max_condition``
    (default 1 / (1000 eps), formalML IFT notes, Remark 7) at a step or at the returned point makes the status
    ``SINGULAR``: the solution, if any, is not locally unique or has no reliable digits, and the affected
    samples stop where they are.

    Arguments:
        f: The map, (B, ...) -> (B, ...) of the same shape, acting per sample.
        x0: Starting point (B, ...).
        y: Target (default zero: a root of f).
        jacobian, atol, rtol, max_iter, line_search, max_condition, krylov_rtol, krylov_restart: As above;
            ``max_iter`` counts Newton steps (default :data:`~invertnet.solvers.common.NEWTON_MAX_ITER`).
        strict: Raise :class:`~invertnet.ConvergenceError` unless the solve succeeded.

    Returns:
        An :class:`~invertnet.InverseResult` with ``condition_number`` at the returned point and
        ``condition_kind`` naming it (``"exact"`` or ``"lower_bound"``). With gradients enabled its ``value`` is
        differentiable in y and in every tensor f uses (parameters, closure variables) by the implicit function
        theorem, dx/dy = J_f(x)^{-1} (formalML IFT notes, Theorem 1), one transposed solve per backward pass
        (:func:`~invertnet.solvers.implicit_step.differentiable_solution`); under ``torch.no_grad()`` it is
        returned as computed.

    Examples:
        >>> result = newton(lambda x: x**3, torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[8.0]]).double())
        >>> result.status.name, round(result.value.item(), 12), result.iterations <= 8
        ('SUCCESS', 2.0, True)
    """
    if jacobian not in ("auto", "dense", "krylov"):
        raise ValueError(f"newton: jacobian must be 'auto', 'dense' or 'krylov', got {jacobian!r}")
    check_max_iter(max_iter, "newton")
    y = _target(x0, y)
    atol, rtol = resolve_tolerances(x0.dtype, atol, rtol)
    check_tolerance(krylov_rtol, "krylov_rtol", "newton")
    options = _Options(
        dense=jacobian == "dense" or (jacobian == "auto" and x0[0].numel() <= DENSE_LIMIT),
        line_search=line_search,
        max_condition=resolve_max_condition(x0.dtype, max_condition, "newton"),
        krylov_rtol=krylov_rtol,
        krylov_restart=krylov_restart,
    )
    threshold = atol + rtol * per_sample_norm(y)
    state = _NewtonState.start(f, x0, y, threshold)
    for _ in range(max_iter):
        if not state.running:
            break
        _iterate(state, state.active(), f, y, threshold, options)
    jacobian = batched_jacobian(f, state.x)[1] if options.dense else None  # at the returned point, used twice
    record = _record(state, f, options, strict, jacobian)
    if torch.is_grad_enabled():
        value = differentiable_solution(lambda x: f(x) - y, record.value, dense=options.dense, jacobian=jacobian)
        record = replace(record, value=value)
    return record


def _target(x0: Tensor, y: Tensor | None) -> Tensor:
    """The target y (default zero: a root of f), refused unless it has the shape of x0 (B, ...)."""
    y = torch.zeros_like(x0) if y is None else y
    if y.shape != x0.shape:
        raise ValueError(f"newton: y {tuple(y.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    return y


@dataclass(frozen=True)
class _Options:
    """The resolved settings of a solve: dense or Newton-Krylov steps, the line search, the condition limit
    and the GMRES accuracy and restart length of Krylov steps."""

    dense: bool
    line_search: bool
    max_condition: float
    krylov_rtol: float
    krylov_restart: int


@dataclass
class _NewtonState:
    """The state of the iteration after ``iterations`` Newton steps.

    ``x`` and ``r`` = y - f(x) are (B, ...); ``residual`` |r|_2, the flags ``finite``, ``converged``,
    ``singular`` and ``stalled``, and ``condition`` (that of the last Jacobian used) are (B,); ``history``
    holds the largest finite residual after each step.
    """

    x: Tensor
    r: Tensor
    residual: Tensor
    finite: Tensor
    converged: Tensor
    singular: Tensor
    stalled: Tensor
    condition: Tensor
    history: list[float]
    iterations: int = 0
    running: bool = True
    """Whether a sample was still active at the last measurement (read with the history, one transfer)."""

    @classmethod
    def start(cls, f: Callable[[Tensor], Tensor], x0: Tensor, y: Tensor, threshold: Tensor) -> _NewtonState:
        """Start at (a detached copy of) x0 (B, ...) with its residual y - f(x0); ``threshold`` is (B,)."""
        x = x0.detach().clone()
        with torch.no_grad():
            r = y - f(x)
        residual = per_sample_norm(r)
        finite = torch.ones_like(residual, dtype=torch.bool)
        state = cls(
            x=x,
            r=r,
            residual=residual,
            finite=finite,
            converged=torch.zeros_like(finite),
            singular=torch.zeros_like(finite),
            stalled=torch.zeros_like(finite),
            condition=torch.ones_like(residual),
            history=[],
        )
        state.measure(threshold)  # finiteness, convergence and the first history entry, as after every step
        return state

    def active(self) -> Tensor:
        """The samples (B,) still iterating: finite, not converged, singular or stalled."""
        return ~self.converged & ~self.singular & ~self.stalled & self.finite

    def measure(self, threshold: Tensor) -> None:
        """Update finiteness and convergence (B,) from the current residual and append its largest finite value."""
        self.finite = torch.isfinite(self.residual)
        self.converged = self.converged | (self.finite & (self.residual <= threshold))
        worst, (self.running,) = read_stop_test(self.residual, self.finite, self.active().any())
        self.history.append(worst)


def _iterate(
    state: _NewtonState,
    active: Tensor,
    f: Callable[[Tensor], Tensor],
    y: Tensor,
    threshold: Tensor,
    options: _Options,
) -> None:
    """One Newton step on the ``active`` samples (B,): solve J dx = r, stop samples whose Jacobian is too badly
    conditioned or whose step is not finite (singular), search along dx and mark samples without an acceptable
    step as stalled."""
    state.iterations += 1
    step, step_condition = _newton_step(f, state.x, state.r, options.dense, options.krylov_rtol, options.krylov_restart)
    state.condition = torch.where(active, step_condition, state.condition)
    unusable = (step_condition > options.max_condition) | ~torch.isfinite(step).flatten(1).all(1)
    state.singular = state.singular | (active & unusable)
    active = active & ~state.singular
    mask = active.view(-1, *([1] * (state.x.dim() - 1)))
    step = torch.where(mask, step, torch.zeros_like(step))
    state.x, state.r, state.residual, accepted = _line_search(
        f, state.x, y, state.r, step, state.residual, active, options.line_search
    )
    state.stalled = state.stalled | (active & ~accepted)
    state.measure(threshold)


def _record(
    state: _NewtonState, f: Callable[[Tensor], Tensor], options: _Options, strict: bool, jacobian: Tensor | None
) -> InverseResult:
    """The record at the returned point: its condition number (B,) (at least the largest seen on the way for
    unconverged samples; from ``jacobian``, the dense per-sample Jacobian there, or GMRES's lower bound when it is
    ``None``), ``SINGULAR`` beyond ``max_condition``; raises if ``strict`` and the solve failed."""
    if jacobian is not None:
        final_condition = condition_numbers(jacobian)
    else:
        final_condition = _krylov_condition_at(f, state.x, options.krylov_restart)
    condition = torch.where(state.converged, final_condition, torch.maximum(state.condition, final_condition))
    return conditioned_result(
        state.x,
        state.residual,
        condition,
        state.iterations,
        state.history,
        converged=state.converged,
        singular=state.singular | (condition > options.max_condition),
        stalled=state.stalled,
        condition_kind="exact" if options.dense else "lower_bound",
        strict=strict,
    )


def _newton_step(
    f: Callable[[Tensor], Tensor], x: Tensor, r: Tensor, dense: bool, krylov_rtol: float, restart: int
) -> tuple[Tensor, Tensor]:
    """(dx, condition number) with J_f(x) dx = r, dense or by GMRES with Jacobian-vector products."""
    if dense:
        matrix = batched_jacobian(f, x)[1]
        condition = condition_numbers(matrix)
        solution, info = torch.linalg.solve_ex(matrix, r.reshape(r.shape[0], -1, 1))
        return solution.view_as(x), torch.where(info > 0, torch.full_like(condition, float("inf")), condition)
    result = gmres(  # relative accuracy only: an absolute floor would zero the last, smallest steps
        lambda v: jvp(f, (x,), (v,))[1],
        r,
        atol=0.0,
        rtol=krylov_rtol,
        restart=restart,
        max_condition=float("inf"),
        condition_probe=0,  # each step's lower bound comes from its own Krylov space; the final point is probed
        strict=False,
    )
    return result.value, result.condition_number  # type: ignore[return-value]


def _line_search(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    r: Tensor,
    step: Tensor,
    residual: Tensor,
    active: Tensor,
    enabled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backtracking along ``step`` for the active samples from x with r = y - f(x); returns (x, y - f(x),
    |y - f(x)|, accepted) with the residuals of the accepted trials (no extra evaluation of f)."""
    scale = torch.ones_like(residual)
    accepted = ~active
    new_x, new_r, new_residual = x, r, residual
    with torch.no_grad():
        for _ in range(MAX_HALVINGS if enabled else 1):
            trial = x + scale.view(-1, *([1] * (x.dim() - 1))) * step
            trial_r = y - f(trial)
            trial_residual = per_sample_norm(trial_r)
            good = active & ~accepted
            if enabled:
                good = good & torch.isfinite(trial_residual) & (trial_residual <= (1 - ARMIJO * scale) * residual)
            mask = good.view(-1, *([1] * (x.dim() - 1)))
            new_x, new_r = torch.where(mask, trial, new_x), torch.where(mask, trial_r, new_r)
            new_residual = torch.where(good, trial_residual, new_residual)
            accepted = accepted | good
            if accepted.all():
                break
            scale = torch.where(accepted, scale, scale / 2)
    return new_x, new_r, new_residual, accepted


def _krylov_condition_at(f: Callable[[Tensor], Tensor], x: Tensor, restart: int) -> Tensor:
    """GMRES's lower bound on the condition number of J_f(x) per sample."""
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
    result = gmres(
        lambda v: jvp(f, (x,), (v,))[1],
        probe,
        atol=0.0,
        rtol=1e-6,
        restart=restart,
        max_condition=float("inf"),
        condition_probe=0,  # the right-hand side is itself the random probe
        strict=False,
    )
    return result.condition_number  # type: ignore[return-value]
