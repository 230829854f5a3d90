r"""Cross-validation folds by groups (Behrmann's thesis, 7.4: 4-fold cross-validation on the level of tissue
microarrays, so that spectra of one patient or core never sit in both training and test data)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_folds"]


def grouped_folds(
    groups: Tensor, n_folds: int = 4, seed: int = 0, labels: Tensor | None = None
) -> list[tuple[Tensor, Tensor]]:
    """``n_folds`` (train indices, test indices) pairs with every group in exactly one test fold.

    The groups are shuffled with ``seed`` and dealt to folds greedily, largest first into the fold with the
    fewest samples, so the folds have similar sizes. With ``labels``, groups are dealt class by class (a
    group's class is its most frequent label), so that every fold holds groups of every class that has at
    least ``n_folds`` groups (stratified group folds: with one class per patient, plain group folds can leave
    a test fold with a single class, where the balanced accuracy is a single recall).

    Arguments:
        groups: (N,) integer group (patient / core) of every sample.
        n_folds: Number of folds, at least 2 and at most the number of groups.
        seed: Shuffling seed.
        labels: (N,) class labels, for stratification.

    Examples:
        >>> folds = grouped_folds(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), n_folds=2)
        >>> [len(test) for _, test in folds]
        [4, 4]
    """
    unique = torch.unique(groups)
    if n_folds < 2 or n_folds > len(unique):
        raise ValueError(f"grouped_folds: need 2 <= n_folds <= {len(unique)} groups, got n_folds={n_folds}")
    if labels is not None and labels.shape != groups.shape:
        raise ValueError(f"grouped_folds: labels {tuple(labels.shape)} and groups {tuple(groups.shape)} differ")
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    sizes = torch.stack([(groups == group).sum() for group in order])
    classes = (
        torch.zeros_like(order)
        if labels is None
        else torch.stack([torch.mode(labels[groups == group]).values for group in order])
    )
    members: list[list[Tensor]] = [[] for _ in range(n_folds)]
    filled = [0] * n_folds
    for label in torch.unique(classes).tolist():
        dealt = [0] * n_folds  # groups of this class per fold
        of_class = torch.nonzero(classes == label).flatten()
        for index in of_class[torch.argsort(sizes[of_class], descending=True, stable=True)].tolist():
            fold = min(range(n_folds), key=lambda k: (dealt[k], filled[k]))
            members[fold].append(order[index])
            dealt[fold] += 1
            filled[fold] += int(sizes[index])
    folds = []
    for fold_groups in members:
        test = torch.isin(groups, torch.stack(fold_groups))
        folds.append((torch.nonzero(~test).flatten(), torch.nonzero(test).flatten()))
    return folds
