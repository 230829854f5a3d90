r"""Networks for mass spectra (thesis ch. 7): IsotopeNet (Table 7.2), whose receptive field is sized by peptide
isotope patterns and whose strides follow the ~1 Da peak spacing, and the ResidualNet baseline (Table A.1).

Spectra are (B, 1, L): one channel of L m/z bins. All convolutions pad by kernel // 2 ("same"), so a layer of
stride s maps L bins to ceil(L / s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.models.saving import saveable

__all__ = [
    "IsotopeNet",
    "LocallyConnected1d",
    "ResidualLayer1d",
    "ResidualNet",
    "receptive_field",
]


def receptive_field(layers: Sequence[tuple[int, int]]) -> int:
    """Bins of the input that one output position sees through convolutions (kernel, stride), in order:
    r <- r + (k - 1) j, j <- j s, from r = j = 1 (Luo et al. 2016).

    Examples:
        >>> receptive_field([(3, 1), (3, 1)]), receptive_field([(3, 5), (3, 1)])
        (5, 13)
    """
    size, jump = 1, 1
    for kernel, stride in layers:
        size += (kernel - 1) * jump
        jump *= stride
    return size


class ResidualLayer1d(nn.Module):
    r"""A pre-activation residual layer of depth 2 (thesis Table 7.2, A.1).

    x + B(conv_s(ReLU(B(conv_1(ReLU x))))) for ``norm_order="after_conv"`` (IsotopeNet) or
    x + conv_s(B(ReLU(B(conv_1(ReLU x))))) for ``"before_conv"`` (ResidualNet), B batch norm, convolutions
    without bias; the second convolution has the stride. When the stride or the number of channels changes,
    the shortcut is a 1x1 convolution with that stride. Shapes (B, C_in, L) -> (B, C_out, ceil(L / stride)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        norm_order: Literal["after_conv", "before_conv"] = "after_conv",
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ResidualLayer1d: kernel_size must be odd for 'same' padding, got {kernel_size}")
        padding = kernel_size // 2
        self.kernel_size, self.stride = kernel_size, stride
        self.first = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.second = nn.Conv1d(out_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm_first, self.norm_second = nn.BatchNorm1d(out_channels), nn.BatchNorm1d(out_channels)
        self.norm_order = norm_order
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False) if changes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm_first(self.first(F.relu(x)))
        if self.norm_order == "after_conv":
            h = self.norm_second(self.second(F.relu(h)))
        else:
            h = self.second(self.norm_second(F.relu(h)))
        return self.shortcut(x) + h

    def geometry(self) -> list[tuple[int, int]]:
        """(kernel, stride) of the residual path's convolutions, for :func:`receptive_field`."""
        return [(self.kernel_size, 1), (self.kernel_size, self.stride)]


class LocallyConnected1d(nn.Module):
    r"""A convolution whose weights are not shared across positions: y[:, o, p] = sum_{i, t} W[p, o, i, t]
    x[:, i, p + t - k // 2] (zero padded), so every m/z region gets its own filter (thesis 7.3.2).

    Arguments:
        in_channels, out_channels: Channels; input (B, in_channels, length), output (B, out_channels, length).
        length: Number of positions.
        kernel_size: Odd width of each position's filter.
        bias: Learn one bias per output channel and position.
    """

    def __init__(self, in_channels: int, out_channels: int, length: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"LocallyConnected1d: kernel_size must be odd, got {kernel_size}")
        self.kernel_size, self.length = kernel_size, length
        fan_in = in_channels * kernel_size
        self.weight = nn.Parameter(torch.randn(length, out_channels, fan_in) * math.sqrt(2.0 / fan_in))  # He
        self.bias = nn.Parameter(torch.zeros(out_channels, length)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.length:
            raise ValueError(f"LocallyConnected1d: built for {self.length} positions, got {x.shape[-1]}")
        pad = self.kernel_size // 2
        patches = F.pad(x, (pad, pad)).unfold(2, self.kernel_size, 1)  # (B, C, L, k)
        patches = patches.permute(0, 2, 1, 3).flatten(2)  # (B, L, C k)
        y = torch.einsum("blf,lof->bol", patches, self.weight)
        return y if self.bias is None else y + self.bias


@saveable
class IsotopeNet(nn.Module):
    r"""IsotopeNet (thesis Table 7.2): residual layers of depth 2 with kernel 3, strides 1-5-1-3 and 8, 8, 8, 1
    feature maps; ReLU, dropout (30%, Table A.2), a locally connected layer (batch norm, ReLU) and a linear
    read-out to ``n_classes`` logits (the softmax is in the loss).

    The first stride, 5, makes one position of the next layers about one isotope peak (1 Da at ~0.163 Da
    per bin); the receptive field of the convolutions (:meth:`receptive_field`) should cover the largest isotope
    pattern (:func:`~invertnet.data.isotope_pattern_bins`, thesis Fig. 7.3).

    Parameter count (two classes): 1191 + (k + 2) L' + 4 with L' = ceil(L / 15) positions after the strides and
    k the locally connected kernel. The table's 13935 parameters are reproduced by k = 5 (the reference
    implementation's width) on L = 27286 m/z bins, L' = 1820, or by the table's k = 3 on L' = 2548.

    The batch norm and ReLU after the locally connected layer are not in Table 7.2; ``locally_connected_norm=False``
    is the table as written (the locally connected layer straight into the read-out).

    Arguments:
        input_length: L, bins per spectrum; input (B, 1, L).
        n_classes: Number of classes.
        locally_connected_kernel: k (3 in Table 7.2).
        dropout: Dropout probability before the locally connected layer.
        locally_connected_norm: Batch norm and ReLU after the locally connected layer.

    Examples:
        >>> net = IsotopeNet(300)
        >>> net(torch.randn(4, 1, 300)).shape, net.reduced_length
        (torch.Size([4, 2]), 20)
    """

    STRIDES = (1, 5, 1, 3)
    CHANNELS = (8, 8, 8, 1)

    def __init__(
        self,
        input_length: int,
        n_classes: int = 2,
        locally_connected_kernel: int = 3,
        dropout: float = 0.3,
        locally_connected_norm: bool = True,
    ) -> None:
        super().__init__()
        if input_length < 1 or n_classes < 2:
            raise ValueError(f"IsotopeNet: need input_length >= 1 and n_classes >= 2, got {input_length}, {n_classes}")
        layers, channels, length = [], 1, input_length
        for out_channels, stride in zip(self.CHANNELS, self.STRIDES, strict=True):
            layers.append(ResidualLayer1d(channels, out_channels, 3, stride, norm_order="after_conv"))
            channels, length = out_channels, math.ceil(length / stride)
        self.input_length, self.reduced_length = input_length, length
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.locally_connected = LocallyConnected1d(1, 1, length, locally_connected_kernel, bias=False)
        self.norm = nn.BatchNorm1d(1) if locally_connected_norm else None
        self.head = nn.Linear(length, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_spectra(x, self.input_length, "IsotopeNet")
        h = self.locally_connected(self.dropout(F.relu(self.features(x))))
        if self.norm is not None:
            h = F.relu(self.norm(h))
        return self.head(h.flatten(1))

    def receptive_field(self, include_locally_connected: bool = False) -> int:
        """Input bins seen by one position after the convolutions (or after the locally connected layer)."""
        geometry = [pair for layer in self.features for pair in layer.geometry()]
        if include_locally_connected:
            geometry.append((self.locally_connected.kernel_size, 1))
        return receptive_field(geometry)


@saveable
class ResidualNet(nn.Module):
    r"""The ResidualNet baseline of thesis Table A.1: residual layers of depth 2 with kernel 5, in pairs (stride
    1, then stride 3 with twice the feature maps, capped at 128) from 16 maps while the length exceeds 30 bins,
    then a stride-3 layer with 256 maps, global average pooling and a linear read-out. 2132130 parameters for
    two classes and 21871 to 65610 bins (seven pairs).

    ``layout="table"`` is Table A.1 read literally instead: twelve residual layers with 16, 32, 32, 64, 64,
    5 x 128 (strides alternating 3 and 1) and 128, 256 maps and strides 1, 3, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3
    (1.6e6 parameters for two classes; the text's 2132130 needs the fitted layout's 15 layers).

    Arguments:
        input_length: L, bins per spectrum; input (B, 1, L).
        n_classes: Number of classes.
        layout: ``"fitted"`` (pairs while the length exceeds 30 bins, matching the stated parameter count) or
            ``"table"`` (the table's twelve layers).

    Examples:
        >>> net = ResidualNet(100)
        >>> net(torch.randn(2, 1, 100)).shape
        torch.Size([2, 2])
    """

    TABLE_A1 = ((16, 1), (32, 3), (32, 1), (64, 3), (64, 1), (128, 3), (128, 1), (128, 3), (128, 1), (128, 3))
    """(maps, stride) of Table A.1's first ten residual layers (the five 128-map layers alternate 3 / 1); two
    stride-3 layers with 128 and 256 maps follow."""

    def __init__(self, input_length: int, n_classes: int = 2, layout: Literal["fitted", "table"] = "fitted") -> None:
        super().__init__()
        if input_length < 1 or n_classes < 2:
            raise ValueError(f"ResidualNet: need input_length >= 1 and n_classes >= 2, got {input_length}, {n_classes}")
        if layout not in ("fitted", "table"):
            raise ValueError(f"ResidualNet: layout must be 'fitted' or 'table', got {layout!r}")
        layers: list[nn.Module] = []
        channels, maps, width = 1, 16, float(input_length)
        if layout == "table":
            for maps, stride in (*self.TABLE_A1, (128, 3)):
                layers.append(ResidualLayer1d(channels, maps, 5, stride, norm_order="before_conv"))
                channels = maps
        while layout == "fitted" and width > 30:
            layers.append(ResidualLayer1d(channels, maps, 5, 1, norm_order="before_conv"))
            channels, maps = maps, min(2 * maps, 128)
            layers.append(ResidualLayer1d(channels, maps, 5, 3, norm_order="before_conv"))
            channels, width = maps, width / 3
        layers.append(ResidualLayer1d(channels, 256, 5, 3, norm_order="before_conv"))
        self.input_length = input_length
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_spectra(x, self.input_length, "ResidualNet")
        return self.head(self.features(x).mean(dim=2))


def _check_spectra(x: Tensor, length: int, where: str) -> None:
    if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != length:
        raise ValueError(f"{where}: expected spectra of shape (B, 1, {length}), got {tuple(x.shape)}")
