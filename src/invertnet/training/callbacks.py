r"""What the :class:`~invertnet.training.Trainer` tells the outside world: one record of metrics at a time.

A callback is any callable taking the record, a dict with ``"step"`` and the scalars of that step (the mean
training loss since the previous record, ``"lr"``, and ``test_*`` metrics at evaluations), called every
``log_every`` steps, at every evaluation and checkpoint and at the end, on rank 0 only, after the record is in
``metrics.jsonl``. That is enough for any tracker::

    import wandb
    trainer = Trainer(model, data, config, "run", callbacks=[lambda record: wandb.log(record, step=record["step"])])

A callback with a ``close()`` method is closed when the Trainer's ``fit`` returns. :class:`TensorBoardLogger` is
one callback; the Trainer installs it by default when TensorBoard is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from invertnet._optional import require

__all__ = ["Callback", "TensorBoardLogger", "default_callbacks"]


class Callback(Protocol):
    """Called with each record of metrics (``{"step": int, name: float, ...}``)."""

    def __call__(self, record: Mapping[str, float]) -> None: ...


class TensorBoardLogger:
    """Every scalar of every record as a TensorBoard event in ``log_dir`` (the ``tensorboard`` extra).

    Arguments:
        log_dir: The events' folder, e.g. ``RUN_DIR/tensorboard``.
        purge_step: A resumed run's step: events of later steps, which the run redoes, are dropped.

    Raises:
        ImportError: TensorBoard is not installed, naming the extra that installs it.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        writer = require("torch.utils.tensorboard", "tensorboard", "TensorBoard events").SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer = writer(str(self.log_dir), purge_step=purge_step)

    def __call__(self, record: Mapping[str, float]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush the events to disk."""
        self._writer.close()


def default_callbacks(run_dir: Path, purge_step: int | None = None) -> list[Callback]:
    """What a Trainer reports to when given no callbacks: TensorBoard in ``run_dir/tensorboard`` when installed
    (dropping the events after ``purge_step``, a resumed run's step)."""
    try:
        return [TensorBoardLogger(run_dir / "tensorboard", purge_step=purge_step)]
    except ImportError:
        return []
