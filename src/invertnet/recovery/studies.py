r"""The experiments of Ma, Ayaz & Karaman 2018: loss landscapes over a 2-D latent space (Fig. 4) and the phase
transition of exact recovery in the sampling rate (the discussion after Theorem 4)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from invertnet.figures import save_figure, subplots
from invertnet.models.generators import TransposedConvGenerator
from invertnet.recovery.masks import MASK_KINDS, Mask, make_mask
from invertnet.recovery.recover import recover

__all__ = [
    "Landscape",
    "NegativeMultiple",
    "PhaseTransitionRow",
    "loss_landscape",
    "negative_multiple",
    "phase_transition",
    "plot_landscapes",
    "plot_phase_transition",
    "theorem_network",
    "write_phase_transition_csv",
]


@dataclass
class Landscape:
    """J(z) on a grid: ``loss[i, j]`` at z = (axis_x[j], axis_y[i]); ``truth`` the true code (the centre)."""

    axis_x: Tensor
    axis_y: Tensor
    loss: Tensor
    truth: Tensor
    title: str


def _measurement_loss(generator: Callable[[Tensor], Tensor], mask: Mask, z_true: Tensor) -> Callable[[Tensor], Tensor]:
    """z -> J(z) = 1/2 |A (G(z) - G(z*))|^2 per code (N,), the cost of Ma, Ayaz & Karaman 2018, Eq. 3."""
    target = mask(generator(z_true)).detach()
    return lambda z: 0.5 * (mask(generator(z)) - target).flatten(1).square().sum(dim=1)


@torch.no_grad()
def loss_landscape(
    generator: Callable[[Tensor], Tensor],
    z_true: Tensor,
    mask: Mask,
    extent: float = 3.0,
    resolution: int = 101,
    title: str = "",
) -> Landscape:
    r"""J(z) = 1/2 |A (G(z) - G(z*))|^2 on a ``resolution`` x ``resolution`` grid of half-width ``extent``
    centred at z*, for a generator with a 2-D latent space (Ma, Ayaz & Karaman 2018, Fig. 4).

    Arguments:
        generator: G with latents of shape (N, 2, 1, 1) (or any shape with 2 entries).
        z_true: The true code, 2 entries.
        mask: The sampling operator, one shared pattern.
    """
    if z_true.numel() != 2:
        raise ValueError(f"loss_landscape: needs a 2-D latent space, got a code with {z_true.numel()} entries")
    shape = tuple(z_true.shape[1:]) if z_true.dim() > 1 and z_true.shape[0] == 1 else tuple(z_true.shape)
    offsets = torch.linspace(-extent, extent, resolution, dtype=z_true.dtype)
    centre = z_true.flatten()
    axis_x, axis_y = centre[0] + offsets, centre[1] + offsets
    grid_y, grid_x = torch.meshgrid(axis_y, axis_x, indexing="ij")
    codes = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1).view(-1, *shape)
    loss = _measurement_loss(generator, mask, z_true.reshape(1, *shape))
    losses = [loss(chunk) for chunk in codes.split(4096)]
    return Landscape(axis_x, axis_y, torch.cat(losses).view(resolution, resolution), centre, title)


@dataclass(frozen=True)
class NegativeMultiple:
    """J along the ray -s z*, where Theorem 1 of Ma, Ayaz & Karaman 2018 leaves a neighbourhood of -rho z* open
    (a local minimum or saddle may sit there), and whether descent from there still finds z*.

    Attributes:
        rho: The s in (0, ``max_scale``] minimising J(-s z*) on the ray.
        interior: Whether that minimum lies inside the searched interval (a stationary point on the ray), not at
            its ends (J monotone along the ray: no negative multiple to fear).
        loss: J(-rho z*), against J(0) = ``loss_at_zero``.
        loss_at_zero: J(0).
        gradient_norm: |grad J(-rho z*)|: the point is stationary along the ray; this says whether it is
            stationary in every direction.
        escapes: Adam from -rho z* reaches z* (relative error below ``success_tol``).
        relative_error: The relative latent error Adam ended at.
    """

    rho: float
    interior: bool
    loss: float
    loss_at_zero: float
    gradient_norm: float
    escapes: bool
    relative_error: float


def negative_multiple(
    generator: Callable[[Tensor], Tensor],
    z_true: Tensor,
    mask: Mask,
    max_scale: float = 3.0,
    resolution: int = 3001,
    max_iter: int = 3000,
    success_tol: float = 1e-3,
) -> NegativeMultiple:
    """Find the minimiser -rho z* of J on the negative ray and test it (:class:`NegativeMultiple`): one problem,
    ``z_true`` of shape (1, *latent_shape), a shared ``mask``."""
    if z_true.shape[0] != 1:
        raise ValueError(f"negative_multiple: one problem, z_true of shape (1, ...), got {tuple(z_true.shape)}")
    loss = _measurement_loss(generator, mask, z_true)
    with torch.no_grad():
        scales = torch.linspace(0.0, max_scale, resolution, dtype=z_true.dtype)[1:]
        rays = -scales.view(-1, *[1] * (z_true.dim() - 1)) * z_true  # (resolution - 1, *latent_shape)
        along = torch.cat([loss(chunk) for chunk in rays.split(512)])
        best = int(along.argmin())
        rho = scales[best].item()
        at_zero = loss(torch.zeros_like(z_true)).item()
    point = (-rho * z_true).detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss(point).sum(), point)
    result = recover(generator, generator(z_true).detach(), mask, z_true=z_true, z0=point.detach(), max_iter=max_iter)
    assert result.relative_error is not None
    error = result.relative_error.item()
    return NegativeMultiple(
        rho=rho,
        interior=0 < best < len(scales) - 1,
        loss=along.min().item(),
        loss_at_zero=at_zero,
        gradient_norm=gradient.norm().item(),
        escapes=error < success_tol,
        relative_error=error,
    )


def plot_landscapes(landscapes: Sequence[Landscape], path: str | Path) -> Path:
    """Save the landscapes side by side as log10(J) heat maps with the true code marked.

    Ma, Ayaz & Karaman 2018, Fig. 4 a-d.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    width = 4 * len(landscapes)
    figure, axes = subplots(1, len(landscapes), figsize=(width, 4), squeeze=False, feature="plot_landscapes")
    for axis, landscape in zip(axes[0], landscapes, strict=True):
        extent = (
            landscape.axis_x[0].item(),
            landscape.axis_x[-1].item(),
            landscape.axis_y[0].item(),
            landscape.axis_y[-1].item(),
        )
        image = axis.imshow(torch.log10(landscape.loss + 1e-12).numpy(), origin="lower", extent=extent, cmap="viridis")
        axis.plot(*landscape.truth.tolist(), "r*", markersize=12, label="z*")
        axis.set(title=landscape.title, xlabel="z1", ylabel="z2")
        figure.colorbar(image, ax=axis, fraction=0.046, label="log10 J(z)")
    axes[0][0].legend(loc="upper left")
    return save_figure(figure, path)


@dataclass
class PhaseTransitionRow:
    """Exact-recovery counts for one mask kind at one requested sampling rate (``observed_rate``: the fraction
    the pattern really observes; a border cannot be thinner than one pixel), and whether the networks meet
    Theorem 4's hypotheses at that rate (:meth:`~invertnet.models.TransposedConvGenerator.conditions`)."""

    mask: str
    rate: float
    observed_rate: float
    successes: int
    trials: int
    meets_theorem_4: bool = False

    @property
    def probability(self) -> float:
        return self.successes / self.trials


def theorem_network(rng: torch.Generator) -> TransposedConvGenerator:
    """A 2-layer ReLU generator that meets Theorem 1's hypotheses, and Theorem 4's at sampling rates
    r >= 0.116: latent (10, 1, 1), channels (8, 4), kernel = stride = 6 (36 x 36 images with 4 channels), Gaussian
    weights of the theory's variance; C_1 l = 288 >= C_0 log C_0 = 23 and C_2 l = 144 >= C_1 log C_1 / r."""
    return TransposedConvGenerator((10, 1, 1), (8, 4), kernel_size=6, generator=rng)


def phase_transition(
    rates: Sequence[float],
    kinds: Sequence[str] = MASK_KINDS,
    n_networks: int = 10,
    n_codes: int = 10,
    make_generator: Callable[[torch.Generator], TransposedConvGenerator] | None = None,
    success_tol: float = 1e-3,
    max_iter: int = 2000,
    seed: int = 0,
    progress: bool = False,
    method: Literal["adam", "gd"] = "adam",
) -> list[PhaseTransitionRow]:
    r"""Probability of exact recovery (relative latent error < ``success_tol``) against the sampling rate.

    For every mask kind and rate, ``n_networks`` random generators each recover ``n_codes`` random codes
    (uniform masks: a fresh pattern per code), in float64, by Adam at lr 0.1 (the optimiser of Ma, Ayaz &
    Karaman 2018, 4.3; ``method="gd"``: gradient descent with the adaptive step, whose step collapses at ReLU
    kinks). Each row says whether the networks meet Theorem 4's hypotheses at its rate.

    Arguments:
        rates: Sampling rates r in (0, 1].
        kinds: Mask kinds (:data:`~invertnet.recovery.MASK_KINDS`: the paper's five, uniform, top, bottom, left
            and right, and a border).
        n_networks, n_codes: Trials = n_networks * n_codes per (kind, rate).
        make_generator: Builds a random generator from a seeded RNG (default: :func:`theorem_network`).
        success_tol: Relative latent error counted as exact recovery.
        method: The optimiser of :func:`~invertnet.recovery.recover`.
    """
    if make_generator is None:
        make_generator = theorem_network

    rows = []
    settings = [(kind, rate) for kind in kinds for rate in rates]
    for kind, rate in tqdm(settings, disable=not progress, desc="phase transition", unit="setting"):
        successes = 0
        for network in range(n_networks):
            rng = torch.Generator().manual_seed(seed + 1000 * network)
            generator = make_generator(rng).double()
            z_true = torch.randn(n_codes, *generator.latent_shape, generator=rng, dtype=torch.float64)
            size = generator.output_shape[1:]
            mask = make_mask(kind, size, rate, batch=n_codes if kind == "uniform" else None, generator=rng)  # type: ignore[arg-type]
            result = recover(
                generator,
                generator(z_true),
                mask,
                z_true=z_true,
                method=method,
                max_iter=max_iter,
                seed=seed + 1000 * network + 1,
            )
            assert result.relative_error is not None
            successes += int((result.relative_error < success_tol).sum())
        meets = generator.conditions(min(max(mask.rate, 1e-12), 1.0)).theorem_4
        rows.append(PhaseTransitionRow(kind, float(rate), mask.rate, successes, n_networks * n_codes, meets))
    return rows


def write_phase_transition_csv(rows: Sequence[PhaseTransitionRow], path: str | Path) -> Path:
    """Write ``mask,rate,observed_rate,successes,trials,probability,meets_theorem_4`` rows."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mask", "rate", "observed_rate", "successes", "trials", "probability", "meets_theorem_4"])
        for row in rows:
            writer.writerow(
                [
                    row.mask,
                    row.rate,
                    f"{row.observed_rate:.4f}",
                    row.successes,
                    row.trials,
                    f"{row.probability:.4f}",
                    int(row.meets_theorem_4),
                ]
            )
    return path


def plot_phase_transition(rows: Sequence[PhaseTransitionRow], path: str | Path) -> Path:
    """Save probability of exact recovery against the sampling rate, one curve per mask kind.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    figure, axis = subplots(figsize=(6, 4), feature="plot_phase_transition")
    for kind in dict.fromkeys(row.mask for row in rows):
        mine = sorted((row for row in rows if row.mask == kind), key=lambda row: row.rate)
        axis.plot([row.observed_rate for row in mine], [row.probability for row in mine], marker="o", label=kind)
    axis.set(
        xlabel="observed fraction of pixels", ylabel="P(exact recovery)", ylim=(-0.02, 1.02), title="phase transition"
    )
    axis.legend()
    return save_figure(figure, path)
