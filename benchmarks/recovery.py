"""Latent recovery (Ma, Ayaz & Karaman 2018): throughput of batched recovery, Adam vs gradient descent, success
per mask kind.

Run from the repository root::

    .venv/bin/python benchmarks/recovery.py

Progress and tables go to stderr, one JSON object to stdout. The generator is the expansive 2-layer ReLU
network of Theorem 1 (latent (10, 1, 1), channels (16, 1), kernel = stride = 4, 16x16 images, Gaussian
weights), in float64, with torch's default threads.

* Throughput: 256 problems (one network, random codes, a fresh 50% uniform mask each) recovered as one batch
  to relative residual 1e-7, for Adam (lr 0.1, Ma, Ayaz & Karaman's setting) and gradient descent with the adaptive
  step; against solving 16 of the same problems one at a time (the per-problem loop other code uses).
* Iterations to tolerance: median and maximum over the 256 problems (the batch stops at the slowest).
* Success at r = 0.5 for each mask kind: 10 networks x 10 codes, relative latent error < 1e-3.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from invertnet.models import TransposedConvGenerator
from invertnet.recovery import MASK_KINDS, make_mask, phase_transition, recover

BATCH = 256
SEQUENTIAL = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def theorem_generator(seed: int) -> TransposedConvGenerator:
    rng = torch.Generator().manual_seed(seed)
    return TransposedConvGenerator((10, 1, 1), (16, 1), kernel_size=4, generator=rng).double()


def first_converged(history: torch.Tensor, y_norms: torch.Tensor, rtol: float) -> list[int]:
    """Iteration at which each problem's relative residual sqrt(2 J) / |A y| first reached rtol."""
    relative = (2 * history[:, 0]).sqrt() / y_norms
    reached = relative <= rtol
    return [int(column.nonzero()[0]) + 1 if column.any() else len(history) for column in reached.T]


def throughput(method: str) -> dict:
    generator = theorem_generator(0)
    rng = torch.Generator().manual_seed(1)
    z_true = torch.randn(BATCH, 10, 1, 1, generator=rng, dtype=torch.float64)
    mask = make_mask("uniform", (16, 16), 0.5, batch=BATCH, generator=rng)
    y = generator(z_true)
    start = time.perf_counter()
    result = recover(generator, y, mask, z_true=z_true, method=method, max_iter=5000)  # type: ignore[arg-type]
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(SEQUENTIAL):
        single = make_mask("uniform", (16, 16), 0.5, generator=rng)
        recover(generator, y[index : index + 1], single, method=method, max_iter=5000)  # type: ignore[arg-type]
    sequential_seconds = time.perf_counter() - start
    iterations = first_converged(result.loss_history, mask(y).flatten(1).norm(dim=1), 1e-7)
    assert result.relative_error is not None
    return {
        "method": method,
        "problems": BATCH,
        "batched_seconds": batched_seconds,
        "batched_problems_per_second": BATCH / batched_seconds,
        "one_at_a_time_problems_per_second": SEQUENTIAL / sequential_seconds,
        "batch_iterations": result.iterations,
        "median_iterations_to_tolerance": statistics.median(iterations),
        "max_iterations_to_tolerance": max(iterations),
        "recovered_fraction": (result.relative_error < 1e-4).double().mean().item(),
    }


def main() -> None:
    output: dict = {"threads": torch.get_num_threads(), "throughput": []}
    for method in ("adam", "gd"):
        log(f"throughput, {method} ...")
        row = throughput(method)
        output["throughput"].append(row)
        log(
            f"  {method:<5} {row['batched_problems_per_second']:8.1f} problems/s batched, "
            f"{row['one_at_a_time_problems_per_second']:6.1f} one at a time; iterations median "
            f"{row['median_iterations_to_tolerance']}, max {row['max_iterations_to_tolerance']}; "
            f"recovered {row['recovered_fraction']:.3f}"
        )
    log("success at r = 0.5 per mask kind (100 trials each) ...")
    rows = phase_transition([0.5], MASK_KINDS, n_networks=10, n_codes=10)
    output["success_at_half"] = {row.mask: row.probability for row in rows}
    for row in rows:
        log(f"  {row.mask:<8} observed {row.observed_rate:.3f}  P(exact) {row.probability:.2f}")
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
