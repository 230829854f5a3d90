r"""Do a trained network's weights look Gaussian? (Ma, Ayaz & Karaman 2018, section 4.1 and Fig. 3.)

Theorem 1 of that paper assumes Gaussian filter weights; section 4.1 checks the assumption on trained generators
by the histograms of every layer's weights. :func:`weight_normality` gives, per layer, the moments and a
normality statistic, and :func:`plot_weight_histograms` the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from invertnet.figures import save_figure, subplots

__all__ = ["WeightNormality", "plot_weight_histograms", "weight_normality"]


@dataclass(frozen=True)
class WeightNormality:
    """The weights of one layer against the normal law with their mean and standard deviation.

    Attributes:
        name: The layer's parameter name.
        count: Number of weights.
        mean, std: Their mean and standard deviation; ``mean / std`` says how far from zero-mean they are.
        skewness: The third standardised moment (0 for a normal law).
        excess_kurtosis: The fourth standardised moment minus 3 (0 for a normal law; -1.2 for a uniform one,
            negative for light tails, positive for heavy ones).
        ks_distance: The Kolmogorov-Smirnov distance sup |F_n - Phi((x - mean) / std)| between the empirical
            distribution and the fitted normal one. With the mean and standard deviation estimated from the same
            weights this is Lilliefors' statistic: its critical value at the 5% level is about 0.886 / sqrt(count)
            (``ks_critical``), smaller than Kolmogorov's 1.36 / sqrt(count).
        weights: The weights themselves, flattened (for the histogram).
    """

    name: str
    count: int
    mean: float
    std: float
    skewness: float
    excess_kurtosis: float
    ks_distance: float
    weights: Tensor

    @property
    def ks_critical(self) -> float:
        """Lilliefors' 5% critical value of ``ks_distance``, 0.886 / sqrt(count) (large-sample approximation)."""
        return 0.886 / math.sqrt(self.count)

    @property
    def looks_normal(self) -> bool:
        """``ks_distance`` below the 5% critical value: normality is not rejected at that level."""
        return self.ks_distance <= self.ks_critical


def _statistics(name: str, weights: Tensor) -> WeightNormality:
    values = weights.detach().double().flatten().cpu()
    mean, std = values.mean(), values.std()
    standard = (values - mean) / std
    ordered = torch.sort(standard).values
    count = len(ordered)
    normal = 0.5 * (1 + torch.erf(ordered / math.sqrt(2.0)))
    ranks = torch.arange(1, count + 1, dtype=torch.float64)
    ks = torch.maximum(ranks / count - normal, normal - (ranks - 1) / count).max()
    return WeightNormality(
        name=name,
        count=count,
        mean=mean.item(),
        std=std.item(),
        skewness=standard.pow(3).mean().item(),
        excess_kurtosis=standard.pow(4).mean().item() - 3.0,
        ks_distance=ks.item(),
        weights=values,
    )


def weight_normality(model: nn.Module, min_count: int = 32) -> list[WeightNormality]:
    """The normality statistics (:class:`WeightNormality`) of the weights of every convolution and linear layer
    of ``model`` (parameters named ``weight`` with at least two dimensions and ``min_count`` entries), in order.

    Examples:
        >>> layer = nn.Linear(100, 100)
        >>> with torch.no_grad():
        ...     _ = layer.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
        >>> stats = weight_normality(layer)[0]
        >>> stats.count, stats.looks_normal, abs(stats.excess_kurtosis) < 0.2
        (10000, True, True)
    """
    found = []
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "weight" and parameter.dim() >= 2 and parameter.numel() >= min_count:
            found.append(_statistics(name, parameter))
    return found


def plot_weight_histograms(statistics: Sequence[WeightNormality], path: str | Path, bins: int = 60) -> Path:
    """Save one histogram per layer with the fitted normal density over it (Ma, Ayaz & Karaman 2018, Fig. 3).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    if not statistics:
        raise ValueError("plot_weight_histograms: no layers to plot")
    figure, axes = subplots(
        1, len(statistics), figsize=(3.2 * len(statistics), 3), squeeze=False, feature="plot_weight_histograms"
    )
    for axis, layer in zip(axes[0], statistics, strict=True):
        axis.hist(layer.weights.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.7)
        grid = torch.linspace(layer.weights.min().item(), layer.weights.max().item(), 200, dtype=torch.float64)
        density = torch.exp(-0.5 * ((grid - layer.mean) / layer.std) ** 2) / (layer.std * math.sqrt(2 * math.pi))
        axis.plot(grid.numpy(), density.numpy(), color="tab:red", label="normal fit")
        axis.set(title=f"{layer.name}\nKS {layer.ks_distance:.3f} (5%: {layer.ks_critical:.3f})", xlabel="weight")
    axes[0][0].legend(loc="upper right")
    return save_figure(figure, path)
