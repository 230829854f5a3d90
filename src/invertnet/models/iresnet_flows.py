r"""i-ResNet flow architectures: the dense flow of Behrmann et al. 2019 (appendix C.3) and the multi-scale image flow
of the thesis (appendix A.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from invertnet.core import InvertibleModule, InvertibleSequential
from invertnet.layers.conditional import ConditionalLipschitzConvNet, ConditionalLipschitzMLP
from invertnet.layers.lipschitz_nets import CONV_POWER_ITERATIONS, POWER_ITERATIONS, LipschitzConvNet, LipschitzMLP
from invertnet.layers.norm import ActNorm
from invertnet.layers.residual import InvertibleResidual, LogDetEstimator
from invertnet.layers.shape import Flatten, Squeeze
from invertnet.logdet.series import PowerSeriesLogDet
from invertnet.models.flows import FlowDistribution, LayerContexts, standard_normal
from invertnet.models.preprocessing import Dequantization, discrete_preprocessing
from invertnet.models.saving import saveable

__all__ = ["DENSE_SERIES_TERMS", "dense_iresnet_flow", "multiscale_iresnet_flow"]

DENSE_SERIES_TERMS = 5
"""Terms of the training power series of :func:`dense_iresnet_flow`'s blocks when no estimator is given. Five
terms train as well per step as ten and take 2-30 % more steps in the same time (each term is a
vector-Jacobian product through every block); per 60 s on the digits grid they tested 0.002-0.006 bits/dim
better at three settings of four and 0.001 worse at the fourth (docs/defaults.md). Evaluation is exact either
way (:class:`~invertnet.logdet.DenseExactLogDet` in eval mode)."""


@saveable
def dense_iresnet_flow(
    features: int | Sequence[int],
    n_blocks: int = 100,
    hidden_features: int = 64,
    n_layers: int = 3,
    coeff: float = 0.97,
    activation: str = "elu",
    log_det: LogDetEstimator | None = None,
    *,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    n_power_iterations: int = POWER_ITERATIONS,
    preactivation: bool = True,
    context_features: int = 0,
    actnorm: Literal["before", "after", "none"] = "before",
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    """The dense i-ResNet flow for 2-D and tabular data (Behrmann et al. 2019, appendix C.3 "Toy Densities").

    ``n_blocks`` residual blocks x + g(x), each with an ActNorm before it, g an MLP of ``n_layers`` linear layers
    features-hidden-...-hidden-features; standard normal base. The paper's toy model, "100 residual blocks, where
    each residual connection is a multilayer perceptron with state sizes of 2-64-64-64-2 and ELU nonlinearities
    ... ActNorm after each residual block", with the exact log-det, is
    ``dense_iresnet_flow(2, n_blocks=100, hidden_features=64, n_layers=4, preactivation=False, actnorm="after",
    log_det=DenseExactLogDet())`` (the ``two_moons_c3`` config); the defaults differ where a study measured better
    (docs/defaults.md).
    Given an event shape such as (1, 8, 8) instead of a number of features, the flow flattens its input
    (:class:`~invertnet.layers.Flatten`), so small images can be modelled densely. Its spectrally normalised
    weights learn slowly at Adam's usual lr 1e-3: on the digits, 3e-3 to 6e-3 trained best per step
    (docs/defaults.md, "The learning rate").

    Arguments:
        features: Data dimension d (data with shape (B, d)), or the event shape of one sample.
        n_blocks, hidden_features, n_layers, coeff, activation: The residual branches (see
            :class:`~invertnet.layers.LipschitzMLP`).
        log_det: Log-det estimator of every block in training (default: power series with
            :data:`DENSE_SERIES_TERMS` = 5 terms; Behrmann et al. 2019 computed the exact log-det,
            :class:`~invertnet.logdet.DenseExactLogDet`, which is affordable in 2-D).
        levels: Number K of discrete levels of the data: prepend dequantisation (``dequantization``) and the logit
            transform, so that ``bits_per_dim`` is with respect to the discrete data.
        logit_alpha: Margin of the logit transform when ``levels`` is given.
        n_power_iterations: Power-iteration steps of every normalised layer per training step.
        preactivation: Apply the activation to each branch's input first, g = A_n phi(... A_1 phi(x)) (thesis
            Eq. 4.5; Chen et al. 2019's dense branches): 0.025 test bits/dim better on the digits at two settings
            (docs/defaults.md).
        context_features: Size k of a context c, shape (B, k), for a conditional flow p(x | c): every branch is
            a :class:`~invertnet.layers.ConditionalLipschitzMLP` g(x, c), contractive in x for every c; use
            ``flow.log_prob(x, context=c)``, ``flow.sample(shape, context=c)`` or ``flow(c)``. 0: unconditional.
        actnorm: An :class:`~invertnet.layers.ActNorm` ``"before"`` every block (the default, as the thesis'
            image flows), ``"after"`` every block (the paper's toy densities), or ``"none"``.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.

    Examples:
        >>> flow = dense_iresnet_flow(2, n_blocks=2)
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> dense_iresnet_flow((1, 8, 8), n_blocks=1, levels=17).base.event_shape
        torch.Size([64])
    """
    if n_blocks < 1:
        raise ValueError(f"dense_iresnet_flow: n_blocks must be positive, got {n_blocks}")
    shape = (int(features),) if isinstance(features, int) else tuple(int(size) for size in features)
    parts: list[InvertibleModule] = []
    parts += discrete_preprocessing(levels, shape, logit_alpha, dequantization, "dense_iresnet_flow")
    if len(shape) > 1:
        parts.append(Flatten(shape))
    dim = math.prod(shape)
    contexts = LayerContexts(context_features, None, "dense_iresnet_flow", image=False)
    log_det = PowerSeriesLogDet(DENSE_SERIES_TERMS) if log_det is None else log_det
    if actnorm not in ("before", "after", "none"):
        raise ValueError(f"dense_iresnet_flow: actnorm must be 'before', 'after' or 'none', got {actnorm!r}")
    for _ in range(n_blocks):
        branch = dict(n_power_iterations=n_power_iterations, preactivation=preactivation)
        if contexts:
            g: LipschitzMLP = ConditionalLipschitzMLP(
                dim, contexts.at((dim,)), hidden_features, n_layers, coeff, activation, **branch
            )
        else:
            g = LipschitzMLP(dim, hidden_features, n_layers, coeff, activation, **branch)
        block: list[InvertibleModule] = [InvertibleResidual(g, log_det=log_det)]
        if actnorm != "none":
            block.insert(0 if actnorm == "before" else 1, ActNorm(dim))
        parts += block
    return FlowDistribution(InvertibleSequential(*parts), standard_normal((dim,)))


@saveable
def multiscale_iresnet_flow(
    input_shape: Sequence[int],
    n_scales: int = 3,
    n_blocks: int = 32,
    hidden_channels: int = 32,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    coeff: float = 0.97,
    activation: str = "elu",
    log_det: LogDetEstimator | None = None,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    n_power_iterations: int = CONV_POWER_ITERATIONS,
    context_features: int = 0,
    context_shape: Sequence[int] | None = None,
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    r"""The multi-scale i-ResNet image flow (thesis A.2; Behrmann et al. 2019, appendix C.3 "MNIST and CIFAR").

    ``n_scales`` scale-blocks of ``n_blocks`` i-ResNet blocks (convolutions 3x3-1x1-3x3 with ELU in between,
    each block preceded by ActNorm), with a squeeze (C, H, W) -> (4C, H/2, W/2) after every scale-block but
    the last. The thesis' MNIST model: 3 scales x 32 blocks, 32 hidden channels; CIFAR-10: 512 hidden
    channels. With ``levels``, the flow starts with dequantisation to [0, 1) and the logit
    transform, so ``bits_per_dim`` is with respect to the discrete data.

    Arguments:
        input_shape: (C, H, W) of the data; H and W divisible by 2^(n_scales - 1).
        n_scales, n_blocks, hidden_channels, kernel_sizes, coeff, activation: The architecture.
        log_det: Log-det estimator of every block (default: power series with 10 terms, the MNIST setting).
        levels: Number K of discrete levels of the data (256 for 8-bit images), or ``None`` for continuous data.
        logit_alpha: Margin of the logit transform when ``levels`` is given.
        n_power_iterations: Power-iteration steps of every normalised layer per training step.
        context_features: Size k of a context c, shape (B, k), for a conditional flow p(x | c): every branch is a
            :class:`~invertnet.layers.ConditionalLipschitzConvNet` (c as per-channel biases), contractive in x for
            every c. 0: unconditional.
        context_shape: Instead of ``context_features``: the shape (C', H', W') of an image context c (a
            low-resolution or a partly observed image, a segmentation), H' and W' an integer multiple or fraction
            of H and W; each branch sees c at its resolution as biases per channel and position.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.

    Examples:
        >>> flow = multiscale_iresnet_flow((1, 8, 8), n_scales=2, n_blocks=1, hidden_channels=4, levels=17)
        >>> flow.base.event_shape
        torch.Size([4, 4, 4])
    """
    channels, height, width = (int(size) for size in input_shape)
    factor = 2 ** (n_scales - 1)
    if n_scales < 1 or n_blocks < 1:
        raise ValueError(f"multiscale_iresnet_flow: need n_scales, n_blocks >= 1, got {n_scales}, {n_blocks}")
    if height % factor or width % factor:
        raise ValueError(
            f"multiscale_iresnet_flow: {n_scales} scales squeeze {n_scales - 1} times, so H and W must be divisible "
            f"by {factor}; got {height}x{width}"
        )
    contexts = LayerContexts(context_features, context_shape, "multiscale_iresnet_flow")
    parts: list[InvertibleModule] = []
    parts += discrete_preprocessing(
        levels, (channels, height, width), logit_alpha, dequantization, "multiscale_iresnet_flow"
    )
    for scale in range(n_scales):
        for _ in range(n_blocks):
            options = {"n_power_iterations": n_power_iterations}
            if contexts:
                context = contexts.at((channels, height, width))
                g: LipschitzConvNet = ConditionalLipschitzConvNet(
                    channels, context, hidden_channels, kernel_sizes, coeff, activation, **options
                )
            else:
                g = LipschitzConvNet(channels, hidden_channels, kernel_sizes, coeff, activation, **options)
            parts += [ActNorm(channels), InvertibleResidual(g, log_det=log_det)]
        if scale < n_scales - 1:
            parts.append(Squeeze())
            channels, height, width = 4 * channels, height // 2, width // 2
    return FlowDistribution(
        InvertibleSequential(*parts), standard_normal((channels, height, width)), context_shape=contexts.shape
    )
