r"""One training loop that needs no files: :func:`fit`, and the step it repeats, shared with the
:class:`~invertnet.training.Trainer`.

A step draws the step's batch, puts the objective in training mode, computes the loss, backpropagates, clips the
gradient norm, steps the optimiser and the learning-rate schedule, and updates the exponential moving average (EMA)
of the weights:

.. math:: \bar\theta_{t+1} = \alpha_t\, \bar\theta_t + (1 - \alpha_t)\, \theta_{t+1}, \qquad
          \alpha_t = \min(\alpha, t / (t + 10))

for the update after t earlier steps, with :math:`\alpha` = ``ema_decay``: exponentially weighted iterate averaging
(after Polyak and Juditsky, 1992), with which Behrmann's thesis (appendix A.2) evaluates flows. The warm-up
:math:`\alpha_t` (as in timm's ``ModelEmaV2/V3`` warm-up) makes the first update a copy of the weights, so the
average starts after the first step's data-dependent initialisation (ActNorm) instead of averaging the
uninitialised weights, and a short run is not evaluated on an average dominated by its first iterates (a 60-step
run at ``ema_decay`` 0.999 averaged without warm-up is ~94% its starting point).

The losses stay on the device until they are read, every ``log_every`` steps (and at every evaluation, checkpoint
and the last step): reading a value synchronises the host with a GPU, so a step never does. When they are read they
are checked: a NaN or infinite loss raises :class:`FloatingPointError` naming the first step it occurred at, which
may be up to ``log_every - 1`` steps before the check (the parameters are then those after the checked step; a
Trainer's checkpoints are written only after a check, so none holds them).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from invertnet.training.batches import BatchSource, TrainData, batch_source, shard
from invertnet.training.checkpoint import CheckpointError, check_weight_average
from invertnet.training.settings import TrainConfig

__all__ = ["FitResult", "TrainState", "fit", "run_steps", "train_step"]

Objective = nn.Module | Callable[[Any], Tensor]
Callback = Callable[[int, float], None]


class TrainState:
    """What a training run carries from step to step: the trained parameters, their optimiser, the
    learning-rate schedule, the EMA of the parameters and the number of steps done.

    Arguments:
        config: The :class:`~invertnet.training.TrainConfig` (optimiser, schedule, clipping, EMA).
        parameters: The parameters trained (a list, in a fixed order: the EMA and checkpoints follow it).
    """

    def __init__(self, config: TrainConfig, parameters: list[nn.Parameter]) -> None:
        if not parameters:
            raise ValueError("TrainState: no trainable parameters (every parameter has requires_grad=False?)")
        self.config = config
        self.parameters = parameters
        self.optimizer = config.make_optimizer(parameters)
        self.schedule = config.make_schedule(self.optimizer)
        self.ema = [p.detach().clone() for p in parameters] if config.ema_decay else None
        self.step = 0
        self._unread: list[Tensor] = []  # the detached losses of the steps since the last read_losses()

    def update(self, loss: Tensor) -> Tensor:
        """One optimiser step on the scalar ``loss``; returns it detached, still on its device (no host
        synchronisation: :meth:`read_losses` reads and checks it)."""
        self._unread.append(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            decay = self.ema_decay_at(self.step)
            with torch.no_grad():
                for average, parameter in zip(self.ema, self.parameters, strict=True):
                    average.lerp_(parameter, 1 - decay)
        self.step += 1
        return self._unread[-1]

    def read_losses(self) -> list[float]:
        """The losses of the steps since the last call, as floats (one host synchronisation).

        Raises:
            FloatingPointError: One of them is NaN or infinite; the message names the first such step (1-based).
        """
        if not self._unread:
            return []
        values = torch.stack(self._unread).tolist()
        first = self.step - len(values) + 1
        self._unread.clear()
        for step, value in enumerate(values, start=first):
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at step {step}; lower the lr or clip")
        return values

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay of the update after ``step`` earlier steps: min(ema_decay, step / (step + 10)); 0 (a copy
        of the weights) for the first."""
        return min(self.config.ema_decay, step / (step + 10))

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Context manager putting the EMA weights in place of the parameters, and the trained ones back after
        (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.ema, strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved, strict=True):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """``{"ema", "optimizer", "schedule"}``: tensors and JSON values, for a checkpoint."""
        return {"ema": self.ema or [], "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Restore :meth:`state_dict` (as read back from JSON) at ``step`` steps done.

        A cosine schedule saved with another horizon (a run extended by a larger ``steps``) is re-planned: it
        continues on the cosine of the new horizon, lr_t = lr_0 (1 + cos(pi t / steps)) / 2 from step t on, as a
        run planned with ``steps`` from the start would (the restored schedule would otherwise run past its end,
        where the cosine climbs back to lr_0).

        Raises:
            CheckpointError: The saved weight average does not have one tensor per parameter, of its shape, or is
                missing while ``ema_decay`` is set.
        """
        saved_average = check_weight_average(state["ema"], self.parameters, "checkpoint")  # checked before any change
        if self.ema is not None and not saved_average:
            raise CheckpointError("checkpoint: holds no weight average (ema), but ema_decay is set")
        optimizer_state = dict(state["optimizer"])
        optimizer_state["state"] = {int(key): value for key, value in optimizer_state["state"].items()}
        self.optimizer.load_state_dict(optimizer_state)
        self.schedule.load_state_dict(dict(state["schedule"]))  # LambdaLR's lambdas are saved as None, kept as built
        if self.ema is not None:
            for average, saved in zip(self.ema, saved_average, strict=True):
                average.copy_(saved)
        self.step = step
        self._replan_cosine()

    def _replan_cosine(self) -> None:
        schedule = self.schedule
        if not isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) or schedule.T_max == self.config.steps:
            return
        schedule.T_max = self.config.steps
        progress = math.cos(math.pi * schedule.last_epoch / schedule.T_max)
        for group, base in zip(self.optimizer.param_groups, schedule.base_lrs, strict=True):
            group["lr"] = schedule.eta_min + (base - schedule.eta_min) * (1 + progress) / 2


def train_step(objective: Objective, batch: Any, state: TrainState) -> Tensor:
    """The step of every training loop: ``objective(batch)`` in training mode, then :meth:`TrainState.update`.

    Returns the batch's loss, detached and on its device (a training-mode value: for flows with stochastic log-det
    estimators an estimate); :meth:`TrainState.read_losses` reads and checks it.
    """
    if isinstance(objective, nn.Module):
        objective.train()
    return state.update(objective(batch))


TERMINAL_REFRESH_SECONDS = 0.5
"""Shortest interval between two redraws of the progress bar in a terminal."""

LOG_REFRESH_SECONDS = 30.0
"""Shortest interval between two progress lines when stderr is a file or a pipe (a SLURM log, ``2> log``): a
2000-step run writes a line every 30 s, not one per update."""


def run_steps(
    objective: Objective,
    source: BatchSource,
    state: TrainState,
    until: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    callback: Callback | None = None,
    progress: bool = False,
    name: str = "loss",
    read_at: Callable[[int], bool] | None = None,
) -> list[float]:
    """Run :func:`train_step` on ``source.batch(state.step)`` (rows ``rank::world_size`` of it) until
    ``state.step == until``; returns the losses of every step.

    The losses are read (:meth:`TrainState.read_losses`: checked for NaN) at the steps where ``read_at(step)``
    holds (default: multiples of the config's ``log_every``) and at ``until``; there the progress bar shows, and
    ``callback(step, loss)`` receives, the mean loss of the steps since the last read.
    """
    if read_at is None:
        read_at = _every(state.config.log_every)
    losses: list[float] = []
    interval = TERMINAL_REFRESH_SECONDS if sys.stderr.isatty() else LOG_REFRESH_SECONDS
    bar = tqdm(total=until, initial=state.step, disable=not progress, desc="train", unit="step", mininterval=interval)
    with bar:
        while state.step < until:
            train_step(objective, shard(source.batch(state.step), rank, world_size), state)
            if state.step == until or read_at(state.step):
                values = state.read_losses()
                losses += values
                mean = math.fsum(values) / len(values)
                bar.set_postfix({name: f"{mean:.3f}"}, refresh=False)
                bar.update(len(values))
                if callback is not None:
                    callback(state.step, mean)
    return losses


def _every(period: int) -> Callable[[int], bool]:
    return lambda step: step % period == 0


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns."""

    losses: Tensor
    """(steps,) float64: the loss of every step, in training mode."""
    state: TrainState
    """The optimiser, schedule and EMA after the last step."""

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context manager with the EMA weights in place of the parameters (see :meth:`TrainState.ema_weights`)."""
        return self.state.ema_weights()


def fit(
    objective: Objective,
    data: TrainData,
    config: TrainConfig | None = None,
    *,
    parameters: Iterable[nn.Parameter] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    **settings: Any,
) -> FitResult:
    r"""Minimise ``objective`` over batches of ``data`` for ``steps`` optimiser steps, in memory.

    Writes no files and leaves torch's global RNG to the caller (seed it for reproducible log-det probes or
    augmentations); the batch order is a function of ``seed`` (:mod:`invertnet.training.batches`). For
    checkpoints, metrics files, evaluation, exact resume and multi-process training use the
    :class:`~invertnet.training.Trainer`, which repeats the same :func:`train_step`.

    Arguments:
        objective: Maps a batch to a scalar loss, e.g. :class:`~invertnet.training.BitsPerDim` of a flow
            (batches (B, ...)) or :class:`~invertnet.training.CrossEntropy` of a classifier (batches ``(x, y)``).
            A module is put in training mode before every step.
        data: A tensor (N, ...), a tuple of tensors with N rows, a map-style ``Dataset`` or a ``DataLoader``
            (whose own batch size and order are used); batches are moved to the parameters' device.
        config: A :class:`~invertnet.training.TrainConfig`; default ``TrainConfig()``.
        parameters: What is trained; default every parameter of ``objective`` with ``requires_grad``.
        callback: Called as ``callback(step, loss)`` every ``log_every`` steps and after the last, with the number
            of steps done (1 to ``steps``) and the mean loss of the steps since the previous call, as a float: for
            logging, or evaluation (which may leave the model in eval mode: the next step sets training mode
            again). An exception raised there stops training. ``log_every=1`` calls it after every step.
        progress: Show a progress bar.
        **settings: Fields of :class:`~invertnet.training.TrainConfig` (``steps``, ``batch_size``, ``lr``,
            ...), overriding those of ``config``.

    Returns:
        A :class:`FitResult`: the (steps,) losses, and the final :class:`TrainState` (optimiser, schedule, EMA;
        ``result.ema_weights()`` puts the EMA weights in place).

    Raises:
        pydantic.ValidationError: A setting is unknown or invalid (the error names it).
        TypeError, ValueError: ``data`` is of an unsupported type, empty, or smaller than ``batch_size``.
        FloatingPointError: The loss became NaN or infinite; the message names the first such step (detected when
            the losses are next read, up to ``log_every - 1`` steps later).

    Examples:
        >>> from invertnet.models import dense_iresnet_flow
        >>> from invertnet.training import BitsPerDim
        >>> flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8)
        >>> result = fit(BitsPerDim(flow), torch.randn(256, 2), steps=20, batch_size=64, lr=1e-2)
        >>> result.losses.shape
        torch.Size([20])
    """
    if config is None or settings:
        config = TrainConfig.model_validate({**(config.model_dump() if config else {}), **settings})
    if parameters is None:
        if not isinstance(objective, nn.Module):
            raise TypeError("fit: pass parameters= when the objective is a function and not a module")
        parameters = objective.parameters()
    state = TrainState(config, [p for p in parameters if p.requires_grad])
    source = batch_source(data, config.batch_size, config.seed, device=state.parameters[0].device)
    name = getattr(objective, "name", "loss")
    losses = run_steps(objective, source, state, config.steps, callback=callback, progress=progress, name=name)
    return FitResult(torch.tensor(losses, dtype=torch.float64), state)
