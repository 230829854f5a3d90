"""Time a training step of the digits grid's dense i-ResNet flow, with and without batched spectral normalisation.

Run from the repository root::

    .venv/bin/python benchmarks/dense_flow_step.py [--batch 64 128] [--rounds 5] [--steps 20]

The flow is the equal-architecture model of ``digits_density.py --settings`` (its ``invertnet-dense``:
``dense_iresnet_flow((1, 8, 8), n_blocks=6, hidden_features=128, n_layers=3, levels=17)``, builder defaults
otherwise) on random digit levels; a step is the grid's own (``flowbench.adam_step``: the mean bits/dim of a
batch, backward and one plain Adam step). Two variants alternate round by round in one process, so a machine whose
speed drifts affects both alike:

* ``grouped``: as the library runs (``FlowDistribution.log_prob`` normalises each group of same-shaped
  ``SpectralNormLinear`` layers in batched operations, ``invertnet.layers.spectral_groups``);
* ``per_layer``: every layer takes its own power steps and normalisation (grouping switched off).

Reported per batch size: milliseconds per step, the minimum and the median over the rounds (``--rounds`` rounds of
``--steps`` steps after ``--warmup`` steps). One JSON object to stdout. CPU, float32, torch's default threads.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from unittest import mock

import torch
from digits_density import INVERTNET, SHAPE, bits_per_dim
from flowbench import adam_step

import invertnet.models.flows as flows_module
from invertnet.data import DIGITS_LEVELS

#: The grid's ``invertnet-dense`` model, built and trained as ``digits_density.py --settings`` does.
DENSE = next(spec for spec in INVERTNET if spec.name == "invertnet-dense")
VARIANTS = ("grouped", "per_layer")


def training_step(batch: int, seed: int) -> Callable[[], float]:
    """The grid's Adam step (``flowbench.adam_step``) of its dense flow on a fixed batch of random levels."""
    torch.manual_seed(seed)
    flow = DENSE.build(DENSE.width)
    levels = torch.randint(0, DIGITS_LEVELS, (batch, *SHAPE)).float()
    return adam_step(flow, DENSE, bits_per_dim, itertools.repeat(levels), lr=1e-3)


def time_round(step: Callable[[], float], variant: str, steps: int) -> float:
    """Milliseconds per step over ``steps`` steps of one variant."""
    ungrouped = mock.patch.object(flows_module, "normalize_together", lambda module: [])
    with ungrouped if variant == "per_layer" else contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps * 1e3


def measure(batch: int, rounds: int, steps: int, warmup: int, seed: int) -> dict:
    """Alternate the variants round by round on one flow each (the same seed and batch)."""
    runs = {variant: training_step(batch, seed) for variant in VARIANTS}
    for variant in VARIANTS:
        if warmup:
            time_round(runs[variant], variant, warmup)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            times[variant].append(time_round(runs[variant], variant, steps))
    return {
        variant: {"min_ms": round(min(values), 3), "median_ms": round(statistics.median(values), 3)}
        for variant, values in times.items()
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128], help="batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per variant first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flows and the batch")
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch, --rounds and --steps must be positive and --warmup non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    results = {str(batch): measure(batch, args.rounds, args.steps, args.warmup, args.seed) for batch in args.batch}
    for batch, result in results.items():
        speedup = result["per_layer"]["min_ms"] / result["grouped"]["min_ms"]
        result["per_layer_over_grouped"] = round(speedup, 3)
        print(f"batch {batch}: {result}", file=sys.stderr)
    output = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batches": results}
    print(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
