r"""Normalising flows as distributions: p_X(x) = p_Z(F(x)) |det J_F(x)| (thesis Eq. 5.2)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from invertnet.core import InvertibleModule, check_dtype
from invertnet.layers.lipschitz_nets import LipschitzMLP
from invertnet.layers.residual import InvertibleResidual
from invertnet.layers.spectral import refine_spectral_norms
from invertnet.logdet.dense import DenseExactLogDet
from invertnet.logdet.series import PowerSeriesLogDet, n_terms_for_bias, truncation_error_bound

EXACT_EVALUATION_FEATURES = 256
"""Widest dense residual branch :meth:`FlowDistribution.use_evaluation_estimator` evaluates exactly: one
:class:`~invertnet.logdet.DenseExactLogDet` pass costs O(B d^2 h) for width h plus a d x d LU per sample, below the
series' n_terms vector-Jacobian products over several probe passes at these sizes."""

__all__ = ["FlowDistribution", "standard_normal"]


def standard_normal(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Distribution:
    """The standard normal on tensors of the given event shape (log_prob sums over the event)."""
    zeros = torch.zeros(shape, dtype=dtype or torch.get_default_dtype(), device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros)), len(shape))


def _mapped(distribution: Distribution, fn: Callable[[Tensor], Tensor]) -> Distribution:
    """The distribution rebuilt with ``fn`` applied to its tensors (normal and independent-normal bases);
    other distributions are returned unchanged."""
    if isinstance(distribution, Independent):
        return Independent(_mapped(distribution.base_dist, fn), distribution.reinterpreted_batch_ndims)
    if isinstance(distribution, Normal):
        return Normal(fn(distribution.loc), fn(distribution.scale))
    return distribution


class FlowDistribution(nn.Module):
    r"""The distribution of x = F^{-1}(z), z ~ base, for an invertible transform F (data -> latent).

    .. math:: \log p(x) = \log p_Z(F(x)) + \log|\det J_F(x)|,
        \qquad \text{bits/dim}(x) = -\frac{\log p(x)}{d \ln 2}.

    Names follow ``torch.distributions``. When the transform starts with
    :class:`~invertnet.layers.UniformDequantization`, ``log_prob`` of discrete data is the log-density of
    the dequantised data in the units of the discrete levels, and ``bits_per_dim`` is with respect to the
    discrete data: its expectation over the dequantisation noise upper-bounds the discrete bits/dim
    (thesis Lemma 5.10 and 5.3, "Evaluation").

    Arguments:
        transform: The flow F, mapping data with shape (B, ...) to latents.
        base: The latent distribution, with ``event_shape`` the latent shape and ``log_prob`` of shape (B,),
            e.g. :func:`standard_normal`. Normal bases move with the module (``flow.to(device)``,
            ``flow.double()``); other distributions must be created on the right device by the caller.

    Example:
        >>> from invertnet.layers import ActNorm
        >>> flow = FlowDistribution(ActNorm(2), standard_normal((2,)))
        >>> flow.log_prob(torch.zeros(3, 2)).shape, flow.sample((5,)).shape
        (torch.Size([3]), torch.Size([5, 2]))
    """

    def __init__(self, transform: InvertibleModule, base: Distribution) -> None:
        super().__init__()
        if not isinstance(transform, InvertibleModule):
            raise TypeError(f"FlowDistribution: transform must be an InvertibleModule, got {type(transform).__name__}")
        self.transform = transform
        self.base = base

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (nn.Module's private hook)
        """Move and cast the base with the module (``.to``, ``.double()``, ``.cuda()``), as nn.Module cannot."""
        super()._apply(fn, *args, **kwargs)
        self.base = _mapped(self.base, fn)
        return self

    def _base_log_prob(self, z: Tensor) -> Tensor:
        expected = tuple(self.base.event_shape)
        if tuple(z.shape[1:]) != expected:
            raise ValueError(
                f"FlowDistribution: the transform maps to latents of shape {tuple(z.shape[1:])}, but the base "
                f"distribution's event shape is {expected}"
            )
        return self.base.log_prob(z)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) with shape (B,) for x with shape (B, ...) of the transform's dtype (else a named ``ValueError``)."""
        check_dtype(x, self.transform, "FlowDistribution.log_prob")
        z, log_det = self.transform.forward_and_log_det(x)
        return self._base_log_prob(z) + log_det

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """-log p(x) / (d ln 2) per sample, shape (B,), with d the number of entries of one sample."""
        return -self.log_prob(x) / (x[0].numel() * math.log(2.0))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = (1,), **solver_options: object) -> Tensor:
        """Draw x = F^{-1}(z) without gradients; solver failures raise :class:`~invertnet.ConvergenceError`.

        Arguments:
            sample_shape: A single batch size, e.g. ``(64,)``; ``(0,)`` gives an empty tensor of shape
                (0, *data shape), like ``torch.distributions`` (one latent is inverted to learn the data shape).
            **solver_options: ``atol``, ``rtol``, ``max_iter``, ``strict`` for iterative inverses.
        """
        with torch.no_grad():
            return self.rsample(sample_shape, **solver_options)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = (1,), **solver_options: object) -> Tensor:
        """Draw x = F^{-1}(z), differentiable with respect to the transform's parameters (implicit gradients)."""
        shape = torch.Size(sample_shape)
        if len(shape) != 1:
            raise ValueError(f"FlowDistribution: sample_shape must be one batch size such as (64,), got {tuple(shape)}")
        empty = shape[0] == 0
        z = self.base.rsample(torch.Size([1]) if empty else shape)
        parameter = next(self.transform.parameters(), None)
        if parameter is not None:
            z = z.to(device=parameter.device, dtype=parameter.dtype)
        x = self.transform.inverse(z, **solver_options)
        return x[:0] if empty else x

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
        stochastic = [block for block in residual if not block.exact_log_det]
        for block in stochastic:
            if isinstance(block.g, LipschitzMLP) and block.g.event_shape[0] <= exact_features:
                block.use_log_det_estimator(DenseExactLogDet())
        exact = sum(block.exact_log_det for block in residual)
        blocks = [block for block in stochastic if not block.exact_log_det]
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
        return {"n_terms": n_terms, "bias_bound_bits": bias, "lipschitz_bound": lipschitz, "exact_blocks": exact}
