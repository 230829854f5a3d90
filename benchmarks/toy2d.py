"""Toy 2-D densities: invertnet's flows against zuko and normflows, beside the true density's log-likelihood.

Run from the repository root::

    .venv/bin/python benchmarks/toy2d.py [--datasets NAME ...] [--models NAME ...] [--steps 1000]
        [--lr 1e-3] [--batch 256] [--seed 0]

Progress and tables go to stderr, one JSON object to stdout.

Data sets: two moons, eight Gaussians and the checkerboard (``invertnet.data.sample_toy``): 20 000 training
points (seed 0), 2 000 validation points (seed 2) and 5 000 test points (seed 1), the same for every model.
Every model trains for ``--steps`` steps of plain Adam (default lr 1e-3, batch 256; no schedule, no clipping, no
weight average) from the same seed on the same batches; its validation log-likelihood is evaluated at every
tenth of the steps and the best evaluated copy is tested.

Models (``--models``, default all):

* ``invertnet-dense``: ``dense_iresnet_flow(2, n_blocks=8, hidden_features=64, n_layers=4)``, the toy net of
  Behrmann et al. 2019 (app. C.3: 2-64-64-64-2) at 8 blocks, every other argument at the builder's default;
* ``invertnet-glow`` / ``invertnet-realnvp`` / ``invertnet-spline``: ``glow_flow`` / ``realnvp_flow`` /
  ``spline_flow`` where this invertnet has them, at the builders' defaults but for the width of 64;
* ``zuko-nsf``, ``zuko-maf``: ``zuko.flows.NSF(2)``, ``zuko.flows.MAF(2)`` with zuko's defaults;
* ``normflows-residual``: normflows' residual flow of the same architecture as invertnet's, 8 x
  [Residual(LipschitzMLP 2-64-64-64-2), ActNorm], its Lipschitz updates after every step.

Evaluation: the exact test log-likelihood in nats per point, log p(x) averaged over the test points, with its
standard error. invertnet: ``refine_spectral_norms``, then ``DenseExactLogDet`` in every block (exact in 2-D).
zuko: its exact ``log_prob``. normflows' residual flow in eval mode computes the 2 x 2 determinant exactly. The
true density's test log-likelihood (``invertnet.data.toy_log_prob``) is the ceiling: no model's expected test
log-likelihood exceeds it. Per data set: the winner, the best invertnet model against the best peer (each chosen
on validation), the best invertnet model against zuko NSF, and every model against the true density, as
differences of per-point log-likelihoods with their paired standard errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from flowbench import (
    Budget,
    Result,
    Spec,
    Split,
    adam_step,
    batches,
    best_by_validation,
    compare,
    comparisons,
    converge_lipschitz,
    guarded,
    invertnet_candidate,
    log,
    optional_invertnet_builder,
    per_sample,
    run,
    standard_error,
    table,
    tested,
    update_lipschitz,
    verdicts,
    versions,
    winner,
    zuko_flow,
)
from flowbench import normflows_residual as residual_flow
from torch import Tensor, nn

from invertnet.data import TOY_LOG_DENSITIES, sample_toy, toy_log_prob
from invertnet.models import dense_iresnet_flow

DATASETS = ("two_moons", "eight_gaussians", "checkerboard")
N_TRAIN, N_VALIDATION, N_TEST = 20_000, 2_000, 5_000
BLOCKS, HIDDEN, LAYERS = 8, 64, 4
PACKAGES = ("invertnet", "torch", "zuko", "normflows")


def negative_log_likelihood(model: nn.Module, x: Tensor) -> Tensor:
    return -model.log_prob(x)


class TrueDensity(nn.Module):
    """The data set's true density, scored like a model."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def log_prob(self, x: Tensor) -> Tensor:
        return toy_log_prob(self.name, x)


def coupling(builder: str) -> nn.Module:
    return optional_invertnet_builder(builder)(2, hidden=HIDDEN)


MODELS = [
    invertnet_candidate(
        "invertnet-dense",
        lambda width: dense_iresnet_flow(2, n_blocks=BLOCKS, hidden_features=width, n_layers=LAYERS),
        f"dense_iresnet_flow: {BLOCKS} x [ActNorm, i-ResNet block (LipschitzMLP 2-64-64-64-2)], builder defaults",
        width=HIDDEN,
    ),
    invertnet_candidate("invertnet-glow", lambda _: coupling("glow_flow"), "glow_flow, builder defaults", width=0),
    invertnet_candidate(
        "invertnet-realnvp", lambda _: coupling("realnvp_flow"), "realnvp_flow, builder defaults", width=0
    ),
    invertnet_candidate(
        "invertnet-spline", lambda _: coupling("spline_flow"), "spline_flow, builder defaults", width=0
    ),
    Spec("zuko-nsf", "peer", lambda _: zuko_flow("NSF", 2), "zuko.flows.NSF(2), zuko's defaults", width=0),
    Spec("zuko-maf", "peer", lambda _: zuko_flow("MAF", 2), "zuko.flows.MAF(2), zuko's defaults", width=0),
    Spec(
        "normflows-residual",
        "peer",
        lambda width: residual_flow(2, width, BLOCKS, LAYERS),
        f"normflows residual flow: {BLOCKS} x [Residual(LipschitzMLP 2-64-64-64-2, LipSwish before each layer, "
        "coeff 0.97), ActNorm]",
        width=HIDDEN,
        after_step=update_lipschitz,
        prepare=converge_lipschitz,
        estimator="exact: normflows' eval mode takes the 2 x 2 determinant",
    ),
]


def toy_split(name: str) -> Split:
    return Split(
        sample_toy(name, N_TRAIN, seed=0), sample_toy(name, N_VALIDATION, seed=2), sample_toy(name, N_TEST, seed=1)
    )


def run_model(spec: Spec, split: Split, args: argparse.Namespace) -> Result:
    torch.manual_seed(args.seed)
    model = spec.build(spec.width)
    stream = batches(split.train, args.batch, args.seed)
    step = adam_step(model, spec, negative_log_likelihood, stream, args.lr)
    budget = Budget(steps=args.steps)
    return run(spec, model, step, budget, split, negative_log_likelihood, checks=args.checks, draws=1)


def as_log_likelihood(result: Result) -> dict:
    """The report row in log-likelihood (nats per point, higher is better) instead of the loss."""
    row = dict(result.row)
    for key in ("best_validation", "test"):
        if key in row:
            row[key] = -row[key]
    for record in row.get("validations", []):
        record["validation"] = -record["validation"]
    return {"model": result.spec.name, "architecture": result.spec.architecture, **row}


def run_dataset(name: str, specs: list[Spec], args: argparse.Namespace) -> dict:
    split = toy_split(name)
    truth = Result(Spec("true density", "truth", lambda _: TrueDensity(name), "the data set's true density"), {})
    truth.test = per_sample(negative_log_likelihood, TrueDensity(name), split.test, draws=1)
    truth.row = {"test": truth.test.mean().item(), "standard_error": standard_error(truth.test)}
    results = [guarded(spec, lambda spec=spec: run_model(spec, split, args)) for spec in specs]
    pairs = []
    best = best_by_validation(results, "invertnet")
    if best is not None:
        pairs.append(("best invertnet (chosen on validation) vs zuko NSF", best.spec.name, "zuko-nsf"))
    found = comparisons(results, pairs) + [compare("against the true density", r, truth) for r in tested(results)]
    for entry in found:  # as log-likelihood differences: a - b in log p, higher is better
        entry["difference"] = -entry["difference"]
    ceiling = -truth.row["test"]
    log(f"\n{name} (true density: test log-likelihood {ceiling:.4f} +- {truth.row['standard_error']:.4f})")
    best_test = winner(results)
    if best_test is not None:
        best_test["test"] = -best_test["test"]
    won = f"winner: {best_test['model']}, {best_test['test']:.4f} nats" if best_test else "winner: none"
    log(f"{table(results, 'test log p', sign=-1.0)}\n{won}\n{verdicts(found, 'nats (log-likelihood)')}\n")
    return {
        "dataset": name,
        "true_test_log_likelihood": ceiling,
        "true_standard_error": truth.row["standard_error"],
        "models": [as_log_likelihood(r) for r in results],
        "winner": best_test,
        "comparisons": found,
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=sorted(TOY_LOG_DENSITIES))
    parser.add_argument("--models", nargs="+", default=[spec.name for spec in MODELS], choices=[s.name for s in MODELS])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model's initialisation and batch order")
    parser.add_argument("--checks", type=int, default=10, help="validation evaluations per run")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.lr <= 0 or args.checks < 1:
        parser.error("--steps, --batch, --checks and --lr must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    specs = [spec for spec in MODELS if spec.name in args.models]
    output = {
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "data": {"train": N_TRAIN, "validation": N_VALIDATION, "test": N_TEST},
        "versions": versions(PACKAGES),
        "datasets": [run_dataset(name, specs, args) for name in args.datasets],
    }
    print(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
