r"""Two-dimensional toy densities (thesis Fig. 5.2; Behrmann et al. 2019, appendix C.3), sampled with torch's RNG.

Each sampler returns a float tensor of shape (n, 2), roughly standardised to [-4, 4]^2. Three of them also have
their true log-density (:func:`toy_log_prob`), the ceiling of any model's expected test log-likelihood:

* eight Gaussians, an equal mixture of N(c_k, 0.25^2 I) with c_k = 2.5 (cos(k pi / 4), sin(k pi / 4)):
  closed form;
* the checkerboard, uniform on 8 squares of side 1.75: log p = -log(8 * 1.75^2) on them, -inf elsewhere;
* two moons, each moon (probability 1/2) a point a(theta), theta ~ U[0, pi], on a half circle of radius 2.5,
  plus N(0, 0.1^2 I) noise:

  .. math:: p(x) = \sum_{m=1}^{2} \frac{1}{2} \int_0^\pi \frac{1}{\pi}\,
      \mathcal{N}(x;\, a_m(\theta), \sigma^2 I)\, d\theta,

  by composite Gauss-Legendre quadrature over the arc (:data:`MOONS_QUADRATURE`), in log space.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["MOONS_QUADRATURE", "TOY_DENSITIES", "TOY_LOG_DENSITIES", "sample_toy", "toy_log_prob"]

_MOONS_SCALE, _MOONS_NOISE = 2.5, 0.1
_GAUSSIANS_RADIUS, _GAUSSIANS_SCALE, _GAUSSIANS_COUNT = 2.5, 0.25, 8
_CHECKER_CELL, _CHECKER_CELLS = 1.75, 4

MOONS_QUADRATURE = (64, 16)
"""Panels and Gauss-Legendre nodes per panel over each moon's arc [0, pi] (the two-moons log-density): 1024 nodes
resolve the noise's angular width 0.1 / 2.5 = 0.04 rad with about 13 nodes (log-density error below 1e-6)."""


def _moon_arc(angle: Tensor, upper: bool) -> Tensor:
    """Points (..., 2) on the centre line of the upper or lower moon at angles in [0, pi]."""
    x, y = (torch.cos(angle), torch.sin(angle)) if upper else (1 - torch.cos(angle), 0.5 - torch.sin(angle))
    return torch.stack([x - 0.5, y - 0.25], dim=-1) * _MOONS_SCALE


def _two_moons(n: int, generator: torch.Generator) -> Tensor:
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    points = torch.where(upper[:, None], _moon_arc(angle, upper=True), _moon_arc(angle, upper=False))
    return points + _MOONS_NOISE * torch.randn(n, 2, generator=generator)


def _gaussian_centres(angle: Tensor) -> Tensor:
    return _GAUSSIANS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def _eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    centre = torch.randint(0, _GAUSSIANS_COUNT, (n,), generator=generator) * (2 * math.pi / _GAUSSIANS_COUNT)
    return _gaussian_centres(centre) + _GAUSSIANS_SCALE * torch.randn(n, 2, generator=generator)


def _checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """Uniform on the cells (i, j) of a 4 x 4 grid with i + j even."""
    column = torch.randint(0, _CHECKER_CELLS, (n,), generator=generator)
    row = 2 * torch.randint(0, _CHECKER_CELLS // 2, (n,), generator=generator) + column % 2
    cell = torch.stack([column, row], dim=1).float()
    return _CHECKER_CELL * (cell + torch.rand(n, 2, generator=generator) - _CHECKER_CELLS / 2)


def _rings(n: int, generator: torch.Generator) -> Tensor:
    radius = (torch.randint(1, 5, (n,), generator=generator)).float()
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return 0.9 * points + 0.08 * torch.randn(n, 2, generator=generator)


def _pinwheel(n: int, generator: torch.Generator, arms: int = 5) -> Tensor:
    arm = torch.randint(0, arms, (n,), generator=generator)
    radial = 1.0 + 0.3 * torch.randn(n, generator=generator)
    tangential = 0.05 * torch.randn(n, generator=generator)
    angle = arm * (2 * math.pi / arms) + 0.25 * radial.exp()
    rotation = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], 1).view(n, 2, 2)
    return 2.0 * (rotation @ torch.stack([radial, tangential], dim=1)[:, :, None]).squeeze(-1)


def _two_spirals(n: int, generator: torch.Generator) -> Tensor:
    turn = torch.sqrt(torch.rand(n, generator=generator)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    points = sign[:, None] * torch.stack([-torch.cos(turn) * turn, torch.sin(turn) * turn], dim=1) / 3
    return points + 0.1 * torch.randn(n, 2, generator=generator)


TOY_DENSITIES: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "two_moons": _two_moons,
    "eight_gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "pinwheel": _pinwheel,
    "two_spirals": _two_spirals,
}
"""The 2-D toy densities by name: each draws ``n`` points of shape (n, 2) with a ``torch.Generator``."""


def _gaussian_log_density(squared_distance: Tensor, scale: float) -> Tensor:
    """log N(x; c, scale^2 I) in 2-D from |x - c|^2."""
    return -squared_distance / (2 * scale**2) - math.log(2 * math.pi * scale**2)


def _moon_nodes() -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre nodes on [0, pi] and the logs of their weights (which sum to pi)."""
    panels, per_panel = MOONS_QUADRATURE
    nodes, weights = np.polynomial.legendre.leggauss(per_panel)
    width = math.pi / panels
    left = width * np.arange(panels)[:, None]
    angles = left + width * (nodes[None, :] + 1) / 2
    return torch.from_numpy(angles.ravel()), torch.from_numpy(np.log(np.tile(weights * width / 2, panels)))


def _two_moons_log_prob(points: Tensor) -> Tensor:
    angles, log_weights = _moon_nodes()
    arcs = torch.cat([_moon_arc(angles, upper=True), _moon_arc(angles, upper=False)])  # (2 J, 2)
    log_weights = torch.cat([log_weights, log_weights]) - math.log(2 * math.pi)  # moon 1/2, angle density 1/pi
    chunks = []
    for chunk in points.split(4096):
        # |x - a|^2 = |x|^2 - 2 x.a + |a|^2: one matrix product instead of a (n, 2 J, 2) difference
        squared = chunk.square().sum(dim=1, keepdim=True) - 2 * chunk @ arcs.T + arcs.square().sum(dim=1)
        chunks.append(torch.logsumexp(log_weights + _gaussian_log_density(squared.clamp_min(0), _MOONS_NOISE), dim=1))
    return torch.cat(chunks)


def _eight_gaussians_log_prob(points: Tensor) -> Tensor:
    angles = torch.arange(_GAUSSIANS_COUNT, dtype=points.dtype) * (2 * math.pi / _GAUSSIANS_COUNT)
    squared = (points[:, None, :] - _gaussian_centres(angles)[None]).square().sum(dim=-1)
    log_terms = _gaussian_log_density(squared, _GAUSSIANS_SCALE) - math.log(_GAUSSIANS_COUNT)
    return torch.logsumexp(log_terms, dim=1)


def _checkerboard_log_prob(points: Tensor) -> Tensor:
    """-log(8 cell^2) on the closed support squares (a boundary point belongs to the squares it touches)."""
    cells = points / _CHECKER_CELL + _CHECKER_CELLS / 2  # coordinates in cell units, the grid is [0, 4]^2
    inside = ((cells >= 0) & (cells <= _CHECKER_CELLS)).all(dim=1)
    low = torch.floor(cells).clamp(0, _CHECKER_CELLS - 1)
    high = (torch.ceil(cells) - 1).clamp(0, _CHECKER_CELLS - 1)  # differs from low on a grid line only
    on_support = torch.zeros_like(inside)
    for column in (low[:, 0], high[:, 0]):
        for row in (low[:, 1], high[:, 1]):
            on_support |= (column + row) % 2 == 0
    n_cells = _CHECKER_CELLS**2 // 2
    value = -math.log(n_cells * _CHECKER_CELL**2)
    return torch.where(inside & on_support, value, -math.inf)


TOY_LOG_DENSITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "two_moons": _two_moons_log_prob,
    "eight_gaussians": _eight_gaussians_log_prob,
    "checkerboard": _checkerboard_log_prob,
}
"""The toy densities whose true log-density :func:`toy_log_prob` evaluates."""


def toy_log_prob(name: str, points: Tensor) -> Tensor:
    """The true log-density log p(x) of the named toy density at points of shape (n, 2), shape (n,).

    Computed in float64 and returned in the points' dtype; ``-inf`` off the support (the checkerboard).
    Available for :data:`TOY_LOG_DENSITIES` (module docstring: closed forms, and quadrature for two moons).

    Examples:
        >>> round(toy_log_prob("checkerboard", torch.tensor([[0.5, 0.5]])).item(), 4)  # -log(8 * 1.75^2)
        -3.1987
    """
    if name not in TOY_LOG_DENSITIES:
        known = f"; choose one of {sorted(TOY_LOG_DENSITIES)}"
        reason = "has no true log-density here" if name in TOY_DENSITIES else "is not a toy density"
        raise ValueError(f"toy_log_prob: {name!r} {reason}{known}")
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"toy_log_prob: expected points of shape (n, 2), got {tuple(points.shape)}")
    return TOY_LOG_DENSITIES[name](points.double()).to(points.dtype)


def sample_toy(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw n points of shape (n, 2) from the named toy density, reproducibly from ``seed``.

    Examples:
        >>> sample_toy("two_moons", 5).shape
        torch.Size([5, 2])
    """
    if name not in TOY_DENSITIES:
        raise ValueError(f"unknown toy density {name!r}; choose one of {sorted(TOY_DENSITIES)}")
    if n < 1:
        raise ValueError(f"sample_toy: n must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return TOY_DENSITIES[name](n, generator)
