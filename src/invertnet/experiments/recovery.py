r"""Ma, Ayaz & Karaman 2018 (Invertibility of convolutional generative networks from partial measurements):
the loss landscapes of their Fig. 4 and the phase transition of exact recovery in the sampling rate
(``invertnet recover-study``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from invertnet.models.generators import TransposedConvGenerator
from invertnet.recovery.masks import make_mask
from invertnet.recovery.studies import (
    loss_landscape,
    phase_transition,
    plot_landscapes,
    plot_phase_transition,
    write_phase_transition_csv,
)

__all__ = ["study_landscapes", "study_phase_transition"]


def study_landscapes(output_dir: str | Path, seed: int = 0, resolution: int = 101) -> dict[str, Any]:
    """Fig. 4 a-d: J(z) around z* for 2-layer generators with a 2-D latent (16 channels, then 1; kernel 5,
    stride 3; 50% uniform samples) with ReLU, sigmoid, tanh and Gaussian weights, and ReLU with U[0, 1]
    weights (a code in the negative quadrant, where the minimum is flat). Saves ``landscapes.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = [("relu", "gaussian"), ("sigmoid", "gaussian"), ("tanh", "gaussian"), ("relu", "uniform")]
    landscapes = []
    for activation, law in settings:
        rng = torch.Generator().manual_seed(seed)
        generator = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, activation, law, generator=rng).double()  # type: ignore[arg-type]
        z_true = torch.tensor([0.8, -0.6] if law == "gaussian" else [-0.8, -0.6], dtype=torch.float64)
        mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
        title = f"({'abcd'[len(landscapes)]}) {activation}, {law} weights"
        landscapes.append(loss_landscape(generator, z_true.view(1, 2, 1, 1), mask, resolution=resolution, title=title))
    figure = plot_landscapes(landscapes, output_dir / "landscapes.png")
    flat = {landscape.title: (landscape.loss <= 1e-12).double().mean().item() for landscape in landscapes}
    return {"figure": str(figure), "fraction_of_grid_with_zero_loss": flat}


def study_phase_transition(
    output_dir: str | Path,
    rates: Sequence[float],
    kinds: Sequence[str],
    n_networks: int = 10,
    n_codes: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The phase transition of exact recovery; saves ``phase_transition.csv`` and ``phase_transition.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = phase_transition(rates, kinds, n_networks, n_codes, seed=seed, progress=progress)
    csv_path = write_phase_transition_csv(rows, output_dir / "phase_transition.csv")
    figure = plot_phase_transition(rows, output_dir / "phase_transition.png")
    table = [
        {"mask": row.mask, "rate": row.rate, "observed_rate": row.observed_rate, "probability": row.probability}
        for row in rows
    ]
    (output_dir / "phase_transition.json").write_text(json.dumps(table, indent=2))
    return {"csv": str(csv_path), "figure": str(figure), "rows": table}
