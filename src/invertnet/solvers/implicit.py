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

__all__ = ["attach_inverse_gradient"]


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
    x_star = x_star.detach()
    with torch.enable_grad():
        x_leaf = x_star.clone().requires_grad_(True)
        g_of_x = g(x_leaf)
        image = y - g(x_star)
    if not image.requires_grad:
        return x_star

    def backward_hook(cotangent: Tensor | None) -> Tensor | None:
        if cotangent is None:  # an undefined gradient stays undefined
            return None

        def transposed_step(v: Tensor) -> Tensor:
            with torch.enable_grad():
                (vjp,) = torch.autograd.grad(g_of_x, x_leaf, v, retain_graph=True)
            return cotangent - vjp

        result = fixed_point(transposed_step, cotangent, atol=atol, rtol=rtol, max_iter=max_iter, lipschitz=lipschitz)
        return result.value

    image.register_hook(backward_hook)
    return x_star + (image - image.detach())
