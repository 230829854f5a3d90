r"""Sub-sampling operators A (Ma, Ayaz & Karaman 2018): rows of the identity, stored as boolean masks, not matrices.

A mask keeps the pixels where it is ``True``; every channel of a kept pixel is observed. ``A x`` is
represented as ``mask * x`` (zeros where unobserved), so that J(z) = 1/2 |A (G(z) - x)|^2 needs no gather and
a batch of problems can carry one mask each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["MASK_KINDS", "Mask", "make_mask"]

MaskKind = Literal["uniform", "top", "bottom", "left", "right", "border"]
MASK_KINDS: tuple[str, ...] = ("uniform", "top", "bottom", "left", "right", "border")
"""The kinds of :func:`make_mask`: uniformly random pixels, a band of rows or columns from one side, a frame."""


class Mask:
    r"""The sampling operator A of y = A G(z) (Ma, Ayaz & Karaman 2018, section 2), as a boolean tensor.

    Arguments:
        keep: Boolean tensor of shape (H, W) (one pattern for all problems) or (B, H, W) (one per problem);
            ``True`` marks observed pixels.

    Examples:
        >>> mask = Mask(torch.tensor([[True, False], [False, True]]))
        >>> mask.rate, mask(torch.ones(1, 1, 2, 2))[0, 0]
        (0.5, tensor([[1., 0.],
                [0., 1.]]))
    """

    def __init__(self, keep: Tensor) -> None:
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.dim() not in (2, 3):
            raise ValueError("Mask: keep must be a boolean tensor of shape (H, W) or (B, H, W)")
        if not bool(keep.flatten(-2).any(dim=-1).all()):
            raise ValueError("Mask: every pattern must observe at least one pixel")
        self.keep = keep

    @property
    def rate(self) -> float:
        """Fraction r of observed pixels (averaged over problems)."""
        return self.keep.float().mean().item()

    def weights(self, x: Tensor) -> Tensor:
        """The mask as 0/1 weights broadcastable to images x of shape (B, C, H, W)."""
        if tuple(x.shape[-2:]) != tuple(self.keep.shape[-2:]):
            raise ValueError(
                f"Mask: pattern of size {tuple(self.keep.shape[-2:])} for images of size {tuple(x.shape[-2:])}"
            )
        weights = self.keep.to(device=x.device, dtype=x.dtype)
        return weights[:, None] if weights.dim() == 3 else weights

    def __call__(self, x: Tensor) -> Tensor:
        """A x: the image with unobserved pixels set to zero, shape of x."""
        return x * self.weights(x)

    def select(self, index: Tensor) -> Mask:
        """The mask of the problems ``index`` of the batch (itself when the pattern is shared)."""
        return self if self.keep.dim() == 2 else Mask(self.keep[index.to(self.keep.device)])

    def repeat(self, times: int) -> Mask:
        """The mask of ``times`` stacked copies of the batch (for restarts), problem-major within each copy."""
        return self if self.keep.dim() == 2 else Mask(self.keep.repeat(times, 1, 1))

    def __repr__(self) -> str:
        return f"Mask(shape={tuple(self.keep.shape)}, rate={self.rate:.3f})"


def _border(height: int, width: int, rate: float) -> Tensor:
    """The frame whose area fraction is closest to ``rate`` (at least one pixel thick)."""
    best, best_gap = torch.ones(height, width, dtype=torch.bool), math.inf
    for thickness in range(1, (min(height, width) + 1) // 2 + 1):
        keep = torch.zeros(height, width, dtype=torch.bool)
        keep[:thickness], keep[-thickness:], keep[:, :thickness], keep[:, -thickness:] = True, True, True, True
        gap = abs(keep.float().mean().item() - rate)
        if gap < best_gap:
            best, best_gap = keep, gap
    return best


def make_mask(
    kind: MaskKind,
    image_size: Sequence[int],
    rate: float = 0.5,
    *,
    batch: int | None = None,
    generator: torch.Generator | None = None,
) -> Mask:
    r"""A sampling pattern observing a fraction ``rate`` (Ma, Ayaz & Karaman 2018, Fig. 5 and after Theorem 4).

    * ``"uniform"``: round(rate * H * W) pixels drawn uniformly without replacement;
    * ``"top"``, ``"bottom"``, ``"left"``, ``"right"``: the first ceil(rate * H) rows (or W columns) from that
      side (rate 0.5: the half);
    * ``"border"``: the frame whose area is closest to ``rate`` of the image (at least one pixel thick, so its
      :attr:`Mask.rate` can exceed a small ``rate``).

    Arguments:
        kind: One of :data:`MASK_KINDS`.
        image_size: (H, W).
        rate: Sampling rate r in (0, 1].
        batch: Draw one independent pattern per problem (for ``"uniform"``); ``None``: one shared pattern.
        generator: Random number generator for ``"uniform"``.

    Examples:
        >>> make_mask("top", (4, 4), 0.5).keep.int()
        tensor([[1, 1, 1, 1],
                [1, 1, 1, 1],
                [0, 0, 0, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    height, width = (int(size) for size in image_size)
    if not 0 < rate <= 1:
        raise ValueError(f"make_mask: rate must be in (0, 1], got {rate}")
    if kind == "uniform":
        count = max(1, round(rate * height * width))
        patterns = []
        for _ in range(batch or 1):
            keep = torch.zeros(height * width, dtype=torch.bool)
            keep[torch.randperm(height * width, generator=generator)[:count]] = True
            patterns.append(keep.view(height, width))
        return Mask(torch.stack(patterns) if batch else patterns[0])
    keep = torch.zeros(height, width, dtype=torch.bool)
    rows, columns = math.ceil(rate * height), math.ceil(rate * width)
    if kind == "top":
        keep[:rows] = True
    elif kind == "bottom":
        keep[height - rows :] = True
    elif kind == "left":
        keep[:, :columns] = True
    elif kind == "right":
        keep[:, width - columns :] = True
    elif kind == "border":
        keep = _border(height, width, rate)
    else:
        raise ValueError(f"make_mask: kind must be one of {MASK_KINDS}, got {kind!r}")
    return Mask(keep if batch is None else keep.expand(batch, height, width).clone())
