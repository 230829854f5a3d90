r"""Invariance of invertible classifiers (thesis 6.3): metameric sampling (Definition 6.8)."""

from __future__ import annotations

import torch
from torch import Tensor

from invertnet.models.classifiers import FullyInvertibleClassifier

__all__ = ["metameric_sample"]


@torch.no_grad()
def metameric_sample(
    model: FullyInvertibleClassifier, x: Tensor, x_reference: Tensor, **solver_options: object
) -> Tensor:
    r"""x_met = F^{-1}(z_s, z~_n): the logits of x with the nuisance variables of x_reference (thesis Def. 6.8).

    The classifier cannot tell x_met from x (their logits agree up to the inverse's tolerance), while x_met
    carries everything else of the reference; if x_met looks like the reference, the classifier is invariant
    to the change from x to x_met (an invariance-based adversarial example, Definition 6.3).

    Arguments:
        model: A :class:`~invertnet.models.FullyInvertibleClassifier`, in eval mode.
        x: Inputs (B, ...) whose logits are kept.
        x_reference: Inputs (B, ...) whose nuisance variables are kept.
        **solver_options: ``atol``, ``rtol``, ``max_iter``, ``strict`` of the inverse.
    """
    if x.shape != x_reference.shape:
        raise ValueError(f"metameric_sample: x {tuple(x.shape)} and x_reference {tuple(x_reference.shape)} differ")
    z, z_reference = model.features(x), model.features(x_reference)
    semantic, _ = model.split(z)
    _, nuisance = model.split(z_reference)
    return model.invert_features(model.merge(semantic, nuisance, z), **solver_options)
