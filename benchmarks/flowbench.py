"""What the density benchmarks share (``digits_density.py``, ``toy2d.py``): models, training, evaluation, reports.

Every model is an ``nn.Module`` scored per sample by a loss (lower is better: bits/dim on digits, negative
log-likelihood in nats on the 2-D sets). A :class:`Spec` names it and says how to build it at a width, what to
do after each optimiser step and how to prepare a copy of it for an exact evaluation. :func:`run` trains it for
a :class:`Budget` (seconds or steps), evaluates it on the validation data at every tenth of the budget (or only
at the end) and keeps the best evaluated copy, whose per-sample test losses it returns; :func:`compare` turns
two models' per-sample test losses into a difference with its paired standard error.

Evaluations are reproducible and paired: before each chunk of ``EVAL_BATCH`` samples of each draw, torch's
global seed is set from (draw, chunk), so every model sees the same dequantisation noise on the same images.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from invertnet.layers import refine_spectral_norms
from invertnet.logdet import DenseExactLogDet
from invertnet.models import FlowDistribution

EVAL_BATCH = 256
CHECKS = 10
#: Draws per validation evaluation (the test figures average over more): one draw ranks checkpoints well, since
#: every checkpoint sees the same draw, and keeps the ten evaluations per run cheap.
VALIDATION_DRAWS = 1
LOG_EVERY = 10.0

#: Per-sample losses of a model on a batch, shape (B,); lower is better.
Score = Callable[[nn.Module, Tensor], Tensor]


class Unavailable(Exception):
    """A model that cannot be built here (its library is missing, or this invertnet lacks the builder)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def standard_error(values: Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


def unchanged(model: nn.Module) -> None:
    pass


def require(module: str) -> object:
    """Import ``module`` or raise :class:`Unavailable` naming it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Unavailable(f"{module} is not installed ({error}); pip install -e '.[bench]'") from error


def optional_invertnet_builder(name: str) -> Callable:
    """``invertnet.models.<name>``, or :class:`Unavailable` when this version of invertnet has none."""
    import invertnet.models

    builder = getattr(invertnet.models, name, None)
    if builder is None:
        version = importlib.metadata.version("invertnet")
        raise Unavailable(f"invertnet.models.{name} is not available in this version of invertnet ({version})")
    return builder


@dataclass(frozen=True)
class Spec:
    """A model of a benchmark.

    Attributes:
        name: Its name on the command line and in the report.
        family: ``"invertnet"``, ``"peer"``, or ``"check"`` (a peer with an invertnet part: a like-for-like check,
            never the best peer).
        build: The model at a width (hidden features or channels); raises :class:`Unavailable` when it cannot.
        architecture: One line describing it (the width is appended).
        width: A fixed width (an architecture defined to be equal to another's), or ``None``: the width whose
            parameter count is closest to the benchmark's target.
        after_step: Called with the model after every optimiser step (normflows' Lipschitz updates).
        prepare: Makes an eval-mode copy the model tested (exact log-dets, converged norms). Without
            ``prepare_validation`` it prepares every validated copy, so the best one is tested as it is;
            with it, it prepares the best copy once, before the test.
        prepare_validation: Called with each eval-mode copy before its validation (default: ``prepare``).
        estimator: How the test loss is computed, as the report states it.
    """

    name: str
    family: str
    build: Callable[[int], nn.Module]
    architecture: str
    width: int | None = None
    after_step: Callable[[nn.Module], None] = unchanged
    prepare: Callable[[nn.Module], None] = unchanged
    prepare_validation: Callable[[nn.Module], None] | None = None
    estimator: str = "exact: the library's own log_prob"


# invertnet's exact evaluation

_EXACT_TEST = (
    "exact: refine_spectral_norms, then DenseExactLogDet in every i-ResNet block (brute-force ExactLogDet for "
    "convolutional branches); MintNet's and coupling flows' log-dets are exact by construction"
)
INVERTNET_EXACT = f"{_EXACT_TEST}. Validation: the same, on each validated copy"
INVERTNET_EXACT_UNREFINED_VALIDATION = (
    f"{_EXACT_TEST}. Validation: exact log-dets of each validated copy as training left its norms (the tested "
    "copy alone is refined: the refinement of convolutions takes minutes)"
)


def exact_log_dets(flow: nn.Module) -> None:
    """Give every residual block of the flow an exact log-det (its spectral norms as training left them)."""
    if isinstance(flow, FlowDistribution):
        for block in flow.residual_blocks():
            block.use_log_det_estimator(DenseExactLogDet())


def exact_evaluation(flow: nn.Module) -> None:
    """Converge the flow's spectral norms (certified Lip(g) <= coeff) and give every residual block an exact
    log-det, so the test figure carries neither the training series' truncation bias nor probe noise."""
    refine_spectral_norms(flow)
    exact_log_dets(flow)


def invertnet_candidate(
    name: str,
    build: Callable[[int], nn.Module],
    architecture: str,
    width: int | None = None,
    *,
    refined_validation: bool = True,
) -> Spec:
    """An invertnet model, tested exactly (:func:`exact_evaluation`).

    Each validated copy is evaluated as the tested one is, refinement included, so that the checkpoint the
    validation chooses is the model tested (the refinement scales every layer by its converged norm and so
    changes the map). ``refined_validation=False`` validates with exact log-dets of the norms as training left
    them, for flows whose refinement is too slow to repeat at every check (convolutional branches)."""
    return Spec(
        name,
        "invertnet",
        build,
        architecture,
        width,
        prepare=exact_evaluation,
        prepare_validation=None if refined_validation else exact_log_dets,
        estimator=INVERTNET_EXACT if refined_validation else INVERTNET_EXACT_UNREFINED_VALIDATION,
    )


# peers


class ZukoDensity(nn.Module):
    """An unconditional zuko flow with a ``log_prob`` method."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, y: Tensor) -> Tensor:
        return self.flow().log_prob(y)


def zuko_flow(kind: str, features: int, **options: object) -> nn.Module:
    """``zuko.flows.<kind>(features, **options)`` as a density with ``log_prob``."""
    zuko = require("zuko")
    return ZukoDensity(getattr(zuko.flows, kind)(features, **options))


def normflows_residual(features: int, hidden: int, n_blocks: int, n_layers: int) -> nn.Module:
    """normflows' residual flow: ``n_blocks`` x [Residual(LipschitzMLP features-hidden-...-features), ActNorm]."""
    nf = require("normflows")
    channels = [features, *[hidden] * (n_layers - 1), features]
    flows = []
    for _ in range(n_blocks):
        net = nf.nets.LipschitzMLP(channels, lipschitz_const=0.97, init_zeros=True)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(features)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(features, trainable=False), flows)


def update_lipschitz(model: nn.Module) -> None:
    """normflows' recipe: 5 power iterations of every Lipschitz layer after each optimiser step."""
    require("normflows").utils.update_lipschitz(model, 5)


def converge_lipschitz(model: nn.Module, rtol: float = 1e-6, chunk: int = 100, max_chunks: int = 50) -> None:
    """normflows' power iterations in chunks of ``chunk`` until no layer's norm estimate changes by more than
    ``rtol`` relatively over a chunk (at most ``max_chunks`` chunks)."""
    nf = require("normflows")
    kinds = (nf.nets.lipschitz.InducedNormLinear, nf.nets.lipschitz.InducedNormConv2d)
    layers = [module for module in model.modules() if isinstance(module, kinds)]
    for _ in range(max_chunks):
        before = torch.stack([layer.scale.clone() for layer in layers])
        nf.utils.update_lipschitz(model, chunk)
        after = torch.stack([layer.scale for layer in layers])
        if ((after - before).abs() <= rtol * after.abs()).all():
            return


# data and budgets


@dataclass(frozen=True)
class Split:
    """Training, validation (held out from the training data) and test samples."""

    train: Tensor
    validation: Tensor
    test: Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


@dataclass(frozen=True)
class Budget:
    """Training seconds (optimiser steps only, evaluations excluded) or a number of steps."""

    seconds: float | None = None
    steps: int | None = None

    def fraction(self, seconds: float, steps: int) -> float:
        return seconds / self.seconds if self.seconds is not None else steps / self.steps


def batches(data: Tensor, size: int, seed: int) -> Iterator[Tensor]:
    """Shuffled batches, epoch after epoch, in an order drawn from ``seed`` alone: the same for every model."""
    if size > len(data):
        raise ValueError(f"batch size {size} exceeds the {len(data)} training samples")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order) - size + 1, size):
            yield data[order[start : start + size]]


def adam_step(model: nn.Module, spec: Spec, score: Score, stream: Iterator[Tensor], lr: float) -> Callable[[], float]:
    """One step of plain Adam (no schedule, no clipping, no averaging) on the mean loss; returns the loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> float:
        model.train()
        loss = score(model, next(stream)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        spec.after_step(model)
        return loss.item()

    return step


# evaluation


def per_sample(score: Score, model: nn.Module, data: Tensor, draws: int) -> Tensor:
    """Per-sample losses (N,) averaged over ``draws`` evaluations, each chunk under a seed fixed by (draw,
    chunk), so that every model sees the same random draws (dequantisation noise) on the same samples."""
    total = torch.zeros(len(data), dtype=torch.float64)
    with torch.random.fork_rng(), torch.no_grad():
        for draw in range(draws):
            for index, chunk in enumerate(data.split(EVAL_BATCH)):
                torch.manual_seed(1_000_003 * draw + index)
                total[index * EVAL_BATCH : index * EVAL_BATCH + len(chunk)] += score(model, chunk).double()
    return total / draws


@dataclass
class BestCheckpoint:
    """Evaluates copies of a model on the validation data (``VALIDATION_DRAWS`` draws) and keeps the best one."""

    spec: Spec
    score: Score
    validation: Tensor
    best: nn.Module | None = None
    best_loss: float = math.inf
    history: list[dict] = field(default_factory=list)

    def consider(self, model: nn.Module, steps: int, seconds: float) -> None:
        snapshot = copy.deepcopy(model).eval()
        (self.spec.prepare_validation or self.spec.prepare)(snapshot)
        loss = per_sample(self.score, snapshot, self.validation, VALIDATION_DRAWS).mean().item()
        self.history.append({"steps": steps, "seconds": round(seconds, 2), "validation": loss})
        if math.isfinite(loss) and loss <= self.best_loss:
            self.best, self.best_loss = snapshot, loss


def train(
    step: Callable[[], float], budget: Budget, validate: Callable[[int, float], None], name: str, checks: int
) -> tuple[int, float]:
    """Call ``step`` until the budget is spent, and ``validate(steps, seconds)`` at every 1/checks of it (the
    last at the end); only the steps' time counts. Returns (steps, seconds)."""
    spent, steps, done_checks, last_log = 0.0, 0, 0, time.perf_counter()
    while budget.fraction(spent, steps) < 1:
        start = time.perf_counter()
        loss = step()
        spent += time.perf_counter() - start
        steps += 1
        reached = min(checks, math.floor(budget.fraction(spent, steps) * checks))
        if reached > done_checks:
            validate(steps, spent)
            done_checks = reached
        if time.perf_counter() - last_log >= LOG_EVERY:
            log(f"  {name}: step {steps}, {spent:.0f} s, training loss {loss:.3f}")
            last_log = time.perf_counter()
    return steps, spent


@dataclass
class Result:
    """A model's report row and per-sample test losses (``None`` when it was skipped or failed)."""

    spec: Spec
    row: dict
    test: Tensor | None = None
    validation: float = math.inf


def run(
    spec: Spec,
    model: nn.Module,
    step: Callable[[], float],
    budget: Budget,
    split: Split,
    score: Score,
    *,
    checks: int,
    draws: int,
    before_validation: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Result:
    """Train with ``step`` for ``budget``, keep the best of ``checks`` validation evaluations, test it (``draws``
    draws per test sample).

    ``before_validation`` returns a context manager put around each evaluation (averaged weights, say)."""
    checkpoint = BestCheckpoint(spec, score, split.validation)

    def validate(steps: int, seconds: float) -> None:
        with before_validation():
            checkpoint.consider(model, steps, seconds)

    start = time.perf_counter()
    steps, seconds = train(step, budget, validate, spec.name, checks)
    if checkpoint.best is None:
        raise FloatingPointError(f"no finite validation loss in {checkpoint.history}")
    if spec.prepare_validation is not None:  # otherwise the best copy was prepared as tested when it was validated
        spec.prepare(checkpoint.best)
    test = per_sample(score, checkpoint.best, split.test, draws)
    best = min(checkpoint.history, key=lambda record: record["validation"])
    row = {
        "family": spec.family,
        "parameters": parameter_count(model),
        "steps": steps,
        "seconds": round(seconds, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "best_validation": checkpoint.best_loss,
        "best_at_step": best["steps"],
        "validations": checkpoint.history,
        "test": test.mean().item(),
        "standard_error": standard_error(test),
        "estimator": spec.estimator,
    }
    return Result(spec, row, test, checkpoint.best_loss)


def guarded(spec: Spec, execute: Callable[[], Result]) -> Result:
    """Run one model; a model that cannot be built is skipped and one that fails is reported, with the reason,
    and the others still run."""
    log(f"{spec.name} ...")
    try:
        return execute()
    except Unavailable as reason:
        log(f"  {spec.name} skipped: {reason}")
        return Result(spec, {"family": spec.family, "skipped": str(reason)})
    except Exception as error:  # one failing model is reported, the others still run
        log(f"  {spec.name} failed: {type(error).__name__}: {error}")
        return Result(spec, {"family": spec.family, "error": f"{type(error).__name__}: {error}"})


def matched_width(build: Callable[[int], nn.Module], target: int) -> int:
    """The width whose model's parameter count is closest to ``target`` (counts grow with the width)."""
    high = 1
    while parameter_count(build(high)) < target:
        high *= 2
    low = high // 2  # count(low) < target <= count(high), or high == 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if parameter_count(build(middle)) < target else (low, middle)
    if low >= 1 and target - parameter_count(build(low)) < parameter_count(build(high)) - target:
        return low
    return high


def width_of(spec: Spec, target: int) -> int:
    return spec.width if spec.width is not None else matched_width(spec.build, target)


# reports


def compare(label: str, a: Result, b: Result) -> dict:
    """a's mean test loss minus b's, with the paired standard error of the per-sample differences (the same
    samples and draws), and how many of them separate the two."""
    difference = a.test - b.test
    paired = standard_error(difference)
    unpaired = math.hypot(a.row["standard_error"], b.row["standard_error"])
    mean = difference.mean().item()
    return {
        "comparison": label,
        "a": a.spec.name,
        "b": b.spec.name,
        "difference": mean,
        "paired_standard_error": paired,
        "unpaired_standard_error": unpaired,
        "better": a.spec.name if mean < 0 else b.spec.name,
        "standard_errors": abs(mean) / paired if paired > 0 else math.inf,
    }


def tested(results: list[Result], family: str | None = None) -> list[Result]:
    return [r for r in results if r.test is not None and (family is None or r.spec.family == family)]


def best_by_validation(results: list[Result], family: str) -> Result | None:
    """The family's model with the lowest validation loss (the test data never choose)."""
    candidates = tested(results, family)
    return min(candidates, key=lambda r: r.validation) if candidates else None


def comparisons(results: list[Result], pairs: list[tuple[str, str, str]]) -> list[dict]:
    """The best invertnet model against the best peer (each chosen on validation), then the named ``pairs``
    (label, a, b) whose both models were tested."""
    found = []
    best_invertnet, best_peer = best_by_validation(results, "invertnet"), best_by_validation(results, "peer")
    if best_invertnet is not None and best_peer is not None:
        found.append(compare("best invertnet vs best peer (chosen on validation)", best_invertnet, best_peer))
    by_name = {r.spec.name: r for r in tested(results)}
    found += [compare(label, by_name[a], by_name[b]) for label, a, b in pairs if a in by_name and b in by_name]
    return found


def winner(results: list[Result]) -> dict | None:
    candidates = tested(results)
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r.row["test"])
    return {"model": best.spec.name, "test": best.row["test"]}


def table(results: list[Result], loss_name: str, sign: float = 1.0) -> str:
    """Rows of name, parameters, steps, seconds, best validation and test figure (the loss times ``sign``)."""
    columns = f"{'params':>8} {'steps':>7} {'seconds':>8} {'validation':>10} {loss_name:>14} {'s.e.':>7}"
    lines = [f"{'model':<22} {'family':<9} {columns}"]
    for r in results:
        if r.test is None:
            lines.append(f"{r.spec.name:<22} {r.spec.family:<9} {r.row.get('skipped') or r.row.get('error')}")
            continue
        row = r.row
        lines.append(
            f"{r.spec.name:<22} {r.spec.family:<9} {row['parameters']:>8} {row['steps']:>7} {row['seconds']:>8.1f} "
            f"{sign * row['best_validation']:>10.4f} {sign * row['test']:>14.4f} {row['standard_error']:>7.4f}"
        )
    return "\n".join(lines)


def verdicts(found: list[dict], unit: str) -> str:
    lines = []
    for c in found:
        lines.append(
            f"{c['comparison']}: {c['a']} - {c['b']} = {c['difference']:+.4f} {unit} (paired s.e. "
            f"{c['paired_standard_error']:.4f}): {c['better']} better by {c['standard_errors']:.1f} s.e."
        )
    return "\n".join(lines)


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
