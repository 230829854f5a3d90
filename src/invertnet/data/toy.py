r"""Two-dimensional toy densities (thesis Fig. 5.2; Behrmann et al. 2019, appendix C.3), sampled with torch's RNG.

Each sampler returns a float tensor of shape (n, 2), roughly standardised to [-4, 4]^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DENSITIES", "sample_toy"]


def _two_moons(n: int, generator: torch.Generator) -> Tensor:
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.5
    return points + 0.1 * torch.randn(n, 2, generator=generator)


def _eight_gaussians(n: int, generator: torch.Generator) -> Tensor:
    centre = torch.randint(0, 8, (n,), generator=generator) * (2 * math.pi / 8)
    centres = 2.5 * torch.stack([torch.cos(centre), torch.sin(centre)], dim=1)
    return centres + 0.25 * torch.randn(n, 2, generator=generator)


def _checkerboard(n: int, generator: torch.Generator) -> Tensor:
    """Uniform on the cells (i, j) of a 4 x 4 grid with i + j even."""
    column = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + column % 2
    cell = torch.stack([column, row], dim=1).float()
    return 1.75 * (cell + torch.rand(n, 2, generator=generator) - 2)


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


def sample_toy(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw n points of shape (n, 2) from the named toy density, reproducibly from ``seed``.

    Example:
        >>> sample_toy("two_moons", 5).shape
        torch.Size([5, 2])
    """
    if name not in TOY_DENSITIES:
        raise ValueError(f"unknown toy density {name!r}; choose one of {sorted(TOY_DENSITIES)}")
    if n < 1:
        raise ValueError(f"sample_toy: n must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return TOY_DENSITIES[name](n, generator)
