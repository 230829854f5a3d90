r"""Sensitivity maps (thesis 7.5, "interpretation of models"): how strongly the predicted class score reacts to
each input bin, |d s_y(x) / d x|, averaged over samples, so that the m/z regions a spectrum classifier relies on
can be compared with known peptides."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["sensitivity_map", "top_sensitive_bins"]


def sensitivity_map(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    batch_size: int = 256,
    method: Literal["gradient", "gradient_times_input"] = "gradient",
) -> Tensor:
    """Mean over samples of |d logit_y / d x| (``"gradient"``) or of |x * d logit_y / d x|
    (``"gradient_times_input"``: the first-order contribution of each bin to the score, zero where the spectrum
    is empty), with y the label (or the predicted class); shape of one sample.

    Arguments:
        model: A classifier mapping (B, ...) to (B, C) logits (evaluated in eval mode, restored afterwards).
        x: Inputs (N, ...).
        labels: (N,) classes whose logit is differentiated; default the predicted ones.
        batch_size: Samples per backward pass.
        method: See above.
    """
    if method not in ("gradient", "gradient_times_input"):
        raise ValueError(f"sensitivity_map: method must be 'gradient' or 'gradient_times_input', got {method!r}")
    training = model.training
    model.eval()
    total = torch.zeros_like(x[0])
    try:
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].detach().requires_grad_(True)
            logits = model(chunk)
            target = logits.argmax(1) if labels is None else labels[start : start + batch_size]
            (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), chunk)
            total += (gradient if method == "gradient" else gradient * chunk.detach()).abs().sum(0)
    finally:
        model.train(training)
    return total / len(x)


def top_sensitive_bins(sensitivity: Tensor, k: int, min_separation: int = 1) -> Tensor:
    """Indices of the k largest entries of a 1-D map, greedily skipping entries within ``min_separation``
    bins of one already taken (one index per peak).

    Examples:
        >>> top_sensitive_bins(torch.tensor([0.0, 5.0, 4.0, 0.0, 3.0]), 2, min_separation=2)
        tensor([1, 4])
    """
    chosen: list[int] = []
    for index in torch.argsort(sensitivity.flatten(), descending=True).tolist():
        if all(abs(index - other) >= min_separation for other in chosen):
            chosen.append(index)
        if len(chosen) == k:
            break
    return torch.tensor(chosen)
