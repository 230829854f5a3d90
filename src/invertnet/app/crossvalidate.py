r"""``invertnet crossvalidate``: a spectrum classifier trained on every grouped cross-validation fold
(thesis 7.4)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from invertnet.app.config import RunConfig
from invertnet.app.kinds import KINDS, UnsupportedOperation
from invertnet.app.kinds.spectra import SpectraKind, load_spectra_dataset, plot_sensitivity, sensitivity_report
from invertnet.app.runs import train_run

__all__ = ["crossvalidate"]


def crossvalidate(config: RunConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train one run per fold (``run_dir/fold-k``) and report the balanced accuracy per fold, its median and
    interquartile range (thesis Fig. 7.5), and the sensitivity map averaged over folds
    (``run_dir/sensitivity.png``)."""
    if not isinstance(KINDS[config.model.kind], SpectraKind):
        raise UnsupportedOperation(
            f"crossvalidate: model kind {config.model.kind!r} is not a spectrum classifier (isotopenet, residualnet)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    folds, maps = [], []
    for fold in range(config.data.n_folds):
        fold_config = config.model_copy(deep=True)
        fold_config.data.fold = fold
        summary = train_run(fold_config, run_dir / f"fold-{fold}", progress=progress)
        folds.append(summary["test"]["balanced_accuracy"])
        maps.append(load_file(str(run_dir / f"fold-{fold}" / "sensitivity.safetensors"))["sensitivity"])
    dataset = load_spectra_dataset(config)
    sensitivity = torch.stack(maps).mean(0)
    quartiles = statistics.quantiles(folds, n=4) if len(folds) > 1 else [folds[0]] * 3
    x = dataset.spectra.unsqueeze(1)
    report = {
        "balanced_accuracy_per_fold": folds,
        "median_balanced_accuracy": statistics.median(folds),
        "interquartile_range": quartiles[2] - quartiles[0],
        "sensitivity": sensitivity_report(sensitivity, dataset),
    }
    report["sensitivity"]["figure"] = str(
        plot_sensitivity(sensitivity, x, dataset.labels, dataset, run_dir / "sensitivity.png")
    )
    (run_dir / "crossvalidation.json").write_text(json.dumps(report, indent=2))
    return report
