r"""Expansive transposed-convolution generators G: latent z -> image (Ma, Ayaz & Karaman 2018, Eq. 2, 4.2-4.3)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from invertnet._files import save_tensors
from invertnet.models.saving import saveable

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GeneratorConditions",
    "TransposedConvGenerator",
    "dcgan_image_size",
    "load_generator",
    "save_generator",
]

Activation = Literal["relu", "leaky_relu", "sigmoid", "tanh"]
WeightLaw = Literal["gaussian", "uniform", "centered_uniform", "sign"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"generator: activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


@dataclass(frozen=True)
class GeneratorConditions:
    r"""Which hypotheses of Ma, Ayaz & Karaman 2018, Theorems 1 and 4, a :class:`TransposedConvGenerator` meets.

    Theorem 1 (exact recovery of z from G(z) by gradient descent, no stationary point away from z* and a
    negative multiple of it) assumes two transposed-convolution layers with ReLU, filters in R^l with i.i.d.
    N(0, 1 / (C_i l)) entries, and expansive layers, C_1 l >~ C_0 log C_0 and C_2 l >~ C_1 log C_1. Theorem 4
    (partial measurements at sampling rate r) asks the last layer to be 1 / r times more expansive,
    r C_2 l >~ C_1 log C_1. The ">~" hides constants that depend on the accuracy epsilon; the checks here take
    the constant 1, so they say whether the network is expansive by the logarithmic factor, not that the
    theorem's probability bound is a given number.

    Attributes:
        two_layers, relu, gaussian, no_overlap: The architecture (two layers; ReLU; Gaussian weights of the
            theory's variance; stride = kernel size, the setting of the proof).
        expansion: C_i l / (C_{i-1} log C_{i-1}) for each layer (>= 1: expansive by the factor).
        rate: The sampling rate r of Theorem 4's check (1: full observation).
    """

    two_layers: bool
    relu: bool
    gaussian: bool
    no_overlap: bool
    expansion: tuple[float, ...]
    rate: float = 1.0

    @property
    def theorem_1(self) -> bool:
        """Every hypothesis of Theorem 1."""
        return self.two_layers and self.relu and self.gaussian and self.no_overlap and min(self.expansion) >= 1

    @property
    def theorem_4(self) -> bool:
        """Theorem 1's hypotheses with the last layer expansive by 1 / r more."""
        return self.theorem_1 and self.expansion[-1] * self.rate >= 1

    def unmet(self) -> list[str]:
        """The hypotheses of Theorem 4 at this rate (Theorem 1's at rate 1) that fail, named."""
        names = [name for name in ("two_layers", "relu", "gaussian", "no_overlap") if not getattr(self, name)]
        for layer, value in enumerate(self.expansion, start=1):
            if value < 1:
                names.append(f"expansion of layer {layer} ({value:.2f} < 1)")
        last, needed = (self.expansion[-1] if self.expansion else 0.0), 1 / self.rate
        if 1 <= last < needed:
            names.append(f"last layer expansive by 1/r = {needed:.3g} ({last:.2f} < {needed:.3g})")
        return names


@saveable
class TransposedConvGenerator(nn.Module):
    r"""G(z) = h(W_d ... h(W_1 z)): transposed convolutions, each followed by the activation h.

    Ma, Ayaz & Karaman 2018, Eq. 2.

    Shapes: z (B, C_0, H_0, W_0) -> (B, C_d, H_d, W_d), with H_i = (H_{i-1} - 1) s + k. The theory setting
    of Theorem 1 is stride = kernel size (the default), so the filters of different input pixels never
    overlap, and weights i.i.d. N(0, 1 / (C_i l)) with C_i the output channels of layer i and l = k^2 the
    filter size. ``weights`` draws them from that law (``"gaussian"``), from U[0, 1] (``"uniform"``, the
    counter-example of Fig. 4d, not zero-mean, many-to-one), or from the zero-mean subgaussian laws of
    Conjecture 3 with the same variance: U[-a, a] with a = sqrt(3 / (C_i l)) (``"centered_uniform"``) and
    +-1 / sqrt(C_i l) (``"sign"``). ``weight_std`` replaces the theory's standard deviation (section 4.2 draws
    the landscapes' weights with unit standard deviation). :meth:`conditions` says which hypotheses of
    Theorems 1 and 4 the network meets. The weights are fixed (buffers, not parameters): the generator is the
    object of study, and recovery optimises z.

    Arguments:
        latent_shape: (C_0, H_0, W_0) of one latent code, e.g. (10, 1, 1).
        channels: Output channels C_1, ..., C_d of the d layers.
        kernel_size: Filter size k.
        stride: Stride s (default k, the theory setting).
        activation: ``"relu"`` (the theory), ``"leaky_relu"``, ``"sigmoid"`` or ``"tanh"``, after every layer.
        weights: The weight law.
        generator: Random number generator for the weights (default: torch's global one).
        weight_std: Standard deviation of the zero-mean laws (default: the theory's 1 / sqrt(C_i l)).

    Examples:
        >>> G = TransposedConvGenerator((10, 1, 1), channels=(16, 1), kernel_size=4)
        >>> G(torch.randn(3, 10, 1, 1)).shape
        torch.Size([3, 1, 16, 16])
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        channels: Sequence[int],
        kernel_size: int,
        stride: int | None = None,
        activation: Activation = "relu",
        weights: WeightLaw = "gaussian",
        generator: torch.Generator | None = None,
        weight_std: float | None = None,
    ) -> None:
        super().__init__()
        self.latent_shape = tuple(int(size) for size in latent_shape)
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise ValueError(f"TransposedConvGenerator: latent_shape must be (C, H, W), got {latent_shape}")
        if not channels or min(channels) < 1 or kernel_size < 1:
            raise ValueError("TransposedConvGenerator: need at least one layer, positive channels and kernel_size")
        if weights not in ("gaussian", "uniform", "centered_uniform", "sign"):
            raise ValueError(
                f"TransposedConvGenerator: weights must be gaussian, uniform, centered_uniform or sign, got {weights!r}"
            )
        if weight_std is not None and not (math.isfinite(weight_std) and weight_std > 0):
            raise ValueError(f"TransposedConvGenerator: weight_std must be positive, got {weight_std}")
        self.weight_std = weight_std
        self.kernel_size, self.stride = kernel_size, kernel_size if stride is None else stride
        self.activation_name, self.weight_law = activation, weights
        self.architecture = {
            "kind": "transposed_conv",
            "latent_shape": list(self.latent_shape),
            "channels": [int(c) for c in channels],
            "kernel_size": kernel_size,
            "stride": self.stride,
            "activation": activation,
            "weights": weights,
            "weight_std": weight_std,
        }
        self.activation = _activation(activation)
        inputs = [self.latent_shape[0], *channels[:-1]]
        for index, (c_in, c_out) in enumerate(zip(inputs, channels, strict=True)):
            self.register_buffer(f"weight{index}", self._draw(c_in, int(c_out), generator))
        self.n_layers = len(channels)

    def _draw(self, c_in: int, c_out: int, generator: torch.Generator | None) -> Tensor:
        shape = (c_in, c_out, self.kernel_size, self.kernel_size)  # conv_transpose2d layout
        scale = 1.0 / math.sqrt(c_out * self.kernel_size**2) if self.weight_std is None else self.weight_std
        if self.weight_law == "uniform":
            return torch.rand(shape, generator=generator)
        if self.weight_law == "sign":
            return scale * (2.0 * torch.randint(0, 2, shape, generator=generator) - 1.0)
        if self.weight_law == "centered_uniform":
            return scale * math.sqrt(3.0) * (2.0 * torch.rand(shape, generator=generator) - 1.0)
        return scale * torch.randn(shape, generator=generator)

    def conditions(self, rate: float = 1.0) -> GeneratorConditions:
        """The hypotheses of Theorem 1 (and of Theorem 4 at sampling rate ``rate``) this network meets
        (:class:`GeneratorConditions`).

        Examples:
            >>> G = TransposedConvGenerator((10, 1, 1), channels=(16, 1), kernel_size=4)
            >>> G.conditions().theorem_1, G.conditions().unmet()
            (False, ['expansion of layer 2 (0.36 < 1)'])
            >>> TransposedConvGenerator((10, 1, 1), (8, 4), kernel_size=6).conditions(rate=0.2).theorem_4
            True
        """
        if not 0 < rate <= 1:
            raise ValueError(f"TransposedConvGenerator.conditions: rate must lie in (0, 1], got {rate}")
        filter_size = self.kernel_size**2
        channels = [self.latent_shape[0], *(getattr(self, f"weight{i}").shape[1] for i in range(self.n_layers))]
        expansion = tuple(
            (c_out * filter_size) / (c_in * math.log(c_in)) if c_in > 1 else math.inf
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        theory_scale = self.weight_std is None
        return GeneratorConditions(
            two_layers=self.n_layers == 2,
            relu=self.activation_name == "relu",
            gaussian=self.weight_law == "gaussian" and theory_scale,
            no_overlap=self.stride == self.kernel_size,
            expansion=expansion,
            rate=rate,
        )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C_d, H_d, W_d) of one output image."""
        _, height, width = self.latent_shape
        for _ in range(self.n_layers):
            height = (height - 1) * self.stride + self.kernel_size
            width = (width - 1) * self.stride + self.kernel_size
        return int(getattr(self, f"weight{self.n_layers - 1}").shape[1]), height, width

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"TransposedConvGenerator: expected latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(z.shape)}"
            )
        x = z
        for index in range(self.n_layers):
            weight = getattr(self, f"weight{index}").to(z.dtype)
            x = self.activation(nn.functional.conv_transpose2d(x, weight, stride=self.stride))
        return x

    def extra_repr(self) -> str:
        return (
            f"latent_shape={self.latent_shape}, output_shape={self.output_shape}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, activation={self.activation_name!r}, weights={self.weight_law!r}"
        )


def dcgan_image_size(n_layers: int) -> int:
    """H = W of the images of a DCGAN with ``n_layers`` transposed convolutions: a 4 x 4 projection doubled by
    each of the ``n_layers - 1`` stride-2 layers, 4 * 2^(n_layers - 1).

    Examples:
        >>> dcgan_image_size(4)
        32
    """
    return 4 * 2 ** (n_layers - 1)


@saveable
class DCGANGenerator(nn.Module):
    r"""The conditional DCGAN generator of Ma, Ayaz & Karaman 2018, 4.3: transposed convolutions with batch norm and
    leaky ReLU, tanh output.

    z (B, latent_dim) and labels (B,) -> images (B, C, H, W) in [-1, 1]. The label enters as a one-hot vector
    concatenated to z; a 4x4 projection is followed by ``n_layers - 1`` stride-2 transposed convolutions, each
    doubling the resolution and halving the width, the last one with tanh. H = W = 4 * 2^(n_layers - 1)
    (8 for digits with 2 layers, 32 for MNIST with 4, 64 for CelebA with 5).

    Arguments:
        latent_dim: Dimension of z (Ma, Ayaz & Karaman use 10 so that the network is expansive).
        n_classes: Number of labels (0 for an unconditional generator).
        channels: Channels C of the images.
        n_layers: Number of transposed convolutions.
        width: Channels of the first feature map.

    Examples:
        >>> G = DCGANGenerator(10, n_classes=10, channels=1, n_layers=2, width=32)
        >>> G(torch.randn(3, 10), torch.tensor([0, 1, 2])).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, latent_dim: int, n_classes: int, channels: int = 1, n_layers: int = 4, width: int = 128) -> None:
        super().__init__()
        if latent_dim < 1 or n_classes < 0 or n_layers < 1 or width < 2 ** (n_layers - 1):
            raise ValueError(
                f"DCGANGenerator: need latent_dim >= 1, n_classes >= 0, n_layers >= 1 and width >= 2^(n_layers-1); "
                f"got {latent_dim}, {n_classes}, {n_layers}, {width}"
            )
        self.latent_dim, self.n_classes = latent_dim, n_classes
        self.latent_shape = (latent_dim,)
        self.image_shape = (channels, dcgan_image_size(n_layers), dcgan_image_size(n_layers))
        self.architecture = {
            "kind": "dcgan",
            "latent_dim": latent_dim,
            "n_classes": n_classes,
            "channels": channels,
            "n_layers": n_layers,
            "width": width,
        }
        layers: list[nn.Module] = []
        c_in, c_out = latent_dim + n_classes, width
        for index in range(n_layers):
            last = index == n_layers - 1
            if index == 0:
                conv = nn.ConvTranspose2d(c_in, channels if last else c_out, 4, stride=1, padding=0, bias=last)
            else:
                conv = nn.ConvTranspose2d(c_in, channels if last else c_out, 4, stride=2, padding=1, bias=last)
            layers.append(conv)
            if last:
                layers.append(nn.Tanh())
            else:
                layers += [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c_in, c_out = c_out, max(c_out // 2, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"DCGANGenerator: expected z of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        if self.n_classes:
            if labels is None or labels.shape != (z.shape[0],):
                raise ValueError("DCGANGenerator: a conditional generator needs labels of shape (B,)")
            z = torch.cat([z, nn.functional.one_hot(labels, self.n_classes).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


@saveable
class DCGANDiscriminator(nn.Module):
    r"""The conditional DCGAN discriminator of Ma, Ayaz & Karaman 2018, 4.3: the mirror of :class:`DCGANGenerator`.

    Images (B, C, H, W) and labels (B,) -> logits (B,) of "real". The label enters as one constant channel per
    class; ``n_layers - 1`` stride-2 convolutions halve the resolution (batch norm from the second, leaky ReLU),
    and a final 4x4 convolution gives the logit (Ma, Ayaz & Karaman end in a sigmoid; the loss takes logits instead,
    which is the same model and numerically safer).

    Examples:
        >>> D = DCGANDiscriminator(n_classes=10, channels=1, n_layers=2, width=32)
        >>> D(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])).shape
        torch.Size([3])
    """

    def __init__(self, n_classes: int, channels: int = 1, n_layers: int = 4, width: int = 128) -> None:
        super().__init__()
        if n_classes < 0 or n_layers < 1 or width < 2 ** (n_layers - 1):
            raise ValueError("DCGANDiscriminator: need n_classes >= 0, n_layers >= 1, width >= 2^(n_layers-1)")
        self.n_classes = n_classes
        self.image_shape = (channels, dcgan_image_size(n_layers), dcgan_image_size(n_layers))
        layers: list[nn.Module] = []
        c_in, c_out = channels + n_classes, width // 2 ** (n_layers - 2) if n_layers > 1 else width
        for index in range(n_layers - 1):
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=index == 0))
            if index > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in, c_out = c_out, 2 * c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=0))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"DCGANDiscriminator: expected images of shape (B, {self.image_shape}), got {tuple(x.shape)}"
            )
        if self.n_classes:
            if labels is None:
                raise ValueError("DCGANDiscriminator: a conditional discriminator needs labels of shape (B,)")
            planes = nn.functional.one_hot(labels, self.n_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, *x.shape[2:])], dim=1)
        return self.net(x).flatten()


def save_generator(generator: TransposedConvGenerator | DCGANGenerator, path: str | Path) -> Path:
    """Write the generator's weights and architecture to one safetensors file (architecture as JSON metadata)."""
    path = Path(path)
    tensors = {name: value.detach().contiguous().cpu() for name, value in generator.state_dict().items()}
    save_tensors(tensors, path, metadata={"invertnet_generator": json.dumps(generator.architecture)})
    return path


def load_generator(path: str | Path) -> TransposedConvGenerator | DCGANGenerator:
    """Rebuild a generator written by :func:`save_generator` (in eval mode); a missing, corrupt or foreign file
    is refused with a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_generator: {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"load_generator: {path} is not a readable safetensors file ({error})") from error
    if "invertnet_generator" not in metadata:
        raise ValueError(f"load_generator: {path} holds no invertnet generator (no 'invertnet_generator' metadata)")
    architecture: dict[str, Any] = json.loads(metadata["invertnet_generator"])
    kind = architecture.pop("kind")
    generator: TransposedConvGenerator | DCGANGenerator
    if kind == "transposed_conv":
        generator = TransposedConvGenerator(**architecture)
    elif kind == "dcgan":
        generator = DCGANGenerator(**architecture)
    else:
        raise ValueError(f"load_generator: {path}: unknown generator kind {kind!r}")
    generator.load_state_dict(tensors)
    return generator.eval()
