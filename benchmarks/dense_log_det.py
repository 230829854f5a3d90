"""The structured exact log-det of a dense residual block against the series estimators, by dimension.

Run from the repository root::

    .venv/bin/python benchmarks/dense_log_det.py [--dims 2 16 64 128 256] [--reps 20]

For each dimension d the block is ``InvertibleResidual(LipschitzMLP(d, 256, n_layers=3, coeff=0.97))`` at batch
256 (d = 64 is the dense block of ``benchmarks/iresnet_block.py``), float32 on the CPU with torch's default
threads. A training step is forward, log-det, the loss ``(y**2).sum() / 2 - log_det.sum()`` and backward, with one
power iteration per layer; times are medians over ``--reps`` steps after 3 warm-up steps, for
``DenseExactLogDet`` (exact value and gradient), ``PowerSeriesLogDet(10)`` (biased: truncation) and
``UnbiasedLogDet()`` (Russian roulette, E[N] = 3 terms; unbiased, with probe variance) and, up to d = 64, the
brute-force ``ExactLogDet`` (d backward passes). One JSON line per d goes to stdout with ``exact_over_series`` =
DenseExactLogDet time / PowerSeriesLogDet(10) time. ``--hidden`` sets the width (256; the toy densities of
Behrmann et al. 2019 use 64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from invertnet.layers import InvertibleResidual, LipschitzMLP
from invertnet.logdet import DenseExactLogDet, ExactLogDet, PowerSeriesLogDet, UnbiasedLogDet

ESTIMATORS = {
    "dense_exact": DenseExactLogDet,
    "power_series_10": lambda: PowerSeriesLogDet(n_terms=10),
    "unbiased": UnbiasedLogDet,
    "brute_force_exact": ExactLogDet,
}
#: The brute-force Jacobian takes d backward passes: measured up to this dimension only.
BRUTE_FORCE_MAX_DIM = 64


def step_seconds(block: InvertibleResidual, x: torch.Tensor, reps: int) -> float:
    times = []
    for rep in range(reps + 3):
        start = time.perf_counter()
        y, log_det = block.forward_and_log_det(x)
        ((y**2).sum() / 2 - log_det.sum()).backward()
        if rep >= 3:
            times.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
    return statistics.median(times)


def measure(dimension: int, reps: int, hidden: int, batch: int = 256) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(batch, dimension)
    record: dict[str, object] = {"d": dimension, "hidden": hidden, "batch": batch}
    for name, make in ESTIMATORS.items():
        if name == "brute_force_exact" and dimension > BRUTE_FORCE_MAX_DIM:
            continue
        torch.manual_seed(1)
        block = InvertibleResidual(LipschitzMLP(dimension, hidden, n_layers=3, coeff=0.97), log_det=make())
        record[f"{name}_ms"] = round(1e3 * step_seconds(block.train(), x, reps), 2)
    record["exact_over_series"] = round(record["dense_exact_ms"] / record["power_series_10_ms"], 3)  # type: ignore[operator]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 128, 256])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    arguments = parser.parse_args()
    for dimension in arguments.dims:
        print(json.dumps(measure(dimension, arguments.reps, arguments.hidden)), flush=True)


if __name__ == "__main__":
    main()
