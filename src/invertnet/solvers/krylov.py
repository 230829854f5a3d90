r"""Batched restarted GMRES for the linear systems of Newton steps and implicit gradients (formalML IFT notes, Remark 7:
solve, never invert).

Every sample b of a batch has its own system A_b w_b = r_b with A_b known only through products; the
products of all samples are taken together (one call of ``matvec`` per Krylov step), the Krylov spaces and
least-squares problems are per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from invertnet.core import InverseResult
from invertnet.solvers.common import (
    check_max_iter,
    conditioned_result,
    read_scalars,
    resolve_max_condition,
    resolve_tolerances,
)

__all__ = ["gmres"]


def _batched_norm(v: Tensor) -> Tensor:
    """The 2-norm of each row of v (B, d), shape (B,)."""
    return torch.linalg.vector_norm(v, dim=1)


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    restart: int = 50,
    max_iter: int | None = None,
    max_condition: float | None = None,
    condition_probe: int = 10,
    strict: bool = True,
) -> InverseResult:
    r"""Solve A x = b per sample by restarted GMRES(m), with products v -> A v only.

    Each cycle builds an orthonormal Krylov basis V of span{r, A r, ..., A^{m-1} r} by Arnoldi with
    classical Gram-Schmidt applied twice (CGS2, orthogonal to working precision), and takes
    x <- x + V y with y minimising |beta e_1 - H y| over the (m + 1) x m Hessenberg matrix H (least squares
    per sample). Sample b has converged when |b - A x|_2 <= atol + rtol |b|_2; converged samples keep their x.
    The singular values of H lie within [sigma_min(A), sigma_max(A)] (A V_m = V_{m+1} H with orthonormal V), so
    sigma_max(H) / sigma_min(H) is a lower bound on cond_2(A), reported as ``condition_number`` with
    ``condition_kind`` ``"lower_bound"``; beyond ``max_condition`` the status is ``SINGULAR``. The Krylov space
    of b alone can miss the conditioning entirely: for A = diag(1, 1e-14) and b = (1, 1e-14) one step meets
    the tolerance with x = (1, 1e-14) (the solution is (1, 1)) and its H has condition 1. So after the solve
    ``condition_probe`` further Arnoldi steps from a fixed pseudo-random vector add a second lower bound, here
    1e14 after two steps, and a status ``SINGULAR``.

    Arguments:
        matvec: v -> A v for v of the shape of ``b``, acting per sample.
        b: Right-hand sides (B, ...).
        x0: Starting guess (default zero).
        atol, rtol: Residual tolerances (``None``: :func:`~invertnet.solvers.default_tolerances`).
        restart: Krylov dimension m per cycle (capped at the dimension d).
        max_iter: Maximal number of products in all (default 10 d: in exact arithmetic GMRES is exact after d).
        max_condition: Condition lower bound beyond which the status is ``SINGULAR``
            (default :func:`~invertnet.solvers.default_max_condition`).
        condition_probe: Arnoldi steps of the probe (capped at d; 0: no probe, only the solve's spaces).
        strict: Raise :class:`~invertnet.ConvergenceError` unless the solve succeeded.

    Returns:
        An :class:`~invertnet.InverseResult` whose ``iterations`` counts products with A, the probe's included.

    Examples:
        >>> A = torch.tensor([[[4.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
        >>> result = gmres(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), torch.ones(1, 2, dtype=torch.float64))
        >>> result.status.name, [round(value, 6) for value in result.value[0].tolist()]
        ('SUCCESS', [0.181818, 0.272727])
    """
    batch, dimension = b.shape[0], b[0].numel()
    restart, max_iter, atol, rtol, max_condition = _resolve_options(b, restart, max_iter, atol, rtol, max_condition)
    if isinstance(condition_probe, bool) or not isinstance(condition_probe, int) or condition_probe < 0:
        raise ValueError(f"gmres: condition_probe must be an integer >= 0, got {condition_probe!r}")

    def apply(v: Tensor) -> Tensor:
        return matvec(v.view(b.shape)).reshape(batch, dimension)

    rhs = b.reshape(batch, dimension)
    threshold = atol + rtol * _batched_norm(rhs)
    state = _KrylovState.start(apply, rhs, x0, threshold)
    with torch.no_grad():
        while state.running(max_iter):
            _cycle(state, apply, rhs, threshold, restart, max_iter)
        if condition_probe > 0 and state.all_finite:
            steps = min(condition_probe, dimension)
            state.condition = torch.maximum(state.condition, _probe_condition(apply, rhs, steps))
            state.products += steps
    return conditioned_result(
        state.x.view(b.shape),
        state.residual,
        state.condition,
        state.products,
        state.history,
        converged=state.converged,
        singular=state.condition > max_condition,
        stalled=torch.full_like(state.converged, state.stalled),
        condition_kind="lower_bound",
        strict=strict,
    )


def _resolve_options(
    b: Tensor, restart: int, max_iter: int | None, atol: float | None, rtol: float | None, max_condition: float | None
) -> tuple[int, int, float, float, float]:
    """(restart, max_iter, atol, rtol, max_condition) with the defaults filled in for right-hand sides b (B, ...)
    of dimension d: restart capped to [1, d], 10 d products, the dtype's tolerances and condition limit."""
    if not b.is_floating_point():
        raise TypeError(f"gmres: b must be floating point, got {b.dtype}")
    dimension = b[0].numel()
    restart = max(1, min(restart, dimension))
    max_iter = 10 * dimension if max_iter is None else max_iter
    check_max_iter(max_iter, "gmres")
    atol, rtol = resolve_tolerances(b.dtype, atol, rtol)
    max_condition = resolve_max_condition(b.dtype, max_condition, "gmres")
    return restart, max_iter, atol, rtol, max_condition


@dataclass
class _KrylovState:
    """The state of restarted GMRES between cycles, on flattened samples.

    ``x`` and ``residual_vector`` = b - A x are (B, d); ``residual`` |b - A x|_2, ``converged`` and the lower
    bound ``condition`` on cond(A) are (B,); ``products`` counts products with A, ``history`` holds the
    largest residual after each cycle and ``stalled`` marks a cycle that did not reduce it.
    """

    x: Tensor
    residual_vector: Tensor
    residual: Tensor
    converged: Tensor
    condition: Tensor
    products: int
    history: list[float]
    stalled: bool = False
    all_converged: bool = False
    all_finite: bool = True

    def read(self) -> None:
        """Append the largest residual to ``history`` and take ``all_converged`` and ``all_finite``: one host
        read per cycle."""
        worst, (self.all_converged, self.all_finite) = read_scalars(
            self.residual.max(), self.converged.all(), torch.isfinite(self.residual).all()
        )
        self.history.append(worst)

    @classmethod
    def start(
        cls, apply: Callable[[Tensor], Tensor], rhs: Tensor, x0: Tensor | None, threshold: Tensor
    ) -> _KrylovState:
        """Start at x0 (default zero; one product for its residual) for right-hand sides ``rhs`` (B, d)."""
        x = torch.zeros_like(rhs) if x0 is None else x0.reshape(rhs.shape).clone()
        residual_vector = rhs - apply(x) if x0 is not None else rhs.clone()
        residual = _batched_norm(residual_vector)
        state = cls(
            x=x,
            residual_vector=residual_vector,
            residual=residual,
            converged=residual <= threshold,
            condition=torch.ones(rhs.shape[0], dtype=rhs.dtype, device=rhs.device),
            products=0 if x0 is None else 1,
            history=[],
        )
        state.read()
        return state

    def running(self, max_iter: int) -> bool:
        """True while the last cycle made progress, products remain, a sample is unconverged and all
        residuals are finite."""
        return not (self.stalled or self.products >= max_iter or self.all_converged) and self.all_finite


def _cycle(
    state: _KrylovState,
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    threshold: Tensor,
    restart: int,
    max_iter: int,
) -> None:
    """One GMRES(m) cycle: x <- x + V y on the unconverged samples, then the true residual b - A x (one product),
    the condition bound from the Hessenberg matrix, and the stall test (no progress over a full cycle:
    restarting the same space cannot help)."""
    beta = state.residual.clone()
    budget = min(restart, max_iter - state.products)
    basis, hessenberg, y = _arnoldi(apply, state.residual_vector, beta, threshold, state.converged, budget, restart)
    steps = len(basis) - 1
    state.products += steps
    update = (torch.stack(basis[:steps], dim=2) @ y).squeeze(-1)
    state.x = torch.where(state.converged[:, None], state.x, state.x + update)
    state.condition = torch.maximum(state.condition, _hessenberg_condition(hessenberg, steps))
    state.residual_vector = rhs - apply(state.x)
    state.products += 1
    state.residual = torch.where(state.converged, state.residual, _batched_norm(state.residual_vector))
    state.converged = state.converged | (state.residual <= threshold)
    state.read()
    history = state.history
    state.stalled = len(history) > 2 and history[-1] >= history[-2] and not state.all_converged


def _arnoldi(
    apply: Callable[[Tensor], Tensor],
    residual_vector: Tensor,
    beta: Tensor,
    threshold: Tensor,
    converged: Tensor,
    budget: int,
    restart: int,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Up to ``budget`` Arnoldi steps from r / beta (r = ``residual_vector`` (B, d), beta = |r| (B,)).

    Stops early when every unconverged sample's least-squares residual estimate meets ``threshold`` or the
    Krylov space became invariant in every sample (happy breakdown). Returns the basis (steps + 1 vectors
    (B, d)), the Hessenberg matrix H (B, m + 1, m) and the least-squares solution y (B, steps, 1).
    """
    basis = [_normalised(residual_vector, beta)]
    hessenberg = torch.zeros(
        residual_vector.shape[0], restart + 1, restart, dtype=residual_vector.dtype, device=residual_vector.device
    )
    for j in range(budget):
        norm = _extend_basis(apply, basis, hessenberg, j)
        y, estimate = _least_squares(hessenberg, beta, j + 1)
        met = ((estimate <= threshold) | converged).all()
        if met | (norm <= 1e-14 * beta.clamp_min(1e-300)).all():  # one host read per Arnoldi step
            break
    return basis, hessenberg, y


def _normalised(v: Tensor, norm: Tensor) -> Tensor:
    """v / |v| per row of v (B, d) given its norms (B,); zero rows stay zero."""
    return torch.where(norm[:, None] > 0, v / norm.clamp_min(1e-300)[:, None], 0.0)


def _extend_basis(apply: Callable[[Tensor], Tensor], basis: list[Tensor], hessenberg: Tensor, j: int) -> Tensor:
    """Arnoldi step j: orthogonalise A v_j against the basis (CGS2), append it normalised to ``basis`` and
    fill column j of ``hessenberg`` (B, m + 1, m) in place; returns h_{j+1,j} (B,)."""
    w = apply(basis[j])
    stacked = torch.stack(basis, dim=2)  # (B, d, j + 1)
    for _ in range(2):  # CGS2
        coefficients = (stacked.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)
        w = w - (stacked @ coefficients.unsqueeze(-1)).squeeze(-1)
        hessenberg[:, : j + 1, j] += coefficients
    norm = _batched_norm(w)
    hessenberg[:, j + 1, j] = norm
    basis.append(_normalised(w, norm))
    return norm


def _least_squares(hessenberg: Tensor, beta: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """y minimising |beta e_1 - H y| over the leading (steps + 1) x steps block of H (B, m + 1, m), per sample;
    returns y (B, steps, 1) and that minimum (B,), the residual estimate."""
    small = hessenberg[:, : steps + 1, :steps]
    target = torch.zeros(hessenberg.shape[0], steps + 1, 1, dtype=hessenberg.dtype, device=hessenberg.device)
    target[:, 0, 0] = beta
    # CPU: the SVD driver; the default gelsy reads uninitialised memory (pytorch/pytorch#71222), which made two
    # identical solves differ. CUDA has only gels (QR), which is deterministic.
    driver = "gelsd" if small.device.type == "cpu" else None
    y = torch.linalg.lstsq(small, target, driver=driver).solution
    return y, _batched_norm((target - small @ y).squeeze(-1))


def _hessenberg_condition(hessenberg: Tensor, steps: int) -> Tensor:
    """sigma_max / sigma_min (B,) of the leading (steps + 1) x steps block of H (B, m + 1, m): a lower bound
    on cond(A).

    A sample whose Krylov space became invariant after k < steps steps (exact breakdown) has zero columns
    from k on (its next basis vector is zero); its bound is that of the first k columns, whose non-zero
    singular values are those of the block."""
    block = hessenberg[:, : steps + 1, :steps]
    singular_values = torch.linalg.svdvals(block)
    columns = (block.abs().sum(dim=1) > 0).sum(dim=1)
    smallest = singular_values.gather(1, (columns - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    condition = singular_values[:, 0] / smallest.clamp_min(torch.finfo(hessenberg.dtype).tiny)
    return torch.where(columns > 0, condition, torch.ones_like(condition))


def _probe_condition(apply: Callable[[Tensor], Tensor], rhs: Tensor, steps: int) -> Tensor:
    """The Hessenberg lower bound on cond(A) (B,) of ``steps`` Arnoldi steps from a fixed pseudo-random start
    (seed 0, one vector per sample, shaped like ``rhs`` (B, d)), independent of the right-hand side."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(rhs.shape, generator=generator, dtype=rhs.dtype).to(rhs.device)
    basis = [_normalised(start, _batched_norm(start))]
    hessenberg = torch.zeros(rhs.shape[0], steps + 1, steps, dtype=rhs.dtype, device=rhs.device)
    for j in range(steps):
        _extend_basis(apply, basis, hessenberg, j)
    return _hessenberg_condition(hessenberg, steps)
