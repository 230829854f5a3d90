r"""Coupling flows: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018), for vectors and images, and
neural spline flows (Durkan et al. 2019) for vectors and flattened images.

Both flows keep every dimension to the end: there is no factoring-out of half the variables after a scale
(Dinh et al. 2017, section 3.6; Kingma & Dhariwal 2018, Fig. 2b), so their latents have the shape of the last
scale, like :func:`~invertnet.models.multiscale_iresnet_flow`'s, and all layers see all variables. Both use
:class:`~invertnet.layers.ActNorm` where RealNVP used batch normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from invertnet.core import InvertibleModule, InvertibleSequential
from invertnet.layers.coupling import AffineCoupling, Scale
from invertnet.layers.linear import InvertibleConv1x1, LULinear
from invertnet.layers.norm import ActNorm
from invertnet.layers.shape import Flatten, Squeeze
from invertnet.layers.spline_coupling import SplineCoupling
from invertnet.models.flows import FlowDistribution, LayerContexts, standard_normal
from invertnet.models.preprocessing import Dequantization, discrete_preprocessing
from invertnet.models.saving import saveable

__all__ = ["glow_flow", "realnvp_flow", "spline_flow"]


def _event_shape(features_or_shape: int | Sequence[int], where: str, any_rank: bool = False) -> tuple[int, ...]:
    """The event shape: (d,) or (C, H, W), or any non-empty shape when ``any_rank`` (the flow flattens it)."""
    if isinstance(features_or_shape, int):
        shape: tuple[int, ...] = (features_or_shape,)
    else:
        shape = tuple(int(size) for size in features_or_shape)
    if not shape or min(shape) < 1 or (not any_rank and len(shape) not in (1, 3)):
        expected = (
            "a positive size or shape" if any_rank else "a number of features d, (d,) or an image shape (C, H, W)"
        )
        raise ValueError(f"{where}: expected {expected}, got {shape}")
    return shape


def _scales(n_scales: int | None, shape: tuple[int, ...], where: str) -> int:
    """The number of scales: 1 for vectors (which take no other), default 2 for images."""
    if n_scales is None:
        return 1 if len(shape) == 1 else 2
    if n_scales < 1:
        raise ValueError(f"{where}: n_scales must be positive, got {n_scales}")
    if len(shape) == 1 and n_scales != 1:
        raise ValueError(f"{where}: vectors {shape} have one scale (n_scales=None or 1), got n_scales={n_scales}")
    return n_scales


def _check_divisible(shape: tuple[int, ...], squeezes: int, where: str) -> None:
    factor = 2**squeezes
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"{where}: {squeezes} squeezes need H and W divisible by {factor}, got {shape[1]}x{shape[2]}; "
            "use fewer scales"
        )


def _flow(
    preprocessing: list[InvertibleModule],
    parts: list[InvertibleModule],
    shape: tuple[int, ...],
    contexts: LayerContexts,
) -> FlowDistribution:
    """The flow of ``parts`` after the ``preprocessing`` of discrete data, with a standard normal base of ``shape``."""
    return FlowDistribution(
        InvertibleSequential(*preprocessing, *parts), standard_normal(shape), context_shape=contexts.shape
    )


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    channels, height, width = shape
    return (4 * channels, height // 2, width // 2)


@saveable
def realnvp_flow(
    features_or_shape: int | Sequence[int],
    n_scales: int | None = None,
    n_steps: int = 3,
    hidden: int = 64,
    scale: Scale = "exp",
    clamp: float | None = 3.0,
    *,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    context_features: int = 0,
    context_shape: Sequence[int] | None = None,
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    r"""A RealNVP flow (Dinh et al. 2017): affine couplings with alternating masks, each after an ActNorm.

    Vectors (d,): ``n_steps`` couplings with the half mask, alternately flipped. Images (C, H, W): each scale but
    the last has ``n_steps`` couplings with alternating checkerboard masks, a :class:`~invertnet.layers.Squeeze`
    (C, H, W) -> (4C, H/2, W/2) and ``n_steps`` couplings with alternating channel masks; the last scale has
    ``n_steps + 1`` checkerboard couplings (Dinh et al. 2017, section 3.6: 3 and 4). Every coupling

    .. math:: y_b = x_b \odot \exp(s(x_a)) + t(x_a), \qquad \log|\det J| = \sum s(x_a)

    (Eq. 4-5) has a default conditioner (:func:`~invertnet.layers.default_conditioner`) of width ``hidden``; the
    log-det of the flow is exact and its inverse closed-form. All dimensions are kept to the end (no factoring
    out). Standard normal base.

    Arguments:
        features_or_shape: d for vectors (data (B, d)), or (C, H, W); H and W divisible by 2^(n_scales - 1).
        n_scales: Scales of an image flow (default 2); vectors have one.
        n_steps: Couplings per mask type and scale.
        hidden: Units (vectors) or channels (images) of the conditioners.
        scale, clamp: The coupling scale (:class:`~invertnet.layers.AffineCoupling`): ``"exp"`` with the
            log-scale bounded to (-clamp, clamp), or Glow's ``"sigmoid"`` (then ``clamp=None``).
        levels: Number K of discrete levels of the data: prepend dequantisation (``dequantization``) and the logit
            transform, so that ``bits_per_dim`` is with respect to the discrete data.
        logit_alpha: Margin of the logit transform when ``levels`` is given.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.
        context_features: Size k of a context for a conditional flow p(x | c): every conditioner also sees c
            (``flow.log_prob(x, context=c)``, ``flow(c)``). 0: unconditional.
        context_shape: Image flows, instead of ``context_features``: the shape (C', H', W') of an image context
            (H', W' an integer multiple or fraction of H, W), which every conditioner sees as C' f^2 extra
            channels at its resolution (:func:`~invertnet.layers.context_shape_at`).

    Examples:
        >>> flow = realnvp_flow(2, n_steps=4, hidden=16)
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> realnvp_flow((1, 8, 8), n_steps=1, hidden=4, levels=17).base.event_shape
        torch.Size([4, 4, 4])
    """
    where = "realnvp_flow"
    shape = _event_shape(features_or_shape, where)
    preprocessing = discrete_preprocessing(levels, shape, logit_alpha, dequantization, where)
    n_scales = _scales(n_scales, shape, where)
    if n_steps < 1:
        raise ValueError(f"{where}: n_steps must be positive, got {n_steps}")
    contexts = LayerContexts(context_features, context_shape, where, image=len(shape) == 3)
    options = {"hidden": hidden, "scale": scale, "clamp": clamp}

    def couplings(event: tuple[int, ...], mask: str, count: int) -> list[InvertibleModule]:
        steps: list[InvertibleModule] = []
        context = contexts.at(event)
        for index in range(count):
            coupling = AffineCoupling(
                event,
                mask,
                flip=index % 2 == 1,
                context_features=context,
                **options,  # type: ignore[arg-type]
            )
            steps += [ActNorm(event[0]), coupling]
        return steps

    if len(shape) == 1:
        return _flow(preprocessing, couplings(shape, "half", n_steps), shape, contexts)
    _check_divisible(shape, n_scales - 1, where)
    parts: list[InvertibleModule] = []
    for _ in range(n_scales - 1):
        parts += couplings(shape, "checkerboard", n_steps)
        shape = _squeezed(shape)
        parts += [Squeeze(), *couplings(shape, "channel", n_steps)]
    parts += couplings(shape, "checkerboard", n_steps + 1)
    return _flow(preprocessing, parts, shape, contexts)


@saveable
def glow_flow(
    features_or_shape: int | Sequence[int],
    n_scales: int | None = None,
    n_steps: int = 4,
    hidden: int = 64,
    scale: Scale = "sigmoid",
    clamp: float | None = None,
    *,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    context_features: int = 0,
    context_shape: Sequence[int] | None = None,
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    r"""A Glow flow (Kingma & Dhariwal 2018, section 3 and Fig. 2): steps of ActNorm, invertible 1x1 convolution
    and affine coupling.

    Images (C, H, W): ``n_scales`` levels, each a :class:`~invertnet.layers.Squeeze` followed by ``n_steps`` steps
    :class:`~invertnet.layers.ActNorm` -> :class:`~invertnet.layers.InvertibleConv1x1` (LU) ->
    :class:`~invertnet.layers.AffineCoupling` with the channel mask (the 1x1 convolution mixes the channels
    between couplings, so the mask never flips) and Glow's scale sigmoid(h + 2),
    :math:`\log|\det J| = \sum \log \mathrm{sigmoid}(h_s + 2)`. Vectors (d,): ``n_steps`` steps ActNorm ->
    :class:`~invertnet.layers.LULinear` -> coupling with the half mask. All dimensions are kept to the end (Glow
    factors out half of them after each level; this flow does not). Exact log-det, closed-form inverse, standard
    normal base.

    Arguments:
        features_or_shape: d for vectors (data (B, d)), or (C, H, W); H and W divisible by 2^n_scales.
        n_scales: Levels L of an image flow (default 2); vectors have one.
        n_steps: Steps K per level.
        hidden: Units (vectors) or channels (images) of the conditioners (Glow: 512).
        scale, clamp: The coupling scale (:class:`~invertnet.layers.AffineCoupling`): ``"sigmoid"`` (Glow's code)
            or ``"exp"`` (their Table 1) with an optional bound on the log-scale.
        levels: Number K of discrete levels of the data: prepend dequantisation (``dequantization``) and the logit
            transform, so that ``bits_per_dim`` is with respect to the discrete data.
        logit_alpha: Margin of the logit transform when ``levels`` is given.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.
        context_features: Size k of a context for a conditional flow p(x | c): every coupling's conditioner also
            sees c (``flow.log_prob(x, context=c)``, ``flow(c)``). 0: unconditional.
        context_shape: Image flows, instead of ``context_features``: the shape (C', H', W') of an image context
            (H', W' an integer multiple or fraction of H, W), which every conditioner sees as extra channels at its
            resolution (:func:`~invertnet.layers.context_shape_at`).

    Examples:
        >>> flow = glow_flow((1, 8, 8), n_steps=2, hidden=8, levels=17)
        >>> flow.base.event_shape
        torch.Size([16, 2, 2])
        >>> glow_flow(2, n_steps=2, hidden=8).log_prob(torch.randn(3, 2)).shape
        torch.Size([3])
    """
    where = "glow_flow"
    shape = _event_shape(features_or_shape, where)
    preprocessing = discrete_preprocessing(levels, shape, logit_alpha, dequantization, where)
    n_scales = _scales(n_scales, shape, where)
    if n_steps < 1:
        raise ValueError(f"{where}: n_steps must be positive, got {n_steps}")
    contexts = LayerContexts(context_features, context_shape, where, image=len(shape) == 3)
    options = {"hidden": hidden, "scale": scale, "clamp": clamp}

    def steps(event: tuple[int, ...], mask: str, linear: type[LULinear | InvertibleConv1x1]) -> list[InvertibleModule]:
        parts: list[InvertibleModule] = []
        context = contexts.at(event)
        for _ in range(n_steps):
            coupling = AffineCoupling(event, mask, context_features=context, **options)  # type: ignore[arg-type]
            parts += [ActNorm(event[0]), linear(event[0]), coupling]
        return parts

    if len(shape) == 1:
        return _flow(preprocessing, steps(shape, "half", LULinear), shape, contexts)
    _check_divisible(shape, n_scales, where)
    parts: list[InvertibleModule] = []
    for _ in range(n_scales):
        shape = _squeezed(shape)
        parts += [Squeeze(), *steps(shape, "channel", InvertibleConv1x1)]
    return _flow(preprocessing, parts, shape, contexts)


@saveable
def spline_flow(
    features_or_shape: int | Sequence[int],
    n_steps: int = 8,
    hidden: int = 64,
    bins: int = 16,
    bound: float = 3.0,
    linear: bool | None = None,
    *,
    levels: int | None = None,
    logit_alpha: float = 0.05,
    context_features: int = 0,
    dequantization: Dequantization = "uniform",
) -> FlowDistribution:
    r"""A neural spline flow (Durkan et al. 2019): ``n_steps`` steps of ActNorm, (LULinear,) SplineCoupling.

    Each step standardises (:class:`~invertnet.layers.ActNorm`, data-initialised, so the entries fall inside
    the splines' interval [-B, B]), mixes the features (:class:`~invertnet.layers.LULinear`, Kingma & Dhariwal
    2018, section 3.2, as Durkan et al.'s coupling flows do) and applies a rational-quadratic spline coupling
    (:class:`~invertnet.layers.SplineCoupling`, half mask, ``bins`` bins, identity outside [-B, B]) with a
    default conditioner of width ``hidden``. Without the mixing, the couplings' half masks flip from step to
    step instead. The log-det is exact and the inverse closed-form. Given an image shape (C, H, W), the flow
    flattens it first (:class:`~invertnet.layers.Flatten`) and models it densely. Standard normal base. The
    defaults (8 steps, 16 bins) were measured on the 2-D toy densities (docs/defaults.md).

    Arguments:
        features_or_shape: d for vectors (data (B, d), d >= 2), or the event shape of one sample.
        n_steps: Steps of the flow.
        hidden: Units of the conditioners (two hidden layers).
        bins: Bins K of every spline.
        bound: B: every spline acts on [-B, B] and is the identity outside.
        linear: Mix the features with an LU-parameterised linear map before every coupling. ``None``: when
            d > 2 (a fixed half mask would otherwise always split the same features); in 2-D the flips already
            alternate the two coordinates.
        levels: Number K of discrete levels of the data: prepend dequantisation (``dequantization``) and the logit
            transform, so that ``bits_per_dim`` is with respect to the discrete data.
        logit_alpha: Margin of the logit transform when ``levels`` is given.
        dequantization: With ``levels``: ``"uniform"``, ``"variational"`` or (images) ``"variational_conv"``
            noise, as :func:`~invertnet.models.preprocessing.discrete_preprocessing` builds it.
        context_features: Size k of a context for a conditional flow p(x | c): every conditioner also sees c
            (``flow.log_prob(x, context=c)``, ``flow(c)``). 0: unconditional.

    Examples:
        >>> flow = spline_flow(2, n_steps=2, hidden=16)
        >>> flow.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
        >>> spline_flow((1, 8, 8), n_steps=1, hidden=8, levels=17).base.event_shape
        torch.Size([64])
    """
    where = "spline_flow"
    shape = _event_shape(features_or_shape, where, any_rank=True)
    preprocessing = discrete_preprocessing(levels, shape, logit_alpha, dequantization, where)
    if n_steps < 1:
        raise ValueError(f"{where}: n_steps must be positive, got {n_steps}")
    dim = math.prod(shape)
    if dim < 2:
        raise ValueError(f"{where}: a coupling needs at least 2 features, got {dim}")
    mixing = dim > 2 if linear is None else linear
    contexts = LayerContexts(context_features, None, where, image=False)
    parts: list[InvertibleModule] = [Flatten(shape)] if len(shape) > 1 else []
    for index in range(n_steps):
        flip = not mixing and index % 2 == 1
        coupling = SplineCoupling(
            (dim,), "half", flip=flip, hidden=hidden, bins=bins, bound=bound, context_features=contexts.at((dim,))
        )
        parts += [ActNorm(dim), LULinear(dim), coupling] if mixing else [ActNorm(dim), coupling]
    return _flow(preprocessing, parts, (dim,), contexts)
