r"""Discrete image levels to the centred unit interval, the input range of the classifiers (thesis A.1)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["centered_levels"]


def centered_levels(images: Tensor, levels: int) -> Tensor:
    """Images of integer levels 0..K-1 scaled to [-0.5, 0.5]: x / (K - 1) - 0.5, any shape.

    Examples:
        >>> centered_levels(torch.tensor([0.0, 8.0, 16.0]), 17)
        tensor([-0.5000,  0.0000,  0.5000])
    """
    if levels < 2:
        raise ValueError(f"centered_levels: need at least 2 levels, got {levels}")
    return images / (levels - 1) - 0.5
