r"""Derivatives of inverses without inverting a matrix (formalML IFT notes, Proposition 1 and Remark 7).

For a bijection F with x = F^{-1}(y), Proposition 1 gives J_{F^{-1}}(y) = J_F(x)^{-1}. So the derivative of the
inverse along v is the solution w of J_F(x) w = v, and the cotangent u pulls back to the solution of
J_F(x)^T w = u: one linear solve each, by LU on the dense per-sample Jacobian for small dimensions or by
GMRES with Jacobian-vector (vector-Jacobian) products for large ones.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.func import jvp, vjp

from invertnet.core import InverseResult, InvertibleModule, frozen_mode
from invertnet.solvers.common import batched_jacobian, condition_numbers, conditioned_result, resolve_max_condition
from invertnet.solvers.krylov import gmres
from invertnet.solvers.newton import DENSE_LIMIT

__all__ = ["inverse_jvp", "inverse_vjp"]


def inverse_jvp(
    module: InvertibleModule,
    y: Tensor,
    v: Tensor,
    x: Tensor | None = None,
    *,
    method: Literal["auto", "dense", "krylov"] = "auto",
    **gmres_options: object,
) -> InverseResult:
    r"""The derivative of the inverse along v: w = J_{F^{-1}}(y) v, the solution of J_F(x) w = v (Prop. 1).

    Arguments:
        module: The bijection F (evaluated without advancing spectral-norm power iterations).
        y: Points (B, ...) in the image.
        v: Tangents (B, ...) at y.
        x: F^{-1}(y) if already known (else computed by ``module.inverse``).
        method: ``"dense"`` (per-sample Jacobian, LU, exact condition number), ``"krylov"`` (GMRES with
            Jacobian-vector products, a lower bound on it) or ``"auto"`` (dense up to 256 dimensions per sample).
        **gmres_options: ``atol``, ``rtol``, ``restart``, ``max_iter``, ``max_condition``, ``condition_probe``,
            ``strict``.

    Returns:
        An :class:`~invertnet.InverseResult` whose ``value`` is w (B, ...), with the condition number of J_F(x)
        and its ``condition_kind`` (``"exact"`` dense, ``"lower_bound"`` by GMRES).

    Examples:
        >>> from invertnet.layers import ActNorm
        >>> layer = ActNorm(2).double().eval()
        >>> y, v = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        >>> w = inverse_jvp(layer, y, v).value  # ActNorm: J = diag(exp(log_scale))
        >>> torch.allclose(w, v * torch.exp(-layer.log_scale))
        True
    """
    return _solve(module, y, v, x, method, transposed=False, options=gmres_options)


def inverse_vjp(
    module: InvertibleModule,
    y: Tensor,
    u: Tensor,
    x: Tensor | None = None,
    *,
    method: Literal["auto", "dense", "krylov"] = "auto",
    **gmres_options: object,
) -> InverseResult:
    r"""The cotangent u pulled back through the inverse: w = J_{F^{-1}}(y)^T u, the solution of J_F(x)^T w = u.

    This is what backpropagation through x = F^{-1}(y) needs (e.g. a loss on samples x = F^{-1}(z)); arguments
    and result as for :func:`inverse_jvp`, with vector-Jacobian products for ``"krylov"``.
    """
    return _solve(module, y, u, x, method, transposed=True, options=gmres_options)


def _solve(
    module: InvertibleModule,
    y: Tensor,
    rhs: Tensor,
    x: Tensor | None,
    method: str,
    transposed: bool,
    options: dict[str, object],
) -> InverseResult:
    if method not in ("auto", "dense", "krylov"):
        raise ValueError(f"inverse derivative: method must be 'auto', 'dense' or 'krylov', got {method!r}")
    if rhs.shape != y.shape:
        raise ValueError(f"inverse derivative: vector {tuple(rhs.shape)} and y {tuple(y.shape)} must have one shape")
    with frozen_mode(module), torch.no_grad():
        x = module.inverse(y) if x is None else x
        if method == "krylov" or (method == "auto" and y[0].numel() > DENSE_LIMIT):
            if transposed:
                _, pullback = vjp(module, x)
                return gmres(lambda w: pullback(w)[0], rhs, **options)  # type: ignore[arg-type]
            return gmres(lambda w: jvp(module, (x,), (w,))[1], rhs, **options)  # type: ignore[arg-type]
        matrix = batched_jacobian(module, x)[1]
        if transposed:
            matrix = matrix.transpose(1, 2)
        condition = condition_numbers(matrix)
        solution, info = torch.linalg.solve_ex(matrix, rhs.reshape(rhs.shape[0], -1, 1))
        residual = torch.linalg.vector_norm((matrix @ solution).squeeze(-1) - rhs.reshape(rhs.shape[0], -1), dim=1)
    max_condition = resolve_max_condition(y.dtype, options.get("max_condition"), "inverse derivative")  # type: ignore[arg-type]
    singular = (info > 0) | (condition > max_condition)
    return conditioned_result(
        solution.view_as(rhs),
        residual,
        condition,
        1,
        [residual.max().item()],
        converged=torch.isfinite(residual),
        singular=singular,
        stalled=torch.zeros_like(singular),
        condition_kind="exact",
        strict=bool(options.get("strict", True)),
    )
