r"""1-Lipschitz activations with continuous derivatives (thesis Corollary 4.4 needs C^1 activations).

Lip(phi) <= 1 keeps the product bound of thesis Eq. 4.6 valid; a continuous derivative makes the i-ResNet a
diffeomorphism and its Jacobian (hence the log-determinant) continuous. ReLU is deliberately absent. Each
activation also gives ``forward_and_derivative(x)``, phi(x) with phi'(x) in closed form, for the structured
Jacobian of :meth:`~invertnet.layers.LipschitzNet.linearize`, and declares its Lipschitz constant in
``lipschitz_constant`` for the certified bounds of :meth:`~invertnet.layers.LipschitzNet.lipschitz_bound`.

A concatenating activation (:class:`CLipSwish`) maps C features to ``width_factor`` x C along dimension 1, so the
layer after it takes that many inputs; its derivative is a :class:`ConcatenatedDerivative`, not a diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ELU", "CLipSwish", "ConcatenatedDerivative", "LipSwish", "Softplus", "make_activation", "width_factor"]


class ELU(nn.Module):
    r"""ELU with :math:`\alpha = 1`: :math:`\phi(x) = x` for x > 0, :math:`e^x - 1` otherwise.

    Its derivative, 1 or :math:`e^x`, is continuous and bounded by 1.
    """

    lipschitz_constant: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(phi(x), phi'(x)); phi'(x) is 1 for x > 0 and e^x = phi(x) + 1 otherwise, i.e. min(phi(x) + 1, 1)
        (phi(x) + 1 = x + 1 > 1 for x > 0)."""
        y = F.elu(x)
        return y, (y + 1).clamp(max=1.0)


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
        scaled = s / 1.1
        return x * scaled, torch.addcmul(scaled, beta_x, scaled * (1 - s))


@dataclass
class ConcatenatedDerivative:
    r"""The Jacobian of x -> cat(f(x), h(x)) along dimension 1 for elementwise f, h: the stacked diagonals
    :math:`[\mathrm{diag}(a); \mathrm{diag}(b)]`, from C features to 2C.

    Attributes:
        first, second: a = f'(x) and b = h'(x), each of the input's shape (B, C, ...).
    """

    first: Tensor
    second: Tensor

    def apply(self, v: Tensor) -> Tensor:
        """J v = cat(a v, b v) along dimension 1."""
        return torch.cat((self.first * v, self.second * v), dim=1)

    def adjoint(self, w: Tensor) -> Tensor:
        """J^T w = a w_1 + b w_2 for w = cat(w_1, w_2) along dimension 1."""
        w_first, w_second = w.chunk(2, dim=1)
        return self.first * w_first + self.second * w_second

    def rows(self, matrix: Tensor) -> Tensor:
        """J M for a (B, C, d) or (C, d) matrix M of a dense chain (as (B, 2C, d))."""
        return torch.cat((self.first.unsqueeze(-1) * matrix, self.second.unsqueeze(-1) * matrix), dim=-2)


CLIPSWISH_DIVISOR = 1.004
r"""What :class:`CLipSwish` divides by, as Perugachi-Diaz et al. (2021) do. The 2-norm of its Jacobian at a
coordinate is :math:`\sqrt{s(u)^2 + s(-u)^2} / 1.1` with :math:`s(u) = \sigma(u)(1 + u(1 - \sigma(u)))`, the
swish's derivative at u = beta x, whatever beta: its supremum, 1.003965 (at u = -2.40; a float64 grid of spacing
1e-5 on [-20, 20] and the tails' limit 1 / 1.1 beyond, checked in the tests), is below the divisor."""


class CLipSwish(nn.Module):
    r"""Concatenated LipSwish (Perugachi-Diaz, Tomczak and Bhulai 2021, "Invertible DenseNets with
    Concatenated LipSwish"): :math:`\Phi(x) = [\phi(x), \phi(-x)] / 1.004`
    along dimension 1, with :math:`\phi` the :class:`LipSwish` (its beta learnable, shared by both halves).

    Unlike an elementwise activation it keeps the information of both signs (phi(x) alone flattens towards 0 for
    negative x), at twice the features: inputs (B, C, ...) give outputs (B, 2C, ...) (``width_factor``). It is
    1-Lipschitz in the 2-norm (:data:`CLIPSWISH_DIVISOR`) and in no other p-norm we certify, so the branches
    refuse it with mixed norms.

    Arguments:
        beta: Initial value of :math:`\beta > 0`.
    """

    lipschitz_constant: float = 1.0
    width_factor: int = 2

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.swish = LipSwish(beta)

    def forward(self, x: Tensor) -> Tensor:
        return self.swish(torch.cat((x, -x), dim=1)) / CLIPSWISH_DIVISOR

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, ConcatenatedDerivative]:
        """(Phi(x), its Jacobian as a :class:`ConcatenatedDerivative`: phi'(x) / 1.004 and -phi'(-x) / 1.004)."""
        y, derivative = self.swish.forward_and_derivative(torch.cat((x, -x), dim=1))
        positive, negative = derivative.chunk(2, dim=1)
        return y / CLIPSWISH_DIVISOR, ConcatenatedDerivative(
            positive / CLIPSWISH_DIVISOR, -negative / CLIPSWISH_DIVISOR
        )


_ACTIVATIONS = {"elu": ELU, "softplus": Softplus, "lipswish": LipSwish, "clipswish": CLipSwish}


def _activation_class(name: str) -> type[nn.Module]:
    """The activation class of a name (case-insensitive); unknown names are refused, naming the choices."""
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)} (all 1-Lipschitz and C^1)")
    return _ACTIVATIONS[key]


def make_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name: ``"elu"``, ``"softplus"``, ``"lipswish"`` or ``"clipswish"``."""
    return _activation_class(name)()


def width_factor(name: str) -> int:
    """How many times its input features the named activation outputs (2 for ``"clipswish"``, else 1)."""
    return getattr(_activation_class(name), "width_factor", 1)
