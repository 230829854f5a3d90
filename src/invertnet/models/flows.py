r"""Normalising flows as distributions: p_X(x) = p_Z(F(x)) |det J_F(x)| (thesis Eq. 5.2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, TransformedDistribution, constraints

from invertnet.core import (
    InverseResult,
    InvertibleModule,
    SolverOptions,
    SolverOverride,
    check_dtype,
    validation_enabled,
)
from invertnet.layers.conditional import context_shape, context_shape_at
from invertnet.layers.lipschitz_nets import LipschitzMLP
from invertnet.layers.residual import EXACT_EVALUATION_FEATURES, InvertibleResidual
from invertnet.layers.spectral import refine_spectral_norms
from invertnet.layers.spectral_groups import normalize_together, release_together
from invertnet.logdet.dense import DenseExactLogDet
from invertnet.logdet.exact import ExactLogDet
from invertnet.logdet.series import PowerSeriesLogDet, n_terms_for_bias, truncation_error_bound
from invertnet.transforms import batch_shape_of

__all__ = ["FlowDistribution", "standard_normal"]


class GivenContext(InvertibleModule):
    """A conditional transform at fixed contexts, bound at every call: each use runs ``transform.at(context)``
    anew, so the flow that :meth:`FlowDistribution.at` returns follows its parent's mode (``train`` / ``eval``),
    estimators and parameters. The parent is not a submodule: ``train()`` / ``eval()`` / ``to()`` of the bound flow
    do not reach it (set the mode on the parent flow).

    Arguments:
        transform: The conditional transform.
        context: (M, k) contexts, tiled over a batch of a multiple of M samples.
    """

    def __init__(self, transform: InvertibleModule, context: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "parent", transform)  # not registered: the parent keeps its own mode
        self.context = context
        self.bijective = transform.bijective

    def bound(self) -> InvertibleModule:
        """The transform at the context, in the parent's current state."""
        return self.parent.at(self.context)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.parent.parameters(recurse)

    @property
    def exact_log_det(self) -> bool:  # type: ignore[override]
        return self.bound().exact_log_det

    @property
    def analytic_inverse(self) -> bool:  # type: ignore[override]
        return self.parent.analytic_inverse

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bound().forward_and_log_det(x)

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        return self.bound().inverse_and_log_det(y, options)

    def inverse(self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride) -> Tensor:
        return self.bound().inverse(y, options, **overrides)

    def inverse_result(
        self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride
    ) -> InverseResult:
        return self.bound().inverse_result(y, options, **overrides)

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        return self.parent.event_shape_after(event_shape)

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        return self.parent.event_shape_before(event_shape)


SampleShape = int | torch.Size | tuple[int, ...]
"""A sample shape as torch.distributions takes it, or a single int n for (n,)."""


def _sample_size(sample_shape: SampleShape) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``; a ``ValueError`` for negative or non-integer sizes."""
    if isinstance(sample_shape, bool):
        raise TypeError(f"FlowDistribution: sample_shape must be an int or a tuple of ints, got {sample_shape!r}")
    if isinstance(sample_shape, int):
        sample_shape = (sample_shape,)
    try:
        shape = torch.Size(sample_shape)
    except TypeError as error:
        raise TypeError(
            f"FlowDistribution: sample_shape must be an int or a tuple of ints, got {sample_shape!r}"
        ) from error
    if any(size < 0 for size in shape):
        raise ValueError(f"FlowDistribution: sample_shape must not be negative, got {tuple(shape)}")
    return shape


def standard_normal(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Distribution:
    """The standard normal on tensors of the given event shape (log_prob sums over the event).

    Without torch.distributions' own argument checks (``validate_args=False``): :class:`FlowDistribution` checks
    its latents itself while :func:`invertnet.validation` is on, so switching validation off removes the check's
    host synchronisation here too."""
    zeros = torch.zeros(shape, dtype=dtype or torch.get_default_dtype(), device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), len(shape), validate_args=False)


def _mapped(distribution: Distribution, fn: Callable[[Tensor], Tensor]) -> Distribution:
    """The distribution rebuilt with ``fn`` applied to its tensors (normal and independent-normal bases);
    other distributions are returned unchanged."""
    if isinstance(distribution, Independent):
        return Independent(
            _mapped(distribution.base_dist, fn),
            distribution.reinterpreted_batch_ndims,
            validate_args=distribution._validate_args,
        )
    if isinstance(distribution, Normal):
        return Normal(fn(distribution.loc), fn(distribution.scale), validate_args=distribution._validate_args)
    return distribution


class LayerContexts:
    """The contexts of a flow builder's layers: ``features`` = k for vector contexts (B, k), or an image context
    of ``shape`` (C, H, W), which each layer sees at its resolution (:func:`~invertnet.layers.context_shape_at`).

    Arguments:
        features: k, or 0.
        shape: (C, H, W) of an image context, or ``None``; at most one of the two is given.
        where: The builder, for error messages.
        image: Whether the builder's data are images (image contexts need image data).
    """

    def __init__(self, features: int, shape: Sequence[int] | None, where: str, image: bool = True) -> None:
        if features < 0:
            raise ValueError(f"{where}: context_features must be 0 or positive, got {features}")
        if shape is not None and features:
            raise ValueError(f"{where}: give context_features (vector contexts) or context_shape (images), not both")
        if shape is not None and not image:
            raise ValueError(f"{where}: context_shape (image contexts) needs image data; use context_features=k")
        self.features, self.where = features, where
        self.shape = None if shape is None else context_shape(shape, where)

    def __bool__(self) -> bool:
        return bool(self.features) or self.shape is not None

    def at(self, event_shape: Sequence[int]) -> int | tuple[int, int, int]:
        """The ``context_features`` of a layer whose inputs have ``event_shape``: k for vector contexts (and for
        vector events), the image context's shape at the layer's resolution (C, H, W) otherwise."""
        if self.shape is None or len(event_shape) != 3:
            return self.features
        try:
            return context_shape_at(self.shape, *event_shape[1:])
        except ValueError as error:
            raise ValueError(f"{self.where}: context_shape {self.shape}: {error}") from None


class FlowDistribution(nn.Module, Distribution):
    r"""The distribution of x = F^{-1}(z), z ~ base, for an invertible transform F (data -> latent).

    .. math:: \log p(x) = \log p_Z(F(x)) + \log|\det J_F(x)|,
        \qquad \text{bits/dim}(x) = -\frac{\log p(x)}{d \ln 2}.

    A ``torch.distributions.Distribution`` and an ``nn.Module`` (its parameters are the transform's: train it
    with any optimiser). ``event_shape`` is the data shape, ``batch_shape`` is ``()``; ``sample`` / ``rsample``
    take any ``sample_shape`` (an int, ``()``, ``(n,)``, ``(n, m)``) and ``log_prob`` any batch shape before the
    event shape, as torch's distributions do. ``expand`` returns the equivalent
    ``torch.distributions.TransformedDistribution``. When the transform starts with
    :class:`~invertnet.layers.UniformDequantization`, ``log_prob`` of discrete data is the log-density of the
    dequantised data in the units of the discrete levels, and ``bits_per_dim`` is with respect to the discrete
    data: its expectation over the dequantisation noise upper-bounds the discrete bits/dim (Behrmann et al. 2019,
    section 5.3; Theis et al. 2016). With :class:`~invertnet.layers.VariationalDequantization` first, ``log_prob``
    is log p(x + u) - log q(u | x) and the same holds (Ho et al. 2019, section 3.1).

    ``log_prob`` uses the transform's log-det as configured. In training mode residual blocks estimate it (power
    series or Russian roulette: one random draw of probes per call). In eval mode blocks with dense branches of at
    most 256 features compute it exactly; other blocks keep their estimator, so the value is random and, for a
    truncated series, biased. :attr:`log_prob_is_exact` says which holds now;
    :func:`~invertnet.evaluate_log_prob` evaluates with a stated bias bound and probe standard error.

    Arguments:
        transform: The flow F, mapping data with shape (B, ...) to latents.
        base: The latent distribution, with ``event_shape`` the latent shape, batch shape ``()`` and
            ``log_prob`` of shape (B,), e.g. :func:`standard_normal`. Normal bases move with the module
            (``flow.to(device)``, ``flow.double()``); other distributions must be created on the right device by
            the caller.
        batch_shape: Of a flow given contexts (:meth:`at` sets it).
        context_shape: The shape of one context of a conditional flow: ``(C, H, W)`` for image contexts; ``None``
            (the default): vector contexts, whose last dimension is the context.

    Examples:
        >>> from invertnet.layers import ActNorm
        >>> flow = FlowDistribution(ActNorm(2), standard_normal((2,)))
        >>> flow.log_prob(torch.zeros(3, 2)).shape, flow.sample((5,)).shape, flow.sample().shape
        (torch.Size([3]), torch.Size([5, 2]), torch.Size([2]))
        >>> x, log_prob = flow.rsample_and_log_prob((4, 3))  # one pass: the inverse's log-det
        >>> x.shape, log_prob.shape
        (torch.Size([4, 3, 2]), torch.Size([4, 3]))
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 (torch.distributions' class attribute)
    has_rsample = True

    def __init__(
        self,
        transform: InvertibleModule,
        base: Distribution,
        batch_shape: torch.Size | tuple[int, ...] = (),
        context_shape: Sequence[int] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(transform, InvertibleModule):
            raise TypeError(f"FlowDistribution: transform must be an InvertibleModule, got {type(transform).__name__}")
        if not isinstance(base, Distribution):
            raise TypeError(
                f"FlowDistribution: base must be a torch.distributions.Distribution, got {type(base).__name__}"
            )
        if tuple(base.batch_shape) != ():
            raise ValueError(
                f"FlowDistribution: the base must be one distribution (batch shape ()), got batch shape "
                f"{tuple(base.batch_shape)}; wrap it in torch.distributions.Independent to make those dimensions "
                "part of the event"
            )
        self.transform = transform
        self.base = base
        self.context_shape = None if context_shape is None else tuple(int(size) for size in context_shape)
        event_shape = transform.event_shape_before(tuple(base.event_shape))
        Distribution.__init__(
            self, batch_shape=torch.Size(batch_shape), event_shape=torch.Size(event_shape), validate_args=False
        )

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (nn.Module's private hook)
        """Move and cast the base with the module (``.to``, ``.double()``, ``.cuda()``), as nn.Module cannot."""
        super()._apply(fn, *args, **kwargs)
        self.base = _mapped(self.base, fn)
        return self

    __repr__ = nn.Module.__repr__

    @property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        """Real tensors of the event shape (dequantising flows take levels in [0, levels) there)."""
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def log_prob_is_exact(self) -> bool:
        """Whether :meth:`log_prob` is exact in the current mode: every log-det exact, no probe randomness (a
        dequantising flow still draws its dequantisation noise)."""
        return bool(self.transform.exact_log_det)

    @property
    def conditional(self) -> bool:
        """Whether the transform takes a context: then ``log_prob(x, context=c)``, ``sample(shape, context=c)`` or
        ``flow(c)``."""
        return self.transform.conditional

    def forward(self, context: Tensor) -> FlowDistribution:
        """``flow(c)``: the conditional distribution given c, as :meth:`at` (zuko's convention)."""
        return self.at(context)

    def at(self, context: Tensor) -> FlowDistribution:
        """The distribution of x given the context c of shape (*batch, k) (image contexts: (*batch, C, H, W)): a
        flow with batch shape ``batch`` (one distribution per context) that shares this flow's parameters.

        Examples:
            >>> from invertnet.models import dense_iresnet_flow
            >>> flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8, context_features=3)
            >>> given = flow(torch.randn(4, 3))
            >>> given.batch_shape, given.sample((5,)).shape, given.log_prob(torch.zeros(4, 2)).shape
            (torch.Size([4]), torch.Size([5, 4, 2]), torch.Size([4]))
        """
        if isinstance(self.transform, GivenContext):
            raise TypeError("FlowDistribution: this flow is already given a context; use at() of the flow it came from")
        if not self.conditional:
            raise TypeError("FlowDistribution: this flow takes no context (build it with context_features=k)")
        event_dims = 1 if self.context_shape is None else len(self.context_shape)
        expected = "(..., k)" if self.context_shape is None else f"(..., {', '.join(map(str, self.context_shape))})"
        if not isinstance(context, Tensor) or context.dim() < event_dims:
            raise TypeError(f"FlowDistribution: the context must be a tensor of shape {expected}, got {context!r}")
        if self.context_shape is not None and tuple(context.shape[context.dim() - event_dims :]) != self.context_shape:
            raise ValueError(f"FlowDistribution: expected contexts of shape {expected}, got {tuple(context.shape)}")
        context = self._like_parameters(context)  # integer codes (one_hot) too: they are added to activations
        batch_shape = context.shape[: context.dim() - event_dims]
        flat = context.reshape(-1, *context.shape[context.dim() - event_dims :])
        return FlowDistribution(
            GivenContext(self.transform, flat), self.base, batch_shape=batch_shape, context_shape=self.context_shape
        )

    def _given(self, context: Tensor | None) -> FlowDistribution:
        """This flow, or its distribution given ``context``; a conditional flow without a context is named."""
        if context is not None:
            return self.at(context)
        if self.conditional and not tuple(self.batch_shape):
            sizes = ", ".join(map(str, self.context_shape or ()))
            shape = "(B, k) or (k,)" if self.context_shape is None else f"(B, {sizes})"
            raise TypeError(
                f"FlowDistribution: this flow is conditional: pass context= a tensor of shape {shape}, or use "
                "flow(context)"
            )
        return self

    def expand(self, batch_shape: torch.Size | tuple[int, ...], _instance: object = None) -> Distribution:
        """The same distribution repeated over ``batch_shape``: a ``TransformedDistribution`` of the expanded
        base through this flow's transform (sharing its parameters)."""
        if self.conditional or tuple(self.batch_shape):
            raise NotImplementedError("FlowDistribution.expand: only for unconditional flows with batch shape ()")
        transform = self.transform.as_transform(self.event_shape).inv
        return TransformedDistribution(self.base.expand(torch.Size(batch_shape)), [transform])

    def _base_log_prob(self, z: Tensor) -> Tensor:
        expected = tuple(self.base.event_shape)
        if tuple(z.shape[1:]) != expected:
            raise ValueError(
                f"FlowDistribution: the transform maps to latents of shape {tuple(z.shape[1:])}, but the base "
                f"distribution's event shape is {expected}"
            )
        if validation_enabled() and not torch.isfinite(z).all():
            raise ValueError(
                f"FlowDistribution: the transform gave {int((~torch.isfinite(z)).sum())} NaN or infinite latents"
            )
        return self.base.log_prob(z)

    def _parameter(self) -> Tensor | None:
        """The transform's first parameter (its device and dtype are the flow's), ``None`` without parameters."""
        return next(self.transform.parameters(), None)

    def _like_parameters(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the parameters' device and in their dtype (unchanged without parameters)."""
        parameter = self._parameter()
        return tensor if parameter is None else tensor.to(device=parameter.device, dtype=parameter.dtype)

    def _dtype(self) -> torch.dtype:
        parameter = self._parameter()
        return parameter.dtype if parameter is not None else torch.get_default_dtype()

    def _empty(self, shape: torch.Size, device: torch.device) -> Tensor:
        return torch.zeros(shape, dtype=self._dtype(), device=device)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(x) (given the context, for conditional flows) with the batch shape of x = (*batch, *event_shape),
        of the transform's dtype (else a named ``ValueError``)."""
        given = self._given(context)
        if given is not self:
            return given.log_prob(x)
        check_dtype(x, self.transform, "FlowDistribution.log_prob")
        batch = batch_shape_of(x.shape, tuple(self.event_shape), "FlowDistribution.log_prob")
        own = tuple(self.batch_shape)
        if own:  # x broadcasts against the contexts' batch shape, as in torch.distributions
            try:
                batch = torch.Size(torch.broadcast_shapes(batch, own))
            except RuntimeError as error:
                expected = ", ".join(map(str, own + tuple(self.event_shape)))
                raise ValueError(
                    f"FlowDistribution.log_prob: x of shape {tuple(x.shape)} does not broadcast to (..., {expected}) "
                    f"for {own} contexts"
                ) from error
            if tuple(batch[len(batch) - len(own) :]) != own:
                raise ValueError(f"FlowDistribution.log_prob: x's batch shape broadcasts beyond the contexts' {own}")
            x = x.expand(*batch, *self.event_shape)
        if math.prod(batch) == 0:
            return self._empty(batch, x.device)
        if not x.is_floating_point():  # integer levels of a dequantising flow, in the parameters' dtype
            x = x.to(self._dtype())
        grouped = normalize_together(self.transform)  # batched spectral normalisation of same-shaped layers
        try:
            z, log_det = self.transform.forward_and_log_det(x.reshape(-1, *self.event_shape))
        finally:
            release_together(grouped)
        return (self._base_log_prob(z) + log_det).reshape(batch)

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """-log p(x) / (d ln 2) with the batch shape of x, for d the number of entries of one sample."""
        return -self.log_prob(x, context) / (math.prod(self.event_shape) * math.log(2.0))

    def sample(
        self, sample_shape: SampleShape = (), context: Tensor | None = None, **solver_options: SolverOverride
    ) -> Tensor:
        """Draw x = F^{-1}(z) without gradients, of shape (*sample_shape, *event_shape); solver failures raise
        :class:`~invertnet.ConvergenceError`.

        Arguments:
            sample_shape: An int or a shape: ``()`` for one sample, ``1000`` or ``(1000,)``, ``(n, m)``.
            context: Conditional flows: the context, shape (*batch, k); the samples then have shape
                (*sample_shape, *batch, *event_shape).
            **solver_options: ``atol``, ``rtol``, ``max_iter``, ``strict`` for iterative inverses.
        """
        with torch.no_grad():
            return self.rsample(sample_shape, context, **solver_options)

    def rsample(
        self, sample_shape: SampleShape = (), context: Tensor | None = None, **solver_options: SolverOverride
    ) -> Tensor:
        """Draw x = F^{-1}(z), differentiable with respect to the transform's parameters (implicit gradients)."""
        given = self._given(context)
        if given is not self:
            return given.rsample(sample_shape, **solver_options)
        shape, z = self._latents(sample_shape)
        if z is None:
            return self._empty(torch.Size((*shape, *self.event_shape)), self._device())
        return self._shaped(self.transform.inverse(z, **solver_options), shape)

    def rsample_and_log_prob(
        self, sample_shape: SampleShape = (), context: Tensor | None = None, **solver_options: SolverOverride
    ) -> tuple[Tensor, Tensor]:
        r"""Draw x = F^{-1}(z) and its log p(x) in one pass: :math:`\log p(x) = \log p_Z(z) - \log|\det
        J_{F^{-1}}(z)|`, the inverse's log-det (reverse-KL / variational training).

        Returns:
            ``(x, log_prob)`` of shapes (*sample_shape, *batch_shape, *event_shape) and (*sample_shape,
            *batch_shape), both differentiable with respect to the transform's parameters.
        """
        given = self._given(context)
        if given is not self:
            return given.rsample_and_log_prob(sample_shape, **solver_options)
        shape, z = self._latents(sample_shape)
        if z is None:
            return self._empty(torch.Size((*shape, *self.event_shape)), self._device()), self._empty(
                shape, self._device()
            )
        x, inverse_log_det = self.transform.inverse_and_log_det(z, SolverOptions.of(None, solver_options))
        return self._shaped(x, shape), (self._base_log_prob(z) - inverse_log_det).reshape(shape)

    def _device(self) -> torch.device:
        parameter = self._parameter()
        return parameter.device if parameter is not None else torch.device("cpu")

    def _latents(self, sample_shape: SampleShape) -> tuple[torch.Size, Tensor | None]:
        """The sample and batch shape and (n, *latent shape) base draws for its n samples (``None`` when n = 0)."""
        shape = _sample_size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        if n == 0:
            return shape, None
        z = self.base.rsample(torch.Size([n]))
        return shape, self._like_parameters(z)

    def _shaped(self, x: Tensor, shape: torch.Size) -> Tensor:
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise RuntimeError(
                f"FlowDistribution: the inverse returned samples of shape {tuple(x.shape[1:])}, not the event shape "
                f"{tuple(self.event_shape)}; a layer that changes shapes must override event_shape_before / "
                "event_shape_after"
            )
        return x.reshape(*shape, *self.event_shape)

    def residual_blocks(self) -> list[InvertibleResidual]:
        """The i-ResNet blocks of the transform, in module order."""
        return [module for module in self.transform.modules() if isinstance(module, InvertibleResidual)]

    def use_evaluation_estimator(
        self,
        dim: int,
        *,
        bias_bits: float = 1e-3,
        max_terms: int = 200,
        exact_features: int = EXACT_EVALUATION_FEATURES,
    ) -> dict[str, float]:
        r"""Install the evaluation log-det estimator of every residual block (thesis A.2) and report its bias.

        Refines the spectral norms (so that each block's certified Lipschitz bound is at most its ``coeff`` and close to
        the true norm). Blocks with a dense branch (:class:`~invertnet.layers.LipschitzMLP`) of at most
        ``exact_features`` features get the exact log-det from the Jacobian's factors
        (:class:`~invertnet.logdet.DenseExactLogDet`: no bias, no probe noise, one pass). For the others it takes L,
        their largest certified block bound, and the shortest power series whose truncation error (thesis
        Theorem 5.8) is below ``bias_bits`` bits per dimension over all T of them:

        .. math:: n = \min\{n : T \cdot \mathrm{err}(L, d, n) \le \text{bias\_bits} \cdot d \ln 2\},

        capped at ``max_terms``; each then uses ``PowerSeriesLogDet(n, probe="rademacher")``. Blocks that already
        use an exact log-det are left unchanged.

        Arguments:
            dim: The number d of entries of one data sample (bits/dim divide by it).
            bias_bits: Bound on the bits/dim bias of the truncated series.
            max_terms: Most series terms.
            exact_features: Largest dense branch width evaluated exactly (0: none; the series for every block).

        Returns:
            ``{"n_terms", "bias_bound_bits", "lipschitz_bound", "exact_blocks"}``: the series length (0 when no
            block uses the series), its bias bound (0 then), the L it was chosen for (absent then) and the number of
            blocks evaluated exactly.
        """
        residual = self.residual_blocks()
        if residual:
            refine_spectral_norms(self)
        stochastic = [block for block in residual if not isinstance(block.log_det_estimator, ExactLogDet)]
        for block in stochastic:
            if isinstance(block.g, LipschitzMLP) and block.g.event_shape[0] <= exact_features:
                block.use_log_det_estimator(DenseExactLogDet())
        exact = sum(isinstance(block.log_det_estimator, ExactLogDet) for block in residual)
        blocks = [block for block in stochastic if not isinstance(block.log_det_estimator, ExactLogDet)]
        if not blocks:
            return {"n_terms": 0, "bias_bound_bits": 0.0, "exact_blocks": exact}
        bounds = [block.lipschitz_bound() for block in blocks]
        if any(bound is None for bound in bounds):
            unknown = next(block for block, bound in zip(blocks, bounds, strict=True) if bound is None)
            raise ValueError(
                f"use_evaluation_estimator: the residual block with branch {type(unknown.g).__name__} declares no "
                "Lipschitz bound, so the series' truncation error cannot be bounded; use ExactLogDet in it"
            )
        lipschitz = max(bounds)  # type: ignore[type-var]
        per_block_nats = bias_bits * dim * math.log(2) / len(blocks)
        n_terms = min(n_terms_for_bias(lipschitz, dim, per_block_nats), max_terms)
        bias = len(blocks) * truncation_error_bound(lipschitz, dim, n_terms) / (dim * math.log(2))
        for block in blocks:
            block.use_log_det_estimator(PowerSeriesLogDet(n_terms, probe="rademacher"))
            block.eval_log_det = "training"  # the series whose bias is reported, in eval mode too
        return {"n_terms": n_terms, "bias_bound_bits": bias, "lipschitz_bound": lipschitz, "exact_blocks": exact}
