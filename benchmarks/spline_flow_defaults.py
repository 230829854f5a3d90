"""The study behind ``spline_flow``'s defaults: variants of the builder on the toy 2-D densities.

Run from the repository root::

    .venv/bin/python benchmarks/spline_flow_defaults.py [--variants NAME ...] [--datasets NAME ...]
        [--steps 1000] [--lr 1e-3] [--batch 256] [--seed 0] [--nsf]

Every variant is ``spline_flow(2, ...)`` with the keywords of its row in :data:`VARIANTS`, trained exactly as
``benchmarks/toy2d.py`` trains its models (``--steps`` steps of plain Adam on the same batches, the best of 10
validation evaluations tested on the same 5 000 points); ``--nsf`` adds zuko's NSF at zuko's defaults. One line per
data set and variant goes to stdout: the test log-likelihood in nats per point and its standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import toy2d
from flowbench import invertnet_candidate, log

from invertnet.models import spline_flow

#: The variants of the study, as keywords of ``spline_flow(2, ...)``; ``defaults`` is the builder's.
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "steps_4_bins_8_lu": {"n_steps": 4, "bins": 8, "linear": True},
    "steps_8_bins_8_lu": {"n_steps": 8, "bins": 8, "linear": True},
    "steps_8_bins_16_lu": {"n_steps": 8, "linear": True},
    "steps_4_bins_16_lu": {"n_steps": 4, "linear": True},
    "steps_8_bins_8": {"bins": 8},
    "steps_8_bins_32": {"bins": 32},
    "steps_12": {"n_steps": 12},
    "bound_4": {"bound": 4.0},
    "hidden_128_lu": {"hidden": 128, "bins": 8, "linear": True},
    "bound_5_bins_8_lu": {"bins": 8, "bound": 5.0, "linear": True},
    "steps_6_bins_8_bound_4_lu": {"n_steps": 6, "bins": 8, "bound": 4.0, "linear": True},
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--datasets", nargs="+", default=list(toy2d.DATASETS), choices=list(toy2d.DATASETS))
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of every model's initialisation and batches")
    parser.add_argument("--nsf", action="store_true", help="also run zuko's NSF at its defaults")
    args = parser.parse_args(argv)
    if args.lr <= 0 or args.batch < 1 or args.steps < 1:
        parser.error("--steps, --lr and --batch must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    specs = [
        invertnet_candidate(name, lambda _width, options=VARIANTS[name]: spline_flow(2, **options), name, width=0)
        for name in args.variants or list(VARIANTS)
    ]
    if args.nsf:
        specs += [spec for spec in toy2d.MODELS if spec.name == "zuko-nsf"]
    training = argparse.Namespace(steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed, checks=10)
    rows = []
    for dataset in args.datasets:
        split = toy2d.toy_split(dataset)
        for spec in specs:
            log(f"{dataset}: {spec.name} ...")
            result = toy2d.run_model(spec, split, training)
            row = {"dataset": dataset, "variant": spec.name, "options": VARIANTS.get(spec.name, "zuko defaults")}
            row |= {"test_log_likelihood": -result.row["test"], "standard_error": result.row["standard_error"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
