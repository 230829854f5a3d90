r"""Gradients of a solution through the equation it solves (formalML IFT notes, Theorem 3 and Proposition 2).

A solution y* of R(y) = 0, where R depends on inputs theta (the x of F(x, y) = 0, a target, parameters), is found
without a graph. The implicit function theorem gives its derivative, dy/dtheta = -R_y^{-1} R_theta. One Newton
step written with a graph carries exactly that:

.. math:: y = y^* - R_y(y^*)^{-1} R(y^*; \theta),

with y* held constant: its value is y* corrected by one more Newton step (R(y*) is at the solver's tolerance),
and its derivative in theta is -R_y^{-1} R_theta. The linear solve is an autograd function whose backward pass
solves the transposed system, R_y^T w = g: dense LU for small dimensions, GMRES with vector-Jacobian products
for large ones, so no Jacobian is inverted and none is formed in the Krylov case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import jvp, vjp

from invertnet.solvers.common import batched_jacobian
from invertnet.solvers.krylov import gmres

__all__ = ["differentiable_solution"]


class _DenseSolve(torch.autograd.Function):
    """w = J^{-1} r per sample for J (B, m, m); backward: J^{-T} g."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(matrix)
        return torch.linalg.solve(matrix, residual.reshape(residual.shape[0], -1, 1)).view_as(residual)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        (matrix,) = ctx.saved_tensors
        solution = torch.linalg.solve(matrix.transpose(1, 2), grad.reshape(grad.shape[0], -1, 1))
        return None, solution.view_as(grad)


class _KrylovSolve(torch.autograd.Function):
    """w = J^{-1} r by GMRES with Jacobian-vector products; backward: J^T w = g with vector-Jacobian products."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, product: Callable[[Tensor], Tensor], transposed: Callable[[Tensor], Tensor], residual: Tensor
    ) -> Tensor:
        ctx.transposed = transposed
        return gmres(product, residual.detach(), strict=False).value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        return None, None, gmres(ctx.transposed, grad, strict=False).value


def differentiable_solution(
    residual: Callable[[Tensor], Tensor], solution: Tensor, *, dense: bool, jacobian: Tensor | None = None
) -> Tensor:
    """``solution`` (B, ...) of residual(y) = 0, differentiable in everything ``residual`` depends on besides y
    (dy/dtheta = -R_y^{-1} R_theta, the module docstring), or returned as it is when nothing needs a gradient.

    Arguments:
        residual: y -> R(y) of the shape of y, per sample, evaluated with gradients enabled.
        solution: y*, computed without a graph.
        dense: Solve with the dense per-sample Jacobian (small dimensions) or by GMRES.
        jacobian: R_y at the solution (B, m, m) when the caller has it already (dense only).
    """
    solution = solution.detach()
    with torch.enable_grad():
        value = residual(solution)
    if not value.requires_grad:
        return solution
    if dense:
        matrix = batched_jacobian(residual, solution)[1] if jacobian is None else jacobian
        return solution - _DenseSolve.apply(matrix, value)
    with torch.enable_grad():
        _, pullback = vjp(residual, solution)

    def product(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return jvp(residual, (solution,), (v,))[1].detach()

    def transposed(w: Tensor) -> Tensor:
        with torch.enable_grad():
            return pullback(w)[0].detach()

    return solution - _KrylovSolve.apply(product, transposed, value)
