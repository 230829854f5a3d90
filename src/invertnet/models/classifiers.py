r"""Invertible classifiers: an invertible feature extractor with a pooling read-out (Song, Meng & Ermon 2019, 5.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from invertnet.core import InvertibleModule, InvertibleSequential
from invertnet.layers.lipschitz_nets import LipschitzConvNet, LipschitzMLP
from invertnet.layers.masked import MintLayer
from invertnet.layers.norm import ActNorm, InvertibleBatchNorm
from invertnet.layers.residual import InvertibleResidual
from invertnet.layers.shape import Flatten, InjectivePad, Squeeze
from invertnet.models.mintnet_flows import squeeze_positions
from invertnet.models.saving import saveable

__all__ = [
    "FullyInvertibleClassifier",
    "InvertibleClassifier",
    "fully_invertible_classifier",
    "iresnet_classifier",
    "mintnet_classifier",
]


class InvertibleClassifier(nn.Module):
    r"""Logits = linear(global average pool(F(x))) for an invertible feature map F.

    The features z = F(x) keep all information about x: ``invert_features(z)`` recovers the input (in eval
    mode, where batch norms are fixed affine maps).

    Arguments:
        body: The invertible feature extractor, (B, C, H, W) -> (B, C', H', W').
        features: C', the channels of the body's output.
        n_classes: Number of classes.
        normalize_head: Apply batch norm and ELU to the features before pooling (thesis A.1).

    Examples:
        >>> model = mintnet_classifier((1, 8, 8), n_classes=3, n_blocks=2, n_squeezes=1, pad_channels=2).eval()
        >>> model(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """

    def __init__(self, body: InvertibleModule, features: int, n_classes: int, normalize_head: bool = False) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"InvertibleClassifier: need at least 2 classes, got {n_classes}")
        self.body = body
        self.prelude = nn.Sequential(nn.BatchNorm2d(features), nn.ELU()) if normalize_head else nn.Identity()
        self.head = nn.Linear(features, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """z = F(x), the invertible features."""
        return self.body(x)

    def invert_features(self, z: Tensor, **options: object) -> Tensor:
        """x = F^{-1}(z); solver options as for :meth:`~invertnet.InvertibleModule.inverse`."""
        return self.body.inverse(z, **options)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.prelude(self.features(x)).mean(dim=(2, 3)))


@saveable
def mintnet_classifier(
    input_shape: Sequence[int] = (3, 32, 32),
    n_classes: int = 10,
    n_blocks: int = 19,
    hidden_factor: int = 1,
    n_squeezes: int = 2,
    pad_channels: int = 16,
    kernel_size: int = 3,
    activation: Literal["elu", "softplus"] = "elu",
) -> InvertibleClassifier:
    r"""The MintNet classifier of Song, Meng & Ermon 2019, section 5.1.

    Zero padding to ``pad_channels`` channels (:class:`~invertnet.layers.InjectivePad`), then ``n_blocks``
    grouped layers, each a lower and an upper :class:`~invertnet.layers.MintLayer` with an
    :class:`~invertnet.layers.InvertibleBatchNorm` before each, squeezes at :func:`squeeze_positions`, and
    global average pooling with a linear read-out. Their CIFAR-10 model: 19 grouped layers (38
    residual layers of three 3x3 convolutions), 2 squeezes, hidden_factor 1 (16, 64, 256 filters as the
    ResNet it is compared with); trained with AMSGrad, lr 1e-3, cosine schedule, batch 128.

    Arguments:
        input_shape: (C, H, W), H and W divisible by 2^n_squeezes, C <= pad_channels.
        n_classes, n_blocks, hidden_factor, n_squeezes, pad_channels, kernel_size, activation: The architecture.
    """
    channels, height, width = (int(size) for size in input_shape)
    if channels > pad_channels:
        raise ValueError(f"mintnet_classifier: {channels} input channels exceed pad_channels={pad_channels}")
    if height % 2**n_squeezes or width % 2**n_squeezes:
        raise ValueError(
            f"mintnet_classifier: {n_squeezes} squeezes need H and W divisible by {2**n_squeezes}, got {height}x{width}"
        )
    parts: list[InvertibleModule] = []
    if pad_channels > channels:
        parts.append(InjectivePad(pad_channels - channels))
    channels = pad_channels
    squeezes = set(squeeze_positions(n_blocks, n_squeezes))
    for index in range(n_blocks):
        if index in squeezes:
            parts.append(Squeeze())
            channels *= 4
        for direction in ("lower", "upper"):
            parts += [
                InvertibleBatchNorm(channels),
                MintLayer(channels, hidden_factor, kernel_size, direction, activation),
            ]
    return InvertibleClassifier(InvertibleSequential(*parts), channels, n_classes)


def _plain_branch(channels: int, hidden: int, kernel_sizes: Sequence[int], batch_norm: bool) -> nn.Sequential:
    """The unconstrained pre-activation bottleneck of the baselines (batch norm before every ELU if asked)."""
    sizes = [channels] + [hidden] * (len(kernel_sizes) - 1) + [channels]
    layers: list[nn.Module] = []
    for index, kernel in enumerate(kernel_sizes):
        if batch_norm:
            layers.append(nn.BatchNorm2d(sizes[index]))
        layers += [nn.ELU(), nn.Conv2d(sizes[index], sizes[index + 1], kernel, padding=kernel // 2)]
    return nn.Sequential(*layers)


def _residual_stages(
    channels: int, n_stages: int, n_blocks: int, branch: Callable[[int], nn.Module]
) -> tuple[list[InvertibleModule], int]:
    """``n_stages`` stages of ``n_blocks`` [ActNorm, x + branch(x)] blocks with a squeeze between stages; returns
    the parts and the final number of channels."""
    parts: list[InvertibleModule] = []
    for stage in range(n_stages):
        if stage:
            parts.append(Squeeze())
            channels *= 4
        for _ in range(n_blocks):
            parts += [ActNorm(channels), InvertibleResidual(branch(channels))]
    return parts, channels


@saveable
def iresnet_classifier(
    input_shape: Sequence[int] = (3, 32, 32),
    n_classes: int = 10,
    n_blocks: int = 13,
    hidden_channels: int = 32,
    n_stages: int = 3,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    coeff: float = 0.9,
    pad_channels: int = 16,
    variant: Literal["iresnet", "vanilla", "batchnorm"] = "iresnet",
) -> InvertibleClassifier:
    r"""The i-ResNet classifier of thesis A.1 and its baselines.

    Zero padding to ``pad_channels`` channels, then ``n_stages`` stages of ``n_blocks`` pre-activation
    bottleneck blocks x + g(x) (convolutions 3x3-1x1-3x3 with ELU), ActNorm before every block, a squeeze
    between stages, and batch norm, ELU, average pooling and a linear read-out (the thesis' CIFAR model: 3
    stages of 13 blocks, 16 padded channels, an 8x8x256 output). ``variant``: ``"iresnet"`` (spectrally
    normalised branches with Lipschitz coefficient ``coeff``, invertible by Theorem 4.1), ``"vanilla"`` (the
    same network without the constraint) or ``"batchnorm"`` (vanilla with batch norm before every ELU): the
    baselines keep the fixed-point inverse, which is only guaranteed to work for the i-ResNet.

    Examples:
        >>> model = iresnet_classifier((1, 8, 8), 3, n_blocks=1, hidden_channels=4, n_stages=2, pad_channels=2)
        >>> model(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 3])
    """
    channels, height, width = (int(size) for size in input_shape)
    if variant not in ("iresnet", "vanilla", "batchnorm"):
        raise ValueError(f"iresnet_classifier: variant must be iresnet, vanilla or batchnorm, got {variant!r}")
    if channels > pad_channels:
        raise ValueError(f"iresnet_classifier: {channels} input channels exceed pad_channels={pad_channels}")
    factor = 2 ** (n_stages - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"iresnet_classifier: {n_stages} stages need H and W divisible by {factor}, got {height}x{width}"
        )

    def branch(width: int) -> nn.Module:
        if variant == "iresnet":
            return LipschitzConvNet(width, hidden_channels, kernel_sizes, coeff=coeff)
        return _plain_branch(width, hidden_channels, kernel_sizes, batch_norm=variant == "batchnorm")

    parts: list[InvertibleModule] = [InjectivePad(pad_channels - channels)] if pad_channels > channels else []
    stages, channels = _residual_stages(pad_channels, n_stages, n_blocks, branch)
    return InvertibleClassifier(InvertibleSequential(*parts, *stages), channels, n_classes, normalize_head=True)


class FullyInvertibleClassifier(InvertibleClassifier):
    r"""A bijective classifier with simplified read-out (thesis Definition 6.7): the logits are the first C
    entries of z = F(x), the remaining d - C entries are the nuisance variables z_n.

    Arguments:
        body: The bijection F, (B, ...) -> (B, ...) with at least ``n_classes`` entries per sample.
        n_classes: Number of classes C.
    """

    def __init__(self, body: InvertibleModule, n_classes: int) -> None:
        nn.Module.__init__(self)
        if n_classes < 2:
            raise ValueError(f"FullyInvertibleClassifier: need at least 2 classes, got {n_classes}")
        self.body, self.n_classes = body, n_classes

    def split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(z_s, z_n): the logits (B, C) and the nuisance variables (B, d - C) of features z."""
        flat = z.flatten(1)
        if flat.shape[1] < self.n_classes:
            raise ValueError(f"FullyInvertibleClassifier: {flat.shape[1]} features for {self.n_classes} classes")
        return flat[:, : self.n_classes], flat[:, self.n_classes :]

    def merge(self, semantic: Tensor, nuisance: Tensor, like: Tensor) -> Tensor:
        """Features with the given logits and nuisance variables, shaped like ``like``."""
        return torch.cat([semantic, nuisance], dim=1).view_as(like)

    def forward(self, x: Tensor) -> Tensor:
        return self.split(self.features(x))[0]


@saveable
def fully_invertible_classifier(
    input_shape: Sequence[int] = (1, 8, 8),
    n_classes: int = 10,
    n_blocks: int = 4,
    hidden_channels: int = 32,
    n_stages: int = 2,
    coeff: float = 0.9,
    dense_blocks: int = 0,
    dense_hidden: int = 128,
) -> FullyInvertibleClassifier:
    """An i-ResNet bijection read out by its first ``n_classes`` outputs (thesis Definition 6.7).

    ``n_stages`` stages of ``n_blocks`` convolutional [ActNorm, x + g(x)] blocks with a squeeze between stages
    (no padding: the map is a bijection of R^d), then, if ``dense_blocks`` > 0, the features flattened and
    ``dense_blocks`` dense blocks with MLP branches of width ``dense_hidden``. The convolutional logits are
    ``n_classes`` positions of the last feature map, each seeing only its receptive field; dense blocks make
    every logit and nuisance variable a function of the whole input, which the independence cross-entropy
    needs to move the label information out of z_n.

    Examples:
        >>> model = fully_invertible_classifier((1, 4, 4), n_classes=3, n_blocks=1, hidden_channels=4, dense_blocks=1)
        >>> model(torch.randn(5, 1, 4, 4)).shape
        torch.Size([5, 3])
    """
    channels, height, width = (int(size) for size in input_shape)
    dim = channels * height * width
    if dim < n_classes:
        raise ValueError(f"fully_invertible_classifier: {dim} dimensions for {n_classes} classes")
    stages, channels = _residual_stages(
        channels, n_stages, n_blocks, lambda width: LipschitzConvNet(width, hidden_channels, coeff=coeff)
    )
    if dense_blocks:
        factor = 2 ** (n_stages - 1)
        stages.append(Flatten((channels, height // factor, width // factor)))
        for _ in range(dense_blocks):
            stages += [ActNorm(dim), InvertibleResidual(LipschitzMLP(dim, dense_hidden, coeff=coeff))]
    return FullyInvertibleClassifier(InvertibleSequential(*stages), n_classes)
