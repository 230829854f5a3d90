r"""Training with a run folder: checkpoints, metrics, evaluation and exact resume, on top of
:func:`~invertnet.training.fit`'s step (Behrmann's thesis, 5.2 and appendix A.2).

The :class:`Trainer` repeats :func:`~invertnet.training.loop.train_step` through the same
:func:`~invertnet.training.loop.run_steps` loop as :func:`~invertnet.training.fit`, and adds, every ``log_every``
steps, a line of ``metrics.jsonl`` (and the callbacks: TensorBoard when installed), periodic evaluation with the
EMA weights and periodic checkpoints (the losses are read from the device, and checked for NaN, only at those
steps). Batches of tensors and Datasets are a function of (seed, step), and checkpoints hold the model, EMA,
optimiser, schedule and torch RNG state, so a resumed run ends bit-identical to an uninterrupted one; a run killed
at any moment loses at most the steps since its last checkpoint.

The folder holds ``metrics.jsonl`` (one JSON record every ``log_every`` steps, at every evaluation and checkpoint
and at the last step, with the mean training loss since the previous record; a resume drops the records after its
checkpoint, which are redone), ``train_config.json`` (the :class:`~invertnet.training.TrainConfig`, for reading: it
is no run config of the application, whose run folders hold the whole config in ``run_config.json``; earlier
versions named this file ``config.json``), the checkpoints (``step-NNNNNNNN/`` and ``latest``, see
:mod:`invertnet.training.checkpoint`) and, with TensorBoard installed, ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invertnet._files import write_atomically
from invertnet.models.flows import FlowDistribution
from invertnet.training.batches import Batch, TrainData, batch_source
from invertnet.training.callbacks import Callback, default_callbacks
from invertnet.training.checkpoint import (
    Key,
    check_writable,
    load_latest_checkpoint,
    save_checkpoint,
    writing_to,
)
from invertnet.training.distributed import rank_and_world_size
from invertnet.training.loop import TrainState, run_steps
from invertnet.training.objectives import AdversarialLoss, BitsPerDim, CrossEntropy, IndependenceCrossEntropy
from invertnet.training.settings import TrainConfig

__all__ = ["Trainer"]


class Trainer:
    """Train a model on its objective with a run folder: checkpoints, ``metrics.jsonl``, evaluation, exact resume.

    Each step is :func:`~invertnet.training.fit`'s step. Under ``torchrun`` (a joined process group, see
    :mod:`invertnet.training.distributed`) every rank takes rows ``rank::world`` of each batch,
    DistributedDataParallel averages the gradients, and only rank 0 writes files.

    Arguments:
        model: The model trained, e.g. a :class:`~invertnet.models.FlowDistribution`; the objective must hold it.
        train_data: A tensor (N, ...), a tuple of tensors with N rows (e.g. ``(images, labels)``), a map-style
            ``Dataset`` or a ``DataLoader``, see :mod:`invertnet.training.batches` (exact resume needs tensors, a
            Dataset, or a loader that yields the same batches in every pass).
        config: A :class:`~invertnet.training.TrainConfig`.
        run_dir: Folder for ``metrics.jsonl``, ``train_config.json`` and checkpoints.
        test_data: Optional held-out samples as the objective's ``evaluate`` takes them (a tensor or a tuple
            of tensors), evaluated every ``eval_every`` steps and at the end.
        progress: Show a progress bar.
        objective: The loss and its evaluation (:mod:`invertnet.training.objectives`); default
            :class:`~invertnet.training.BitsPerDim` of the model, which must then be a flow.
        checkpoint_key: Optional secret (bytes or text): checkpoints are signed with HMAC-SHA256 and only load
            with it (see :mod:`invertnet.training.checkpoint`).
        callbacks: Called with every record of ``metrics.jsonl`` (see :mod:`invertnet.training.callbacks`: wandb,
            MLflow, ...), on rank 0, after that step's checkpoint; one that raises gives a warning and training goes
            on; their ``close()`` is called when each ``fit`` returns. Default:
            :class:`~invertnet.training.callbacks.TensorBoardLogger` in ``run_dir/tensorboard`` when TensorBoard
            is installed (reopened by the next ``fit``); ``[]`` for none.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: TrainData,
        config: TrainConfig,
        run_dir: str | Path,
        test_data: Batch | None = None,
        progress: bool = True,
        objective: BitsPerDim | CrossEntropy | AdversarialLoss | IndependenceCrossEntropy | None = None,
        checkpoint_key: Key | None = None,
        callbacks: Sequence[Callback] | None = None,
    ) -> None:
        if objective is None and not isinstance(model, FlowDistribution):
            raise TypeError(f"Trainer: pass an objective to train a {type(model).__name__} (not a flow)")
        self.model = model
        self.objective = BitsPerDim(model) if objective is None else objective
        if not any(module is model for module in self.objective.modules()):
            raise ValueError(f"Trainer: the objective {type(self.objective).__name__} does not hold the model")
        self.train_data, self.test_data = train_data, test_data
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.checkpoint_key = checkpoint_key
        self._saved_step: int | None = None  # the step of the checkpoint on disk, never written twice
        self.state = TrainState(config, [p for p in model.parameters() if p.requires_grad])
        self.rank, self.world_size = rank_and_world_size()
        device = self.state.parameters[0].device
        self._batches = batch_source(train_data, config.batch_size, config.seed, device, self.world_size)
        self._callbacks: list[Callback] | None = None if callbacks is None else list(callbacks)
        self._defaults = False
        self._resumed_step: int | None = None
        for callback in self._callbacks or []:
            if not callable(callback):
                raise TypeError(f"Trainer: a callback must be callable with a record, got {type(callback).__name__}")
        torch.manual_seed(config.seed + self.rank)  # independent log-det probes on every rank
        self.loss: nn.Module = self.objective
        if self.world_size > 1:
            with torch.no_grad():  # data-dependent initialisation on the global batch, identical on every rank
                model.train()
                self.objective(self.batch(0))
            self.loss = torch.nn.parallel.DistributedDataParallel(self.objective)

    @property
    def step(self) -> int:
        """Number of optimiser steps done."""
        return self.state.step

    def batch(self, step: int) -> Any:
        """The (global) batch of a step: for tensors and Datasets a function of (seed, step)."""
        return self._batches.batch(step)

    def train_step(self) -> float:
        """One optimiser step; returns the batch's loss (for flows: mean bits/dim, training-mode estimate)."""
        return self._run(self.step + 1, progress=False)[0]

    def _run(self, until: int, progress: bool, callback: Callable[[int, float], None] | None = None) -> list[float]:
        return run_steps(
            self.loss,
            self._batches,
            self.state,
            until,
            rank=self.rank,
            world_size=self.world_size,
            callback=callback,
            progress=progress and self.rank == 0,
            name=self.objective.name,
            read_at=self._reads_losses_at,
        )

    def _reads_losses_at(self, step: int) -> bool:
        """Whether the losses are read (and checked) at ``step``: every ``log_every`` steps, and before every
        evaluation and checkpoint (so that no checkpoint holds the weights after a NaN loss)."""
        periods = (self.config.log_every, self.config.eval_every, self.config.checkpoint_every)
        return any(period and step % period == 0 for period in periods)

    @torch.no_grad()
    def evaluate(self, data: Batch, batch_size: int = 256) -> dict[str, float]:
        """The objective's test metrics (flows: mean bits/dim and its standard error), with the EMA weights."""
        self.model.eval()
        with self.ema_weights():
            return self.objective.evaluate(data, batch_size)

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        """Context manager putting the EMA weights in place of the parameters (a no-op without EMA)."""
        return self.state.ema_weights()

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds: model, EMA, optimiser, schedule, torch RNG state and the config (JSON)."""
        return {
            "model": self.model.state_dict(),
            **self.state.state_dict(),
            "rng": torch.get_rng_state(),
            "config": self.config.model_dump(mode="json"),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; rank 0 only).

        Raises:
            RunWriteError: A file could not be written (full disk, read-only folder); names it and the last
                complete checkpoint, which is intact.
        """
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.run_dir, self.step, self.checkpoint_state(), key=self.checkpoint_key)
        self._saved_step = self.step
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def resume(self) -> bool:
        """Restore the run's latest checkpoint, if any (an earlier complete one, with a warning, when the latest
        is missing or damaged); returns whether one was found. The ``metrics.jsonl`` records after the restored
        step (0 without a checkpoint), which the run redoes, are dropped (rank 0).

        Raises:
            CheckpointError: No checkpoint of the run loads, or one does not fit the model (named).
            CheckpointKeyError: The checkpoint's signature and ``checkpoint_key`` disagree.
        """
        loaded = load_latest_checkpoint(self.run_dir, key=self.checkpoint_key)
        step = 0 if loaded is None else loaded[1]
        if self.rank == 0:
            self._truncate_metrics(step)
            self._resumed_step = step  # TensorBoard drops its events after it, as metrics.jsonl its records
        if loaded is None:
            return False
        _, step, state = loaded
        self.model.load_state_dict(state["model"])
        self.state.load_state_dict(state, step)
        torch.set_rng_state(state["rng"])
        if self.rank:
            torch.manual_seed(self.config.seed + 1000 * step + self.rank)
        self._saved_step = step
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Keep the ``metrics.jsonl`` records of steps up to ``step`` (and drop a line a kill cut short)."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        with writing_to(self.run_dir):
            write_atomically(metrics, "".join(kept))

    def _log(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl`` and give it to the callbacks (rank 0 only)."""
        self._write(record)
        self._notify(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self.rank:
            return
        with writing_to(self.run_dir), open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _notify(self, record: dict[str, Any]) -> None:
        """Call the callbacks; one that raises is reported by a warning and training goes on (a tracker's network
        error must neither lose the run nor leave the other ranks waiting)."""
        if self.rank:
            return
        if self._callbacks is None:  # created at the first record: the folder exists then
            self._defaults = True
            self._callbacks = default_callbacks(self.run_dir, purge_step=self._resumed_step)
        for callback in self._callbacks:
            try:
                callback(record)
            except Exception as error:  # noqa: BLE001 (any failure of user code is reported, not raised)
                warnings.warn(
                    f"Trainer: callback {callback!r} raised {type(error).__name__}: {error} (step {record['step']}); "
                    "training goes on",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _close_callbacks(self) -> None:
        for callback in self._callbacks or []:
            close = getattr(callback, "close", None)
            if callable(close):
                close()
        if self._defaults:
            self._callbacks = None  # a later fit() opens new ones

    def _after_step(self, step: int, loss: float) -> None:
        """At a step where the losses were read: log their mean since the last record and the learning rate,
        evaluate and checkpoint when their periods say so."""
        record: dict[str, Any] = {
            "step": step,
            f"train_{self.objective.name}": loss,
            "lr": self.state.schedule.get_last_lr()[0],
        }
        if self.test_data is not None and self.config.eval_every and step % self.config.eval_every == 0:
            record.update({f"test_{key}": value for key, value in self.evaluate(self.test_data).items()})
        self._write(record)
        if self.config.checkpoint_every and step % self.config.checkpoint_every == 0:
            self.save()
        self._notify(record)  # after the checkpoint: nothing a callback does can cost the step

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to step ``until`` (default: ``config.steps``), checkpointing and evaluating periodically;
        returns the final test metrics (empty without ``test_data``).

        Raises:
            RunWriteError: The run folder cannot be written (checked before the first step), or a write failed
                (full disk): names the file and the last complete checkpoint, which is intact.
        """
        until = self.config.steps if until is None else until
        if self.rank == 0:
            check_writable(self.run_dir)  # before the work, not after it
            with writing_to(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                write_atomically(self.run_dir / "train_config.json", self.config.model_dump_json(indent=2))
        try:
            self._run(until, self.progress, self._after_step)
            if self._saved_step != self.step:
                self.save()  # the last step, unless its checkpoint was just written or resumed (never write one twice)
            if self.test_data is None:
                return {}
            evaluation = self.evaluate(self.test_data)
            self._log({"step": self.step, **{f"test_{key}": value for key, value in evaluation.items()}})
            return evaluation
        finally:
            self._close_callbacks()
