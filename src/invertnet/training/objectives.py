r"""Training objectives as modules (so that DistributedDataParallel sees the forward pass), with evaluation.

An objective maps a batch to a scalar loss (``forward``) and a data set to its test metrics (``evaluate``);
``name`` is the metric the loss reports (``train_<name>`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.models.flows import FlowDistribution

__all__ = ["BitsPerDim", "CrossEntropy", "bits_per_sample", "mean_and_standard_error"]

Batch = Tensor | tuple[Tensor, ...]


@torch.no_grad()
def bits_per_sample(flow: FlowDistribution, data: Tensor, batch_size: int = 256) -> Tensor:
    """bits/dim of every sample of ``data``, shape (N,), computed in chunks of ``batch_size``."""
    return torch.cat([flow.bits_per_dim(chunk) for chunk in data.split(batch_size)])


def mean_and_standard_error(bits: Tensor) -> dict[str, float]:
    """``{"bits_per_dim": mean, "standard_error": std / sqrt(N)}`` over samples."""
    return {"bits_per_dim": bits.mean().item(), "standard_error": (bits.std() / math.sqrt(len(bits))).item()}


class BitsPerDim(nn.Module):
    r"""Maximum likelihood: the batch's mean -log p(x) / (d ln 2) (thesis Eq. 5.3).

    Arguments:
        flow: The :class:`~invertnet.models.FlowDistribution` trained; batches are tensors (B, ...).
    """

    name = "bits_per_dim"

    def __init__(self, flow: FlowDistribution) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, batch: Tensor) -> Tensor:
        return self.flow.bits_per_dim(batch).mean()

    def evaluate(self, data: Tensor, batch_size: int = 256) -> dict[str, float]:
        """Mean bits/dim over ``data`` and its standard error over samples."""
        return mean_and_standard_error(bits_per_sample(self.flow, data, batch_size))


class CrossEntropy(nn.Module):
    r"""Classification: the batch's mean cross-entropy of ``classifier(x)`` against labels y.

    Arguments:
        classifier: A module mapping (B, ...) inputs to (B, n_classes) logits; batches are ``(x, y)``.
    """

    name = "cross_entropy"

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Mean cross-entropy and accuracy over ``data``, with the binomial standard error of the accuracy."""
        x, y = data
        logits = torch.cat([self.classifier(chunk) for chunk in x.split(batch_size)])
        correct = (logits.argmax(dim=1) == y).double()
        accuracy = correct.mean().item()
        return {
            "cross_entropy": F.cross_entropy(logits, y).item(),
            "accuracy": accuracy,
            "accuracy_standard_error": math.sqrt(accuracy * (1 - accuracy) / len(y)),
        }
