r"""1-Lipschitz activations with continuous derivatives (thesis Corollary 4.4 needs C^1 activations).

Lip(phi) <= 1 keeps the product bound of thesis Eq. 4.6 valid; a continuous derivative makes the i-ResNet a
diffeomorphism and its Jacobian (hence the log-determinant) continuous. ReLU is deliberately absent. Each
activation also gives ``forward_and_derivative(x)``, phi(x) with phi'(x) in closed form, for the structured
Jacobian of :meth:`~invertnet.layers.LipschitzNet.linearize`, and declares its Lipschitz constant in
``lipschitz_constant`` for the certified bounds of :meth:`~invertnet.layers.LipschitzNet.lipschitz_bound`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ELU", "LipSwish", "Softplus", "make_activation"]


class ELU(nn.Module):
    r"""ELU with :math:`\alpha = 1`: :math:`\phi(x) = x` for x > 0, :math:`e^x - 1` otherwise.

    Its derivative, 1 or :math:`e^x`, is continuous and bounded by 1.
    """

    lipschitz_constant: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(x), phi'(x)); phi'(x) is 1 for x > 0 and e^x = phi(x) + 1 otherwise."""
        y = F.elu(x)
        return y, torch.where(x > 0, torch.ones_like(x), y + 1)


class Softplus(nn.Module):
    r""":math:`\phi(x) = \log(1 + e^x)`, with derivative :math:`\sigma(x) \in (0, 1)`."""

    lipschitz_constant: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x)

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(x), phi'(x)) with phi'(x) = sigmoid(x)."""
        return F.softplus(x), torch.sigmoid(x)


class LipSwish(nn.Module):
    r"""LipSwish of Residual Flows (Chen et al. 2019): :math:`\phi(x) = x\,\sigma(\beta x) / 1.1`.

    The swish :math:`x\sigma(\beta x)` has Lipschitz constant at most 1.1 for every
    :math:`\beta > 0`, so dividing by 1.1 makes it 1-Lipschitz. :math:`\beta = \mathrm{softplus}(b)` is
    learnable and positive.

    Arguments:
        beta: Initial value of :math:`\beta > 0`.
    """

    lipschitz_constant: float = 1.0

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"LipSwish: beta must be positive, got {beta}")
        self.raw_beta = nn.Parameter(torch.tensor(float(beta)).expm1().log())

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.raw_beta)
        return x * torch.sigmoid(beta * x) / 1.1

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""(phi(x), phi'(x)) with phi'(x) = (s + \beta x s (1 - s)) / 1.1, s = sigmoid(beta x)."""
        beta_x = F.softplus(self.raw_beta) * x
        s = torch.sigmoid(beta_x)
        return x * s / 1.1, s * (1 + beta_x * (1 - s)) / 1.1


_ACTIVATIONS = {"elu": ELU, "softplus": Softplus, "lipswish": LipSwish}


def make_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name: ``"elu"``, ``"softplus"`` or ``"lipswish"``."""
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)} (all 1-Lipschitz and C^1)")
    return _ACTIVATIONS[key]()
