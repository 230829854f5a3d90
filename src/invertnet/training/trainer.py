r"""Maximum-likelihood training of flows with exact resume (thesis 5.2, A.2).

One training step draws a batch, computes the loss -mean log p(x) (reported in bits/dim), backpropagates,
clips gradients, steps the optimiser and the schedule, and updates an exponential moving average (EMA) of the
weights used for evaluation. Batches are a deterministic function of (seed, step), and checkpoints hold the
model, EMA, optimiser, schedule and torch RNG state, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from invertnet.models.flows import FlowDistribution
from invertnet.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from invertnet.training.distributed import rank_and_world_size
from invertnet.training.objectives import AdversarialLoss, Batch, BitsPerDim, CrossEntropy

__all__ = ["TrainConfig", "Trainer"]

_OPTIMIZERS = ("adam", "adamax", "amsgrad")
_SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainConfig:
    """Settings of :class:`Trainer` (thesis A.2 trains MNIST with Adamax, lr 0.003).

    Attributes:
        steps: Number of optimiser steps.
        batch_size: Samples per step.
        lr: Learning rate.
        optimizer: ``"adam"``, ``"adamax"`` or ``"amsgrad"``.
        beta1: First-moment decay of the optimiser (0.9; DCGAN training uses 0.5).
        schedule: ``"constant"``, ``"cosine"`` (to 0 over ``steps``) or ``"step"`` (x ``gamma`` every
            ``step_size`` steps, or at each of the ``milestones`` when given).
        step_size, gamma, milestones: Parameters of the step schedule.
        weight_decay: L2 penalty of the optimiser.
        grad_clip: Maximal gradient 2-norm, or 0 for none.
        ema_decay: Decay of the weight average used for evaluation, or 0 for none.
        eval_every, checkpoint_every: Periods in steps (0: only at the end).
        seed: Seed of the batch order and of torch's RNG.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    beta1: float = 0.9
    schedule: str = "constant"
    step_size: int = 1000
    gamma: float = 0.5
    milestones: list[int] = field(default_factory=list)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: unknown {self.optimizer!r}; choose one of {_OPTIMIZERS}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: unknown {self.schedule!r}; choose one of {_SCHEDULES}")
        for name in ("steps", "batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if sorted(set(self.milestones)) != list(self.milestones) or any(step < 1 for step in self.milestones):
            raise ValueError(f"TrainConfig.milestones must be increasing positive steps, got {self.milestones}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.grad_clip < 0 or not 0 <= self.beta1 < 1:
            raise ValueError("TrainConfig: need lr > 0, 0 <= ema_decay < 1, grad_clip >= 0 and 0 <= beta1 < 1")


def _optimizer(config: TrainConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    betas = (config.beta1, 0.999)
    if config.optimizer == "adamax":
        return torch.optim.Adamax(parameters, lr=config.lr, betas=betas, weight_decay=config.weight_decay)
    amsgrad = config.optimizer == "amsgrad"
    return torch.optim.Adam(parameters, lr=config.lr, betas=betas, weight_decay=config.weight_decay, amsgrad=amsgrad)


def _schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    if config.schedule == "step" and config.milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestones, gamma=config.gamma)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _size(data: Batch) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def _take(data: Batch, index: Tensor | slice) -> Batch:
    return tuple(part[index] for part in data) if isinstance(data, tuple) else data[index]


class Trainer:
    """Train a flow (or, with an objective, any model) on in-memory data, with checkpoints and exact resume.

    Under ``torchrun`` (a joined process group, see :mod:`invertnet.training.distributed`) every rank takes its
    shard of each batch, DistributedDataParallel averages the gradients, and only rank 0 writes files.

    Arguments:
        model: The model trained, e.g. a :class:`~invertnet.models.FlowDistribution`.
        train_data: The training samples: a tensor (N, ...), or a tuple of tensors with N rows each, e.g.
            ``(images, labels)``; batches have the same structure.
        config: A :class:`TrainConfig`.
        run_dir: Folder for ``metrics.jsonl``, ``config.json`` and checkpoints.
        test_data: Optional held-out samples, evaluated every ``eval_every`` steps and at the end.
        progress: Show a progress bar.
        objective: The loss and its evaluation (:mod:`invertnet.training.objectives`); default
            :class:`~invertnet.training.BitsPerDim` of the model, which must then be a flow.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Batch,
        config: TrainConfig,
        run_dir: str | Path,
        test_data: Batch | None = None,
        progress: bool = True,
        objective: BitsPerDim | CrossEntropy | AdversarialLoss | None = None,
    ) -> None:
        if _size(train_data) < config.batch_size:
            raise ValueError(
                f"Trainer: {_size(train_data)} training samples, fewer than batch_size={config.batch_size}"
            )
        if objective is None and not isinstance(model, FlowDistribution):
            raise TypeError(f"Trainer: pass an objective to train a {type(model).__name__} (not a flow)")
        self.model = model
        self.objective = BitsPerDim(model) if objective is None else objective
        self.train_data = train_data
        self.test_data = test_data
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(config, self.parameters)
        self.schedule = _schedule(config, self.optimizer)
        self.ema = [p.detach().clone() for p in self.parameters] if config.ema_decay else None
        self.step = 0
        self._tensorboard: Any = None
        self._epoch_order: tuple[int, Tensor] | None = None
        self.rank, self.world_size = rank_and_world_size()
        if config.batch_size % self.world_size:
            raise ValueError(f"Trainer: batch_size={config.batch_size} is not divisible by {self.world_size} processes")
        torch.manual_seed(config.seed + self.rank)  # independent log-det probes on every rank
        self.loss: nn.Module = self.objective
        if self.world_size > 1:
            with torch.no_grad():  # data-dependent initialisation on the global batch, identical on every rank
                model.train()
                self.objective(self.batch(0))
            self.loss = torch.nn.parallel.DistributedDataParallel(self.objective)

    def batch(self, step: int) -> Batch:
        """The batch of a step: a deterministic function of (seed, step), so resumed runs see the same data."""
        per_epoch = _size(self.train_data) // self.config.batch_size
        epoch, position = divmod(step, per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # one permutation per epoch, not per step
            generator = torch.Generator().manual_seed(self.config.seed + epoch)
            self._epoch_order = (epoch, torch.randperm(_size(self.train_data), generator=generator))
        order = self._epoch_order[1]
        return _take(
            self.train_data, order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        )

    def train_step(self) -> float:
        """One optimiser step; returns the batch's loss (for flows: mean bits/dim, training-mode estimate)."""
        self.model.train()
        loss = self.loss(_take(self.batch(self.step), slice(self.rank, None, self.world_size)))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Trainer: the loss became {loss.item()} at step {self.step}; lower the lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            with torch.no_grad():
                for average, parameter in zip(self.ema, self.parameters, strict=True):
                    average.lerp_(parameter, 1 - self.config.ema_decay)
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def evaluate(self, data: Batch, batch_size: int = 256) -> dict[str, float]:
        """The objective's test metrics (flows: mean bits/dim and its standard error), with the EMA weights."""
        self.model.eval()
        with self.ema_weights():
            return self.objective.evaluate(data, batch_size)

    def ema_weights(self) -> _SwapWeights:
        """Context manager putting the EMA weights in place of the parameters (a no-op without EMA)."""
        return _SwapWeights(self.parameters, self.ema)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema or [],
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomically; rank 0 only)."""
        path = save_checkpoint(self.run_dir, self.step, self.state()) if self.rank == 0 else None
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def resume(self) -> bool:
        """Restore the run's latest checkpoint, if any; returns whether one was found."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        step, state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        optimizer_state["state"] = {int(key): value for key, value in optimizer_state["state"].items()}
        self.optimizer.load_state_dict(optimizer_state)
        schedule_state = {key: value for key, value in state["schedule"].items() if key != "lr_lambdas"}
        self.schedule.load_state_dict(schedule_state)
        if self.ema is not None:
            for average, saved in zip(self.ema, state["ema"], strict=True):
                average.copy_(saved)
        torch.set_rng_state(state["rng"])
        if self.rank:
            torch.manual_seed(self.config.seed + 1000 * step + self.rank)
        self.step = step
        return True

    def _log(self, record: dict[str, Any]) -> None:
        """Append a record to ``metrics.jsonl``, and to TensorBoard when it is installed (rank 0 only)."""
        if self.rank:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self._tensorboard:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to step ``until`` (default: ``config.steps``), checkpointing and evaluating periodically."""
        until = self.config.steps if until is None else until
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        quiet = not self.progress or self.rank > 0
        bar = tqdm(total=until, initial=self.step, disable=quiet, desc="train", unit="step")
        evaluation: dict[str, float] = {}
        while self.step < until:
            loss = self.train_step()
            record: dict[str, Any] = {
                "step": self.step,
                f"train_{self.objective.name}": loss,
                "lr": self.schedule.get_last_lr()[0],
            }
            if self.test_data is not None and self.config.eval_every and self.step % self.config.eval_every == 0:
                evaluation = self.evaluate(self.test_data)
                record.update({f"test_{key}": value for key, value in evaluation.items()})
            self._log(record)
            bar.set_postfix({self.objective.name: f"{loss:.3f}"})
            bar.update(1)
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save()
        bar.close()
        self.save()
        if self.test_data is not None:
            evaluation = self.evaluate(self.test_data)
            self._log({"step": self.step, **{f"test_{key}": value for key, value in evaluation.items()}})
        return evaluation


class _SwapWeights:
    """Context manager that puts the EMA weights in place of the parameters and restores them after."""

    def __init__(self, parameters: list[nn.Parameter], averages: list[Tensor] | None) -> None:
        self.parameters = parameters
        self.averages = averages
        self.saved: list[Tensor] = []

    def __enter__(self) -> None:
        if self.averages is None:
            return
        self.saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.averages, strict=True):
                parameter.copy_(average)

    def __exit__(self, *exc: object) -> None:
        if self.averages is None:
            return
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, self.saved, strict=True):
                parameter.copy_(saved)
