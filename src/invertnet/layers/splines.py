r"""Monotonic rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows", section 3.1, appendix A).

On the interval [-B, B] the spline is made of K bins with knots :math:`(x^{(k)}, y^{(k)})_{k=0}^{K}` and positive
derivatives :math:`\delta^{(k)}` at the knots. In bin k, with :math:`s_k = (y^{(k+1)} - y^{(k)}) / (x^{(k+1)} -
x^{(k)})` and :math:`\xi = (x - x^{(k)}) / (x^{(k+1)} - x^{(k)}) \in [0, 1]`,

.. math:: y = y^{(k)} + \frac{(y^{(k+1)} - y^{(k)}) [s_k \xi^2 + \delta^{(k)} \xi (1 - \xi)]}
    {s_k + (\delta^{(k+1)} + \delta^{(k)} - 2 s_k) \xi (1 - \xi)}

(Eq. 4), strictly increasing with the derivative of Eq. 5, and inverted in closed form by the root of a quadratic
in :math:`\xi` (appendix A, Eq. 6-8). Outside [-B, B] the map is the identity ("linear tails"), which is why the
boundary derivatives are 1.

The raw parameters of one entry, ``K`` widths, ``K`` heights and ``K - 1`` interior derivatives, come unconstrained
(a conditioner's output): widths and heights through a softmax with a floor, derivatives through a shifted
softplus with a floor, both chosen so that raw parameters 0 give the identity (equal bins, derivatives 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rational_quadratic_spline", "spline_parameter_count"]

#: Floors of a bin's width and height (fractions of 2B / K) and of a knot's derivative: they keep every bin and
#: slope away from 0, so the spline and its inverse stay well conditioned.
MIN_BIN_FRACTION = 1e-3
MIN_DERIVATIVE = 1e-3
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))  # softplus(0 + shift) + floor = 1


def spline_parameter_count(bins: int) -> int:
    """Raw parameters per transformed entry: K widths, K heights and K - 1 interior derivatives."""
    return 3 * bins - 1


def _knots(raw: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (..., K) and knot positions (..., K + 1) on [-B, B] from raw widths or heights."""
    bins = raw.shape[-1]
    floor = MIN_BIN_FRACTION / bins
    sizes = 2 * bound * (floor + (1 - floor * bins) * torch.softmax(raw, dim=-1))
    knots = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) - bound
    # pin the last knot to B exactly: cumsum's rounding must not leave a gap before the identity tail
    knots = torch.cat([knots[..., :-1], torch.full_like(knots[..., -1:], bound)], dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def _derivatives(raw: Tensor) -> Tensor:
    """Knot derivatives (..., K + 1): 1 at both ends (identity tails), a floored softplus inside."""
    inner = MIN_DERIVATIVE + F.softplus(raw + _DERIVATIVE_SHIFT)
    return F.pad(inner, (1, 1), value=1.0)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index).squeeze(-1)


def rational_quadratic_spline(
    x: Tensor, raw: Tensor, bound: float = 3.0, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""The spline of ``raw`` parameters applied entrywise, and log dy/dx per entry.

    Arguments:
        x: Inputs, any shape S (outputs y when ``inverse``).
        raw: Unconstrained parameters of shape S + (3K - 1,): K widths, K heights, K - 1 interior derivatives
            (:func:`spline_parameter_count`).
        bound: B; the spline maps [-B, B] onto itself and is the identity outside.
        inverse: Apply the inverse spline (appendix A) instead.

    Returns:
        ``(out, log_derivative)``, both of shape S: the image (or preimage) and log |dy/dx| at the input of the
        forward map, so the inverse's log-det is minus the sum of the second output.

    Examples:
        >>> x = torch.linspace(-4, 4, 9)
        >>> y, log_derivative = rational_quadratic_spline(x, torch.zeros(9, 11))  # raw 0: the identity
        >>> torch.allclose(y, x, atol=1e-6), torch.allclose(log_derivative, torch.zeros(9), atol=1e-6)
        (True, True)
        >>> raw = torch.randn(9, 11)
        >>> y, _ = rational_quadratic_spline(x, raw)
        >>> torch.allclose(rational_quadratic_spline(y, raw, inverse=True)[0], x, atol=1e-5)
        True
    """
    if raw.shape[:-1] != x.shape or (raw.shape[-1] - 2) % 3 != 0:
        raise ValueError(
            f"rational_quadratic_spline: raw must have shape {tuple(x.shape)} + (3K - 1,), got {tuple(raw.shape)}"
        )
    if not bound > 0:
        raise ValueError(f"rational_quadratic_spline: bound must be positive, got {bound}")
    bins = (raw.shape[-1] + 1) // 3
    widths, x_knots = _knots(raw[..., :bins], bound)
    heights, y_knots = _knots(raw[..., bins : 2 * bins], bound)
    derivatives = _derivatives(raw[..., 2 * bins :])
    inside = (x >= -bound) & (x <= bound)
    point = x.clamp(-bound, bound).unsqueeze(-1)
    knots = y_knots if inverse else x_knots
    index = (torch.searchsorted(knots.contiguous(), point.contiguous(), right=True) - 1).clamp(0, bins - 1)
    x_k, y_k = _gather(x_knots, index), _gather(y_knots, index)
    width, height = _gather(widths, index), _gather(heights, index)
    d_k, d_next = _gather(derivatives, index), _gather(derivatives, index + 1)
    slope = height / width
    curvature = d_next + d_k - 2 * slope
    point = point.squeeze(-1)
    if inverse:
        offset = point - y_k
        a = height * (slope - d_k) + offset * curvature
        b = height * d_k - offset * curvature
        c = -slope * offset
        discriminant = (b * b - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - torch.sqrt(discriminant))).clamp(0, 1)
        out = x_k + xi * width
    else:
        xi = (point - x_k) / width
    mix = xi * (1 - xi)
    denominator = slope + curvature * mix
    if not inverse:
        out = y_k + height * (slope * xi * xi + d_k * mix) / denominator
    numerator = slope * slope * (d_next * xi * xi + 2 * slope * mix + d_k * (1 - xi) ** 2)
    log_derivative = torch.log(numerator) - 2 * torch.log(denominator)
    return torch.where(inside, out, x), torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
