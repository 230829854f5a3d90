r"""MintNet density models: grouped masked-convolution layers with squeezes (Song, Meng & Ermon 2019, section 5.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from invertnet.core import InvertibleModule, InvertibleSequential
from invertnet.layers.masked import MintBlock
from invertnet.layers.norm import ActNorm
from invertnet.layers.shape import Squeeze
from invertnet.models.flows import FlowDistribution, LayerContexts, standard_normal
from invertnet.models.preprocessing import Dequantization, discrete_preprocessing
from invertnet.models.saving import saveable

__all__ = ["mintnet_flow", "squeeze_positions"]


def squeeze_positions(n_blocks: int, n_squeezes: int) -> list[int]:
    """Indices of the grouped layers that a squeeze precedes: evenly spaced, ``n_blocks // (n_squeezes + 1)``
    apart (20 layers, 2 squeezes: before layers 6 and 12). Song, Meng & Ermon 2019 say only "two squeezing
    operations are used" for density estimation (for classification: where the ResNet subsamples); the even
    spacing is this library's choice.

    Examples:
        >>> squeeze_positions(20, 2)
        [6, 12]
    """
    gap = n_blocks // (n_squeezes + 1)
    if n_squeezes and gap < 1:
        raise ValueError(
            f"mintnet: {n_squeezes} squeezes need at least {n_squeezes + 1} grouped layers, got {n_blocks}"
        )
    return [gap * (index + 1) for index in range(n_squeezes)]


@saveable
def mintnet_flow(
    input_shape: Sequence[int],
    n_blocks: int = 20,
    hidden_factor: int | None = None,
    n_squeezes: int = 2,
    kernel_size: int = 3,
    activation: Literal["elu", "softplus"] = "elu",
    *,
    actnorm: bool = True,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    context_features: int = 0,
    context_shape: Sequence[int] | None = None,
    hidden_channels: int | None = None,
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    r"""A MintNet flow: ``n_blocks`` grouped layers (:class:`~invertnet.layers.MintBlock`) with squeezes.

    The density models of Song, Meng & Ermon 2019 (section 5.2): MNIST, "20 grouped invertible layers with 45
    filters each"; CIFAR-10, "16 grouped invertible layers ... each of which has 255 filters"; two squeezes. Read
    as the hidden width of every layer, ``hidden_channels=45`` and ``255`` (the width rounded to a multiple of
    each scale's C, since a layer's hidden channels are copies of its data channels) give the sizes the text
    states: a parameter count comparable to the i-ResNet's on MNIST and a quarter of it on CIFAR-10
    (``tests/test_paper_settings.py``). ``hidden_factor`` instead fixes the copies per channel, so the width
    grows fourfold with every squeeze (45 copies: 8.2e7 parameters on MNIST). The log-det is exact.
    ``actnorm`` puts an :class:`~invertnet.layers.ActNorm` before every grouped layer (Song, Meng & Ermon's
    density models use none; with it, training is less sensitive to the data's scale).

    Arguments:
        input_shape: (C, H, W); H and W divisible by 2^n_squeezes.
        n_blocks: Number of grouped (lower + upper) layers, in total over all scales.
        hidden_factor: Copies per data channel of every :class:`~invertnet.layers.MintLayer` (default 45 when
            ``hidden_channels`` is not given).
        kernel_size, activation: Of every :class:`~invertnet.layers.MintLayer`.
        n_squeezes: Squeezes, evenly spaced (:func:`squeeze_positions`).
        actnorm: ActNorm before every grouped layer.
        levels: Number K of discrete levels of the data: prepend dequantisation (``dequantization``) and the logit
            transform, so that ``bits_per_dim`` is with respect to the discrete data.
        logit_alpha: Margin of the logit transform.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.
        context_features: Size k of a context (class-conditional flows): every masked convolution gets the
            per-channel bias E c (:class:`~invertnet.layers.MintLayer`); use ``flow.log_prob(x, context=c)`` or
            ``flow(c)``. 0: unconditional.
        context_shape: Instead of ``context_features``: the shape (C', H', W') of an image context (H', W' an
            integer multiple or fraction of H, W), a bias per channel and position at every layer's resolution.
        hidden_channels: Instead of ``hidden_factor``: the hidden width of every layer at every scale (the text's
            "filters"), as round(hidden_channels / C) >= 1 copies of each of the scale's C channels.

    Examples:
        >>> flow = mintnet_flow((1, 8, 8), n_blocks=2, hidden_factor=2, n_squeezes=1, levels=17)
        >>> flow.base.event_shape
        torch.Size([4, 4, 4])
    """
    channels, height, width = (int(size) for size in input_shape)
    if hidden_factor is not None and hidden_channels is not None:
        raise ValueError("mintnet_flow: give hidden_factor (copies per channel) or hidden_channels (width), not both")
    if hidden_factor is None and hidden_channels is None:
        hidden_factor = 45
    if n_blocks < 1 or (hidden_factor or hidden_channels or 0) < 1 or n_squeezes < 0:
        raise ValueError(
            f"mintnet_flow: need n_blocks, hidden_factor or hidden_channels >= 1 and n_squeezes >= 0, "
            f"got {n_blocks}, {hidden_factor or hidden_channels}, {n_squeezes}"
        )
    if height % 2**n_squeezes or width % 2**n_squeezes:
        raise ValueError(
            f"mintnet_flow: {n_squeezes} squeezes need H and W divisible by {2**n_squeezes}, got {height}x{width}"
        )
    contexts = LayerContexts(context_features, context_shape, "mintnet_flow")
    squeezes = set(squeeze_positions(n_blocks, n_squeezes))
    parts: list[InvertibleModule] = []
    parts += discrete_preprocessing(levels, (channels, height, width), logit_alpha, dequantization, "mintnet_flow")
    for index in range(n_blocks):
        if index in squeezes:
            parts.append(Squeeze())
            channels, height, width = 4 * channels, height // 2, width // 2
        if actnorm:
            parts.append(ActNorm(channels))
        context = contexts.at((channels, height, width))
        copies = hidden_factor or max(1, round(hidden_channels / channels))  # type: ignore[operator]
        parts.append(MintBlock(channels, copies, kernel_size, activation, context_features=context))
    return FlowDistribution(
        InvertibleSequential(*parts), standard_normal((channels, height, width)), context_shape=contexts.shape
    )
