r"""Gradients through the fixed-point inverse of a residual block, by implicit differentiation.

For F(x) = x + g(x; theta) and x* = F^{-1}(y), the implicit function theorem (seed 002, Theorem 3) gives

.. math::
    \frac{\partial x^*}{\partial y} = (I + J_g(x^*))^{-1}, \qquad
    \frac{\partial x^*}{\partial \theta} = -(I + J_g(x^*))^{-1} \frac{\partial g}{\partial \theta}(x^*).

Backpropagating a cotangent u therefore needs v = (I + J_g)^{-T} u, the fixed point of v = u - J_g^T v,
which contracts at rate Lip(g) < 1. Memory does not grow with the number of forward iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from invertnet.solvers.fixed_point import fixed_point

__all__ = ["attach_implicit_gradient", "attach_inverse_gradient"]

#: v -> J_h(x*)^T v, the vector-Jacobian product of the map h at the solution.
TransposedProduct = Callable[[Tensor], Tensor]


def attach_implicit_gradient(
    x_star: Tensor,
    y: Tensor,
    h: Callable[[Tensor], Tensor],
    solve_transposed: Callable[[Tensor, TransposedProduct], Tensor],
) -> Tensor:
    r"""Return ``x_star`` (value unchanged) carrying the implicit gradient of a solution of x* = y - h(x*).

    Implicit differentiation (seed 002, Theorem 3): the image y - h(x*) has derivative I in y and
    -dh/dtheta in the parameters of h; its cotangent u is replaced by v = solve_transposed(u, vjp), which
    must solve the transposed linear system of the inverse (e.g. (I + J_g)^T v = u for residual blocks,
    J_r^T v = u for triangular maps) using ``vjp(v) = J_h(x*)^T v``. Memory does not depend on the forward
    solve's iterations; only first-order gradients are supported.

    Arguments:
        x_star: The solution with shape (B, ...).
        y: The input of the inverse, shape (B, ...).
        h: The map whose parameters receive gradients.
        solve_transposed: (cotangent, vjp) -> the solution v of the transposed system.
    """
    x_star = x_star.detach()
    with torch.enable_grad():
        x_leaf = x_star.clone().requires_grad_(True)
        h_of_x = h(x_leaf)
        image = y - h(x_star)
    if not image.requires_grad:
        return x_star

    def vjp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(h_of_x, x_leaf, v, retain_graph=True)[0]

    def backward_hook(cotangent: Tensor | None) -> Tensor | None:
        return None if cotangent is None else solve_transposed(cotangent, vjp)  # undefined stays undefined

    image.register_hook(backward_hook)
    return x_star + (image - image.detach())


def attach_inverse_gradient(
    x_star: Tensor,
    y: Tensor,
    g: Callable[[Tensor], Tensor],
    *,
    lipschitz: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iter: int = 1000,
) -> Tensor:
    """Return ``x_star`` (value unchanged) carrying the implicit gradient of x* = (id + g)^{-1}(y).

    Gradients flow to ``y`` and to the parameters of ``g``. Only first-order gradients are supported.
    The backward fixed-point solve raises :class:`~invertnet.ConvergenceError` if it does not converge.

    Arguments:
        x_star: The converged inverse with shape (B, ...), as returned by the forward solve.
        y: The input of the inverse with shape (B, ...).
        g: The residual branch.
        lipschitz: A bound on Lip(g), for the backward solve's error bound and contractivity check.
        atol, rtol, max_iter: Tolerances of the backward solve (defaults follow the dtype).
    """

    def solve(cotangent: Tensor, vjp: TransposedProduct) -> Tensor:
        options = dict(atol=atol, rtol=rtol, max_iter=max_iter, lipschitz=lipschitz)
        return fixed_point(lambda v: cotangent - vjp(v), cotangent, **options).value

    return attach_implicit_gradient(x_star, y, g, solve)
