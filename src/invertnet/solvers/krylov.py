r"""Batched restarted GMRES for the linear systems of Newton steps and implicit gradients (formalML IFT notes, Remark 7:
solve, never invert).

Every sample b of a batch has its own system A_b w_b = r_b with A_b known only through products; the
products of all samples are taken together (one call of ``matvec`` per Krylov step), the Krylov spaces and
least-squares problems are per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from invertnet.core import InverseResult
from invertnet.solvers.common import check_max_iter, conditioned_result, default_max_condition, resolve_tolerances

__all__ = ["gmres"]


def _batched_norm(v: Tensor) -> Tensor:
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
    strict: bool = True,
) -> InverseResult:
    r"""Solve A x = b per sample by restarted GMRES(m), with products v -> A v only.

    Each cycle builds an orthonormal Krylov basis V of span{r, A r, ..., A^{m-1} r} by Arnoldi with
    classical Gram-Schmidt applied twice (CGS2, orthogonal to working precision), and takes
    x <- x + V y with y minimising |beta e_1 - H y| over the (m + 1) x m Hessenberg matrix H (least squares
    per sample). Sample b has converged when |b - A x|_2 <= atol + rtol |b|_2; converged samples keep their x.
    The singular values of H lie within [sigma_min(A), sigma_max(A)], so sigma_max(H) / sigma_min(H) is a lower
    bound on cond(A); it is reported as ``condition_number`` and beyond ``max_condition`` the status is
    ``SINGULAR``.

    Arguments:
        matvec: v -> A v for v of the shape of ``b``, acting per sample.
        b: Right-hand sides (B, ...).
        x0: Starting guess (default zero).
        atol, rtol: Residual tolerances (``None``: :func:`~invertnet.solvers.default_tolerances`).
        restart: Krylov dimension m per cycle (capped at the dimension d).
        max_iter: Maximal number of products in all (default 10 d: in exact arithmetic GMRES is exact after d).
        max_condition: Condition estimate beyond which the status is ``SINGULAR``
            (default :func:`~invertnet.solvers.default_max_condition`).
        strict: Raise :class:`~invertnet.ConvergenceError` unless the solve succeeded.

    Returns:
        An :class:`~invertnet.InverseResult` whose ``iterations`` counts products with A.

    Example:
        >>> A = torch.tensor([[[4.0, 1.0], [1.0, 3.0]]], dtype=torch.float64)
        >>> result = gmres(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), torch.ones(1, 2, dtype=torch.float64))
        >>> result.status.name, [round(value, 6) for value in result.value[0].tolist()]
        ('SUCCESS', [0.181818, 0.272727])
    """
    if not b.is_floating_point():
        raise TypeError(f"gmres: b must be floating point, got {b.dtype}")
    shape, batch = b.shape, b.shape[0]
    dimension = b[0].numel()
    restart = max(1, min(restart, dimension))
    max_iter = 10 * dimension if max_iter is None else max_iter
    check_max_iter(max_iter, "gmres")
    atol, rtol = resolve_tolerances(b.dtype, atol, rtol)
    max_condition = default_max_condition(b.dtype) if max_condition is None else max_condition

    def apply(v: Tensor) -> Tensor:
        return matvec(v.view(shape)).reshape(batch, dimension)

    rhs = b.reshape(batch, dimension)
    x = torch.zeros_like(rhs) if x0 is None else x0.reshape(batch, dimension).clone()
    threshold = atol + rtol * _batched_norm(rhs)
    residual_vector = rhs - apply(x) if x0 is not None else rhs.clone()
    products = 0 if x0 is None else 1
    residual = _batched_norm(residual_vector)
    converged = residual <= threshold
    history = [residual.max().item()]
    condition = torch.ones(batch, dtype=rhs.dtype, device=rhs.device)
    stalled = False
    with torch.no_grad():
        while products < max_iter and not converged.all():
            if not torch.isfinite(residual).all():
                break
            beta = residual.clone()
            basis = [torch.where(beta[:, None] > 0, residual_vector / beta.clamp_min(1e-300)[:, None], 0.0)]
            hessenberg = torch.zeros(batch, restart + 1, restart, dtype=rhs.dtype, device=rhs.device)
            steps = 0
            for j in range(min(restart, max_iter - products)):
                w = apply(basis[j])
                products += 1
                stacked = torch.stack(basis, dim=2)  # (B, d, j + 1)
                for _ in range(2):  # CGS2
                    coefficients = (stacked.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)
                    w = w - (stacked @ coefficients.unsqueeze(-1)).squeeze(-1)
                    hessenberg[:, : j + 1, j] += coefficients
                norm = _batched_norm(w)
                hessenberg[:, j + 1, j] = norm
                basis.append(torch.where(norm[:, None] > 0, w / norm.clamp_min(1e-300)[:, None], 0.0))
                steps = j + 1
                small = hessenberg[:, : steps + 1, :steps]
                target = torch.zeros(batch, steps + 1, 1, dtype=rhs.dtype, device=rhs.device)
                target[:, 0, 0] = beta
                y = torch.linalg.lstsq(small, target).solution
                estimate = _batched_norm((target - small @ y).squeeze(-1))
                if ((estimate <= threshold) | converged).all() or bool((norm <= 1e-14 * beta.clamp_min(1e-300)).all()):
                    break
            update = (torch.stack(basis[:steps], dim=2) @ y).squeeze(-1)
            x = torch.where(converged[:, None], x, x + update)
            singular_values = torch.linalg.svdvals(hessenberg[:, : steps + 1, :steps])
            cycle_condition = singular_values[:, 0] / singular_values[:, -1].clamp_min(torch.finfo(rhs.dtype).tiny)
            condition = torch.maximum(condition, cycle_condition)
            residual_vector = rhs - apply(x)
            products += 1
            residual = torch.where(converged, residual, _batched_norm(residual_vector))
            converged = converged | (residual <= threshold)
            history.append(residual.max().item())
            if len(history) > 2 and history[-1] >= history[-2] and not converged.all():
                stalled = True  # a full cycle without progress: restarting the same space cannot help
                break
    return conditioned_result(
        x.view(shape),
        residual,
        condition,
        products,
        history,
        converged=converged,
        singular=condition > max_condition,
        stalled=torch.full_like(converged, stalled),
        strict=strict,
    )
