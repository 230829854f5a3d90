r"""Which weights a trained model keeps: the trained (raw) ones or their average (EMA), chosen on validation data.

The exponential moving average of the weights usually evaluates better than the last iterate once it has
averaged over many steps, and worse before (a short run with decay 0.999 averages over ~1000 steps it never
took). Rather than assume, :func:`choose_weights` evaluates the objective's criterion (``objective.name`` in
``objective.evaluate(data)``, lower is better: bits/dim, cross-entropy) with both on held-out validation data,
never the test set, with the same random draws for both (dequantisation noise, log-det probes), and keeps the
better one. :func:`compare_weights` gives the same figures on any data, e.g. the test set for a report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch

from invertnet.training.loop import TrainState

__all__ = ["WeightChoice", "choose_weights", "compare_weights", "kept_weights"]

#: The seed of the random draws both evaluations share, so their difference is the weights' alone.
COMPARISON_SEED = 0


class _Evaluated(Protocol):
    name: str

    def evaluate(self, data: Any, batch_size: int = 256) -> dict[str, float]: ...


@dataclass(frozen=True)
class WeightChoice:
    """The weights a run keeps, and why.

    Attributes:
        kept: ``"ema"`` (the weight average) or ``"raw"`` (the last iterate).
        reason: One sentence: the comparison, or why there was none.
        criterion: The metric compared (e.g. ``"bits_per_dim"``), or ``None`` without a comparison.
        validation: ``{"raw": ..., "ema": ...}``: the criterion on the validation data, or ``None``.
    """

    kept: Literal["ema", "raw"]
    reason: str
    criterion: str | None = None
    validation: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_weights(
    state: TrainState, objective: _Evaluated, data: Any, batch_size: int = 256
) -> dict[str, float] | None:
    """The objective's criterion on ``data`` with the raw and with the averaged weights, ``{"raw", "ema"}``;
    ``None`` when the run keeps no average or the objective reports no ``objective.name`` figure (GAN losses).

    The model must be in eval mode; both evaluations see the same random draws (seed
    :data:`COMPARISON_SEED`), and the caller's random state is left as it was.
    """
    if state.ema is None:
        return None
    figures: dict[str, float] = {}
    for label, weights in (("raw", contextlib.nullcontext()), ("ema", state.ema_weights())):
        with weights, _same_draws(), torch.no_grad():
            metrics = objective.evaluate(data, batch_size)
        if objective.name not in metrics:
            return None
        figures[label] = float(metrics[objective.name])
    return figures


def choose_weights(state: TrainState, objective: _Evaluated, validation: Any, batch_size: int = 256) -> WeightChoice:
    """Keep the averaged weights when they score at most the raw ones' criterion on ``validation`` (lower is
    better), else the raw weights. Without an average: raw. Without validation data or a criterion: the
    average (the usual choice, stated as unverified in ``reason``)."""
    if state.ema is None:
        return WeightChoice("raw", "no weight average was kept (ema_decay = 0)")
    if validation is None:
        return WeightChoice("ema", "the weight average, unverified: there is no validation split")
    figures = compare_weights(state, objective, validation, batch_size)
    if figures is None:
        return WeightChoice("ema", f"the weight average, unverified: {objective.name} has no validation criterion")
    kept: Literal["ema", "raw"] = "ema" if figures["ema"] <= figures["raw"] else "raw"
    reason = (
        f"validation {objective.name}: {figures['ema']:.6g} with the weight average, {figures['raw']:.6g} "
        f"with the trained weights"
    )
    return WeightChoice(kept, reason, objective.name, figures)


@contextlib.contextmanager
def kept_weights(state: TrainState, choice: WeightChoice) -> Iterator[None]:
    """Context manager with the chosen weights in place of the parameters (the averaged ones for ``"ema"``)."""
    with state.ema_weights() if choice.kept == "ema" else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _same_draws() -> Iterator[None]:
    with torch.random.fork_rng():
        torch.manual_seed(COMPARISON_SEED)
        yield
