r"""The ROC / LDA baseline of thesis 7.4.1 (after Boskamp et al. 2017): discriminative m/z values by the
Mann-Whitney-Wilcoxon statistic, then linear discriminant analysis on the K best.

Each m/z bin is scored by the area under the ROC curve of its intensities between the classes, AUC = U / (n_1 n_0)
with U the Mann-Whitney statistic (ties get average ranks); the K bins farthest from AUC = 1/2 (one class
against the rest, the largest distance over classes) are kept, and LDA (Hastie et al. 2001, 4.3: Gaussian
classes with one shared covariance, here shrunk towards its diagonal so that it stays invertible for K near the
number of spectra) classifies on them. The thesis reports the worst and best balanced accuracy over
K = 5, ..., 100.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["RocLda", "roc_statistics"]


def roc_statistics(x: Tensor, y: Tensor) -> Tensor:
    """|AUC - 1/2| of every feature, the largest over one-class-against-the-rest splits: shape (L,) for spectra
    x of shape (N, L) (or (N, 1, L)) and labels y (N,).

    Examples:
        >>> x = torch.tensor([[0.0, 5.0], [1.0, 3.0], [2.0, 4.0], [3.0, 6.0]])
        >>> roc_statistics(x, torch.tensor([0, 0, 1, 1]))  # feature 0 separates the classes, feature 1 partly
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    from scipy.stats import rankdata  # imported here: scipy.stats takes a second to import

    features = x.reshape(len(x), -1).double().cpu().numpy()
    labels = y.cpu().numpy()
    ranks = rankdata(features, axis=0)  # average ranks for ties
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("roc_statistics: needs at least two classes")
    distance = np.zeros(features.shape[1])
    for c in classes if len(classes) > 2 else classes[1:]:
        positive = labels == c
        n1, n0 = positive.sum(), (~positive).sum()
        auc = (ranks[positive].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)
        distance = np.maximum(distance, np.abs(auc - 0.5))
    return torch.from_numpy(distance)


class RocLda:
    """The baseline classifier: the ``k`` most discriminative features (:func:`roc_statistics`) and LDA on them.

    Arguments:
        k: Number of m/z values kept (the thesis: 5 to 100).
        shrinkage: Weight of the diagonal in the pooled covariance, (1 - s) S + s diag(S).

    Examples:
        >>> generator = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 50, generator=generator)
        >>> y = torch.arange(200) % 2
        >>> x[:, 7] += 2.0 * y  # one discriminative m/z
        >>> model = RocLda(k=5).fit(x, y)
        >>> 7 in model.features.tolist(), bool((model.predict(x) == y).double().mean() > 0.8)
        (True, True)
    """

    def __init__(self, k: int, shrinkage: float = 0.1) -> None:
        if k < 1:
            raise ValueError(f"RocLda: k must be positive, got {k}")
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"RocLda: shrinkage must lie in [0, 1], got {shrinkage}")
        self.k, self.shrinkage = k, shrinkage

    def fit(self, x: Tensor, y: Tensor, statistics: Tensor | None = None) -> RocLda:
        """Select the features on (x, y) and fit the class means, the shared covariance and the priors;
        ``statistics`` are :func:`roc_statistics` of (x, y) when already computed (several K on one split)."""
        flat = x.reshape(len(x), -1).double()
        statistics = roc_statistics(flat, y) if statistics is None else statistics
        self.features = torch.topk(statistics, min(self.k, flat.shape[1])).indices
        chosen = flat[:, self.features]
        self.classes = torch.unique(y)
        self.means = torch.stack([chosen[y == c].mean(dim=0) for c in self.classes])  # (C, K)
        centred = chosen - self.means[torch.searchsorted(self.classes, y)]
        covariance = centred.T @ centred / max(len(chosen) - len(self.classes), 1)
        covariance = (1 - self.shrinkage) * covariance + self.shrinkage * torch.diag(torch.diag(covariance))
        covariance = covariance + 1e-9 * torch.eye(len(covariance), dtype=covariance.dtype) * covariance.diag().mean()
        self.precision_means = torch.linalg.solve(covariance, self.means.T)  # Sigma^{-1} mu_c, (K, C)
        priors = torch.stack([(y == c).double().mean() for c in self.classes])
        self.offsets = -0.5 * (self.means * self.precision_means.T).sum(dim=1) + priors.log()
        return self

    def scores(self, x: Tensor) -> Tensor:
        """The linear discriminants delta_c(x) = x^T Sigma^{-1} mu_c - mu_c^T Sigma^{-1} mu_c / 2 + log pi_c, (N, C)."""
        chosen = x.reshape(len(x), -1).double()[:, self.features]
        return chosen @ self.precision_means + self.offsets

    def predict(self, x: Tensor) -> Tensor:
        """The class of largest discriminant, (N,)."""
        return self.classes[self.scores(x).argmax(dim=1)]
