"""MintNet grouped layer: cost of the exact log-det, Newton inversion, and digits bits/dim after a budget.

Run from the repository root::

    .venv/bin/python benchmarks/mintnet_layer.py [--reps N] [--budget SECONDS]

Progress and tables go to stderr, one JSON object to stdout.

* Timing, at Song, Meng & Ermon's MNIST setting (one grouped layer, 1 channel at 28x28, hidden_factor 45, 3x3 kernels,
  batch 64, float32, torch's default threads): forward only; forward + exact log-det
  (``forward_and_log_det``); forward + log-det + backward of a maximum-likelihood loss. Median of ``reps``.
* Inversion of the same layer with Xavier-gain-1 weights (far from the near-identity initialisation) to a
  max-abs residual of 1e-6: the safeguarded parallel Newton of ``triangular_newton``, against the reference
  code's plain diagonal Newton with step 1 (iterations, or failure within 200), and the sequential solve of
  Theorem 1 on a 1x8x8 input (the per-coordinate cost that makes it a reference, not a sampler).
* Digits: test bits/dim of the ``mintnet_digits`` and ``digits`` (i-ResNet) configs after the same
  wall-clock budget, as in ``benchmarks/digits_density.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from invertnet.layers import MintBlock
from invertnet.solvers import sequential_solve, triangular_newton

sys.path.insert(0, str(Path(__file__).parent))
from digits_density import run_invertnet  # noqa: E402

BATCH = 64
SHAPE = (1, 28, 28)
HIDDEN_FACTOR = 45
TOLERANCE = 1e-6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_ms(run: Callable[[], object], reps: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timings(reps: int) -> dict:
    torch.manual_seed(0)
    block = MintBlock(SHAPE[0], HIDDEN_FACTOR)
    x = torch.randn(BATCH, *SHAPE)

    def forward() -> None:
        with torch.no_grad():
            block(x)

    def forward_log_det() -> None:
        with torch.no_grad():
            block.forward_and_log_det(x)

    def training_step() -> None:
        block.zero_grad(set_to_none=True)
        y, log_det = block.forward_and_log_det(x)
        (0.5 * y.pow(2).flatten(1).sum(1) - log_det).mean().backward()

    figures = {
        "forward_ms": median_ms(forward, reps),
        "forward_log_det_ms": median_ms(forward_log_det, reps),
        "forward_log_det_backward_ms": median_ms(training_step, reps),
    }
    figures["log_det_overhead"] = figures["forward_log_det_ms"] / figures["forward_ms"]
    return figures


def plain_newton_iterations(layer: torch.nn.Module, y: torch.Tensor, max_iter: int = 200) -> int | None:
    """The reference code's inverse: x <- x - (r(x) - y) / diag, step 1; iterations to tolerance or None."""
    x = y.clone()
    with torch.no_grad():
        for iteration in range(1, max_iter + 1):
            value, diagonal = layer.map_and_diagonal(x)
            residual = value - y
            if not torch.isfinite(residual).all():
                return None
            if bool((residual.abs() <= TOLERANCE * (1 + y.abs())).all()):  # the same test as triangular_newton
                return iteration
            x = x - residual / diagonal
    return None


def inversion() -> dict:
    torch.manual_seed(0)
    block = MintBlock(SHAPE[0], HIDDEN_FACTOR, init_gain=1.0)
    x = torch.randn(BATCH, *SHAPE)
    figures: dict = {}
    with torch.no_grad():
        z = block(x)
        start = time.perf_counter()
        record = block.inverse_result(z, atol=TOLERANCE, rtol=TOLERANCE)
        figures["newton_seconds"] = time.perf_counter() - start
    figures["newton_iterations_per_layer"] = [part.iterations for part in record.parts]
    figures["newton_status"] = record.status.name.lower()
    figures["reconstruction_max_abs_error"] = (record.value - x).abs().max().item()
    upper, lower = block[1], block[0]
    with torch.no_grad():
        y_lower = lower(x)
    figures["plain_newton_iterations_lower_layer"] = plain_newton_iterations(lower, y_lower)
    figures["plain_newton_iterations_upper_layer"] = plain_newton_iterations(upper, z)

    small = MintBlock(1, 8, init_gain=1.0)[0]
    with torch.no_grad():
        y_small = small(torch.randn(8, 1, 8, 8))
        start = time.perf_counter()
        exact = sequential_solve(small.map_and_diagonal, y_small, small.t, atol=TOLERANCE, rtol=TOLERANCE)
        figures["sequential_1x8x8_seconds"] = time.perf_counter() - start
        figures["sequential_1x8x8_evaluations"] = exact.iterations
        start = time.perf_counter()
        fast = triangular_newton(small.map_and_diagonal, y_small, small.t, atol=TOLERANCE, rtol=TOLERANCE)
        figures["newton_1x8x8_seconds"] = time.perf_counter() - start
        figures["newton_1x8x8_evaluations"] = fast.iterations
        figures["newton_vs_sequential_max_abs_difference"] = (fast.value - exact.value).abs().max().item()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per digits model (0: skip)")
    arguments = parser.parse_args()
    log(f"timing a grouped layer at {SHAPE}, hidden_factor {HIDDEN_FACTOR}, batch {BATCH} ...")
    output: dict = {"threads": torch.get_num_threads(), "timing": timings(arguments.reps)}
    for name, value in output["timing"].items():
        log(f"  {name:<30} {value:8.2f}")
    log("inverting ...")
    output["inversion"] = inversion()
    for name, value in output["inversion"].items():
        log(f"  {name:<42} {value}")
    if arguments.budget > 0:
        output["digits"] = [
            {"config": name, **run_invertnet(arguments.budget, name)} for name in ("mintnet_digits", "digits")
        ]
        for row in output["digits"]:
            log(
                f"  {row['config']:<16} {row['parameters']:>8} params {row['steps']:>6} steps "
                f"{row['test_bits_per_dim']:.4f} +- {row['standard_error']:.4f} bits/dim"
            )
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
