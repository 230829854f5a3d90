r"""Fixed-point iteration x = T(x) with per-sample tolerances, error bounds and Anderson acceleration.

The inverse of an i-ResNet block F(x) = x + g(x) is the fixed point of T(x) = y - g(x) (thesis Algorithm 1).
For that map the fixed-point residual equals the inverse's residual, T(x) - x = y - F(x), so the tolerance
is checked on exactly the quantity its name promises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    read_stop_test,
    resolve_tolerances,
)

__all__ = ["a_priori_iterations", "fixed_point"]

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

    Examples:
        >>> result = fixed_point(torch.cos, torch.zeros(1, 1, dtype=torch.float64), lipschitz=0.85)
        >>> result.status.name, round(result.value.item(), 6)
        ('SUCCESS', 0.739085)
    """
    _check_options(method, max_iter, anderson_memory)
    threshold = _thresholds(x0, atol, rtol, reference, norm)
    mixer = _AndersonMixer(anderson_memory, anderson_regularization) if method == "anderson" else None
    state = _iterate(map, x0, threshold, norm, max_iter, mixer)
    return _record(state, lipschitz, threshold, strict)


def a_priori_iterations(lipschitz: float, first_step: Tensor, tolerance: Tensor | float) -> Tensor:
    r"""The number n of Banach iterations after which the Contraction Mapping Theorem guarantees
    |x_n - x^*| <= tolerance (formalML IFT notes, Theorem 2: |x_n - x^*| <= L^n / (1 - L) |x_1 - x_0|):

    .. math:: n = \left\lceil \frac{\log(\varepsilon (1 - L) / |x_1 - x_0|)}{\log L} \right\rceil, \quad n \ge 0.

    Arguments:
        lipschitz: L in (0, 1), a bound on the map's Lipschitz constant.
        first_step: |x_1 - x_0| per sample (B,).
        tolerance: epsilon > 0, a number or per sample (B,).

    Examples:
        >>> a_priori_iterations(0.5, torch.tensor([1.0]), 1e-3)  # 0.5^n / 0.5 <= 1e-3 from n = 11
        tensor([11.])
    """
    if not 0 < lipschitz < 1:
        raise ValueError(f"a_priori_iterations: the Lipschitz bound must lie in (0, 1), got {lipschitz}")
    tolerance = torch.as_tensor(tolerance, dtype=first_step.dtype, device=first_step.device)
    ratio = (tolerance * (1 - lipschitz) / first_step.clamp_min(torch.finfo(first_step.dtype).tiny)).clamp_max(1.0)
    return torch.ceil(torch.log(ratio) / math.log(lipschitz)).clamp_min(0.0)


def _check_options(method: str, max_iter: int, anderson_memory: int) -> None:
    """Refuse an unknown ``method``, a ``max_iter`` below 1 and an ``anderson_memory`` below 1."""
    if method not in ("iteration", "anderson"):
        raise ValueError(f"fixed_point: method must be 'iteration' or 'anderson', got {method!r}")
    check_max_iter(max_iter, "fixed_point")
    if anderson_memory < 1:
        raise ValueError(f"fixed_point: anderson_memory must be at least 1, got {anderson_memory}")


def _thresholds(x0: Tensor, atol: float | None, rtol: float | None, reference: Tensor | None, norm: float) -> Tensor:
    """The per-sample tolerance atol + rtol |r_b|_p, shape (B,), with r = ``reference`` (default |x0|_p)."""
    atol, rtol = resolve_tolerances(x0.dtype, atol, rtol)
    if reference is None:
        reference = per_sample_norm(x0, norm)
    return atol + rtol * reference


@dataclass
class _IterationState:
    """The state of the iteration after ``iterations`` evaluations of T.

    ``x`` is the iterate (B, ...); ``residual``, ``converged`` and ``finite`` are per sample (B,): the residual
    |T(x_b) - x_b|_p last measured on an active sample, convergence (frozen samples) and finiteness so far.
    ``history`` holds the largest finite residual after each evaluation; ``nonfinite`` and ``diverged`` are
    the solve-wide flags of :func:`~invertnet.solvers.common.decide_status`.
    """

    x: Tensor
    residual: Tensor
    converged: Tensor
    finite: Tensor
    history: list[float] = field(default_factory=list)
    nonfinite: bool = False
    diverged: bool = False
    iterations: int = 0
    first_step: Tensor | None = None
    """|x_1 - x_0|_p = |T(x_0) - x_0|_p per sample (B,), for Theorem 2's a-priori bound."""

    @classmethod
    def start(cls, x0: Tensor, threshold: Tensor) -> _IterationState:
        """Start at x0 (B, ...) with no residual measured: residual inf, nothing converged, all finite (B,)."""
        converged = torch.zeros_like(threshold, dtype=torch.bool)
        residual = torch.full_like(threshold, float("inf"))
        return cls(x=x0, residual=residual, converged=converged, finite=torch.ones_like(converged))

    def measure(self, difference: Tensor, threshold: Tensor, norm: float) -> bool:
        """Take the residuals |T(x) - x|_p of ``difference`` (B, ...) on the active samples; True to stop.

        Converged and non-finite samples keep their last residual; the stop is on a non-finite sample,
        divergence by :data:`~invertnet.solvers.common.DIVERGENCE_FACTOR` or every sample converged.
        """
        step_residual = per_sample_norm(difference, norm)
        if self.first_step is None:
            self.first_step = step_residual
        active = ~self.converged & self.finite
        self.finite = self.finite & torch.isfinite(step_residual)
        self.residual = torch.where(active & self.finite, step_residual, self.residual)
        self.converged = self.converged | (active & self.finite & (step_residual <= threshold))
        worst, (all_finite, all_converged) = read_stop_test(
            self.residual, self.finite, self.finite.all(), self.converged.all()
        )
        self.history.append(worst)
        self.nonfinite = not all_finite
        tiny = torch.finfo(self.x.dtype).tiny
        self.diverged = self.history[-1] > DIVERGENCE_FACTOR * max(self.history[0], tiny)
        return self.nonfinite or self.diverged or all_converged

    def advance(self, proposal: Tensor) -> None:
        """Move the unconverged samples to ``proposal`` (B, ...); converged samples stay frozen."""
        keep = self.converged.view(-1, *([1] * (self.x.dim() - 1)))
        self.x = torch.where(keep, self.x, proposal)


@dataclass
class _AndersonMixer:
    """Anderson's history: the last ``memory`` residuals T(x_i) - x_i and images T(x_i), flattened to (B, d),
    and the number of iterations since the largest residual last improved (the restart test)."""

    memory: int
    regularization: float
    differences: list[Tensor] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    best: float = float("inf")
    since_best: int = 0

    def propose(self, image: Tensor, difference: Tensor, history: list[float]) -> Tensor:
        """The next iterate (B, ...) from T(x) = ``image`` and T(x) - x = ``difference``.

        Mixes (:func:`_anderson_step`) only while the last step shrank the residual by less than
        :data:`ANDERSON_ONSET`; after ``memory`` iterations without a new best residual the history is cleared
        and the plain step T(x) is taken. Non-finite mixed entries fall back to T(x).
        """
        improved = history[-1] < self.best
        self.best, self.since_best = (history[-1], 0) if improved else (self.best, self.since_best + 1)
        self.differences = [*self.differences, difference.flatten(1)][-self.memory :]
        self.images = [*self.images, image.flatten(1)][-self.memory :]
        contracting_fast = len(history) >= 2 and history[-1] <= ANDERSON_ONSET * history[-2]
        if self.since_best >= self.memory:
            self.differences, self.images, self.since_best = [], [], 0
            return image
        if len(self.images) > 1 and not contracting_fast:
            mixed = _anderson_step(self.differences, self.images, self.regularization).view_as(image)
            return torch.where(torch.isfinite(mixed), mixed, image)
        return image


def _iterate(
    map: Callable[[Tensor], Tensor],
    x0: Tensor,
    threshold: Tensor,
    norm: float,
    max_iter: int,
    mixer: _AndersonMixer | None,
) -> _IterationState:
    """Iterate x <- T(x) (or Anderson's mixture of past images when ``mixer`` is given) from x0 (B, ...)
    until :meth:`_IterationState.measure` stops or ``max_iter`` evaluations of T are spent."""
    state = _IterationState.start(x0, threshold)
    with torch.no_grad():
        for iteration in range(1, max_iter + 1):
            state.iterations = iteration
            image = map(state.x)
            difference = image - state.x
            if state.measure(difference, threshold, norm) or iteration == max_iter:
                break
            state.advance(image if mixer is None else mixer.propose(image, difference, state.history))
    return state


def _record(state: _IterationState, lipschitz: float | None, threshold: Tensor, strict: bool) -> InverseResult:
    """The :class:`~invertnet.InverseResult` of the final state, with the error bound residual / (1 - L)
    (B,) and Theorem 2's a-priori iteration count for an error below the tolerance when 0 < L < 1 is known;
    raises :class:`~invertnet.ConvergenceError` if ``strict`` and it failed."""
    error_bound = iteration_bound = None
    if lipschitz is not None and lipschitz < 1:
        error_bound = state.residual / (1.0 - lipschitz)
        if lipschitz > 0 and state.first_step is not None:
            iteration_bound = a_priori_iterations(lipschitz, state.first_step, threshold)
    status = decide_status(
        converged=state.converged,
        nonfinite=state.nonfinite,
        diverged=state.diverged,
        not_contractive=lipschitz is not None and lipschitz >= 1,
    )
    result = InverseResult(
        value=state.x,
        converged=state.converged,
        iterations=state.iterations,
        residual=state.residual,
        error_bound=error_bound,
        status=status,
        residual_history=state.history,
        iteration_bound=iteration_bound,
    )
    return finish(result, strict)
