r"""Careful evaluation of a flow's log-likelihood: a stated bias bound and a probe standard error (thesis A.2).

A residual flow's log-det is estimated; Behrmann et al. (2019, appendix A.2) evaluate with a power series long
enough that its truncation error is negligible and average passes with fresh probes until the Monte-Carlo error
is small. :func:`evaluate_log_prob` does that and says what it achieved, where ``flow.log_prob`` alone returns one
draw of whatever estimator the blocks are configured with.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from invertnet.core import frozen_mode
from invertnet.layers.residual import EXACT_EVALUATION_FEATURES
from invertnet.models.flows import FlowDistribution, GivenContext

__all__ = ["LogProbEvaluation", "evaluate_log_prob"]


@dataclass(frozen=True)
class LogProbEvaluation:
    """What :func:`evaluate_log_prob` measured.

    Attributes:
        log_prob: Per-sample log-likelihood in nats, averaged over the probe passes, shape (N,).
        bits_per_dim: Mean of -log p(x) / (d ln 2) over the N samples.
        standard_error: Standard error of that mean over the samples (the data's spread), bits/dim.
        bias_bound_bits: Certified bound on the bias of the truncated power series in bits/dim (Behrmann et al.
            2019, Theorem 3 / thesis Theorem 5.8, with the blocks' certified Lipschitz bounds); 0 when every
            block's log-det is exact.
        probe_standard_error: Monte-Carlo standard error of the estimator's probes, bits/dim (from the spread
            of the pass means; 0 when exact).
        probe_passes: Number of passes over the data with fresh probes.
        probe_target_reached: Whether the probe standard error is below the requested one (``False`` when
            ``max_passes`` stopped the passes first).
        n_terms: Length of the evaluation power series (0 when no block uses it).
        exact_blocks: Residual blocks whose log-det was computed exactly.
        lipschitz_bound: The largest certified Lipschitz bound of the series' blocks (``None`` when none uses
            it), the L of the bias bound.
    """

    log_prob: Tensor
    bits_per_dim: float
    standard_error: float
    bias_bound_bits: float
    probe_standard_error: float
    probe_passes: int
    probe_target_reached: bool
    n_terms: int
    exact_blocks: int
    lipschitz_bound: float | None


@torch.no_grad()
def evaluate_log_prob(
    flow: FlowDistribution,
    x: Tensor,
    *,
    context: Tensor | None = None,
    bias_bits: float = 1e-3,
    standard_error_bits: float = 1e-3,
    max_terms: int = 200,
    max_passes: int | None = 20,
    batch_size: int = 256,
    exact_features: int = EXACT_EVALUATION_FEATURES,
    warn: bool = True,
) -> LogProbEvaluation:
    r"""log p(x) of a flow with the evaluation protocol of Behrmann et al. (2019, appendix A.2).

    In eval mode, after refining the spectral norms (so every bound is certified), dense blocks of at most
    ``exact_features`` features take the exact log-det (:class:`~invertnet.logdet.DenseExactLogDet`) and the
    others the shortest power series whose truncation bias is below ``bias_bits`` (see
    :meth:`FlowDistribution.use_evaluation_estimator`); passes with fresh probes are averaged until their
    standard error is below ``standard_error_bits`` (the paper: "such that the standard error is less than 0.0001
    bit/dim"), or until ``max_passes`` stops them, with a ``RuntimeWarning`` saying the target was not reached.
    The blocks' own estimators are restored afterwards (the refined spectral norms stay), so training can go on.

    Arguments:
        flow: The flow.
        x: Data of shape (N, *event_shape), N >= 1 (integer levels for dequantising flows).
        context: Conditional flows: the contexts, shape (N, k) (or (k,) for all; image contexts (N, C, H, W) or
            (C, H, W)): log p(x | c).
        bias_bits: Bound on the series' bias, bits/dim.
        standard_error_bits: Stop averaging passes when the probe standard error is below this, bits/dim.
        max_terms: Most series terms (the bias bound reports what was reached).
        max_passes: Most passes over ``x``; ``None``: as many as the standard error needs.
        batch_size: Samples per forward pass.
        exact_features: Widest dense branch evaluated exactly (0: the series everywhere).
        warn: Warn when ``max_passes`` stops the passes above ``standard_error_bits`` (the result says so in
            ``probe_target_reached`` either way).

    Returns:
        A :class:`LogProbEvaluation`: the estimate, its certified bias bound and its probe standard error.

    Examples:
        >>> from invertnet.models import dense_iresnet_flow
        >>> flow = dense_iresnet_flow(2, n_blocks=2, hidden_features=8)
        >>> result = evaluate_log_prob(flow, torch.randn(100, 2))
        >>> result.bias_bound_bits, result.probe_standard_error, result.log_prob.shape  # dense: exact
        (0.0, 0.0, torch.Size([100]))
    """
    if not isinstance(flow, FlowDistribution):
        raise TypeError(f"evaluate_log_prob: expected a FlowDistribution, got {type(flow).__name__}")
    if isinstance(flow.transform, GivenContext):
        raise TypeError("evaluate_log_prob: evaluate the conditional flow itself, with context= (not flow(c))")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("evaluate_log_prob: expected a tensor of shape (N, *event_shape) with N >= 1")
    for name, value in (("bias_bits", bias_bits), ("standard_error_bits", standard_error_bits)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"evaluate_log_prob: {name} must be a positive number, got {value!r}")
    if (max_passes is not None and max_passes < 2) or max_terms < 1 or batch_size < 1:
        raise ValueError(
            "evaluate_log_prob: max_passes >= 2 (or None), max_terms >= 1 and batch_size >= 1 are required"
        )
    dim = math.prod(flow.event_shape)
    blocks = flow.residual_blocks()
    saved = [(block.log_det_estimator, block.eval_log_det) for block in blocks]
    try:
        with frozen_mode(flow):
            first = context if _shared(flow, context) else context[:1]
            _log_prob(flow, x[:1], first, batch_size)  # convolutions learn their input size
            report = flow.use_evaluation_estimator(
                dim, bias_bits=bias_bits, max_terms=max_terms, exact_features=exact_features
            )
            passes = [_log_prob(flow, x, context, batch_size)]
            probe_error = 0.0
            if report["n_terms"] > 0:
                probe_error = math.inf
                while probe_error >= standard_error_bits and (max_passes is None or len(passes) < max_passes):
                    passes.append(_log_prob(flow, x, context, batch_size))
                    means = torch.stack([p.mean() for p in passes]) / (dim * math.log(2.0))
                    probe_error = (means.std() / math.sqrt(len(passes))).item()
                if probe_error >= standard_error_bits and warn:
                    warnings.warn(
                        f"evaluate_log_prob: {len(passes)} passes (max_passes) left a probe standard error of "
                        f"{probe_error:.2e} bits/dim, above the target {standard_error_bits:.0e}; raise max_passes "
                        "or pass None",
                        RuntimeWarning,
                        stacklevel=2,
                    )
    finally:
        for block, (estimator, evaluation) in zip(blocks, saved, strict=True):
            block.log_det_estimator, block.eval_log_det = estimator, evaluation
    log_prob = torch.stack(passes).mean(dim=0)
    bits = -log_prob / (dim * math.log(2.0))
    return LogProbEvaluation(
        log_prob=log_prob,
        bits_per_dim=bits.mean().item(),
        standard_error=(bits.std() / math.sqrt(len(bits))).item() if len(bits) > 1 else math.nan,
        bias_bound_bits=float(report["bias_bound_bits"]),
        probe_standard_error=probe_error,
        probe_passes=len(passes),
        probe_target_reached=probe_error < standard_error_bits,
        n_terms=int(report["n_terms"]),
        exact_blocks=int(report["exact_blocks"]),
        lipschitz_bound=report.get("lipschitz_bound"),
    )


def _shared(flow: FlowDistribution, context: Tensor | None) -> bool:
    """Whether ``context`` is one context for every sample (no batch dimension), or there is none."""
    return context is None or context.dim() == (1 if flow.context_shape is None else len(flow.context_shape))


def _log_prob(flow: FlowDistribution, x: Tensor, context: Tensor | None, batch_size: int) -> Tensor:
    """log p(x) (given the contexts, one per sample or one for all) in chunks of ``batch_size``."""
    if _shared(flow, context):
        return torch.cat([flow.log_prob(chunk, context) for chunk in x.split(batch_size)])
    if len(context) != len(x):
        raise ValueError(f"evaluate_log_prob: {len(x)} samples but {len(context)} contexts")
    return torch.cat(
        [
            flow.log_prob(chunk, given)
            for chunk, given in zip(x.split(batch_size), context.split(batch_size), strict=True)
        ]
    )
