"""The inverse's first-order error estimate against the measured error and the rigorous bound, per flow.

Run from the repository root::

    .venv/bin/python benchmarks/inverse_error.py [--samples N] [--configs digits mnist ...]

For each embedded flow config the model is built at its data's shape (freshly initialised: one training-mode
forward pass on uniform data starts ActNorm and the power iterations, then eval mode), x is drawn from the
continuous part's input range (after dequantisation: U[0, 1)), and

* ``max_abs_error`` is max |F^{-1}(F(x)) - x| (the measured error, infinity norm over all samples);
* ``error_estimate`` is max |delta|_inf of ``invertnet.solvers.linearized_inverse_error`` (first order);
* ``error_bound`` is the largest per-sample 2-norm bound composed over the parts (Lemmas 4.5 / 4.6 of
  Behrmann et al. 2019), a bound on the 2-norm and hence on the infinity norm of the error.

One JSON line per config goes to stdout; ``ratio`` is error_estimate / max_abs_error.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from invertnet.app.config import load_config
from invertnet.core import InvertibleSequential
from invertnet.layers import UniformDequantization
from invertnet.solvers import linearized_inverse_error

#: The shape of one sample of each data set the flow configs use.
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "two_moons": (2,)}


def continuous_part(config_name: str) -> tuple[InvertibleSequential, tuple[int, ...]]:
    config = load_config(config_name)
    shape = SHAPES[config.data.name]
    levels = None if len(shape) == 1 else 256 if config.data.name != "digits" else 17
    flow = config.model.builder(shape, levels=levels, **config.model.builder_arguments())
    parts = list(flow.transform)
    if parts and isinstance(parts[0], UniformDequantization):
        parts = parts[1:]
    transform = InvertibleSequential(*parts)
    with torch.no_grad():
        transform.train()(torch.rand(64, *shape))
    return transform.eval(), shape


def measure(config_name: str, samples: int) -> dict[str, object]:
    torch.manual_seed(0)
    transform, shape = continuous_part(config_name)
    x = torch.rand(samples, *shape) if len(shape) > 1 else torch.randn(samples, *shape)
    with torch.no_grad():
        y = transform(x)
        start = time.perf_counter()
        result = transform.inverse_result(y)
        inverse_seconds = time.perf_counter() - start
        start = time.perf_counter()
        estimate = linearized_inverse_error(transform, result.value, y).abs().max().item()
        estimate_seconds = time.perf_counter() - start
    error = (result.value - x).abs().max().item()
    bound = None if result.error_bound is None else result.error_bound.max().item()
    return {
        "config": config_name,
        "shape": list(shape),
        "status": result.status.name.lower(),
        "max_abs_error": error,
        "error_estimate": estimate,
        "ratio": estimate / error if error > 0 else None,
        "error_bound": bound,
        "inverse_seconds": round(inverse_seconds, 2),
        "estimate_seconds": round(estimate_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=["two_moons", "digits_dense", "digits", "mnist", "cifar10"])
    arguments = parser.parse_args()
    for name in arguments.configs:
        print(json.dumps(measure(name, arguments.samples)), flush=True)


if __name__ == "__main__":
    main()
