r"""Brute-force log-determinant of a residual block, log|det(I + J_g(x))|, from the full Jacobian.

Costs d backward passes and an O(d^3) determinant per sample: for small inputs, tests and 2-D models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from invertnet.solvers.common import batched_jacobian

__all__ = ["ExactLogDet"]

#: Above this event size the determinant is taken one sample at a time (batched float64 slogdet of large
#: matrices has been seen to hang in MKL on CPU).
_BATCHED_SLOGDET_MAX_DIM = 128


def _logabsdet(matrices: Tensor) -> Tensor:
    if matrices.shape[-1] <= _BATCHED_SLOGDET_MAX_DIM:
        return torch.linalg.slogdet(matrices).logabsdet
    return torch.stack([torch.linalg.slogdet(m).logabsdet for m in matrices])


class ExactLogDet:
    r"""Exact :math:`\log|\det(I + J_g(x))|` from the brute-force Jacobian of the residual branch g.

    Differentiable (the Jacobian is built with ``create_graph`` when gradients are enabled), so it also
    serves as the reference gradient for the stochastic estimators.

    Examples:
        >>> g = torch.nn.Linear(3, 3)
        >>> g_x, log_det = ExactLogDet()(g, torch.randn(5, 3))
        >>> log_det.shape
        torch.Size([5])
    """

    exact = True

    def __call__(self, g: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(g(x), log_det)`` with log_det of shape (B,) for x of shape (B, ...)."""
        need_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            g_x, jacobian = batched_jacobian(g, x, create_graph=need_graph)
            eye = torch.eye(jacobian.shape[-1], dtype=jacobian.dtype, device=jacobian.device)
            log_det = _logabsdet(eye + jacobian)
        if not need_graph:
            return g_x.detach(), log_det.detach()
        return g_x, log_det

    def __repr__(self) -> str:
        return "ExactLogDet()"
