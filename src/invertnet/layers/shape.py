r"""Volume-preserving reshapes: squeeze (space to depth), flattening and injective zero padding (thesis A.1, A.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from invertnet.core import InvertibleModule, SolverOptions, check_input

__all__ = ["Flatten", "InjectivePad", "Squeeze"]


class Squeeze(InvertibleModule):
    r"""Space to depth: (B, C, H, W) -> (B, 4C, H/2, W/2), a permutation with log-det 0.

    Each output channel group c*4 + (2i + j) holds the pixels at offset (i, j) of 2x2 patches of channel c
    (``torch.nn.functional.pixel_unshuffle``).

    Examples:
        >>> Squeeze()(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 12, 4, 4])
    """

    volume_preserving = True

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, None, "Squeeze.forward")
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Squeeze.forward: expected (B, C, H, W) with even H and W, got {tuple(x.shape)}")
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        check_input(y, None, "Squeeze.inverse")
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse: expected (B, 4C, H, W), got {tuple(y.shape)}")
        return F.pixel_shuffle(y, 2), y.new_zeros(y.shape[0])

    def inverse_lipschitz_bound(self) -> float:
        """1: a permutation preserves the per-sample 2-norm."""
        return 1.0

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if len(event_shape) != 3 or event_shape[1] % 2 or event_shape[2] % 2:
            raise ValueError(f"Squeeze: expected samples (C, H, W) with even H and W, got {tuple(event_shape)}")
        channels, height, width = event_shape
        return (4 * channels, height // 2, width // 2)

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if len(event_shape) != 3 or event_shape[0] % 4:
            raise ValueError(f"Squeeze.inverse: expected samples of shape (4C, H, W), got {tuple(event_shape)}")
        channels, height, width = event_shape
        return (channels // 4, 2 * height, 2 * width)


class Flatten(InvertibleModule):
    r"""(B, *event_shape) -> (B, prod(event_shape)), log-det 0; lets dense flows model images.

    Arguments:
        event_shape: The shape of one sample, e.g. (1, 8, 8).

    Examples:
        >>> Flatten((1, 8, 8))(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 64])
    """

    volume_preserving = True

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(int(size) for size in event_shape)
        self.features = math.prod(self.event_shape)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.event_shape, "Flatten.forward")
        return x.reshape(x.shape[0], self.features), x.new_zeros(x.shape[0])

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        check_input(y, (self.features,), "Flatten.inverse")
        return y.reshape(y.shape[0], *self.event_shape), y.new_zeros(y.shape[0])

    def inverse_lipschitz_bound(self) -> float:
        """1: a reshape preserves the per-sample 2-norm."""
        return 1.0

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if tuple(event_shape) != self.event_shape:
            raise ValueError(f"Flatten: built for samples of shape {self.event_shape}, got {tuple(event_shape)}")
        return (self.features,)

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if tuple(event_shape) != (self.features,):
            raise ValueError(f"Flatten.inverse: expected samples of shape ({self.features},), got {tuple(event_shape)}")
        return self.event_shape

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


_RANGE_TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-3}


class InjectivePad(InvertibleModule):
    r"""Append ``extra_channels`` zero channels: (B, C, ...) -> (B, C + k, ...) (thesis A.1).

    The map is injective, not surjective. Its Jacobian J satisfies J^T J = I, so the volume change
    :math:`\tfrac12 \log\det(J^T J)` is 0. The inverse drops the padded channels after checking that they are
    zero up to ``range_tolerance``, and raises a ``ValueError`` saying so when they are not: such a y is not in
    the range of the map (e.g. a random latent of an invertible classifier).

    Arguments:
        extra_channels: Number k of zero channels appended.
        range_tolerance: Largest magnitude accepted in the padded channels. Default by dtype: 1e-6 for float64,
            1e-3 for float32 (1e-1 for halves): iterative inverses run before this one leave errors of about
            their tolerance times the layers' condition numbers, which must not be mistaken for leaving the
            range.

    Examples:
        >>> pad = InjectivePad(2)
        >>> pad(torch.randn(1, 3, 4, 4)).shape
        torch.Size([1, 5, 4, 4])
    """

    volume_preserving = True
    bijective = False

    def __init__(self, extra_channels: int, range_tolerance: float | None = None) -> None:
        super().__init__()
        if extra_channels < 1:
            raise ValueError(f"InjectivePad: extra_channels must be positive, got {extra_channels}")
        self.extra_channels = extra_channels
        self.range_tolerance = range_tolerance

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, None, "InjectivePad.forward")
        if x.dim() < 2:
            raise ValueError(f"InjectivePad.forward: expected (B, C, ...), got {tuple(x.shape)}")
        zeros = x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])
        return torch.cat([x, zeros], dim=1), x.new_zeros(x.shape[0])

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        check_input(y, None, "InjectivePad.inverse")
        if y.dim() < 2 or y.shape[1] <= self.extra_channels:
            raise ValueError(
                f"InjectivePad.inverse: expected more than {self.extra_channels} channels, got {tuple(y.shape)}"
            )
        kept, padded = y[:, : -self.extra_channels], y[:, -self.extra_channels :]
        tolerance = self.range_tolerance
        if tolerance is None:
            tolerance = _RANGE_TOLERANCES.get(y.dtype, 1e-1)
        largest = padded.abs().max().item() if padded.numel() else 0.0
        if largest > tolerance:
            raise ValueError(
                f"InjectivePad.inverse: the padded channels must be zero, but their largest magnitude is "
                f"{largest:.3e} > range_tolerance={tolerance:.1e}; this y is not in the range of the padding"
            )
        return kept, y.new_zeros(y.shape[0])

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if len(event_shape) < 1:
            raise ValueError("InjectivePad: expected samples of shape (C, ...), got a scalar event")
        return (event_shape[0] + self.extra_channels, *event_shape[1:])

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        if len(event_shape) < 1 or event_shape[0] <= self.extra_channels:
            raise ValueError(
                f"InjectivePad.inverse: expected samples of more than {self.extra_channels} channels, got "
                f"{tuple(event_shape)}"
            )
        return (event_shape[0] - self.extra_channels, *event_shape[1:])

    def inverse_lipschitz_bound(self) -> float:
        """1: dropping channels never increases the per-sample 2-norm."""
        return 1.0

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, range_tolerance={self.range_tolerance}"
