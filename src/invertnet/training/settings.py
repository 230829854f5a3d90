r"""The training settings shared by :func:`~invertnet.training.fit`, the :class:`~invertnet.training.Trainer` and
the application's run configs: one validated class, and the optimiser and schedule it describes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

__all__ = ["MAX_BATCH_SIZE", "MAX_STEPS", "SEED_BITS", "TrainConfig"]

MAX_STEPS = 10**9
"""Most optimiser steps (and the longest periods) a config may ask for."""
MAX_BATCH_SIZE = 2**20
"""Most samples per step."""
SEED_BITS = 62
"""Seeds lie in [0, 2^62): torch seeds are 64-bit, and the Trainer seeds step ``s`` with ``seed + 1000 s + rank``."""


class TrainConfig(BaseModel):
    """Settings of a training run (Behrmann's thesis, appendix A.2, trains MNIST with Adamax, lr 0.003; its
    classifiers, A.1 and Behrmann et al. 2019, C.2, use momentum SGD, lr 0.1, weight decay 5e-4).

    Built with keyword arguments, ``TrainConfig(steps=300, lr=5e-3)``; every field is checked on construction
    and on assignment, and a bad or unknown field raises a :class:`pydantic.ValidationError` (a
    :class:`ValueError`) that names it. ``model_dump(mode="json")`` gives the plain JSON stored in checkpoints.

    Examples:
        >>> TrainConfig(steps=300, schedule="cosine").steps
        300
        >>> TrainConfig(step=300)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for TrainConfig
        step
        ...
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(1000, gt=0, le=MAX_STEPS, description="number of optimiser steps")
    batch_size: int = Field(
        64, gt=0, le=MAX_BATCH_SIZE, description="samples per step (a DataLoader's batches are taken as it yields them)"
    )
    lr: float = Field(1e-3, gt=0, description="learning rate")
    optimizer: Literal["adam", "adamax", "amsgrad", "sgd"] = Field("adam", description="the optimiser")
    beta1: float = Field(
        0.9, ge=0, lt=1, description="Adam / Adamax / AMSGrad: first-moment decay of the optimiser (DCGANs use 0.5)"
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD: momentum (0: plain SGD; the i-ResNet classifiers: 0.9)")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum (needs momentum > 0)")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant",
        description="learning-rate schedule: constant, cosine (to 0 over `steps`), or step (x `gamma` every "
        "`step_size` steps, or at each of the `milestones` when given)",
    )
    step_size: int = Field(1000, gt=0, le=MAX_STEPS, description="step schedule: period in steps")
    gamma: float = Field(0.5, gt=0, description="step schedule: factor of the learning rate")
    milestones: list[int] = Field(
        default_factory=list, description="step schedule: increasing steps at which the rate is multiplied by gamma"
    )
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of the optimiser")
    grad_clip: float = Field(0.0, ge=0, description="maximal gradient 2-norm, or 0 for no clipping")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="decay of the weight average (EMA), or 0 for none")
    eval_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Trainer: evaluation period in steps (0: only at the end)"
    )
    checkpoint_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Trainer: checkpoint period in steps (0: only at the end)"
    )
    log_every: int = Field(
        10,
        gt=0,
        le=MAX_STEPS,
        description="period in steps at which the losses are read from the device (one synchronisation), checked "
        "for NaN and logged (metrics.jsonl, progress bar, callbacks); also at every evaluation, checkpoint and the end",
    )
    seed: int = Field(
        0, description=f"seed of the batch order, 0 <= seed < 2^{SEED_BITS}; the Trainer also seeds torch's RNG with it"
    )

    @field_validator("seed")
    @classmethod
    def _seed_fits(cls, seed: int) -> int:
        if not 0 <= seed < 2**SEED_BITS:
            raise ValueError(
                f"seed must be an integer with 0 <= seed < 2^{SEED_BITS} (torch's seeds are 64-bit integers and the "
                f"Trainer adds the step to it), got {seed}"
            )
        return seed

    @field_validator("milestones")
    @classmethod
    def _increasing_positive(cls, milestones: list[int]) -> list[int]:
        if sorted(set(milestones)) != milestones or any(step < 1 for step in milestones):
            raise ValueError(f"milestones must be increasing positive steps, got {milestones}")
        return milestones

    @model_validator(mode="after")
    def _momentum_is_for_sgd(self) -> TrainConfig:
        if self.optimizer != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(
                f"momentum / nesterov: settings of optimizer='sgd'; optimizer={self.optimizer!r} does not read them "
                "(its first-moment decay is beta1)"
            )
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        return self

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser of ``parameters`` these settings describe (``optimizer``, ``lr``, ``weight_decay``;
        Adam's ``beta1``, with second-moment decay 0.999; SGD's ``momentum`` and ``nesterov``)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                parameters, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
            )
        betas = (self.beta1, 0.999)
        if self.optimizer == "adamax":
            return torch.optim.Adamax(parameters, lr=self.lr, betas=betas, weight_decay=self.weight_decay)
        amsgrad = self.optimizer == "amsgrad"
        return torch.optim.Adam(parameters, lr=self.lr, betas=betas, weight_decay=self.weight_decay, amsgrad=amsgrad)

    def make_schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule of ``optimizer`` (``schedule``, ``steps``, ``step_size``, ``gamma``,
        ``milestones``), stepped once per optimiser step."""
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        if self.schedule == "step" and self.milestones:
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=self.milestones, gamma=self.gamma)
        if self.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
