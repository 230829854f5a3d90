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
    negative_multiple,
    phase_transition,
    plot_landscapes,
    plot_phase_transition,
    write_phase_transition_csv,
)

__all__ = ["study_landscapes", "study_phase_transition"]


def study_landscapes(output_dir: str | Path, seed: int = 0, resolution: int = 101) -> dict[str, Any]:
    """Fig. 4 and section 4.2: J(z) around z* for 2-layer generators with a 2-D latent (16 channels, then 1;
    kernel 5, stride 3; 50% uniform samples), weights i.i.d. with zero mean and unit standard deviation (as the
    section draws them: at the theory's 1 / sqrt(C l) sigmoid and tanh would stay almost linear): ReLU, sigmoid,
    tanh and leaky ReLU with Gaussian weights, ReLU with zero-mean uniform weights (Conjecture 3), and ReLU with
    U[0, 1] weights (the counter-example of Fig. 4d, a code in the negative quadrant, where the minimum is flat).
    For each, the negative multiple -rho z* that Theorem 1 leaves open (:func:`~invertnet.recovery.negative_multiple`;
    ``rho`` is ``None`` when J is monotone along the negative ray).
    Saves ``landscapes.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        ("relu", "gaussian"),
        ("sigmoid", "gaussian"),
        ("tanh", "gaussian"),
        ("leaky_relu", "gaussian"),
        ("relu", "centered_uniform"),
        ("relu", "uniform"),
    ]
    landscapes, stationary = [], {}
    for index, (activation, law) in enumerate(settings):
        rng = torch.Generator().manual_seed(seed)
        std = None if law == "uniform" else 1.0  # U[0, 1] has its own scale
        generator = TransposedConvGenerator(
            (2, 1, 1),
            (16, 1),
            5,
            3,
            activation,  # type: ignore[arg-type]
            law,  # type: ignore[arg-type]
            generator=rng,
            weight_std=std,
        ).double()
        z_true = torch.tensor([0.8, -0.6] if law != "uniform" else [-0.8, -0.6], dtype=torch.float64).view(1, 2, 1, 1)
        mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
        title = f"({'abcdef'[index]}) {activation}, {law.replace('_', ' ')} weights"
        landscapes.append(loss_landscape(generator, z_true, mask, resolution=resolution, title=title))
        found = negative_multiple(generator, z_true, mask)
        stationary[title] = {
            "rho": found.rho if found.interior else None,
            "loss": found.loss,
            "loss_at_zero": found.loss_at_zero,
            "gradient_norm": found.gradient_norm,
            "descent_from_there_reaches_z_true": found.escapes,
        }
    figure = plot_landscapes(landscapes, output_dir / "landscapes.png")
    flat = {landscape.title: (landscape.loss <= 1e-12).double().mean().item() for landscape in landscapes}
    return {"figure": str(figure), "fraction_of_grid_with_zero_loss": flat, "negative_multiple": stationary}


def study_phase_transition(
    output_dir: str | Path,
    rates: Sequence[float],
    kinds: Sequence[str],
    n_networks: int = 10,
    n_codes: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The phase transition of exact recovery on networks that meet Theorem 1's hypotheses
    (:func:`~invertnet.recovery.theorem_network`), by Adam; saves ``phase_transition.csv`` and
    ``phase_transition.png``. Every row says whether Theorem 4's hypotheses hold at its rate."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = phase_transition(rates, kinds, n_networks, n_codes, seed=seed, progress=progress)
    csv_path = write_phase_transition_csv(rows, output_dir / "phase_transition.csv")
    figure = plot_phase_transition(rows, output_dir / "phase_transition.png")
    table = [
        {
            "mask": row.mask,
            "rate": row.rate,
            "observed_rate": row.observed_rate,
            "probability": row.probability,
            "meets_theorem_4": row.meets_theorem_4,
        }
        for row in rows
    ]
    (output_dir / "phase_transition.json").write_text(json.dumps(table, indent=2))
    return {"csv": str(csv_path), "figure": str(figure), "rows": table}
