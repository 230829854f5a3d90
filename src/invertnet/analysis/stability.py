r"""Inverse stability of networks at given inputs (thesis 3.4): singular values of the Jacobians of every
layer prefix, their condition numbers and ranks, and the bounds of Lemma 3.5 on what ReLU can do to them."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from invertnet.figures import save_figure, subplots

__all__ = ["LayerSpectrum", "layer_spectra", "lemma_3_5_bounds", "lemma_3_6_bound", "plot_layer_spectra"]


@dataclass
class LayerSpectrum:
    """Singular values of the Jacobian of the network prefix ending at one layer, at one input.

    Attributes:
        name: The layer's name in the model.
        singular_values: Descending, float64.
        rank: Number of singular values above ``rtol * largest``.
        condition_number: largest / smallest of the non-zero singular values (inf when the rank is 0).
    """

    name: str
    singular_values: Tensor
    rank: int
    condition_number: float


def layer_spectra(
    model: nn.Sequential,
    x: Tensor,
    *,
    window: tuple[slice, slice] | None = None,
    rtol: float = 1e-10,
) -> list[LayerSpectrum]:
    r"""Spectra of the Jacobians d model[:l+1](x) / dx for every layer l of a sequential MLP or CNN, computed on
    a float64 copy in eval mode.

    Arguments:
        model: An ``nn.Sequential`` (e.g. Linear/Conv2d with activations).
        x: One input sample, without batch dimension.
        window: For images, (rows, columns) slices of the input: only those input pixels (all channels) are
            differentiated, giving the Jacobian's columns for that window (large images stay tractable).
        rtol: Relative threshold below which a singular value counts as zero.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
        >>> [spectrum.rank for spectrum in layer_spectra(net, torch.randn(3, dtype=torch.float64))] <= [3, 3, 2]
        True
    """
    model = copy.deepcopy(model).double().eval()  # the caller's model keeps its dtype and mode
    x = x.detach().double()
    mask = torch.zeros_like(x, dtype=torch.bool)
    if window is None:
        mask[...] = True
    else:
        mask[..., window[0], window[1]] = True
    columns = mask.flatten().nonzero().squeeze(1)
    spectra = []
    for depth, (name, _) in enumerate(model.named_children(), start=1):
        prefix = model[:depth]

        def restricted(values: Tensor, prefix: nn.Sequential = prefix) -> Tensor:
            full = x.flatten().index_put((columns,), values)
            return prefix(full.view(1, *x.shape)).flatten()

        point = x.flatten()[columns]
        with torch.no_grad():
            outputs = restricted(point).numel()
        # forward mode when the window has fewer inputs than the prefix has outputs (one jvp per input column)
        jacobian = (torch.func.jacfwd if len(columns) < outputs else torch.func.jacrev)(restricted)(point).detach()
        values = torch.linalg.svdvals(jacobian)
        nonzero = values[values > rtol * values.max()] if values.numel() and values.max() > 0 else values[:0]
        condition = (nonzero[0] / nonzero[-1]).item() if nonzero.numel() else float("inf")
        spectra.append(LayerSpectrum(name, values, int(nonzero.numel()), condition))
    return spectra


def lemma_3_5_bounds(A: Tensor, removed: Sequence[int]) -> tuple[float, float | None]:
    r"""Thesis Lemma 3.5: upper bounds on the largest and the smallest non-zero singular value of D_I A,
    where D_I zeroes the rows ``removed`` (the effect of ReLU): sigma_1(A), and sigma_k(A) with k = N - |I|,
    N the number of non-zero singular values of A (``None`` when |I| >= N: the lemma gives no bound)."""
    values = torch.linalg.svdvals(A.double())
    values = values[values > 1e-12 * values.max()]
    if not values.numel():
        return 0.0, None  # A = 0: D_I A has no non-zero singular value
    k = len(values) - len(set(removed))
    return values[0].item(), values[k - 1].item() if k >= 1 else None


def lemma_3_6_bound(A: Tensor, removed: Sequence[int], k: int) -> tuple[float, bool]:
    r"""Thesis Lemma 3.6 (removal of weakly correlated rows): for a removed row k of A (k in I, the rows ReLU
    zeroes), the smallest c with |<a_j, a_k>| <= c |a_k| / sqrt(M) for every kept row j (M = m - |I|) bounds the
    smallest non-zero singular value of D_I A from above, provided a_k lies in the orthogonal complement of
    N(D_I A). Returns ``(c, hypothesis_holds)``; when the hypothesis fails the lemma says nothing.

    Examples:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=torch.float64)
        >>> c, holds = lemma_3_6_bound(A, removed=[0], k=0)  # a_0 = e_1 is weakly correlated with a_1
        >>> holds, round(c, 6), bool(torch.linalg.svdvals(A[1:]).min() <= c)
        (True, 1.414214, True)
    """
    A = A.double()
    removed_set = set(int(index) for index in removed)
    if k not in removed_set:
        raise ValueError(f"lemma_3_6_bound: row k = {k} must be one of the removed rows {sorted(removed_set)}")
    kept = [j for j in range(A.shape[0]) if j not in removed_set]
    if not kept:
        return 0.0, False
    row = A[k]
    norm = row.norm()
    if norm == 0:
        return 0.0, False
    c = (A[kept] @ row).abs().max().item() * len(kept) ** 0.5 / norm.item()
    _, values, vh = torch.linalg.svd(A[kept], full_matrices=True)
    rank = int((values > 1e-12 * values.max()).sum()) if values.numel() else 0
    null_space = vh[rank:]  # rows spanning N(D_I A)
    holds = bool((null_space @ row).norm() <= 1e-10 * norm) if null_space.numel() else True
    return c, holds


def plot_layer_spectra(spectra: Sequence[LayerSpectrum], path: str | Path, title: str = "") -> Path:
    """Save the singular values of every prefix Jacobian on a log scale (thesis Fig. 3.4).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    figure, axis = subplots(figsize=(7, 4), feature="plot_layer_spectra")
    for spectrum in spectra:
        values = spectrum.singular_values.clamp_min(1e-16)
        label = f"{spectrum.name} (rank {spectrum.rank}, cond {spectrum.condition_number:.1e})"
        axis.semilogy(range(1, len(values) + 1), values.numpy(), marker=".", label=label)
    axis.set(xlabel="index", ylabel="singular value", title=title or "singular values of prefix Jacobians")
    axis.legend(fontsize=7)
    return save_figure(figure, path)
