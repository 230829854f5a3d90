r"""Implicit differentiation of fixed points: inverses of residual blocks and deep equilibrium layers.

For F(x) = x + g(x; theta) and x* = F^{-1}(y), the implicit function theorem (formalML IFT notes, Theorem 3) gives

.. math::
    \frac{\partial x^*}{\partial y} = (I + J_g(x^*))^{-1}, \qquad
    \frac{\partial x^*}{\partial \theta} = -(I + J_g(x^*))^{-1} \frac{\partial g}{\partial \theta}(x^*).

Backpropagating a cotangent u therefore needs v = (I + J_g)^{-T} u, the fixed point of v = u - J_g^T v,
which contracts at rate Lip(g) < 1. Memory does not grow with the number of forward iterations.

The same holds for any fixed point z* = f(z*, x; theta) (the DEQ section of formalML IFT notes): with
J = df/dz at z*, dz*/d(x, theta) = (I - J)^{-1} df/d(x, theta), and backpropagation solves (I - J)^T v = g.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from invertnet.core import InverseResult, TransposedProduct, TransposedSolve, attach_implicit_gradient
from invertnet.solvers.common import FIXED_POINT_MAX_ITER
from invertnet.solvers.fixed_point import fixed_point
from invertnet.solvers.krylov import gmres

__all__ = ["implicit_fixed_point", "residual_transposed_solve"]


def residual_transposed_solve(
    *,
    lipschitz: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = FIXED_POINT_MAX_ITER,
) -> TransposedSolve:
    r"""The transposed solve of a residual block's inverse: v with (I + J_g(x*))^T v = u.

    v is the fixed point of v = u - J_g^T v, found by :func:`~invertnet.solvers.fixed_point` from v = u; the
    iteration contracts at rate Lip(g) < 1 (Behrmann et al. 2019, Theorem 1), the rate that made the forward
    solve converge. A backward solve that fails raises :class:`~invertnet.ConvergenceError`.

    Arguments:
        lipschitz: A bound on Lip(g), for the backward solve's error bound and contractivity check.
        atol, rtol, max_iter: Tolerances and budget of the backward solve (defaults follow the dtype).

    Returns:
        (u, vjp) -> v, for :func:`~invertnet.solvers.attach_implicit_gradient` with h = g.
    """

    def solve(cotangent: Tensor, vjp: TransposedProduct) -> Tensor:
        options = dict(atol=atol, rtol=rtol, max_iter=max_iter, lipschitz=lipschitz)
        return fixed_point(lambda v: cotangent - vjp(v), cotangent, **options).value  # type: ignore[arg-type]

    return solve


def implicit_fixed_point(
    f: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    z0: Tensor | None = None,
    *,
    method: Literal["iteration", "anderson"] = "anderson",
    backward: Literal["iteration", "gmres"] = "iteration",
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = FIXED_POINT_MAX_ITER,
    backward_max_iter: int = FIXED_POINT_MAX_ITER,
    lipschitz: float | None = None,
    strict: bool = True,
) -> tuple[Tensor, InverseResult]:
    r"""The fixed point z* = f(z*, x; theta), differentiable in x and theta by the implicit function theorem.

    Forward: :func:`~invertnet.solvers.fixed_point` on z -> f(z, x) without building a graph. Backward
    (formalML IFT notes, Theorem 3 and the DEQ section): a cotangent g of z* becomes v with (I - J_f)^T v = g, J_f =
    df/dz at z*, then flows through one evaluation of f(z*, x) to x and theta. ``backward="iteration"`` (default)
    solves v = g + J_f^T v, which converges at the rate Lip_z(f) < 1 that made the forward solve converge;
    ``"gmres"`` solves the linear system with vector-Jacobian products, also when the iteration would not contract
    as long as I - J_f is regular, at the price of a Krylov basis of up to 51 copies of z.
    Memory: one evaluation of f is stored, whatever the number of forward iterations. A backward solve that
    fails raises :class:`~invertnet.ConvergenceError`. Only first-order gradients are supported.

    Arguments:
        f: (z, x) -> z, acting per sample; its parameters (theta) receive gradients.
        x: The input (B, ...).
        z0: Starting point (default: zeros shaped like x).
        method: Forward solver, plain ``"iteration"`` or ``"anderson"`` acceleration.
        backward: ``"iteration"`` or ``"gmres"``.
        atol, rtol, max_iter: Forward tolerances and budget (``None``: by dtype); ``backward_max_iter`` for
            the backward solve, which uses the same tolerances.
        lipschitz: A bound on Lip_z(f) < 1 if known, for the forward error bound.
        strict: A failed forward solve raises :class:`~invertnet.ConvergenceError` (default); ``False`` returns
            the best iterate with its record. The backward solve always raises on failure: a gradient it cannot
            vouch for is never returned.

    Returns:
        (z*, the forward solve's :class:`~invertnet.InverseResult`).

    Examples:
        >>> x = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
        >>> z, record = implicit_fixed_point(lambda z, x: torch.cos(z) * x, x)
        >>> z.backward()  # dz/dx = cos z / (1 + x sin z)
        >>> bool(torch.allclose(x.grad, torch.cos(z) / (1 + x * torch.sin(z))))
        True
    """
    if backward not in ("iteration", "gmres"):
        raise ValueError(f"implicit_fixed_point: backward must be 'iteration' or 'gmres', got {backward!r}")
    z0 = torch.zeros_like(x) if z0 is None else z0.detach()
    with torch.no_grad():
        record = fixed_point(
            lambda z: f(z, x),
            z0,
            atol=atol,
            rtol=rtol,
            max_iter=max_iter,
            lipschitz=lipschitz,
            method=method,
            strict=strict,
        )

    def solve(cotangent: Tensor, vjp: TransposedProduct) -> Tensor:  # vjp(v) = -J_f^T v here
        options = dict(atol=atol, rtol=rtol, max_iter=backward_max_iter)
        if backward == "iteration":
            return fixed_point(lambda v: cotangent - vjp(v), cotangent, **options).value  # type: ignore[arg-type]
        return gmres(lambda v: v + vjp(v), cotangent, **options).value  # type: ignore[arg-type]

    z_star = attach_implicit_gradient(record.value, torch.zeros_like(record.value), lambda z: -f(z, x), solve)
    return z_star, record
