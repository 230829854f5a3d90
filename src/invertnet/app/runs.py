r"""Runs: train the model a :class:`~invertnet.app.config.RunConfig` describes in a run folder, and open,
evaluate, invert, sample, certify or draw metameric samples from a trained one.

What a run does with its model is its kind's (:mod:`invertnet.app.kinds`); this module owns the run folder:
``run_config.json``, ``metrics.jsonl``, checkpoints (``step-*``, ``latest``), ``weights.json`` (which weights
the finished run keeps, raw or averaged, chosen on the validation split), ``summary.json`` and the figures the
kind writes. Checkpoints are signed with HMAC-SHA256 when ``INVERTNET_CHECKPOINT_KEY`` is set (and then load
only with it); see :mod:`invertnet.training.checkpoint` for what the checksums protect against.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invertnet._files import is_stale_partial, remove_stale_partials, write_atomically
from invertnet.analysis import Certificate, metameric_sample, plot_certificate
from invertnet.app.config import RunConfig, read_run_config
from invertnet.app.kinds import KINDS, ModelKind, RunData
from invertnet.app.lock import LOCK_NAME, RunLock, check_unlocked
from invertnet.figures import save_figure, subplots
from invertnet.training import Trainer, choose_weights, compare_weights, kept_weights
from invertnet.training.checkpoint import check_weight_average, check_writable, load_latest_checkpoint, writing_to
from invertnet.training.curves import plot_metrics
from invertnet.training.distributed import is_main_process, rank_and_world_size

__all__ = [
    "OpenRun",
    "build",
    "certify_run",
    "evaluate_run",
    "invert_run",
    "metameric_run",
    "open_run",
    "sample_run",
    "train_run",
]

#: The run's choice between its trained and averaged weights (:func:`~invertnet.training.choose_weights`).
WEIGHTS_FILE = "weights.json"

_KEY_VARIABLE = "INVERTNET_CHECKPOINT_KEY"
"""The environment variable holding the key that signs and verifies a run's checkpoints (HMAC-SHA256)."""


def _checkpoint_key() -> str | None:
    """The checkpoint key from ``INVERTNET_CHECKPOINT_KEY``, or ``None`` when it is unset or empty."""
    return os.environ.get(_KEY_VARIABLE) or None


@dataclass
class OpenRun:
    """A run rebuilt from its folder: config, kind, the model in eval mode with the weights the run keeps (see
    ``weights``), and its data.

    Attributes:
        weights: The recorded choice between trained and averaged weights: ``{"kept": "ema" | "raw", ...}``.
    """

    run_dir: Path
    config: RunConfig
    kind: ModelKind
    model: nn.Module
    data: RunData
    weights: dict[str, Any]


def build(config: RunConfig) -> tuple[ModelKind, nn.Module, RunData]:
    """The config's kind, its untrained model and its data; a missing optional dependency of the kind raises
    its named ``ImportError`` first."""
    kind = KINDS[config.model.kind]
    kind.check_requirements(config)
    data = kind.load_data(config)
    if kind.validated:
        data = data.with_validation(config.data.validation_fraction)
    return kind, kind.build(config, data), data


def _finish(
    kind: ModelKind, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData, weights: dict[str, Any]
) -> dict[str, Any]:
    model.eval()
    with writing_to(run_dir):
        summary = {**kind.finish(model, config, run_dir, data), "weights": weights}
        try:
            plot_metrics(run_dir)  # loss.png
        except ImportError as error:
            summary["loss_figure"] = f"not drawn: {error}"
        write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def train_run(
    config: RunConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train the configured model in ``run_dir`` (default: a new folder under ``output_dir``) and evaluate it;
    returns the summary (also written to ``summary.json``).

    A new run (``resume=False``) needs a folder that does not exist or is empty. ``resume=True`` continues the
    run in ``run_dir`` from its latest checkpoint (from step 0 when it was stopped before its first one);
    ``config`` must be the one the run recorded, except for ``train.steps`` (a larger value extends the run).

    Raises:
        ValueError: ``run_dir`` holds files of a run and ``resume`` is off; or ``config`` differs from the run's.
        FileNotFoundError: ``resume`` on a folder without a run config (nothing to resume).
        RunWriteError: The folder cannot be written (checked before the model is built and trained), or a write
            failed (full disk): names the file and the last complete checkpoint, which is intact.
    """
    if run_dir is None:
        if not is_main_process():
            raise ValueError("multi-process training needs --run-dir, so that every process writes the same run")
        run_dir = Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_unlocked(run_dir)
    _check_run_dir(run_dir, config, resume)  # every process, before any of them writes
    if rank_and_world_size()[1] > 1:
        torch.distributed.barrier()  # rank 0's write probe below must not show up in another rank's check
    if is_main_process():
        check_writable(run_dir)
    torch.manual_seed(config.train.seed)
    kind, model, data = build(config)
    model, data = model.to(device), data.to(device)
    if rank_and_world_size()[1] > 1:
        torch.distributed.barrier()
    if not is_main_process():
        return _train(kind, model, data, config, run_dir, resume, progress)
    with writing_to(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        with writing_to(run_dir):
            # files a killed process left half-written (weights.json, summary.json after the last checkpoint,
            # which no later checkpoint save would sweep)
            remove_stale_partials(run_dir)
            write_atomically(run_dir / "run_config.json", config.model_dump_json(indent=2))
        return _train(kind, model, data, config, run_dir, resume, progress)


def _train(
    kind: ModelKind, model: nn.Module, data: RunData, config: RunConfig, run_dir: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    """Train in a prepared folder and, in the main process, evaluate: the summary."""
    objective = kind.objective(model, config)
    test_data = data.test if config.train.eval_every else None  # evaluated every eval_every steps and at the end
    trainer = Trainer(
        model, data.train, config.train, run_dir, test_data, progress, objective, checkpoint_key=_checkpoint_key()
    )
    if resume and not trainer.resume() and is_main_process():
        print(f"invertnet: {run_dir} has no checkpoint yet: training from step 0", file=sys.stderr)
    trainer.fit()
    if not is_main_process():
        return {"run_dir": str(run_dir)}
    model.eval()
    choice = choose_weights(trainer.state, objective, data.validation)
    with writing_to(run_dir):
        write_atomically(run_dir / WEIGHTS_FILE, json.dumps({"step": trainer.state.step, **choice.as_dict()}, indent=2))
    weights = {
        **choice.as_dict(),
        "test": compare_weights(trainer.state, objective, data.test),
        "figures": "the training objective's evaluation (its log-det estimator): comparable with each other, "
        "not with the summary's test figure",
    }
    with kept_weights(trainer.state, choice):
        return _finish(kind, model, config, run_dir, data, weights)


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> None:
    """Refuse to mix two runs in one folder, or to resume a run with another run's config."""
    if not resume:
        entries = sorted(path.name for path in _run_files(run_dir)) if run_dir.is_dir() else []
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"{run_dir} is not empty ({shown}): continue its run with --resume, or give a new --run-dir"
            )
        return
    config_file = run_dir / "run_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir}: nothing to resume (no run_config.json there)")
    _refuse_symlinks(run_dir)
    recorded = read_run_config(config_file).model_dump(mode="json")
    given = config.model_dump(mode="json")
    recorded["train"]["steps"] = given["train"]["steps"]  # extending a run is allowed
    differing = sorted(_differences(recorded, given))
    if differing:
        raise ValueError(
            f"{run_dir} was trained with another config ({', '.join(differing)} differ): resume it with its own "
            "config (omit --config; --set train.steps=N extends it)"
        )


def _run_files(run_dir: Path) -> list[Path]:
    """What a folder holds besides a lock and partial files of interrupted writes (a run killed while it wrote
    its config)."""
    return [path for path in run_dir.iterdir() if path.name != LOCK_NAME and not is_stale_partial(path)]


def _refuse_symlinks(run_dir: Path) -> None:
    """A run writes into its folder; a symbolic link there would make it overwrite the link's target."""
    links = sorted(path.name for path in run_dir.iterdir() if path.is_symlink())
    if links:
        raise ValueError(
            f"{run_dir} holds symbolic links ({', '.join(links)}); a run writes its files in its own folder only"
        )


def _differences(recorded: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        return [
            key
            for name in recorded.keys() | given.keys()
            for key in _differences(recorded.get(name), given.get(name), f"{prefix}{name}.")
        ]
    return [] if recorded == given else [prefix.rstrip(".")]


def open_run(run_dir: str | Path) -> OpenRun:
    """Rebuild a trained run from its folder, with the latest checkpoint's kept weights (``weights.json``; the
    average when no choice is recorded for that checkpoint), in eval mode.

    A damaged or missing latest checkpoint gives way to the newest complete earlier one, with a warning. With
    ``INVERTNET_CHECKPOINT_KEY`` set, only checkpoints signed with it load.

    Raises:
        FileNotFoundError: The folder does not exist, is not a run folder, or holds no checkpoint.
        ValueError: Its ``run_config.json`` is unreadable or invalid, no checkpoint loads, a checkpoint's signature
            and the key disagree, or its weight average does not fit the model (a ``CheckpointError``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist")
    config_file = run_dir / "run_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: run_config.json is missing")
    _refuse_symlinks(run_dir)
    config = read_run_config(config_file)
    loaded = load_latest_checkpoint(run_dir, key=_checkpoint_key())
    if loaded is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (the 'latest' file is missing)")
    checkpoint, step, state = loaded
    kind, model, data = build(config)
    model.load_state_dict(state["model"])
    parameters = [p for p in model.parameters() if p.requires_grad]
    average = check_weight_average(state["ema"], parameters, f"checkpoint {checkpoint}")
    weights = _recorded_choice(run_dir, step)
    if weights["kept"] == "ema":
        with torch.no_grad():
            for parameter, value in zip(parameters, average, strict=False):  # none without EMA, else one each
                parameter.copy_(value)
    return OpenRun(run_dir, config, kind, model.eval(), data, weights)


def _recorded_choice(run_dir: Path, step: int) -> dict[str, Any]:
    """The weights a run keeps: the choice recorded in ``weights.json`` when it was made for this checkpoint's
    step, else the average (a run still training, or written before the choice existed)."""
    path = run_dir / WEIGHTS_FILE
    record: Any = None
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: unreadable ({error}); delete it to use the averaged weights") from error
    if isinstance(record, dict) and record.get("step") == step and record.get("kept") in ("ema", "raw"):
        return record
    return {"kept": "ema", "reason": f"no choice recorded for step {step}: the weight average (if any) is used"}


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """The trained run's summary, recomputed: its kind's test metrics (flows: bits/dim with the series length
    from the truncation bound; classifiers: accuracy) and the reconstruction error through the inverse."""
    run = open_run(run_dir)
    return _finish(run.kind, run.model, run.config, run.run_dir, run.data, run.weights)


def certify_run(run_dir: str | Path) -> tuple[Certificate, Path]:
    """Certify every residual block of a trained run (thesis Remark 4.9) on a batch of its test data; saves
    ``certificate.png`` (per-layer largest singular values, thesis Fig. 4.2) in the run folder."""
    run = open_run(run_dir)
    certificate = run.kind.certify(run.model, run.data)
    return certificate, plot_certificate(certificate, run.run_dir / "certificate.png")


def sample_run(run_dir: str | Path, n: int = 64) -> Tensor:
    """Draw ``n`` samples from a trained generative run (flows; GANs: labels 0, 1, ... in turn)."""
    run = open_run(run_dir)
    return run.kind.sample(run.model, n)


def invert_run(run_dir: str | Path) -> dict[str, Any]:
    """Reconstruction error of test data through the inverse of a trained run (classifiers: of the features;
    GANs: latent recovery of generated images from half their pixels)."""
    run = open_run(run_dir)
    return run.kind.invert(run.model, run.config, run.data)


@torch.no_grad()
def metameric_run(run_dir: str | Path, n: int = 8) -> dict[str, Any]:
    """Metameric samples (thesis Def. 6.8) of a trained fully invertible classifier: the logits of n test images
    with the nuisance variables of n others of different classes; saves ``metameric.png`` (rows: inputs,
    references, metameric samples) and reports how exactly logits and nuisances were kept."""
    run = open_run(run_dir)
    model: Any = copy.deepcopy(run.kind.metameric_classifier(run.model)).double()  # logits kept to 1e-12
    images, labels = run.data.test
    images = images.double()
    x = images[:n]
    partner = [int(((labels != labels[i]).nonzero()[i % 5 + 1]).item()) for i in range(len(x))]
    reference = images[partner]
    x_met = metameric_sample(model, x, reference)
    semantic, nuisance = model.split(model.features(x_met))
    path = _plot_metameric(torch.cat([x, reference, x_met]), len(x), run.run_dir / "metameric.png")
    return {
        "figure": str(path),
        "max_logit_difference": (semantic - model(x)).abs().max().item(),
        "max_nuisance_difference": (nuisance - model.split(model.features(reference))[1]).abs().max().item(),
        "predicted": model(x_met).argmax(1).tolist(),
        "reference_labels": labels[partner].tolist(),
    }


def _plot_metameric(grid: Tensor, n: int, path: Path) -> Path:
    figure, axes = subplots(3, n, figsize=(n, 3.3), squeeze=False, feature="metameric.png")
    for axis, image in zip(axes.flat, grid, strict=True):
        axis.imshow(image[0].numpy(), cmap="gray")
        axis.axis("off")
    for row, title in enumerate(("logits from", "nuisance from", "metameric")):
        axes[row][0].set_title(title, fontsize=7, loc="left")
    return save_figure(figure, path)
