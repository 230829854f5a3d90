"""How much of a uniformly dequantised flow's test bits/dim is the slack of its bound, on the digits.

Run from the repository root::

    .venv/bin/python benchmarks/dequantization_gap.py [--steps 1500] [--lr 3e-3] [--batch 64] [--draws 64]

Trains the settings grid's dense i-ResNet flow (``digits_density.py``'s ``invertnet-dense`` at the margin 0.003)
with plain Adam for ``--steps`` steps, tests it exactly (refined norms, exact log-dets) and prints, per test image
averaged, two figures from the same ``--draws`` uniform draws u_1..u_K of the noise:

* the bound the benchmarks report, -mean_k log p(x + u_k) / (64 ln 2);
* the importance-weighted estimate -log(mean_k p(x + u_k)) / (64 ln 2) (Burda et al. 2016's bound with the
  uniform proposal), which is lower and tends to the model's discrete bits/dim as K grows.

Their difference is a lower bound (in expectation) on the slack of the uniform bound: what a learned dequantiser
(``VariationalDequantization``, Ho et al. 2019) can recover without changing p. One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import digits_density
import torch
from flowbench import batches, exact_evaluation, log


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    split = digits_density.digits_split()
    flow = digits_density.dense(digits_density.DENSE_HIDDEN, 0.003)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    stream = batches(split.train, args.batch, args.seed)
    flow.train()
    for step in range(1, args.steps + 1):
        loss = flow.bits_per_dim(next(stream)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            log(f"step {step}: training bits/dim {loss.item():.4f}")
    flow.eval()
    exact_evaluation(flow)
    with torch.no_grad():
        bits = torch.stack([flow.bits_per_dim(split.test).double() for _ in range(args.draws)])  # (K, N)
    nats = bits * digits_density.DIM * math.log(2)
    importance_weighted = -(torch.logsumexp(-nats, 0) - math.log(args.draws)) / (digits_density.DIM * math.log(2))
    result = {
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "draws": args.draws,
        "uniform_bound_bits_per_dim": bits.mean().item(),
        "importance_weighted_bits_per_dim": importance_weighted.mean().item(),
        "gap_bits_per_dim": (bits.mean(0) - importance_weighted).mean().item(),
    }
    log(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
    print()
