r"""Fixed-point iteration x = T(x) with per-sample tolerances, error bounds and Anderson acceleration.

The inverse of an i-ResNet block F(x) = x + g(x) is the fixed point of T(x) = y - g(x) (thesis Algorithm 1).
For that map the fixed-point residual equals the inverse's residual, T(x) - x = y - F(x), so the tolerance
is checked on exactly the quantity its name promises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from invertnet.core import InverseResult
from invertnet.solvers.common import (
    DIVERGENCE_FACTOR,
    FIXED_POINT_MAX_ITER,
    check_max_iter,
    decide_status,
    finish,
    per_sample_norm,
    resolve_tolerances,
)

__all__ = ["fixed_point"]

#: Anderson mixes only while the last step shrank the residual by less than this factor; faster-contracting
#: steps are left to plain iteration, which Anderson's extrapolation only perturbs (measured in float32).
ANDERSON_ONSET = 0.5

def _anderson_step(residuals: list[Tensor], images: list[Tensor], regularization: float) -> Tensor:
    """Type-II Anderson mixing: sum_i alpha_i T(x_i) with alpha minimising |sum_i alpha_i (T(x_i) - x_i)|.

    ``residuals`` and ``images`` hold T(x_i) - x_i and T(x_i), flattened to (B, d), oldest first.
    The constrained least-squares problem (sum alpha = 1) is solved per sample through its normal
    equations H alpha = 1 (then normalised), with H = R R^T regularised relative to its trace. The small
    m x m systems are solved in float64 whatever the working dtype; a sample whose system is singular
    anyway (e.g. repeated history columns) takes the plain step T(x) instead.
    """
    stacked = torch.stack(residuals, dim=1).to(torch.float64)
    gram = stacked @ stacked.transpose(1, 2)
    m = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    gram = gram + regularization * scale.unsqueeze(-1) * eye
    ones = torch.ones(gram.shape[0], m, 1, dtype=gram.dtype, device=gram.device)
    weights, info = torch.linalg.solve_ex(gram, ones)
    weights = weights.squeeze(-1)
    weights = weights / weights.sum(dim=1, keepdim=True)
    usable = (info == 0) & torch.isfinite(weights).all(dim=1)
    plain = torch.zeros_like(weights)
    plain[:, -1] = 1.0
    weights = torch.where(usable.unsqueeze(-1), weights, plain).to(images[-1].dtype)
    return (weights.unsqueeze(1) @ torch.stack(images, dim=1)).squeeze(1)


def fixed_point(
    map: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = FIXED_POINT_MAX_ITER,
    reference: Tensor | None = None,
    norm: float = 2.0,
    lipschitz: float | None = None,
    method: Literal["iteration", "anderson"] = "iteration",
    anderson_memory: int = 5,
    anderson_regularization: float = 1e-10,
    strict: bool = True,
) -> InverseResult:
    r"""Solve x = T(x) per sample by Banach iteration (thesis Algorithm 1) or Anderson acceleration.

    Sample b has converged when its residual satisfies

    .. math:: \|T(x_b) - x_b\|_p \le \mathrm{atol} + \mathrm{rtol}\,\|r_b\|_p ,

    where r is ``reference`` (default: ``x0``; for an inverse x0 = y). Converged samples are frozen, so the
    returned value of each sample is the iterate whose residual was measured. When a Lipschitz bound L < 1 of
    T is known, the error of the returned x is bounded by Lemma 4.5 of the thesis restarted at x:

    .. math:: \|x^* - x\|_p \le \frac{\|T(x) - x\|_p}{1 - L},

    which is never looser than the a-priori bound L^k/(1-L) |x_1 - x_0|.

    Arguments:
        map: The map T, acting on tensors of the shape of ``x0``; it must act per sample.
        x0: Starting point with shape (B, ...).
        atol, rtol: Absolute and relative residual tolerances; ``None`` takes
            :func:`~invertnet.solvers.default_tolerances`.
        max_iter: Maximal number of evaluations of T (default
            :data:`~invertnet.solvers.common.FIXED_POINT_MAX_ITER`).
        reference: Per-sample norms with shape (B,) that ``rtol`` multiplies; default |x0|_p.
        norm: The order p of the per-sample vector norm.
        lipschitz: A bound on Lip(T) in the p-norm, or ``None`` if unknown. A bound >= 1 makes the status
            ``NOT_CONTRACTIVE`` whatever the residual: uniqueness of the fixed point is not guaranteed.
        method: ``"iteration"`` for x <- T(x), ``"anderson"`` for Anderson acceleration (type II, Walker & Ni 2011;
            one evaluation of T per iteration). Anderson pays off when the map contracts slowly
            (rate near 1), so it takes plain steps while the residual shrinks by more than 2x per step and
            mixes only when it does not; when the largest residual has not improved for ``anderson_memory``
            iterations, its history is cleared and it restarts from a plain step.
        anderson_memory: Number of past iterates Anderson mixes.
        anderson_regularization: Tikhonov term of Anderson's least squares, relative to its scale.
        strict: Raise :class:`~invertnet.ConvergenceError` (carrying the record) unless the solve succeeded.

    Returns:
        An :class:`~invertnet.InverseResult`; its status follows the order of
        :func:`~invertnet.solvers.common.decide_status` (non-finite iterates, divergence by
        :data:`~invertnet.solvers.common.DIVERGENCE_FACTOR`, a Lipschitz bound >= 1, success, budget).

    Raises:
        ConvergenceError: With ``strict=True``, when the status is not ``SUCCESS``.

    Example:
        >>> result = fixed_point(torch.cos, torch.zeros(1, 1, dtype=torch.float64), lipschitz=0.85)
        >>> result.status.name, round(result.value.item(), 6)
        ('SUCCESS', 0.739085)
    """
    if method not in ("iteration", "anderson"):
        raise ValueError(f"fixed_point: method must be 'iteration' or 'anderson', got {method!r}")
    check_max_iter(max_iter, "fixed_point")
    if anderson_memory < 1:
        raise ValueError(f"fixed_point: anderson_memory must be at least 1, got {anderson_memory}")
    atol, rtol = resolve_tolerances(x0.dtype, atol, rtol)
    if reference is None:
        reference = per_sample_norm(x0, norm)
    threshold = atol + rtol * reference

    x = x0
    residual = torch.full_like(threshold, float("inf"))
    converged = torch.zeros_like(threshold, dtype=torch.bool)
    finite = torch.ones_like(converged)
    history: list[float] = []
    differences: list[Tensor] = []
    images: list[Tensor] = []
    best, since_best = float("inf"), 0
    nonfinite = diverged = False
    iterations = 0
    with torch.no_grad():
        for iterations in range(1, max_iter + 1):
            image = map(x)
            difference = image - x
            step_residual = per_sample_norm(difference, norm)
            active = ~converged & finite
            finite = finite & torch.isfinite(step_residual)
            residual = torch.where(active & finite, step_residual, residual)
            converged = converged | (active & finite & (step_residual <= threshold))
            history.append(residual[finite].max().item() if finite.any() else float("inf"))
            nonfinite = not bool(finite.all())
            diverged = history[-1] > DIVERGENCE_FACTOR * max(history[0], torch.finfo(x.dtype).tiny)
            if nonfinite or diverged or bool(converged.all()):
                break
            if iterations == max_iter:
                break
            proposal = image
            if method == "anderson":
                best, since_best = (history[-1], 0) if history[-1] < best else (best, since_best + 1)
                differences = [*differences, difference.flatten(1)][-anderson_memory:]
                images = [*images, image.flatten(1)][-anderson_memory:]
                contracting_fast = len(history) >= 2 and history[-1] <= ANDERSON_ONSET * history[-2]
                if since_best >= anderson_memory:  # stalled: restart from a plain step with an empty history
                    differences, images, since_best = [], [], 0
                elif len(images) > 1 and not contracting_fast:
                    mixed = _anderson_step(differences, images, anderson_regularization).view_as(image)
                    proposal = torch.where(torch.isfinite(mixed), mixed, image)
            keep = converged.view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(keep, x, proposal)

    error_bound = None
    if lipschitz is not None and lipschitz < 1:
        error_bound = residual / (1.0 - lipschitz)
    not_contractive = lipschitz is not None and lipschitz >= 1
    status = decide_status(
        converged=converged, nonfinite=nonfinite, diverged=diverged, not_contractive=not_contractive
    )
    result = InverseResult(
        value=x,
        converged=converged,
        iterations=iterations,
        residual=residual,
        error_bound=error_bound,
        status=status,
        residual_history=history,
    )
    return finish(result, strict)
