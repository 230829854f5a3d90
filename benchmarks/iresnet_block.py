"""Benchmark one i-ResNet block: training step and inverse, and the same work through normflows and FrEIA.

Run from the repository root::

    .venv/bin/python benchmarks/iresnet_block.py           # full run
    .venv/bin/python benchmarks/iresnet_block.py --quick   # fewer repetitions

One JSON object goes to stdout, progress to stderr. Everything runs on the CPU in float32 with torch's
default number of threads; times are medians (and means) over repetitions after warm-up steps.

Blocks (coefficient 0.97 for every spectrally normalised layer):

* dense: ``LipschitzMLP(64, 256, n_layers=3)``, batch 256;
* conv: ``LipschitzConvNet(4, 64, kernel_sizes=(3, 1, 3))`` on a 1x28x28 image squeezed to 4x14x14, batch 64.

Measured:

1. training step: forward, log-det, loss ``(y**2).sum() / 2 - log_det.sum()``, backward, and one
   power iteration per normalised layer, for ``PowerSeriesLogDet(5)``, ``PowerSeriesLogDet(10)`` and
   ``UnbiasedLogDet()`` (Russian roulette, E[N] = 3 terms). The peak memory of a step is the high-water
   mark of the bytes of tensors allocated during the step and not yet freed, from the allocation events
   of ``torch.profiler`` (``profile_memory=True``); neither RSS nor tracemalloc.
2. the same step through the peers (the optional ``bench`` extra; a peer that cannot be imported is
   reported as unavailable, one that fails as an ``error``), each against an invertnet block of the same
   architecture (the "twin"); ``ratio_peer_over_invertnet`` = peer time / twin time, of medians for the
   fixed series and of means for the roulette (whose number of terms is random; ``mean_terms`` is shown):

   * normflows ``Residual(LipschitzMLP | LipschitzCNN)``: LipSwish pre-activations, so the twin is built
     with ``activation="lipswish", preactivation=True``. For the fixed series, ``n_power_series=n`` with
     their default ``reduce_memory=True`` runs invertnet's algorithm (value from n vector-Jacobian
     products, Neumann-series gradient); ``reduce_memory=False`` (backpropagation through the n products)
     is reported beside it. For the roulette, ``n_exact_terms=1`` gives the same distribution of the number
     of terms as invertnet's ``n_exact_terms=2`` (normflows' geometric draw starts at 1), with the same
     Neumann gradient; their default ``n_exact_terms=2`` (E[N] = 4) is reported beside it.
     ``brute_force=False, exact_trace=False, n_samples=1``. normflows' forward does no power iteration,
     so its step calls ``update_lipschitz(flow, 1)``.
   * FrEIA ``IResNetLayer``: ELU between layers and no pre-activation (the twin uses ``activation="elu"``);
     its convolutions are all 3x3, so the middle one is replaced by a 1x1 convolution to match 3-1-3.
     ``jacobian_iterations=n``, one Hutchinson sample, and ``lipschitz_correction()`` with one power
     iteration on one probe in the step. FrEIA's log-det is computed without a graph (no gradient reaches
     the parameters) and re-runs the residual branch for every series term: the work is *not* equivalent,
     see its ``note``; it has no unbiased estimator.
3. inversion of the invertnet blocks (eval mode, weights multiplied by 3 and ``refine_spectral_norms`` so
   every layer sits at its cap): time, ``InverseResult.iterations``, evaluations of g (a forward hook),
   reconstruction error, for ``solver="iteration"`` and ``solver="anderson"``, at ``atol=1e-6, rtol=0``
   and, because a per-sample 2-norm of 1e-6 is at float32's rounding floor for the conv block, at 1e-5.
   A solver that raises is reported with its error.
   A linear block contracting at exactly 0.97 (``dense_slow_contraction``) shows Anderson where plain
   iteration is slow.
4. the peers' inverses at their default settings on the same kind of block, also at their caps:
   evaluations of g, time (under ``torch.no_grad``) and the reconstruction error max |x - F^{-1}(F(x))|.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import invertnet
from invertnet.layers import (
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    SpectralNormConv2d,
    SpectralNormLinear,
    refine_spectral_norms,
)
from invertnet.layers.residual import LogDetEstimator
from invertnet.logdet import PowerSeriesLogDet, UnbiasedLogDet

COEFF = 0.97
WEIGHT_SCALE = 3.0
POWER_ITERATIONS = 1
"""Power-iteration steps per forward pass of both libraries' blocks (equal settings; invertnet's flows default to
5, normflows' to 5 as well)."""
KERNEL_SIZES = (3, 1, 3)
INVERSE_TOLERANCES = (1e-6, 1e-5)
UNBIASED_REP_FACTOR = 3
SETTINGS = {"power_series_5": 5, "power_series_10": 10, "unbiased": None}
# Twin architectures: (activation, preactivation) of the invertnet block that matches each peer.
TWINS = {"normflows": ("lipswish", True), "freia": ("elu", False)}
MEMORY_METHOD = (
    "peak_mb: high-water mark, over one step, of the bytes of tensors allocated by torch's CPU allocator "
    "during the step and not yet freed (running sum of the allocation events of "
    "torch.profiler(profile_memory=True); frees of tensors older than the step are not seen). "
    "Neither RSS nor tracemalloc"
)


# A peer's inverse problem: (forward F, inverse with default settings, residual branch g).
InverseProblem = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], nn.Module]


@dataclass(frozen=True)
class BlockSpec:
    name: str
    shape: tuple[int, ...]
    hidden: int
    batch: int
    train_reps: int
    inverse_reps: int


@dataclass
class Case:
    """One training step to time: ``step(x)`` runs forward, log-det, loss and backward."""

    label: str
    step: Callable[[Tensor], None]
    twin: str | None = None
    note: str = ""
    terms: list[int] = field(default_factory=list)


def error_record(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {error}"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def nll(y: Tensor, log_det: Tensor) -> Tensor:
    return (y**2).sum() / 2 - log_det.sum()


def block_specs(quick: bool) -> list[BlockSpec]:
    return [
        BlockSpec("dense", (64,), 256, 256, train_reps=5 if quick else 20, inverse_reps=3 if quick else 20),
        BlockSpec("conv", (4, 14, 14), 64, 64, train_reps=2 if quick else 15, inverse_reps=1 if quick else 5),
    ]


# ----------------------------------------------------------------------------------------------- invertnet


def invertnet_block(spec: BlockSpec, twin: str, log_det: LogDetEstimator | None = None) -> InvertibleResidual:
    activation, preactivation = TWINS[twin]
    if spec.name == "dense":
        g: nn.Module = LipschitzMLP(
            spec.shape[0],
            spec.hidden,
            3,
            coeff=COEFF,
            activation=activation,
            preactivation=preactivation,
            n_power_iterations=POWER_ITERATIONS,
        )
    else:
        g = LipschitzConvNet(
            spec.shape[0],
            spec.hidden,
            kernel_sizes=KERNEL_SIZES,
            coeff=COEFF,
            activation=activation,
            preactivation=preactivation,
            n_power_iterations=POWER_ITERATIONS,
        )
    return InvertibleResidual(g, log_det=log_det)


def invertnet_estimator(setting: str, terms: list[int]) -> PowerSeriesLogDet | UnbiasedLogDet:
    n_terms = SETTINGS[setting]
    if n_terms is not None:
        return PowerSeriesLogDet(n_terms=n_terms)
    estimator = UnbiasedLogDet()
    draw = estimator.sample_n_terms

    def recorded_draw() -> int:
        terms.append(draw())
        return terms[-1]

    estimator.sample_n_terms = recorded_draw  # type: ignore[method-assign]
    return estimator


def invertnet_case(spec: BlockSpec, setting: str, twin: str, x: Tensor) -> Case:
    terms: list[int] = []
    block = invertnet_block(spec, twin, invertnet_estimator(setting, terms)).train()
    block(x)  # sizes the power-iteration vectors of the convolutions

    def step(x: Tensor) -> None:
        block.zero_grad(set_to_none=True)
        y, log_det = block.forward_and_log_det(x)
        nll(y, log_det).backward()

    return Case(f"invertnet[{twin}-twin]", step, terms=terms)


def scale_invertnet_weights(block: InvertibleResidual, x: Tensor) -> None:
    """Push every layer to its cap: larger weights, then converged spectral norms (eval mode after)."""
    block.train()(x)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, (SpectralNormLinear, SpectralNormConv2d)):
                module.weight.mul_(WEIGHT_SCALE)
    refine_spectral_norms(block)
    block.eval()


# ----------------------------------------------------------------------------------------------- normflows


def normflows_net(spec: BlockSpec) -> nn.Module:
    import normflows as nf

    channels = [spec.shape[0], spec.hidden, spec.hidden, spec.shape[0]]
    common = {"lipschitz_const": COEFF, "max_lipschitz_iter": POWER_ITERATIONS, "init_zeros": False}
    if spec.name == "dense":
        return nf.nets.LipschitzMLP(channels, **common)
    return nf.nets.LipschitzCNN(channels, list(KERNEL_SIZES), **common)


def normflows_flow(spec: BlockSpec, **options: object) -> nn.Module:
    import normflows as nf

    return nf.flows.Residual(
        normflows_net(spec),
        reverse=False,  # forward() is F(x) = x + g(x) with its log-det, the density-evaluation direction
        brute_force=False,
        exact_trace=False,
        n_samples=1,
        **options,
    )


def normflows_case(spec: BlockSpec, label: str, note: str, x: Tensor, **options: object) -> Case:
    from normflows.utils.optim import update_lipschitz

    flow = normflows_flow(spec, **options).train()
    flow(x)  # initialises the power-iteration vectors of the convolutions
    block = flow.iresblock
    terms: list[int] = []

    def step(x: Tensor) -> None:
        flow.zero_grad(set_to_none=True)
        y, log_det = flow(x)
        nll(y, log_det).backward()
        update_lipschitz(flow, POWER_ITERATIONS)
        if block.n_power_series is None:  # roulette: N = drawn geometric sample + n_exact_terms
            terms.append(int(block.last_n_samples.max()) + block.n_exact_terms)

    return Case(label, step, twin="invertnet[normflows-twin]", note=note, terms=terms)


def normflows_cases(spec: BlockSpec, setting: str, x: Tensor) -> Iterator[Case]:
    n_terms = SETTINGS[setting]
    if n_terms is not None:
        yield normflows_case(
            spec,
            "normflows",
            f"n_power_series={n_terms}, their default reduce_memory=True: Neumann-series gradient "
            "(= invertnet's PowerSeriesLogDet)",
            x,
            n_power_series=n_terms,
        )
        yield normflows_case(
            spec,
            "normflows[reduce_memory=False]",
            f"n_power_series={n_terms}, reduce_memory=False: backprop through {n_terms} VJPs "
            "(a different gradient estimator, with memory growing in n)",
            x,
            n_power_series=n_terms,
            reduce_memory=False,
        )
        return
    yield normflows_case(
        spec,
        "normflows",
        "geometric roulette, geom_p=0.5, n_exact_terms=1 (same law of N as invertnet, E[N]=3), "
        "reduce_memory=True (Neumann gradient, = invertnet's UnbiasedLogDet)",
        x,
        n_exact_terms=1,
    )
    yield normflows_case(
        spec,
        "normflows[default n_exact_terms=2]",
        "their default roulette: geom_p=0.5, n_exact_terms=2, so E[N]=4 (one term more than invertnet)",
        x,
    )


def normflows_inverse_problem(spec: BlockSpec, x: Tensor) -> InverseProblem:
    """A normflows block at its cap in eval mode: (forward, default inverse without log-det, g)."""
    from normflows.utils.optim import update_lipschitz

    flow = normflows_flow(spec)
    block = flow.iresblock
    block.forward(x)  # initialises the convolutions' vectors
    with torch.no_grad():
        for name, parameter in block.nnet.named_parameters():
            if name.endswith("weight"):
                parameter.mul_(WEIGHT_SCALE)
    update_lipschitz(flow, 2000)
    flow.eval()
    return block.forward, block.inverse, block.nnet


# --------------------------------------------------------------------------------------------------- FrEIA


def freia_layer(spec: BlockSpec, n_terms: int) -> nn.Module:
    from FrEIA.modules import IResNetLayer

    layer = IResNetLayer(
        [spec.shape],
        internal_size=spec.hidden,
        n_internal_layers=1,
        jacobian_iterations=n_terms,
        hutchinson_samples=1,
        lipschitz_iterations=POWER_ITERATIONS,
        lipschitz_batchsize=1,
        spectral_norm_max=COEFF,
    )
    if spec.name == "conv":  # FrEIA's convolutions are all 3x3; make the middle one 1x1 (kernels 3-1-3)
        middle = nn.Conv2d(spec.hidden, spec.hidden, KERNEL_SIZES[1], padding=KERNEL_SIZES[1] // 2)
        layer.layers[1] = middle
        layer.residual[2] = middle
    return layer


def freia_cases(spec: BlockSpec, setting: str, x: Tensor) -> Iterator[Case]:
    n_terms = SETTINGS[setting]
    if n_terms is None:
        return
    layer = freia_layer(spec, n_terms).train()

    def step(x: Tensor) -> None:
        layer.zero_grad(set_to_none=True)
        (y,), log_det = layer([x.detach().requires_grad_(True)])
        nll(y, log_det).backward()
        layer.lipschitz_correction()

    yield Case(
        "freia",
        step,
        twin="invertnet[freia-twin]",
        note=f"NOT equivalent work: jacobian_iterations={n_terms} VJPs without create_graph, so the log-det "
        "has no gradient (backward only through y) and the residual branch is re-run for every term",
    )


def freia_inverse_problem(spec: BlockSpec, _: Tensor) -> InverseProblem:
    """A FrEIA layer at its cap in eval mode (weights scaled, then its own correction run longer)."""
    layer = freia_layer(spec, n_terms=1)
    with torch.no_grad():
        for module in layer.layers:
            module.weight.mul_(WEIGHT_SCALE)
    # FrEIA's defaults, repeated: its power method does not normalise, so many iterations overflow float32
    layer.lipschitz_iterations, layer.lipschitz_batchsize = 10, 10
    for _ in range(20):
        layer.lipschitz_correction()
    layer.eval()
    return (
        lambda x: layer([x], jac=False)[0][0],
        lambda y: layer([y], rev=True, jac=False)[0][0],
        layer.residual,
    )


# ----------------------------------------------------------------------------------------------- measuring


def _walk(events: list) -> Iterator:
    for event in events:
        yield event
        yield from _walk(event.children)


def peak_tensor_mb(step: Callable[[Tensor], None], x: Tensor) -> float:
    """High-water mark (MiB) of the bytes of tensors allocated during one step and not yet freed."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x)
    allocations = [
        event
        for event in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if event.tag == _EventType.Allocation
    ]
    level = peak = 0
    for event in sorted(allocations, key=lambda event: event.start_time_ns):
        level += event.extra_fields.alloc_size
        peak = max(peak, level)
    return peak / 2**20


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summarise(seconds: list[float]) -> dict:
    return {
        "median_ms": round(1e3 * statistics.median(seconds), 3),
        "mean_ms": round(1e3 * statistics.fmean(seconds), 3),
        "reps": len(seconds),
    }


def time_cases(cases: list[Case], x: Tensor, warmup: int, reps: int) -> dict[str, dict]:
    """Warm every case up and measure its memory, then time the cases round-robin, so that drifts of the
    machine hit all alike. A case that raises (a peer failing) is recorded with its error and dropped."""
    records: dict[str, dict] = {case.label: {} for case in cases}
    times: dict[str, list[float]] = {case.label: [] for case in cases}
    live = list(cases)

    def attempt(case: Case, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as error:  # a peer failing is a result, not a crash
            records[case.label] = error_record(error)
            live.remove(case)

    for case in cases:
        attempt(case, partial(warm_up, case, x, warmup, records[case.label]))
    for _ in range(reps):
        for case in list(live):
            attempt(case, lambda case=case: times[case.label].append(timed(partial(case.step, x))[0]))
    for case in live:
        records[case.label] = {**summarise(times[case.label]), **records[case.label]}
        if case.terms:
            records[case.label]["mean_terms"] = round(statistics.fmean(case.terms), 3)
        if case.note:
            records[case.label]["note"] = case.note
    return records


def warm_up(case: Case, x: Tensor, steps: int, record: dict) -> None:
    """Run warm-up steps, measure the peak memory of one step, and forget the terms drawn so far."""
    for _ in range(steps):
        case.step(x)
    record["peak_mb"] = round(peak_tensor_mb(case.step, x), 3)
    case.terms.clear()


def add_ratios(records: dict[str, dict], cases: list[Case], statistic: str) -> None:
    for case in cases:
        record, twin = records[case.label], records.get(case.twin or "", {})
        if statistic in record and statistic in twin:
            record["ratio_peer_over_invertnet"] = round(record[statistic] / twin[statistic], 3)
            record["ratio_of"] = f"{statistic}, vs {case.twin}"


def guarded(build: Callable[[], Iterator[Case]], label: str, errors: dict[str, dict]) -> list[Case]:
    """The cases ``build`` yields; if building raises, none, and the error recorded under ``label``."""
    try:
        return list(build())
    except Exception as error:
        errors[label] = error_record(error)
        return []


def training_benchmark(spec: BlockSpec, peers: dict[str, str | None], quick: bool) -> dict:
    x = torch.randn(spec.batch, *spec.shape)
    warmup = 1 if quick else 3
    results = {}
    for setting in SETTINGS:
        errors: dict[str, dict] = {}
        cases = [invertnet_case(spec, setting, twin, x) for twin in TWINS]
        if peers["normflows"] is not None:
            cases += guarded(partial(normflows_cases, spec, setting, x), "normflows", errors)
        if peers["freia"] is not None:
            cases += guarded(partial(freia_cases, spec, setting, x), "freia", errors)
        unbiased = SETTINGS[setting] is None
        reps = spec.train_reps * (UNBIASED_REP_FACTOR if unbiased else 1)
        log(f"training {spec.name} {setting}: {len(cases)} cases x {reps} reps")
        records = {**time_cases(cases, x, warmup, reps), **errors}
        add_ratios(records, cases, "mean_ms" if unbiased else "median_ms")
        results[setting] = records
    return results


class CallCounter:
    """Counts the forward calls of a module through a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def time_solve(solve: Callable[[], Tensor], counter: CallCounter, reps: int) -> tuple[dict, Tensor, int]:
    """Median time of ``solve`` after one warm-up call, its output, and its number of g evaluations."""
    seconds = []
    for rep in range(reps + 1):
        counter.calls = 0
        elapsed, out = timed(solve)
        if rep:
            seconds.append(elapsed)
    return summarise(seconds), out, counter.calls


def early_decrease(history: list[float], steps: int = 5) -> float | None:
    """Geometric mean of the factor by which the residual falls per step over the first steps."""
    k = min(steps, len(history) - 1)
    return None if k < 1 else round((history[k] / history[0]) ** (1 / k), 4)


def invertnet_solve(block: InvertibleResidual, x: Tensor, y: Tensor, tol: float, reps: int) -> dict:
    """Time ``block.inverse_result(y, atol=tol, rtol=0)`` with the block's current solver."""
    counter = CallCounter(block.g)
    try:
        record, result, evaluations = time_solve(partial(block.inverse_result, y, atol=tol, rtol=0), counter, reps)
    except Exception as error:  # a solver crashing is a result, not a crash of the benchmark
        return {**error_record(error), "g_evaluations_before_error": counter.calls}
    finally:
        counter.remove()
    return {
        **record,
        "status": result.status.name,
        "iterations": result.iterations,
        "g_evaluations": evaluations,
        "max_residual": float(result.residual.max()),
        "max_abs_error": float((result.value - x).abs().max()),
        "residual_decrease_per_step_first_5": early_decrease(result.residual_history),
    }


def invertnet_inversion(spec: BlockSpec, twin: str) -> dict:
    x = torch.randn(spec.batch, *spec.shape)
    block = invertnet_block(spec, twin)
    scale_invertnet_weights(block, x)
    with torch.no_grad():
        y = block(x)
    return {
        "lipschitz_bound": round(block.lipschitz_bound() or float("nan"), 6),
        **compare_solvers(block, x, y, spec.inverse_reps),
    }


def compare_solvers(block: InvertibleResidual, x: Tensor, y: Tensor, reps: int) -> dict:
    """Plain iteration and Anderson at every tolerance of INVERSE_TOLERANCES, with their ratios."""
    results: dict = {}
    for tol in INVERSE_TOLERANCES:
        by_solver = {}
        for solver in ("iteration", "anderson"):
            block.solver = solver
            by_solver[solver] = invertnet_solve(block, x, y, tol, reps)
        plain, anderson = by_solver["iteration"], by_solver["anderson"]
        if "g_evaluations" in plain and "g_evaluations" in anderson:
            evaluations_ratio = anderson["g_evaluations"] / plain["g_evaluations"]
            by_solver["anderson_over_plain_g_evaluations"] = round(evaluations_ratio, 3)
            by_solver["anderson_over_plain_time"] = round(anderson["median_ms"] / plain["median_ms"], 3)
        results[f"atol={tol:g}"] = by_solver
    return results


def slow_contraction_inversion(reps: int) -> dict:
    """Anderson vs plain iteration where plain iteration is slow: the contraction rate is exactly 0.97.

    g(x) = W x + b with W symmetric, eigenvalues evenly spread over [-0.97, 0.97] (d = 64, batch 256), so
    x <- y - g(x) contracts at the spectral radius 0.97. Randomly initialised nonlinear blocks contract
    far faster than their certified bound (see ``residual_decrease_per_step_first_5``), which leaves
    plain iteration a handful of steps and nothing for Anderson to accelerate.
    """
    g = LipschitzMLP(64, 64, n_layers=1, coeff=1.0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64))
    g[0].weight.data.copy_(basis @ torch.diag(torch.linspace(-0.97, 0.97, 64)) @ basis.T)
    block = InvertibleResidual(g)
    refine_spectral_norms(block)
    block.eval()
    x = torch.randn(256, 64)
    with torch.no_grad():
        y = block(x)
    return {"contraction_rate": 0.97, **compare_solvers(block, x, y, reps)}


def peer_inversion(build: Callable[[BlockSpec, Tensor], InverseProblem], spec: BlockSpec) -> dict:
    """A peer's inverse with its default settings: evaluations of g, time and reconstruction error."""
    try:
        x = torch.randn(spec.batch, *spec.shape)
        forward, inverse, g = build(spec, x)
        with torch.no_grad():
            y = forward(x)
            record, x_hat, evaluations = time_solve(partial(inverse, y), CallCounter(g), spec.inverse_reps)
        return {**record, "g_evaluations": evaluations, "max_abs_error": float((x_hat - x).abs().max())}
    except Exception as error:
        return error_record(error)


def inversion_benchmark(spec: BlockSpec, peers: dict[str, str | None]) -> dict:
    log(f"inversion {spec.name}")
    results: dict = {f"invertnet[{twin}-twin]": invertnet_inversion(spec, twin) for twin in TWINS}
    if peers["normflows"] is not None:
        results["normflows_default"] = {
            "settings": "iResBlock.inverse: stop when (x_k - x_{k-1})**2 < 1e-5 + 1e-5 |y| everywhere, "
            "at most 1002 evaluations",
            **peer_inversion(normflows_inverse_problem, spec),
        }
    if peers["freia"] is not None:
        results["freia_default"] = {
            "settings": "IResNetLayer rev=True: fixed_point_iterations=50, then one more step",
            **peer_inversion(freia_inverse_problem, spec),
        }
    return results


def log_ratios(training: dict) -> None:
    """Print peer time / invertnet time of every peer case to stderr."""
    for block, entry in training.items():
        for setting, records in entry["results"].items():
            for label, record in records.items():
                if "ratio_peer_over_invertnet" in record:
                    ratio = record["ratio_peer_over_invertnet"]
                    log(f"{block:5} {setting:15} {label:34} peer/invertnet = {ratio:.2f} ({record['ratio_of']})")


def peer_versions() -> dict[str, str | None]:
    """Version of each importable peer, ``None`` for a peer that cannot be imported."""
    versions: dict[str, str | None] = {}
    for key, module in (("normflows", "normflows"), ("freia", "FrEIA")):
        try:
            importlib.import_module(module)
            versions[key] = importlib.metadata.version(module)
        except ImportError:
            versions[key] = None
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (for a smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)  # normflows draws its roulette with numpy
    peers = peer_versions()
    output: dict = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "invertnet_source": str(Path(invertnet.__file__).parent),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(torch.get_default_dtype()),
        "quick": args.quick,
        "coeff": COEFF,
        "memory_method": MEMORY_METHOD,
        "peers": {key: version or "unavailable (the `bench` extra)" for key, version in peers.items()},
        "training": {},
        "inversion": {},
    }
    for spec in block_specs(args.quick):
        output["training"][spec.name] = {"batch": spec.batch, "results": training_benchmark(spec, peers, args.quick)}
    for spec in block_specs(args.quick):
        output["inversion"][spec.name] = {"batch": spec.batch, "results": inversion_benchmark(spec, peers)}
    log("inversion dense_slow_contraction")
    output["inversion"]["dense_slow_contraction"] = {"batch": 256, "results": slow_contraction_inversion(reps=5)}
    log_ratios(output["training"])
    print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
