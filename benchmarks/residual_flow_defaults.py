"""The defaults study of the dense i-ResNet flow: one choice changed at a time against the builder's defaults.

Run from the repository root::

    .venv/bin/python benchmarks/residual_flow_defaults.py [--lr 1e-3] [--batch 128] [--budget 60 | --steps N]
        [--variants ...] [--logit-alpha 0.05]

Every variant is ``dense_iresnet_flow`` on the digits at the shape of the settings grid (6 blocks of
LipschitzMLP 64-128-128-64, ~199k parameters) with the builder's defaults except the one choice its name says,
trained and tested exactly as a model of ``digits_density.py --settings`` (the same plain Adam, seed, batches,
validation split, best of the validation checkpoints, refined spectral norms and exact test bits/dim), so the
figures are comparable with that grid's. ``--steps`` gives every variant the same number of optimiser steps
instead of the same seconds: a comparison per step, which a loaded machine does not distort. Progress and a
table go to stderr, one JSON object to stdout; docs/defaults.md records what it measured and which defaults
followed.

Variants:

* ``defaults``: the builder as it is.
* ``power_iterations_1`` / ``_5`` / ``_10`` / ``_32``: power-iteration steps per training step (the default is
  ``invertnet.layers.lipschitz_nets.POWER_ITERATIONS``).
* ``no_preactivation``: the branches without the activation on their input (the default applies it, thesis Eq. 4.5).
* ``lipswish``: LipSwish (Chen et al. 2019) instead of ELU.
* ``clipswish``: the concatenated LipSwish (Perugachi-Diaz et al. 2021) instead of ELU, at the hidden width whose
  parameter count is closest to the defaults' (it doubles the inputs of the layers after it).
* ``near_identity``: the last layer of every branch scaled by 0.01 at initialisation, so each block starts near
  the identity (Chen et al. 2019 start their blocks there).
* ``small_weights``: every normalised layer's raw weight scaled by 0.5 at initialisation (below the cap c, so the
  normalisation starts inactive and Adam's steps are larger relative to the weights).
* ``actnorm_after``: ActNorm after each residual block (Behrmann et al. 2019, appendix C.3) instead of before.
* ``lu_mixing``: an LU-parameterised linear layer (Kingma & Dhariwal 2018, section 3.2) before each ActNorm.
* ``coeff_0.9`` / ``coeff_0.99``: the spectral-normalisation coefficient.
* ``series_2`` / ``series_3`` / ``series_5``: the training power series' length (the default has
  ``invertnet.models.iresnet_flows.DENSE_SERIES_TERMS`` = 5 terms; ``defaults`` had 10 before that study).
* ``unbiased``: the Russian-roulette estimator (Chen et al. 2019) instead of the power series.
* ``gaussian_probes``: the power series with Gaussian Hutchinson probes instead of the default Rademacher ones (the
  default before that study; Gaussian probes add the diagonal's share 2 sum_i A_ii^2 to the variance of v^T A v).
* ``control_variate``: the power series with the control variate of its first term tr(J_g) from the factored
  Jacobian (``invertnet.logdet.trace``; the default probes every term as it is).
* ``variational``: ``dequantization="variational"``, a learned q(u | x) (Ho et al. 2019, section 3.1) instead of
  uniform noise, at the same width (its conditioner adds 12.5k parameters).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import digits_density
import torch
from flowbench import invertnet_candidate, log, matched_width, parameter_count, versions
from torch import nn

from invertnet.core import InvertibleSequential
from invertnet.data import DIGITS_LEVELS
from invertnet.layers import ActNorm, InvertibleResidual, LULinear, SpectralNormLinear
from invertnet.logdet import PowerSeriesLogDet, UnbiasedLogDet
from invertnet.models import FlowDistribution, dense_iresnet_flow
from invertnet.models.iresnet_flows import DENSE_SERIES_TERMS

BLOCKS = digits_density.DENSE_BLOCKS
LAYERS = digits_density.DENSE_LAYERS
WIDTH = digits_density.DENSE_HIDDEN
NEAR_IDENTITY_SCALE = 0.01
SMALL_WEIGHT_SCALE = 0.5


def dense(**options: object) -> Callable[..., nn.Module]:
    """The grid's dense flow with builder keywords changed (a function of the width and the logit margin)."""
    return lambda width, alpha=digits_density.LOGIT_ALPHA: dense_iresnet_flow(
        digits_density.SHAPE,
        n_blocks=BLOCKS,
        hidden_features=width,
        n_layers=LAYERS,
        levels=DIGITS_LEVELS,
        logit_alpha=alpha,
        **options,
    )


def near_identity(width: int, alpha: float = digits_density.LOGIT_ALPHA) -> nn.Module:
    """The defaults with every branch's last layer scaled down, so each block starts close to x -> x."""
    flow = dense()(width, alpha)
    with torch.no_grad():
        for block in flow.residual_blocks():
            last = [layer for layer in block.g if isinstance(layer, SpectralNormLinear)][-1]
            last.weight.mul_(NEAR_IDENTITY_SCALE)
    return flow


def small_weights(width: int, alpha: float = digits_density.LOGIT_ALPHA) -> nn.Module:
    """The defaults with every normalised layer's raw weight scaled by 0.5 at initialisation: below the cap, so
    the normalisation starts inactive, and Adam's steps (about lr per entry) are larger relative to the weights."""
    flow = dense()(width, alpha)
    with torch.no_grad():
        for layer in flow.modules():
            if isinstance(layer, SpectralNormLinear):
                layer.weight.mul_(SMALL_WEIGHT_SCALE)
    return flow


def clipswish(width: int, alpha: float = digits_density.LOGIT_ALPHA) -> nn.Module:
    """CLipSwish instead of ELU, at the width whose parameter count is closest to the defaults' at ``width``."""
    build = dense(activation="clipswish")
    return build(matched_width(build, parameter_count(dense()(width))), alpha)


def actnorm_after(width: int, alpha: float = digits_density.LOGIT_ALPHA) -> nn.Module:
    """The defaults with each ActNorm moved behind its residual block."""
    flow = dense()(width, alpha)
    parts = list(flow.transform)
    for index, part in enumerate(parts[:-1]):
        if isinstance(part, ActNorm) and isinstance(parts[index + 1], InvertibleResidual):
            parts[index], parts[index + 1] = parts[index + 1], part
    return FlowDistribution(InvertibleSequential(*parts), flow.base)


def lu_mixing(width: int, alpha: float = digits_density.LOGIT_ALPHA) -> nn.Module:
    """The defaults with an LU-parameterised linear layer before each ActNorm (Glow's mixing, dense)."""
    flow = dense()(width, alpha)
    parts: list[nn.Module] = []
    for part in flow.transform:
        if isinstance(part, ActNorm):
            parts.append(LULinear(part.channels))
        parts.append(part)
    return FlowDistribution(InvertibleSequential(*parts), flow.base)


VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "defaults": dense(),
    "power_iterations_1": dense(n_power_iterations=1),
    "power_iterations_5": dense(n_power_iterations=5),
    "power_iterations_10": dense(n_power_iterations=10),
    "power_iterations_32": dense(n_power_iterations=32),
    "no_preactivation": dense(preactivation=False),
    "lipswish": dense(activation="lipswish"),
    "clipswish": clipswish,
    "near_identity": near_identity,
    "small_weights": small_weights,
    "actnorm_after": actnorm_after,
    "lu_mixing": lu_mixing,
    "coeff_0.9": dense(coeff=0.9),
    "coeff_0.99": dense(coeff=0.99),
    "series_2": dense(log_det=PowerSeriesLogDet(2)),
    "series_3": dense(log_det=PowerSeriesLogDet(3)),
    "series_5": dense(log_det=PowerSeriesLogDet(5)),
    "unbiased": dense(log_det=UnbiasedLogDet()),
    "gaussian_probes": dense(log_det=PowerSeriesLogDet(DENSE_SERIES_TERMS, probe="gaussian")),
    "control_variate": dense(log_det=PowerSeriesLogDet(DENSE_SERIES_TERMS, control_variate=True)),
    "variational": dense(dequantization="variational"),
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per variant")
    parser.add_argument("--steps", type=int, help="train every variant for this many steps instead of --budget")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every variant's initialisation and batches")
    parser.add_argument("--checks", type=int, default=10, help="validation evaluations per run")
    parser.add_argument(
        "--logit-alpha",
        type=float,
        default=digits_density.LOGIT_ALPHA,
        help="margin of the flows' logit transform (docs/defaults.md)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.logit_alpha < 0.5:
        parser.error("--logit-alpha must lie in (0, 0.5)")
    if args.lr <= 0 or args.batch <= 0 or args.budget <= 0 or args.checks < 1 or (args.steps or 1) < 1:
        parser.error("--lr, --batch, --budget, --steps and --checks must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    names = args.variants or list(VARIANTS)
    specs = [invertnet_candidate(name, VARIANTS[name], f"dense i-ResNet, {name}", width=WIDTH) for name in names]
    setting = digits_density.Setting(args.lr, args.batch, args.budget, args.steps)
    log(f"{len(specs)} variants at {setting.label()}")
    margins = [args.logit_alpha]
    reports = digits_density.run_settings(
        [setting], specs, margins, digits_density.digits_split(), args.seed, args.checks
    )
    output = {"seed": args.seed, "threads": torch.get_num_threads(), "versions": versions(("invertnet", "torch"))}
    output.update(reports[0])
    print(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
