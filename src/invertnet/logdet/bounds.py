r"""Deterministic bounds on the log-determinant of an i-ResNet (thesis Lemma 5.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from invertnet.core import InvertibleModule, InvertibleSequential

__all__ = ["log_det_bounds"]


def _leaves(module: nn.Module) -> list[InvertibleModule]:
    if isinstance(module, InvertibleSequential):
        return [leaf for part in module for leaf in _leaves(part)]
    if isinstance(module, InvertibleModule):
        return [module]
    raise TypeError(f"log_det_bounds: {type(module).__name__} is not an InvertibleModule")


@torch.no_grad()
def log_det_bounds(model: InvertibleModule, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-sample lower and upper bounds on :math:`\log|\det J_F(x)|` (thesis Lemma 5.5).

    Residual blocks are the :class:`~invertnet.layers.InvertibleResidual` leaves. For blocks f_t = I + g_t on d_t
    dimensions, the singular values of J_{f_t} lie in [1 - Lip(g_t), 1 + Lip(g_t)] (Lemma 4.6), hence

    .. math:: \sum_t d_t \log(1 - \mathrm{Lip}(g_t)) \le \log|\det J_F(x)|
        \le \sum_t d_t \log(1 + \mathrm{Lip}(g_t)).

    Layers with exact log-determinants (ActNorm, Squeeze, padding, ...) add their exact value to both bounds.
    The Lipschitz constants are the blocks' certified ``lipschitz_bound()``; after
    :func:`~invertnet.layers.refine_spectral_norms` each is at most the product of its branch's coefficients,
    before it it may exceed that (and a block whose bound reaches 1 is refused).

    Arguments:
        model: An :class:`~invertnet.InvertibleModule`, possibly nested :class:`~invertnet.InvertibleSequential`.
        x: An input batch with shape (B, ...), used to find each block's dimension and the exact terms.

    Returns:
        ``(lower, upper)``, each with shape (B,).

    Raises:
        ValueError: If a residual block has no Lipschitz bound, or one >= 1, or a layer's log-det is not exact.
    """
    from invertnet.layers.residual import InvertibleResidual  # the layers import the estimators of this package

    lower = x.new_zeros(x.shape[0])
    upper = x.new_zeros(x.shape[0])
    for index, leaf in enumerate(_leaves(model)):
        if isinstance(leaf, InvertibleResidual):
            lip = leaf.lipschitz_bound()
            if lip is None or lip >= 1:
                raise ValueError(
                    f"log_det_bounds: residual block {index} has certified Lipschitz bound {lip}; Lemma 5.5 needs "
                    "Lip(g) < 1 (refine_spectral_norms(model) first, or lower coeff)"
                )
            dim = x[0].numel()
            lower += dim * math.log1p(-lip)
            upper += dim * math.log1p(lip)
            x = leaf(x)
        elif leaf.exact_log_det:
            x, log_det = leaf.forward_and_log_det(x)
            lower += log_det
            upper += log_det
        else:
            raise ValueError(f"log_det_bounds: layer {index} ({type(leaf).__name__}) has no exact log-det")
    return lower, upper
