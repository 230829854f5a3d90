"""Benchmark implicit differentiation (the formalML IFT tutorial, Theorem 3) against backpropagation through the
iterations, and Newton against fixed-point iteration for inverses.

Run from the repository root::

    .venv/bin/python benchmarks/implicit_gradients.py           # full run
    .venv/bin/python benchmarks/implicit_gradients.py --quick   # fewer tolerances and repetitions

Prints markdown tables to stderr and one JSON object to stdout. CPU, float32 unless stated, torch's default
number of threads; times are medians over repetitions after one warm-up.

1. Backward through an i-ResNet inverse x = F^{-1}(y) with loss sum(x * t), in float64 so that tolerances
   down to 1e-10 are meaningful: a conv block ``LipschitzConvNet(4, 64, kernel_sizes=(3, 1, 3), coeff=0.97)``
   on 4x14x14 (a squeezed 1x28x28 image; weights scaled up and spectral norms refined, so every layer sits
   at its cap), batch 64; and a DEQ layer ``DEQ(ContractiveCell(256, 64, coeff=0.9))``, batch 256, with the
   backward solve by fixed-point iteration and by GMRES. Tighter tolerances take more iterations.
   "implicit" is invertnet's gradient (forward solve without a graph, one transposed solve in backward);
   "unrolled" backpropagates through every iteration. Peak memory is the high-water mark of tensor bytes
   allocated during forward + backward and not yet freed (``torch.profiler`` allocation events).
2. Inverting dense i-ResNet blocks ``LipschitzMLP(64, 256, n_layers=3 or 1, coeff=0.97)`` (weights at their
   caps; with one layer g is linear and contracts at exactly 0.97), batch 256, float64, to a residual of
   1e-10: fixed-point iteration, Anderson, Newton with dense Jacobians and Newton-Krylov; Newton steps,
   calls of g (a vmapped batch of Jacobian-vector products is one call), time after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from invertnet.layers import (
    DEQ,
    ContractiveCell,
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    refine_spectral_norms,
)
from invertnet.solvers import fixed_point, newton


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _walk(events: list) -> list:
    stack, found = list(events), []
    while stack:
        event = stack.pop()
        found.append(event)
        stack.extend(event.children)
    return found


def peak_mb(step: Callable[[], None]) -> float:
    """High-water mark (MiB) of the bytes of tensors allocated during ``step()`` and not yet freed."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = [
        event
        for event in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if event.tag == torch._C._profiler._EventType.Allocation
    ]
    level = peak = 0
    for event in sorted(allocations, key=lambda event: event.start_time_ns):
        level += event.extra_fields.alloc_size
        peak = max(peak, level)
    return peak / 2**20


def median_ms(step: Callable[[], object], reps: int) -> float:
    step()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(seconds), 2)


def unrolled_fixed_point(image: Callable[[Tensor], Tensor], start: Tensor, atol: float) -> tuple[Tensor, int]:
    """x <- image(x) with autograd recording every iteration, until every sample's step is within atol."""
    x, iterations = start, 0
    while True:
        new = image(x)
        iterations += 1
        step = torch.linalg.vector_norm((new - x).flatten(1), dim=1)
        x = new
        if bool((step <= atol).all()) or iterations >= 2000:
            return x, iterations


def saturated(block: InvertibleResidual, x: Tensor) -> InvertibleResidual:
    """The block with its weights scaled up 3x and spectral norms refined: every layer at its cap."""
    block(x)
    with torch.no_grad():
        for parameter in block.g.parameters():
            parameter.mul_(3.0)
    refine_spectral_norms(block)
    return block.eval()


Step = Callable[[], None]


def inverse_case(block: InvertibleResidual, y: Tensor, atol: float) -> tuple[int, Step, Step]:
    """(forward iterations, implicit step, unrolled step) for a loss on x = F^{-1}(y)."""
    target = torch.randn_like(y)
    leaf = y.clone().requires_grad_(True)
    iterations = block.inverse_result(y, atol=atol, rtol=0.0, max_iter=5000).iterations

    def implicit() -> None:
        (block.inverse(leaf, atol=atol, rtol=0.0, max_iter=5000) * target).sum().backward()

    def unrolled() -> None:
        x, _ = unrolled_fixed_point(lambda x: leaf - block.g(x), leaf, atol)
        (x * target).sum().backward()

    return iterations, implicit, unrolled


def deq_case(cell: ContractiveCell, x: Tensor, atol: float, backward: str) -> tuple[int, Step, Step]:
    """(forward iterations, implicit step, unrolled step) for a loss on the DEQ output z*(x)."""
    leaf = x.clone().requires_grad_(True)
    deq = DEQ(cell, method="iteration", backward=backward, atol=atol, rtol=0.0).eval()  # type: ignore[arg-type]
    target = deq(x).detach().normal_()
    iterations = deq.last_result.iterations  # type: ignore[union-attr]

    def implicit() -> None:
        (deq(leaf) * target).sum().backward()

    def unrolled() -> None:
        z, _ = unrolled_fixed_point(lambda z: cell(z, leaf), torch.zeros_like(target), atol)
        (z * target).sum().backward()

    return iterations, implicit, unrolled


def backward_memory(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    y = torch.randn(64, 4, 14, 14, dtype=torch.float64)
    block = saturated(InvertibleResidual(LipschitzConvNet(4, 64, kernel_sizes=(3, 1, 3), coeff=0.97)).double(), y)
    cell = ContractiveCell(256, 64, coeff=0.9).double()
    x = torch.randn(256, 64, dtype=torch.float64)
    tolerances = [1e-2, 1e-6] if quick else [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
    reps = 1 if quick else 3
    builders: dict[str, Callable[[float], tuple[int, Step, Step]]] = {
        "i-ResNet inverse": lambda atol: inverse_case(block, y, atol),
        "DEQ, backward iteration": lambda atol: deq_case(cell, x, atol, "iteration"),
        "DEQ, backward GMRES": lambda atol: deq_case(cell, x, atol, "gmres"),
    }
    rows = []
    for name, build in builders.items():
        for atol in tolerances:
            iterations, implicit, unrolled = build(atol)
            record = {"model": name, "atol": atol, "iterations": iterations}
            for label, step in (("implicit", implicit), ("unrolled", unrolled)):
                record[f"{label}_peak_mb"] = round(peak_mb(step), 2)
                record[f"{label}_ms"] = median_ms(step, reps)
            log(
                f"| {name} | {atol:g} | {iterations} | {record['implicit_peak_mb']} | {record['unrolled_peak_mb']} "
                f"| {record['implicit_ms']} | {record['unrolled_ms']} |"
            )
            rows.append(record)
    return rows


def inverse_solvers() -> list[dict]:
    rows = []
    for name, layers in (("dense, 3 layers", 3), ("dense, linear (contraction exactly 0.97)", 1)):
        torch.manual_seed(0)
        x = torch.randn(256, 64, dtype=torch.float64)
        block = saturated(InvertibleResidual(LipschitzMLP(64, 256, n_layers=layers, coeff=0.97)).double(), x)
        rows += solver_rows(name, block, x)
    return rows


def solver_rows(name: str, block: InvertibleResidual, x: Tensor) -> list[dict]:
    with torch.no_grad():
        y = block(x)
    calls = {"g": 0}
    block.g.register_forward_hook(lambda *_: calls.__setitem__("g", calls["g"] + 1))
    solvers: dict[str, Callable[[], object]] = {
        "fixed point": lambda: fixed_point(lambda v: y - block.g(v), y, atol=1e-10, rtol=0.0, max_iter=5000),
        "anderson": lambda: fixed_point(
            lambda v: y - block.g(v), y, atol=1e-10, rtol=0.0, max_iter=5000, method="anderson"
        ),
        "newton (dense)": lambda: newton(block, y, y, jacobian="dense", atol=1e-10, rtol=0.0),
        "newton-krylov": lambda: newton(block, y, y, jacobian="krylov", atol=1e-10, rtol=0.0),
    }
    rows = []
    for solver, solve in solvers.items():
        with torch.no_grad():
            solve()  # warm-up (the first forward-mode product compiles torch's decompositions)
        calls["g"] = 0
        start = time.perf_counter()
        with torch.no_grad():
            result = solve()
        seconds = time.perf_counter() - start
        record = {
            "block": name,
            "solver": solver,
            "iterations": result.iterations,  # type: ignore[attr-defined]
            "g_calls": calls["g"],
            "seconds": round(seconds, 3),
            "max_abs_error": (result.value - x).abs().max().item(),  # type: ignore[attr-defined]
            "status": result.status.name.lower(),  # type: ignore[attr-defined]
        }
        log(
            f"| {name} | {solver} | {record['iterations']} | {record['g_calls']} | {record['seconds']} "
            f"| {record['max_abs_error']:.1e} | {record['status']} |"
        )
        rows.append(record)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tolerances and repetitions")
    quick = parser.parse_args().quick
    log("| model | atol | iterations | implicit peak MiB | unrolled peak MiB | implicit ms | unrolled ms |")
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    memory = backward_memory(quick)
    log("\n| block | solver | iterations | calls of g | seconds | max-abs error | status |")
    log("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    solvers = inverse_solvers()
    print(json.dumps({"backward_memory": memory, "inverse_solvers": solvers}, indent=2))


if __name__ == "__main__":
    main()
