"""Density estimation on scikit-learn's 8x8 digits: invertnet's flows against zuko, normflows and nflows.

Run from the repository root::

    .venv/bin/python benchmarks/digits_density.py [--budget SECONDS] [--models NAME ...]
    .venv/bin/python benchmarks/digits_density.py --settings [--lr LR ...] [--batch B ...] [--budget S ...]
        [--models NAME ...] [--seed N] [--logit-alpha A ...]

Progress and tables go to stderr, one JSON object to stdout. Training time is wall-clock time of the optimiser
steps on the CPU with torch's default number of threads; evaluations are not counted.

Two modes:

* ``--settings``, the grid of standard settings nobody tuned: Adam with learning rate 1e-3 and 3e-3, batch 64
  and 128, 60 s and 120 s of training (8 settings; ``--lr``, ``--batch``, ``--budget`` replace an axis by the
  values given, e.g. ``--lr 1e-3 --batch 128 --budget 60`` for one setting). In every setting every model, the
  invertnet ones included, trains with plain Adam at the setting's learning rate and batch size (no schedule,
  no gradient clipping, no weight average), from the same seed, on the same batches in the same order; the
  validation bits/dim are evaluated at every tenth of the budget (``--checks``) and the best evaluated copy is
  tested. Models (``--models``, default all): the invertnet registry :data:`INVERTNET` (the dense i-ResNet of
  the builder's defaults at the equal architecture below, the multi-scale i-ResNet, MintNet, and the coupling
  flows ``glow_flow`` / ``realnvp_flow`` / ``spline_flow`` where this invertnet has them) and the peers
  :data:`PEERS`.
* default (no ``--settings``): invertnet's embedded configs ``digits_dense``, ``mintnet_digits`` and ``digits``
  (the ``make run`` model), each trained with its own optimiser settings (schedule held at its initial rate,
  gradient clipping, EMA) through ``Trainer.train_step`` and evaluated with its averaged weights, against the
  peers trained with Adam (lr 1e-3, batch 64); one budget (default 60 s); the final weights are tested.

Equal architecture: invertnet's ``dense_iresnet_flow((1, 8, 8), n_blocks=6, hidden_features=128, n_layers=3,
levels=17, logit_alpha=A)`` with every other argument at the builder's default, and normflows' residual flow
6 x [Residual(LipschitzMLP 64-128-128-64), ActNorm] (both ~199k parameters). Every other model takes the width
whose parameter count is closest to the dense flow's.

Data: ``load_digits`` train/test (1438/359 images), with the application's validation split (a fixed draw of
``DataConfig.validation_fraction`` = 10 % of the training images, ``RunData.with_validation``) held out of the
training data. Peers see the data flattened to 64 dimensions, dequantised as x = (levels + U[0, 1)) / 17 and
mapped by the same logit (margin A, its log-det included) as invertnet's ``UniformDequantization`` and
``Logit``; under the same seed both draw the same noise.

Logit margins (``--logit-alpha``, default 0.05): the margin is part of every model (each margin gives a density
of the same discrete data), and families prefer different ones (zuko's NSF splines act on a bounded interval that
a small margin's logit leaves). Given several, every model trains at each, the table lists every run as
``name @A``, and each model enters the comparisons and the winner at the margin its validation bits/dim choose.

Evaluation (shared by both modes, ``flowbench.run``): bits/dim with respect to the discrete data, -log p(levels + u)
/ (64 ln 2), averaged per test image over 4 dequantisation draws that are the same for every model (validation: one
draw); ``standard_error`` is over test images. invertnet: ``refine_spectral_norms``, then the exact log-det in every
i-ResNet block (``DenseExactLogDet``; brute force for convolutional branches), for the tested copy and for every
validated one, so the checkpoint chosen is the model tested (the refinement certifies the norms and so changes the
map); the multi-scale i-ResNet alone is validated without it (its 36 convolutions take minutes to refine); MintNet
and coupling flows are exact by construction. zuko, nflows, normflows RealNVP and Glow: their own (exact)
``log_prob``. normflows' residual flow: power iterations to convergence, then its own eval-mode estimator, a
Russian-roulette power series with 20 exact terms and a geometric tail and one Hutchinson probe per image (Chen et
al. 2019, Eq. 6): unbiased for log p when Lip(g) < 1, so its mean test bits/dim has no bias; the probe and roulette
noise enter its per-image variance, hence its standard error. Per setting: the winner (lowest test bits/dim), and
the best invertnet model against the best peer (each chosen on validation bits/dim, never on the test data), the
equal-architecture pair, and the best invertnet model against zuko NSF, as differences of per-image test bits/dim
with their paired standard error and the number of standard errors that separate them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from flowbench import (
    Budget,
    Result,
    Spec,
    Split,
    adam_step,
    batches,
    best_by_validation,
    comparisons,
    converge_lipschitz,
    guarded,
    invertnet_candidate,
    log,
    optional_invertnet_builder,
    parameter_count,
    require,
    run,
    table,
    update_lipschitz,
    verdicts,
    versions,
    width_of,
    winner,
    zuko_flow,
)
from flowbench import normflows_residual as residual_flow
from torch import Tensor, nn

from invertnet.app.config import DataConfig, load_config
from invertnet.app.kinds.base import RunData
from invertnet.app.runs import build
from invertnet.data import DIGITS_LEVELS, load_digits
from invertnet.layers import VariationalDequantization
from invertnet.models import dense_iresnet_flow, mintnet_flow, multiscale_iresnet_flow
from invertnet.training import TrainConfig, Trainer

SHAPE = (1, 8, 8)
DIM = 64
DRAWS = 4
LOGIT_ALPHA = 0.05
DENSE_BLOCKS, DENSE_HIDDEN, DENSE_LAYERS = 6, 128, 3
LEARNING_RATES = (1e-3, 3e-3)
BATCH_SIZES = (64, 128)
BUDGETS = (60.0, 120.0)
#: The default mode's peer optimiser.
PEER_LR, PEER_BATCH = 1e-3, 64
PACKAGES = ("invertnet", "torch", "zuko", "normflows", "nflows")


def bits_per_dim(model: nn.Module, levels: Tensor) -> Tensor:
    return model.bits_per_dim(levels)


# peers: densities of logit-space vectors, wrapped as densities of digit levels


class LogitSpaceDensity(nn.Module):
    """A peer's density of 64-vectors y (or of (1, 8, 8) images when ``image``) as a density of digit levels:
    y = logit(alpha + (1 - 2 alpha) (levels + u) / K), the same maps and log-dets as invertnet's flows; u uniform,
    or drawn by a ``dequantizer`` (invertnet's ``VariationalDequantization``, for the like-for-like check)."""

    def __init__(self, flow: nn.Module, alpha: float, image: bool = False, dequantizer: nn.Module | None = None):
        super().__init__()
        self.flow, self.alpha, self.image, self.dequantizer = flow, alpha, image, dequantizer

    def bits_per_dim(self, levels: Tensor) -> Tensor:
        """-log p(levels + u) / (64 ln 2) per image, for one draw of u (drawn as UniformDequantization does), or
        the variational bound's -[log p(levels + u) - log q(u | levels)] / (64 ln 2) with a dequantizer."""
        if self.dequantizer is None:
            x = ((levels + torch.rand_like(levels)) / DIGITS_LEVELS).flatten(1)
            dequantization = torch.full((len(levels),), -DIM * math.log(DIGITS_LEVELS))
        else:
            x, dequantization = self.dequantizer.forward_and_log_det(levels)
            x = x.flatten(1)
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).sum(dim=1)
        log_density = self.flow.log_prob(y.view(-1, *SHAPE) if self.image else y) + log_det
        return -(log_density + dequantization) / (DIM * math.log(2))


def checkerboard_mask() -> Tensor:
    row, column = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    return ((row + column) % 2).flatten().float()


def zuko_maf(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    return LogitSpaceDensity(zuko_flow("MAF", DIM, transforms=3, hidden_features=(width, width)), alpha)


def zuko_nsf(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    return LogitSpaceDensity(zuko_flow("NSF", DIM, bins=4, transforms=2, hidden_features=(width, width)), alpha)


def zuko_nsf_variational(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    """zuko's NSF with invertnet's variational dequantisation in place of uniform noise: the like-for-like
    check of ``invertnet-dense-variational`` (how much of its lead is the dequantisation)."""
    flow = zuko_flow("NSF", DIM, bins=4, transforms=2, hidden_features=(width, width))
    return LogitSpaceDensity(flow, alpha, dequantizer=VariationalDequantization(DIGITS_LEVELS, SHAPE))


def normflows_realnvp(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    nf = require("normflows")
    mask = checkerboard_mask()
    flows = []
    for i in range(4):
        scale = nf.nets.MLP([DIM, width, width, DIM], init_zeros=True)
        shift = nf.nets.MLP([DIM, width, width, DIM], init_zeros=True)
        flows += [nf.flows.MaskedAffineFlow(mask if i % 2 == 0 else 1 - mask, shift, scale), nf.flows.ActNorm(DIM)]
    return LogitSpaceDensity(nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM, trainable=False), flows), alpha)


def normflows_glow(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    nf = require("normflows")
    blocks = [nf.flows.GlowBlock(4, width, split_mode="channel") for _ in range(4)]
    base = nf.distributions.DiagGaussian((4, 4, 4), trainable=False)
    return LogitSpaceDensity(nf.NormalizingFlow(base, [*blocks, nf.flows.Squeeze()]), alpha, image=True)


def normflows_residual(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    return LogitSpaceDensity(residual_flow(DIM, width, DENSE_BLOCKS, DENSE_LAYERS), alpha)


def nflows_nsf(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    require("nflows")
    from nflows import distributions, flows, transforms
    from nflows.nn.nets import ResidualNet

    mask = checkerboard_mask()
    couplings = [
        transforms.PiecewiseRationalQuadraticCouplingTransform(
            mask if i % 2 == 0 else 1 - mask,
            lambda inputs, outputs: ResidualNet(inputs, outputs, hidden_features=width, num_blocks=2),
            num_bins=8,
            tails="linear",
            tail_bound=4.0,
        )
        for i in range(4)
    ]
    flow = flows.Flow(transforms.CompositeTransform(couplings), distributions.StandardNormal([DIM]))
    return LogitSpaceDensity(flow, alpha)


NORMFLOWS_RESIDUAL_ESTIMATOR = (
    "normflows' eval-mode estimator after power iterations to convergence: a Russian-roulette series (20 exact "
    "terms, geometric tail) with one Hutchinson probe (Chen et al. 2019, Eq. 6); unbiased for log p when "
    "Lip(g) < 1, so the mean has no bias; its noise is in the standard error"
)

PEERS = [
    Spec("zuko-maf", "peer", zuko_maf, "zuko MAF: 3 affine MADE transforms, 2 hidden layers"),
    Spec("zuko-nsf", "peer", zuko_nsf, "zuko NSF: 2 autoregressive RQ-spline transforms (4 bins), 2 hidden layers"),
    Spec(
        "zuko-nsf-variational",
        "check",
        zuko_nsf_variational,
        "zuko NSF as zuko-nsf, with invertnet's VariationalDequantization (a like-for-like check, not a peer's own)",
    ),
    Spec(
        "normflows-realnvp",
        "peer",
        normflows_realnvp,
        "normflows RealNVP: 4 masked affine couplings (checkerboard), s/t MLPs with 2 hidden layers, ActNorm",
    ),
    Spec(
        "normflows-glow",
        "peer",
        normflows_glow,
        "normflows Glow: squeeze to 4x4x4, 4 Glow blocks (affine coupling, 3x3-1x1-3x3 conv net, 1x1 conv, ActNorm)",
    ),
    Spec(
        "normflows-residual",
        "peer",
        normflows_residual,
        f"normflows residual flow: {DENSE_BLOCKS} x [Residual(LipschitzMLP 64-h-h-64, LipSwish before each layer, "
        "coeff 0.97), ActNorm]",
        width=DENSE_HIDDEN,
        after_step=update_lipschitz,
        prepare=converge_lipschitz,
        estimator=NORMFLOWS_RESIDUAL_ESTIMATOR,
    ),
    Spec(
        "nflows-nsf",
        "peer",
        nflows_nsf,
        "nflows NSF: 4 RQ-spline couplings (8 bins, linear tails beyond 4, checkerboard), ResidualNet of 2 blocks",
    ),
]


# invertnet: the registry of candidates, public builders only (one line per builder)


def dense(width: int, alpha: float = LOGIT_ALPHA, dequantization: str = "uniform") -> nn.Module:
    """The dense i-ResNet flow with the builder's defaults but for the shape (Behrmann et al. 2019, app. C.3)."""
    return dense_iresnet_flow(
        SHAPE,
        n_blocks=DENSE_BLOCKS,
        hidden_features=width,
        n_layers=DENSE_LAYERS,
        levels=DIGITS_LEVELS,
        logit_alpha=alpha,
        dequantization=dequantization,
    )


#: The dense flow with a learned dequantisation (Ho et al. 2019, section 3.1); the registry narrows it to the
#: parameters of the equal-architecture one (its conditioner, 64-64-128, adds 12.5k).
dense_variational = functools.partial(dense, dequantization="variational")


def multiscale(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    """The multi-scale i-ResNet at the builder's 3 scales, 4 blocks each (3 scales cost 2.6x fewer multiply-adds
    per image than 2 at the same parameter count, since the wide layers act on 4x4 and 2x2 maps)."""
    return multiscale_iresnet_flow(SHAPE, n_blocks=4, hidden_channels=width, levels=DIGITS_LEVELS, logit_alpha=alpha)


def mintnet(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
    return mintnet_flow(SHAPE, n_blocks=4, hidden_factor=width, n_squeezes=1, levels=DIGITS_LEVELS, logit_alpha=alpha)


def coupling(builder: str) -> Callable[..., nn.Module]:
    """A coupling-flow builder of ``invertnet.models`` on the digits, if this invertnet has it."""

    def build_coupling(width: int, alpha: float = LOGIT_ALPHA) -> nn.Module:
        factory = optional_invertnet_builder(builder)
        return factory(SHAPE, hidden=width, levels=DIGITS_LEVELS, logit_alpha=alpha)

    return build_coupling


INVERTNET = [
    invertnet_candidate(
        "invertnet-dense",
        dense,
        f"dense_iresnet_flow: {DENSE_BLOCKS} x [ActNorm, i-ResNet block (LipschitzMLP 64-h-h-64)], builder defaults",
        width=DENSE_HIDDEN,
    ),
    invertnet_candidate(
        "invertnet-dense-variational",
        dense_variational,
        f"dense_iresnet_flow: {DENSE_BLOCKS} x [ActNorm, i-ResNet block (LipschitzMLP 64-h-h-64)], "
        "dequantization='variational'",
    ),
    invertnet_candidate(
        "invertnet-multiscale",
        multiscale,
        "multiscale_iresnet_flow: 3 scales x 4 blocks, builder defaults",
        refined_validation=False,
    ),
    invertnet_candidate("invertnet-mintnet", mintnet, "mintnet_flow: 4 grouped layers, 1 squeeze, builder defaults"),
    invertnet_candidate("invertnet-glow", coupling("glow_flow"), "glow_flow, builder defaults"),
    invertnet_candidate("invertnet-realnvp", coupling("realnvp_flow"), "realnvp_flow, builder defaults"),
    invertnet_candidate(
        "invertnet-spline", coupling("spline_flow"), "spline_flow: the digits flattened, builder defaults"
    ),
]

#: The default mode's embedded configs.
CONFIGS = {
    "digits_dense": "dense i-ResNet on flattened digits, config 'digits_dense'",
    "mintnet_digits": "MintNet (grouped masked-conv layers), config 'mintnet_digits'",
    "digits": "multiscale i-ResNet, config 'digits' (make run)",
}


def digits_split() -> Split:
    """load_digits' train/test split, with the application's validation split held out of the training data."""
    data = RunData(load_digits("train")[0], load_digits("test")[0])
    data = data.with_validation(DataConfig(name="digits").validation_fraction)
    return Split(data.train, data.validation, data.test)


def target_parameters() -> int:
    """The parameter count every matched-width model is sized to: the equal-architecture dense flow's."""
    return parameter_count(dense(DENSE_HIDDEN))


def described(result: Result, architecture: str) -> dict:
    return {"model": result.spec.name, "architecture": architecture, **result.row}


# a setting of the grid


@dataclass(frozen=True)
class Setting:
    """Adam's learning rate, the batch size and the training budget: ``budget`` seconds, or ``steps`` optimiser
    steps when given (a comparison per step, independent of the machine's load)."""

    lr: float
    batch_size: int
    budget: float
    steps: int | None = None

    def label(self) -> str:
        spent = f"{self.steps} steps" if self.steps is not None else f"{self.budget:g} s"
        return f"Adam lr {self.lr:g}, batch {self.batch_size}, {spent}"

    def training_budget(self) -> Budget:
        return Budget(steps=self.steps) if self.steps is not None else Budget(seconds=self.budget)


def run_plain(spec: Spec, width: int, setting: Setting, split: Split, seed: int, checks: int) -> Result:
    """Build the model at ``width`` from ``seed`` and train it with the setting's plain Adam."""
    torch.manual_seed(seed)
    model = spec.build(width)
    step = adam_step(model, spec, bits_per_dim, batches(split.train, setting.batch_size, seed), setting.lr)
    return run(spec, model, step, setting.training_budget(), split, bits_per_dim, checks=checks, draws=DRAWS)


#: One model's runs, each with its logit margin (``None``: the model's own, an embedded config's).
Runs = list[tuple[Result, float | None]]


def at_margin(spec: Spec, alpha: float, label: bool) -> Spec:
    """The model with the logit margin ``alpha``, named ``name @alpha`` when several margins run."""
    name = f"{spec.name} @{alpha:g}" if label else spec.name
    return dataclasses.replace(spec, name=name, build=functools.partial(spec.build, alpha=alpha))


def at_margins(spec: Spec, margins: list[float], run_one: Callable[[Spec], Result]) -> Runs:
    """The model trained and tested at every margin."""
    runs = [(at_margin(spec, alpha, len(margins) > 1), alpha) for alpha in margins]
    return [(guarded(run, lambda run=run: run_one(run)), alpha) for run, alpha in runs]


def chosen_margin(name: str, runs: Runs) -> tuple[Result, float | None]:
    """The run with the lowest validation bits/dim (the test data choose nothing), under the model's name."""
    best, alpha = min(runs, key=lambda pair: pair[0].validation)
    return dataclasses.replace(best, spec=dataclasses.replace(best.spec, name=name)), alpha


def named_pairs(results: list[Result]) -> list[tuple[str, str, str]]:
    pairs = [("equal architecture", "invertnet-dense", "normflows-residual")]
    best = best_by_validation(results, "invertnet")
    if best is not None:
        pairs.append(("best invertnet (chosen on validation) vs zuko NSF", best.spec.name, "zuko-nsf"))
    like_for_like = ("invertnet-dense-variational", "zuko-nsf-variational")
    pairs.append(("like for like, both variationally dequantised", *like_for_like))
    return pairs


def report(groups: dict[str, Runs], architectures: dict[str, str], title: str) -> dict:
    """Log the table and verdicts; the JSON part of one setting. ``groups`` holds every model's runs; each model
    enters the comparisons at its margin chosen on validation."""
    everything = [result for runs in groups.values() for result, _ in runs]
    picks = {name: chosen_margin(name, runs) for name, runs in groups.items()}
    chosen = [result for result, _ in picks.values()]
    found = comparisons(chosen, named_pairs(chosen))
    best = winner(chosen)
    won = f"winner: {best['model']}, {best['test']:.4f} bits/dim" if best else "winner: none (no model was tested)"
    margins = {name: alpha for name, (_, alpha) in picks.items() if len(groups[name]) > 1}
    picked = "".join(f"{name}: margin {alpha:g} chosen on validation\n" for name, alpha in margins.items())
    log(f"\n{title}\n{table(everything, 'test bits/dim')}\n{picked}{won}\n{verdicts(found, 'bits/dim')}\n")
    return {
        "models": [
            {**described(r, architectures.get(name, r.spec.architecture)), "logit_alpha": alpha}
            for name, runs in groups.items()
            for r, alpha in runs
        ],
        "chosen_margins": margins,
        "winner": best,
        "comparisons": found,
    }


def run_settings(
    settings: list[Setting], specs: list[Spec], margins: list[float], split: Split, seed: int, checks: int
) -> list[dict]:
    target = target_parameters()
    widths = {spec.name: width_of(spec, target) for spec in specs}
    architectures = {spec.name: f"{spec.architecture}; width {widths[spec.name]}" for spec in specs}
    reports = []
    for setting in settings:
        log(f"== {setting.label()}")
        groups = {}
        for spec in specs:

            def one(run: Spec, width: int = widths[spec.name], setting: Setting = setting) -> Result:
                return run_plain(run, width, setting, split, seed, checks)

            groups[spec.name] = at_margins(spec, margins, one)
        spent = {"budget_steps": setting.steps} if setting.steps is not None else {"budget_seconds": setting.budget}
        entry = {"lr": setting.lr, "batch_size": setting.batch_size, **spent}
        reports.append({**entry, **report(groups, architectures, setting.label())})
    return reports


# the default mode: embedded configs on their own recipes


def config_spec(name: str) -> Spec:
    return invertnet_candidate(name, lambda _width: build(load_config(name))[1], CONFIGS[name], width=0)


def run_config(spec: Spec, budget: float, split: Split) -> Result:
    """Train an embedded config with its own optimiser settings for ``budget`` seconds; test its averaged weights."""
    config = load_config(spec.name)
    torch.manual_seed(config.train.seed)
    flow = spec.build(0)
    settings = TrainConfig(**{**config.train.model_dump(), "steps": 10**9})  # the schedule stays at its start
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(flow, split.train, settings, run_dir, progress=False)
        return run(
            spec,
            flow,
            trainer.train_step,
            Budget(seconds=budget),
            split,
            bits_per_dim,
            checks=1,
            draws=DRAWS,
            before_validation=trainer.ema_weights,
        )


def run_configs(names: list[str], margins: list[float], budget: float, split: Split, seed: int) -> dict:
    """The embedded configs on their own recipes (and margins); the peers at every margin."""
    target = target_parameters()
    groups: dict[str, Runs] = {}
    architectures: dict[str, str] = {}
    for name in names:
        if name in CONFIGS:
            spec = config_spec(name)
            groups[name] = [(guarded(spec, lambda spec=spec: run_config(spec, budget, split)), None)]
            continue
        spec = next(peer for peer in PEERS if peer.name == name)
        width = width_of(spec, target)
        architectures[name] = f"{spec.architecture}; width {width}"

        def peer_run(run: Spec, width: int = width) -> Result:
            return run_plain(run, width, Setting(PEER_LR, PEER_BATCH, budget), split, seed, checks=1)

        groups[name] = at_margins(spec, margins, peer_run)
    return {"budget_seconds": budget, **report(groups, architectures, f"embedded configs, {budget:g} s")}


# command line


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", action="store_true", help="run the grid of standard settings")
    parser.add_argument("--lr", type=float, nargs="+", help=f"--settings: learning rates (default {LEARNING_RATES})")
    parser.add_argument("--batch", type=int, nargs="+", help=f"--settings: batch sizes (default {BATCH_SIZES})")
    parser.add_argument(
        "--budget", type=float, nargs="+", help=f"training seconds per model (default 60; --settings: {BUDGETS})"
    )
    parser.add_argument("--models", nargs="+", help="models to run (default: all of the mode)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model's initialisation and batch order")
    parser.add_argument("--checks", type=int, help="--settings: validation evaluations per run (default 10)")
    parser.add_argument(
        "--logit-alpha",
        type=float,
        nargs="+",
        default=[LOGIT_ALPHA],
        help=f"margins of the logit (default {LOGIT_ALPHA}); every model runs at each and enters the comparisons "
        "at the one its validation bits/dim choose (the embedded configs keep their own)",
    )
    args = parser.parse_args(argv)
    names = [spec.name for spec in INVERTNET + PEERS] if args.settings else [*CONFIGS, *(p.name for p in PEERS)]
    unknown = sorted(set(args.models or []) - set(names))
    if unknown:
        parser.error(f"unknown models {unknown}; this mode has {names}")
    if not args.settings and (args.lr or args.batch or args.checks or (args.budget and len(args.budget) > 1)):
        parser.error("--lr, --batch, --checks and several --budget values need --settings")
    if any(value <= 0 for value in [*(args.lr or []), *(args.batch or []), *(args.budget or [])]):
        parser.error("--lr, --batch and --budget must be positive")
    if args.checks is not None and args.checks < 1:
        parser.error(f"--checks must be at least 1, got {args.checks}")
    outside = [alpha for alpha in args.logit_alpha if not 0 < alpha < 0.5]
    if outside or len(set(args.logit_alpha)) < len(args.logit_alpha):
        parser.error(f"--logit-alpha takes distinct margins in (0, 0.5), got {args.logit_alpha}")
    args.models = args.models or names
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    split = digits_split()
    common = {
        "seed": args.seed,
        "logit_alphas": args.logit_alpha,
        "threads": torch.get_num_threads(),
        "target_parameters": target_parameters(),
        "data": {**split.sizes(), "levels": DIGITS_LEVELS, "dequantisation_draws": DRAWS},
        "versions": versions(PACKAGES),
    }
    if args.settings:
        axes = (args.lr or LEARNING_RATES, args.batch or BATCH_SIZES, args.budget or BUDGETS)
        settings = [Setting(lr, batch, budget) for budget, lr, batch in itertools.product(axes[2], axes[0], axes[1])]
        standard = all(s.lr in LEARNING_RATES and s.batch_size in BATCH_SIZES and s.budget in BUDGETS for s in settings)
        specs = [spec for spec in INVERTNET + PEERS if spec.name in args.models]
        reports = run_settings(settings, specs, args.logit_alpha, split, args.seed, args.checks or 10)
        output = {"mode": "settings", "standard_settings": standard, **common, "settings": reports}
    else:
        budget = args.budget[0] if args.budget else 60.0
        output = {"mode": "configs", **common, **run_configs(args.models, args.logit_alpha, budget, split, args.seed)}
    print(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
