r"""Conditional residual branches g(x, c), contractive in x for every context c.

A context c (shape (B, k): a label's one-hot code, features, a measurement) enters a dense branch as a bias of
every linear layer,

.. math:: g(x, c) = A_n \phi(\cdots \phi(A_1 x + b_1 + E_1 c) \cdots) + b_n + E_n c,

with unconstrained context maps :math:`E_i`. The Jacobian in x is that of the unconditional branch at shifted
pre-activations, so :math:`\mathrm{Lip}_x(g(\cdot, c)) \le \prod_i \|A_i\|` for *every* c: each context gives an
i-ResNet block x + g(x, c) with the same certified Lipschitz bound, hence the same invertibility, inverse error
bounds and log-det bias bounds (Behrmann et al. 2019, Theorem 1 and 3, per context). The context itself is not
inverted; it is given in both directions.

:class:`ContextBoundBranch` fixes c and is an ordinary branch g_c(x) = g(x, c) with the branch's declarations, so
an :class:`~invertnet.layers.InvertibleResidual` at a fixed context is an ordinary block
(:meth:`~invertnet.core.InvertibleModule.at`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.layers.lipschitz_nets import (
    CONV_POWER_ITERATIONS,
    POWER_ITERATIONS,
    Linearization,
    LipschitzConvNet,
    LipschitzMLP,
    LipschitzNet,
    ResidualBranch,
)
from invertnet.layers.spectral import SpectralNormLayer

__all__ = [
    "ConditionalLipschitzConvNet",
    "ConditionalLipschitzMLP",
    "ContextBoundBranch",
    "ContextInput",
    "bind_context",
    "check_context",
    "context_shape_at",
    "is_conditional",
]


ContextSpec = int | Sequence[int]
"""A layer's context: k for vectors c of shape (B, k), or (C, H, W) for images c of shape (B, C, H, W) at the
layer's resolution."""


def context_shape(spec: ContextSpec, where: str = "context") -> tuple[int, ...]:
    """The shape of one context: ``()`` for 0 (unconditional), ``(k,)`` for k or (k,), ``(C, H, W)`` for an image
    context.

    Examples:
        >>> context_shape(3), context_shape((2, 8, 8)), context_shape(0)
        ((3,), (2, 8, 8), ())
    """
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"{where}: context_features must be 0 or positive, got {spec}")
        return (spec,) if spec else ()
    shape = tuple(int(size) for size in spec)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(
            f"{where}: a context has a shape (k,) or, for images, (C, H, W) of positive sizes, got {tuple(spec)}"
        )
    return shape


def _resolution_factor(height: int, width: int, target: tuple[int, int]) -> tuple[str, int] | None:
    """How an image context of size height x width reaches ``target``: ``("same", 1)``, ``("squeeze", f)``
    (space-to-depth by f), ``("repeat", f)`` (nearest upsampling by f), or ``None``."""
    if (height, width) == target:
        return "same", 1
    if height % target[0] == 0 and width % target[1] == 0 and height // target[0] == width // target[1]:
        return "squeeze", height // target[0]
    if target[0] % height == 0 and target[1] % width == 0 and target[0] // height == target[1] // width:
        return "repeat", target[0] // height
    return None


def context_shape_at(shape: Sequence[int], height: int, width: int) -> tuple[int, int, int]:
    """The shape (C', h, w) an image context of shape (C, H, W) takes at a layer of resolution h x w: squeezed
    (space to depth, C' = C f^2) when it is f times finer, repeated (nearest, C' = C) when f times coarser.

    Examples:
        >>> context_shape_at((1, 8, 8), 4, 4), context_shape_at((3, 4, 4), 8, 8)
        ((4, 4, 4), (3, 8, 8))
    """
    channels, context_height, context_width = (int(size) for size in shape)
    how = _resolution_factor(context_height, context_width, (height, width))
    if how is None:
        raise ValueError(
            f"an image context of size {context_height}x{context_width} cannot be brought to a layer of size "
            f"{height}x{width}: one must be an integer multiple of the other, equally in both directions"
        )
    return _channels_after(channels, how), height, width


def _channels_after(channels: int, how: tuple[str, int]) -> int:
    """Channels of an image context after :func:`_resolution_factor`'s resampling: f^2 times more when squeezed."""
    kind, factor = how
    return channels * factor**2 if kind == "squeeze" else channels


def _at_resolution(context: Tensor, shape: tuple[int, ...], where: str) -> Tensor:
    """An (M, C, H, W) context brought to the layer's (C', h, w) by :func:`context_shape_at`'s rule."""
    how = _resolution_factor(context.shape[2], context.shape[3], shape[1:])
    if how is None or _channels_after(context.shape[1], how) != shape[0]:
        raise ValueError(
            f"{where}: expected an image context that becomes {shape} at this layer (the flow's context shape), "
            f"got {tuple(context.shape)}"
        )
    kind, factor = how
    if kind == "squeeze":
        return F.pixel_unshuffle(context, factor)
    if kind == "repeat":
        return context.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return context


def check_context(context: object, spec: ContextSpec, where: str) -> Tensor:
    """``context`` as a batch (M, *shape) of the layer's context shape: one context (without the batch
    dimension) becomes a batch of one, an image context is brought to the layer's resolution
    (:func:`context_shape_at`); a ``ValueError`` naming ``where`` for other shapes, a ``TypeError`` for
    non-tensors."""
    shape = context_shape(spec, where)
    expected = "(B, " + ", ".join(str(size) for size in shape) + ")"
    if not isinstance(context, Tensor):
        raise TypeError(
            f"{where}: this layer is conditional: give it a context of shape {expected} "
            f"(flow.log_prob(x, context=c), flow(c), or module.at(c)), got {type(context).__name__}"
        )
    if context.dim() == len(shape):
        context = context.unsqueeze(0)
    if context.dim() != len(shape) + 1 or context.shape[0] == 0:
        raise ValueError(f"{where}: expected a context of shape {expected} or {shape}, got {tuple(context.shape)}")
    if len(shape) == 3:
        return _at_resolution(context, shape, where)
    if tuple(context.shape[1:]) != shape:
        raise ValueError(f"{where}: expected a context of shape {expected} or {shape}, got {tuple(context.shape)}")
    return context


def matched_context(context: Tensor, batch: int, where: str) -> Tensor:
    """The (M, ...) context repeated to ``batch`` rows: one context for all, or M contexts tiled (sample-major)."""
    rows = context.shape[0]
    if rows == batch:
        return context
    if batch % rows:
        raise ValueError(f"{where}: a batch of {batch} samples does not match {rows} contexts")
    return context.repeat(batch // rows, *([1] * (context.dim() - 1)))


def context_map(spec: ContextSpec, out_features: int) -> nn.Module:
    """The map c -> E c of a layer's context biases, zero at initialisation (every context starts at the
    unconditional layer): a linear map for vector contexts, a 1x1 convolution (a bias per channel and position)
    for image contexts."""
    shape = context_shape(spec)
    if len(shape) == 3:
        module: nn.Linear | nn.Conv2d = nn.Conv2d(shape[0], out_features, 1, bias=False)
    else:
        module = nn.Linear(shape[0], out_features, bias=False)
    nn.init.zeros_(module.weight)
    return module


def context_biases(module: nn.Module, context: Tensor, x: Tensor, where: str) -> Tensor:
    """E c for the batch x: shape (B, out) for vector contexts, (B, out, h, w) for image contexts."""
    return module(matched_context(context, x.shape[0], where).to(dtype=x.dtype))


class _ContextBiases(LipschitzNet):
    """A :class:`~invertnet.layers.LipschitzNet` whose every linear layer gets the bias E_i c: per feature for
    dense layers; per channel (constant over the image) for convolutions with vector contexts, per channel and
    position with image contexts."""

    context_features: ContextSpec

    def _add_context_map(self, context_features: ContextSpec) -> None:
        shape = context_shape(context_features, type(self).__name__)
        if not shape:
            raise ValueError(f"{type(self).__name__}: context_features must be positive, got {context_features}")
        self.context_features = context_features if isinstance(context_features, int) else shape
        self._output_sizes = [
            getattr(layer, "out_features", None) or layer.out_channels for layer in self.normalized_layers()
        ]
        self.context_map = context_map(shape, sum(self._output_sizes))

    def _biases(self, x: Tensor, context: Tensor | None) -> list[Tensor]:
        where = type(self).__name__
        context = check_context(context, self.context_features, where)
        biases = context_biases(self.context_map, context, x, where).split(self._output_sizes, dim=1)
        trailing = [1] * (x.dim() - biases[0].dim())  # a vector context's bias is constant over the image
        return [bias.reshape(*bias.shape, *trailing) for bias in biases]

    def chain(self) -> list[nn.Module]:
        """The layers and activations in x; ``lipschitz_bound`` (the bound in x for every context) reads them."""
        return [module for name, module in self._modules.items() if name != "context_map" and module is not None]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """g(x, c) for x of shape (B, ...) and c of shape (B, k), (1, k) or (k,) (one context for every sample)."""
        biases = iter(self._biases(x, context))
        for module in self.chain():
            x = module(x) + next(biases) if isinstance(module, SpectralNormLayer) else module(x)
        return x

    def linearize(self, x: Tensor, context: Tensor | None = None) -> Linearization:  # type: ignore[override]
        """g(x, c) and the factors of J_x g(x, c) (the unconditional structure at shifted pre-activations)."""
        return self._linearized(x, iter(self._biases(x, context)))


class ConditionalLipschitzMLP(_ContextBiases, LipschitzMLP):
    r"""The dense branch g(x, c) of the module docstring: a :class:`~invertnet.layers.LipschitzMLP` in x whose
    every linear layer gets the bias :math:`E_i c`.

    Arguments:
        features: Input and output size d (x of shape (B, d)).
        context_features: Size k of the context (c of shape (B, k)).
        hidden_features, n_layers, coeff, activation, n_power_iterations, preactivation: As
            :class:`~invertnet.layers.LipschitzMLP` (only the 2-norm).

    Examples:
        >>> g = ConditionalLipschitzMLP(2, 3, 16, coeff=0.9)
        >>> g(torch.randn(5, 2), torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        context_features: int,
        hidden_features: int,
        n_layers: int = 3,
        coeff: float = 0.97,
        activation: str = "elu",
        *,
        n_power_iterations: int = POWER_ITERATIONS,
        preactivation: bool = False,
    ) -> None:
        LipschitzMLP.__init__(
            self,
            features,
            hidden_features,
            n_layers,
            coeff,
            activation,
            n_power_iterations=n_power_iterations,
            preactivation=preactivation,
        )
        if not isinstance(context_features, int):
            raise TypeError(
                f"ConditionalLipschitzMLP: a dense branch takes vector contexts (context_features=k), got "
                f"{context_features!r}; flatten an image context first"
            )
        self._add_context_map(context_features)


class ConditionalLipschitzConvNet(_ContextBiases, LipschitzConvNet):
    r"""A convolutional branch g(x, c): a :class:`~invertnet.layers.LipschitzConvNet` in x whose every
    convolution gets the bias :math:`E_i c`, so Lip_x g is the same certified bound for every context. A vector
    context gives a bias per channel (constant over the image); an image context a bias per channel and position,
    :math:`E_i` a 1x1 convolution of the context brought to the branch's resolution (:func:`context_shape_at`:
    space to depth when finer, repeated when coarser).

    Arguments:
        channels: Input and output channels C (x of shape (B, C, H, W)).
        context_features: Size k of a vector context (c of shape (B, k)), or the shape (C', H, W) of an image
            context at the branch's resolution (what :func:`context_shape_at` gives for the flow's context).
        hidden_channels, kernel_sizes, coeff, activation, n_power_iterations, preactivation: As
            :class:`~invertnet.layers.LipschitzConvNet` (only the 2-norm).

    Examples:
        >>> g = ConditionalLipschitzConvNet(2, 3, 8, coeff=0.9)
        >>> g(torch.randn(4, 2, 6, 6), torch.randn(4, 3)).shape
        torch.Size([4, 2, 6, 6])
        >>> g = ConditionalLipschitzConvNet(4, context_shape_at((1, 12, 12), 6, 6), 8)  # a finer image context
        >>> g(torch.randn(4, 4, 6, 6), torch.randn(4, 1, 12, 12)).shape
        torch.Size([4, 4, 6, 6])
    """

    def __init__(
        self,
        channels: int,
        context_features: ContextSpec,
        hidden_channels: int,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        coeff: float = 0.97,
        activation: str = "elu",
        *,
        n_power_iterations: int = CONV_POWER_ITERATIONS,
        preactivation: bool = True,
    ) -> None:
        LipschitzConvNet.__init__(
            self,
            channels,
            hidden_channels,
            kernel_sizes,
            coeff,
            activation,
            n_power_iterations=n_power_iterations,
            preactivation=preactivation,
        )
        self._add_context_map(context_features)


class ContextBoundBranch(ResidualBranch):
    """g_c(x) = g(x, c) at a fixed context: an ordinary residual branch sharing g's parameters, with g's
    declarations (norm, Lipschitz bound, input check) or the defaults of a plain branch. Made by
    :func:`bind_context`, which adds ``linearize`` when g has one.

    Arguments:
        branch: A conditional branch (``context_features`` attribute, ``forward(x, context)``).
        context: (M, *context shape) or one context; a batch of B samples takes the M contexts tiled (B a
            multiple of M).
    """

    def __init__(self, branch: nn.Module, context: Tensor) -> None:
        super().__init__()
        self.branch = branch
        self.context = check_context(context, branch.context_features, type(branch).__name__)
        self.norm_order = getattr(branch, "norm_order", ResidualBranch.norm_order)
        self.event_shape = getattr(branch, "event_shape", ())

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x, self.context)

    def lipschitz_bound(self) -> float | None:
        bound = getattr(self.branch, "lipschitz_bound", None)
        return bound() if callable(bound) else None

    def check_input_shape(self, x: Tensor, where: str) -> None:
        check = getattr(self.branch, "check_input_shape", None)
        if callable(check):
            check(x, where)

    def normalized_layers(self) -> Sequence[SpectralNormLayer]:
        return self.branch.normalized_layers() if isinstance(self.branch, LipschitzNet) else []


class _LinearizableContextBoundBranch(ContextBoundBranch):
    """A :class:`ContextBoundBranch` of a branch with ``linearize(x, context)`` (the structured estimators use it)."""

    def linearize(self, x: Tensor) -> Linearization:
        return self.branch.linearize(x, self.context)


def bind_context(branch: nn.Module, context: Tensor) -> ContextBoundBranch:
    """The conditional ``branch`` at ``context`` as a plain branch (with ``linearize`` when the branch has one)."""
    if callable(getattr(branch, "linearize", None)):
        return _LinearizableContextBoundBranch(branch, context)
    return ContextBoundBranch(branch, context)


def is_conditional(branch: nn.Module) -> bool:
    """Whether a residual branch takes a context (declares ``context_features``)."""
    return bool(context_shape(getattr(branch, "context_features", 0) or 0))


class ContextInput(nn.Module):
    """h -> net(cat(h, c)) along dimension 1 at a fixed context c: the conditioner of a coupling layer at c.

    Vectors h (B, n) get c (B, k) appended; images h (B, C, H, W) get k constant planes for a vector context, or
    the C' channels of an image context brought to h's resolution (:func:`context_shape_at`). ``context`` is
    (M, *context shape), tiled to the batch as in :class:`ContextBoundBranch`.
    """

    def __init__(self, net: nn.Module, context: Tensor, context_features: ContextSpec) -> None:
        super().__init__()
        self.net = net
        self.context = check_context(context, context_features, "coupling conditioner")

    def forward(self, h: Tensor) -> Tensor:
        context = matched_context(self.context, h.shape[0], "coupling conditioner").to(dtype=h.dtype)
        if h.dim() > 2 and context.dim() == 2:
            context = context.reshape(*context.shape, *([1] * (h.dim() - 2))).expand(-1, -1, *h.shape[2:])
        return self.net(torch.cat([h, context], dim=1))
