r"""The training curve of a run folder: ``metrics.jsonl`` drawn as ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path

from invertnet.figures import save_figure, subplots

__all__ = ["plot_metrics"]


def plot_metrics(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the training loss (every record of ``metrics.jsonl``: the mean since the previous one) and the test
    metrics of the evaluations against the step, the loss on the left axis; returns the file written.

    Arguments:
        run_dir: A folder with ``metrics.jsonl`` (a :class:`~invertnet.training.Trainer`'s or a run's).
        output: The image (default ``run_dir/loss.png``).

    Raises:
        FileNotFoundError: ``metrics.jsonl`` is missing.
        ValueError: It holds no training record (a line cut short by a kill is skipped).
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"plot_metrics: {metrics} does not exist")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train = sorted({key for record in records for key in record if key.startswith("train_")})
    if not train:
        raise ValueError(f"plot_metrics: {metrics} holds no training loss record")
    figure, axes = subplots(figsize=(6, 3.5), feature="plot_metrics")
    for key in train:
        points = [(record["step"], record[key]) for record in records if key in record]
        axes.plot(*zip(*points, strict=True), label=key.removeprefix("train_") + " (training, mean since last record)")
    tested = [key for key in sorted({key for record in records for key in record}) if key.startswith("test_")]
    for key in tested:
        if key.endswith("standard_error"):
            continue
        points = [(record["step"], record[key]) for record in records if key in record]
        axes.plot(*zip(*points, strict=True), "o", label=key.removeprefix("test_") + " (test)")
    axes.set_xlabel("step")
    axes.set_ylabel(train[0].removeprefix("train_"))
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return save_figure(figure, Path(output) if output is not None else run_dir / "loss.png")
