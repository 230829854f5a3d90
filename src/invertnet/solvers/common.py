r"""What every solver shares: default tolerances and budgets, norms, per-sample Jacobians, condition numbers
and the one decision of a solve's status.

Status order. A solve's per-sample flags are turned into one :class:`~invertnet.SolverStatus` by
:func:`decide_status`, for every solver in the same order, first match wins:

1. ``NONFINITE``: an iterate or residual is NaN or infinite (nothing else can be trusted);
2. ``DIVERGED``: the largest residual grew :data:`DIVERGENCE_FACTOR`-fold over its first value;
3. ``SINGULAR``: a Jacobian's condition number exceeds the solver's ``max_condition`` (Newton, GMRES,
   inverse derivatives): the solution, if any, is not locally unique or has no reliable digits;
4. ``ILL_CONDITIONED``: the solution is unique (triangular maps with a positive diagonal, Song et al. 2019,
   Theorem 1) but the Jacobian's condition estimate exceeds ``max_condition``, so the forward error can be
   large however small the residual (Higham 2002, Theorem 7.2: relative error <= cond * relative residual);
5. ``NOT_CONTRACTIVE``: a Lipschitz bound >= 1 was given, so even a small residual proves neither existence
   nor uniqueness of the solution;
6. ``SUCCESS``: every sample converged;
7. ``STALLED``: the residual stopped decreasing before the tolerance;
8. ``MAX_ITER``: the budget ran out.

Options. Tolerances must be finite and >= 0 (not both zero) and budgets integers >= 1: every entry point
refuses anything else with a ``ValueError`` naming the solver and the option (:class:`~invertnet.SolverOptions`
checks the same when it is built).

Budgets. ``max_iter`` counts evaluations of the map (fixed point, triangular Newton) or Newton steps, and
defaults by the solver's rate of convergence: :data:`FIXED_POINT_MAX_ITER` for linearly convergent
iterations (Banach, Anderson, the Jacobi iteration of triangular backward solves), :data:`NEWTON_MAX_ITER`
for Newton's method (quadratic near a regular root, Dennis & Schnabel 1996, Theorem 5.2.1),
:data:`TRIANGULAR_MAX_ITER` for the parallel safeguarded Newton of triangular maps (each coordinate converges
once its predecessors have settled) and per coordinate of the sequential solve, and ``10 d`` products for
GMRES, which is exact after d products in exact arithmetic (Saad & Schultz 1986, Proposition 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from invertnet.core import ConditionKind, InverseResult, SolverStatus, check_iteration_budget, check_tolerance

__all__ = [
    "DIVERGENCE_FACTOR",
    "FIXED_POINT_MAX_ITER",
    "NEWTON_MAX_ITER",
    "TRIANGULAR_MAX_ITER",
    "batched_jacobian",
    "check_max_iter",
    "condition_numbers",
    "conditioned_result",
    "decide_status",
    "default_max_condition",
    "default_tolerances",
    "finish",
    "per_sample_norm",
    "resolve_max_condition",
    "resolve_tolerances",
]

#: Growth of the largest residual over its first value beyond which a solve is declared divergent.
DIVERGENCE_FACTOR = 1e8
#: Default budget of linearly convergent iterations (fixed point, Anderson, Jacobi backward solves).
FIXED_POINT_MAX_ITER = 1000
#: Default number of Newton steps (dense or Newton-Krylov).
NEWTON_MAX_ITER = 50
#: Default budget of the parallel triangular Newton solve, and of each coordinate of the sequential one.
TRIANGULAR_MAX_ITER = 200

#: Default (atol, rtol) per dtype. ``standard`` is a few hundred ulps above the rounding floor of float32 and
#: halves and 1e-10 in float64. ``tight`` is for solvers whose error is the residual times a condition number
#: and that converge quadratically, so going 100x further costs about one iteration (triangular Newton,
#: MintNet: Song et al. 2019, Theorem 1); float32 and halves cannot go further and keep the standard.
_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"standard": 1e-10, "tight": 1e-12},
    torch.float32: {"standard": 1e-5, "tight": 1e-5},
    torch.float16: {"standard": 1e-2, "tight": 1e-2},
    torch.bfloat16: {"standard": 1e-2, "tight": 1e-2},
}


def default_tolerances(dtype: torch.dtype, precision: Literal["standard", "tight"] = "standard") -> tuple[float, float]:
    """Return ``(atol, rtol)`` for ``dtype``: 1e-10 for float64 (``tight``: 1e-12), 1e-5 for float32, 1e-2 for halves.

    Raises:
        TypeError: For a dtype that is not floating point.
    """
    if dtype not in _TOLERANCES:
        raise TypeError(f"solver: unsupported dtype {dtype}; use a floating-point tensor")
    tolerance = _TOLERANCES[dtype][precision]
    return tolerance, tolerance


def resolve_tolerances(
    dtype: torch.dtype, atol: float | None, rtol: float | None, precision: Literal["standard", "tight"] = "standard"
) -> tuple[float, float]:
    """``(atol, rtol)`` with ``None`` replaced by :func:`default_tolerances`; refuses NaN, infinite, negative or
    all-zero ones with a ``ValueError``."""
    check_tolerance(atol, "atol", "solver")
    check_tolerance(rtol, "rtol", "solver")
    default_atol, default_rtol = default_tolerances(dtype, precision)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if atol < 0 or rtol < 0 or atol + rtol == 0:
        raise ValueError(f"solver: need atol, rtol >= 0 and not both zero, got atol={atol}, rtol={rtol}")
    return atol, rtol


def check_max_iter(max_iter: int, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``max_iter`` is an integer >= 1."""
    check_iteration_budget(max_iter, "max_iter", where)


def default_max_condition(dtype: torch.dtype) -> float:
    """1 / (1000 eps): a Jacobian with a larger condition number leaves fewer than about 3 reliable digits in
    a solve (formalML IFT notes, Remark 7), so solvers report it as ``SINGULAR``; 4.5e12 in float64, 8.4e3
    in float32."""
    return 1.0 / (1000.0 * torch.finfo(dtype).eps)


def resolve_max_condition(dtype: torch.dtype, max_condition: float | None, where: str) -> float:
    """``max_condition``, or :func:`default_max_condition` for ``None``; a ``ValueError`` naming ``where``
    unless it is a number > 1 (``inf`` allowed: never singular or ill-conditioned)."""
    if max_condition is None:
        return default_max_condition(dtype)
    if isinstance(max_condition, bool) or not isinstance(max_condition, int | float) or not max_condition > 1:
        raise ValueError(f"{where}: max_condition must be a number > 1 (inf allowed) or None, got {max_condition!r}")
    return float(max_condition)


def per_sample_norm(v: Tensor, order: float = 2.0) -> Tensor:
    """The p-norm of each sample of v (B, ...), shape (B,)."""
    return torch.linalg.vector_norm(v.flatten(1), ord=order, dim=1)


def read_scalars(value: Tensor, *flags: Tensor) -> tuple[float, list[bool]]:
    """A scalar ``value`` and scalar booleans ``flags`` read from the device in one host synchronisation: an
    iterative solver's one read per iteration (on a GPU every read waits for the device)."""
    values = torch.stack([value, *(flag.to(value.dtype) for flag in flags)]).tolist()
    return values[0], [bool(flag) for flag in values[1:]]


def read_stop_test(residual: Tensor, finite: Tensor, *flags: Tensor) -> tuple[float, list[bool]]:
    """The largest finite entry of ``residual`` (B,) (inf if none is finite) and each scalar boolean of ``flags``,
    in one read (:func:`read_scalars`)."""
    if residual.numel() == 0:
        return math.inf, [bool(flag) for flag in flags]  # the flags of empty tensors: no device to wait for
    worst, values = read_scalars(torch.where(finite, residual, torch.full_like(residual, -math.inf)).amax(), *flags)
    return (worst if worst > -math.inf else math.inf), values


def batched_jacobian(f: Callable[[Tensor], Tensor], x: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    r"""``(f(x), J)`` with J the per-sample Jacobians :math:`\partial f(x)_b / \partial x_b`, shape (B, d_out, d).

    Because f acts per sample, pulling back the i-th basis vector in every sample at once gives the i-th row of
    every sample's Jacobian: one evaluation of f and d_out vector-Jacobian products, vectorised
    (``torch.autograd.grad(..., is_grads_batched=True)``).

    Arguments:
        f: Map from (B, ...) to (B, ...), sample b of the output depending only on sample b of the input.
        x: Point with shape (B, ...).
        create_graph: Keep the graph, so that J (and f(x)) are differentiable with respect to x (when x
            requires gradients) and to f's parameters; otherwise both are returned detached.
    """
    with torch.enable_grad():
        x_in = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        output = f(x_in)
        batch, size = output.shape[0], output[0].numel()
        basis = torch.eye(size, dtype=output.dtype, device=output.device)
        cotangents = basis.unsqueeze(1).expand(size, batch, size).reshape(size, *output.shape)
        (rows,) = torch.autograd.grad(output, x_in, cotangents, is_grads_batched=True, create_graph=create_graph)
    jacobian = rows.reshape(size, batch, -1).permute(1, 0, 2)
    if not create_graph:
        return output.detach(), jacobian.detach()
    return output, jacobian


def condition_numbers(matrices: Tensor) -> Tensor:
    """2-norm condition numbers of (B, d, d) matrices, shape (B,), for singular ones above any ``max_condition``:
    inf for non-finite matrices and the zero matrix (``torch.linalg.cond``'s 0 / 0), the dtype's largest float for
    the other singular ones (its inf, through ``nan_to_num``)."""
    finite = torch.isfinite(matrices).flatten(1).all(1)
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    safe = torch.where(finite[:, None, None], matrices, eye)  # no host read: non-finite ones are masked out after
    condition = torch.nan_to_num(torch.linalg.cond(safe), nan=float("inf"))
    return torch.where(finite, condition, torch.full_like(condition, float("inf")))


def decide_status(
    *,
    converged: Tensor,
    nonfinite: bool = False,
    diverged: bool = False,
    singular: Tensor | None = None,
    ill_conditioned: Tensor | None = None,
    not_contractive: bool = False,
    stalled: Tensor | None = None,
) -> SolverStatus:
    """The status of a solve from its per-sample flags (B,), in the order of the module docstring.

    Arguments:
        converged: Per-sample convergence, shape (B,).
        nonfinite: An iterate or residual was NaN or infinite.
        diverged: The residual grew :data:`DIVERGENCE_FACTOR`-fold.
        singular: Per-sample singular Jacobians, shape (B,), for solvers that measure conditioning.
        ill_conditioned: Per-sample ill-conditioned Jacobians of solves whose solution is unique, shape (B,).
        not_contractive: A Lipschitz bound >= 1 was given.
        stalled: Per-sample lack of progress, shape (B,).
    """
    if nonfinite:
        return SolverStatus.NONFINITE
    if diverged:
        return SolverStatus.DIVERGED
    if singular is not None and bool(singular.any()):
        return SolverStatus.SINGULAR
    if ill_conditioned is not None and bool(ill_conditioned.any()):
        return SolverStatus.ILL_CONDITIONED
    if not_contractive:
        return SolverStatus.NOT_CONTRACTIVE
    if bool(converged.all()):
        return SolverStatus.SUCCESS
    if stalled is not None and bool(stalled.any()):
        return SolverStatus.STALLED
    return SolverStatus.MAX_ITER


def finish(result: InverseResult, strict: bool) -> InverseResult:
    """Return ``result``, raising :class:`~invertnet.ConvergenceError` first if ``strict`` and it failed."""
    if strict:
        result.raise_if_failed()
    return result


def conditioned_result(
    value: Tensor,
    residual: Tensor,
    condition: Tensor,
    iterations: int,
    history: list[float],
    *,
    converged: Tensor,
    singular: Tensor,
    stalled: Tensor,
    condition_kind: ConditionKind,
    strict: bool,
) -> InverseResult:
    """The record of a solve that measures conditioning (GMRES, Newton, inverse derivatives); ``condition``
    (B,) is of the kind ``condition_kind`` (``"exact"`` or ``"lower_bound"``).

    The status is :func:`decide_status` of the flags (a non-finite residual is ``NONFINITE``); singular samples
    do not count as converged. Raises :class:`~invertnet.ConvergenceError` if ``strict`` and the solve failed.
    """
    status = decide_status(
        converged=converged, nonfinite=not bool(torch.isfinite(residual).all()), singular=singular, stalled=stalled
    )
    result = InverseResult(
        value=value,
        converged=converged & ~singular,
        iterations=iterations,
        residual=residual,
        error_bound=None,
        status=status,
        residual_history=history,
        condition_number=condition,
        condition_kind=condition_kind,
    )
    return finish(result, strict)
