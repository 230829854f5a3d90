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
    interquartile range, per spot and per core (the majority vote of a core's spots), the ROC / LDA baseline on
    the same folds (the median over folds for every number of features, and the worst and best of those, as
    thesis Fig. 7.5 reports), and the sensitivity map averaged over folds (``run_dir/sensitivity.png``)."""
    if not isinstance(KINDS[config.model.kind], SpectraKind):
        raise UnsupportedOperation(
            f"crossvalidate: model kind {config.model.kind!r} is not a spectrum classifier (isotopenet, residualnet)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    folds, cores, baselines, maps = [], [], [], []
    for fold in range(config.data.n_folds):
        fold_config = config.model_copy(deep=True)
        fold_config.data.fold = fold
        summary = train_run(fold_config, run_dir / f"fold-{fold}", progress=progress)
        folds.append(summary["test"]["balanced_accuracy"])
        cores.append(summary["test"]["core_balanced_accuracy"])
        baselines.append(summary["roc_lda"])
        maps.append(load_file(str(run_dir / f"fold-{fold}" / "sensitivity.safetensors"))["sensitivity"])
    dataset = load_spectra_dataset(config)
    sensitivity = torch.stack(maps).mean(0)
    quartiles = statistics.quantiles(folds, n=4) if len(folds) > 1 else [folds[0]] * 3
    x = dataset.spectra.unsqueeze(1)
    core_quartiles = statistics.quantiles(cores, n=4) if len(cores) > 1 else [cores[0]] * 3

    def median_per_k(key: str) -> list[float]:
        return [statistics.median(values) for values in zip(*(baseline[key] for baseline in baselines), strict=True)]

    baseline_spot, baseline_core = median_per_k("balanced_accuracy"), median_per_k("core_balanced_accuracy")
    report = {
        "balanced_accuracy_per_fold": folds,
        "median_balanced_accuracy": statistics.median(folds),
        "interquartile_range": quartiles[2] - quartiles[0],
        "core_balanced_accuracy_per_fold": cores,
        "median_core_balanced_accuracy": statistics.median(cores),
        "core_interquartile_range": core_quartiles[2] - core_quartiles[0],
        "roc_lda": {
            "features": baselines[0]["features"],
            "median_balanced_accuracy": baseline_spot,
            "median_core_balanced_accuracy": baseline_core,
            "worst": min(baseline_spot),
            "best": max(baseline_spot),
            "core_worst": min(baseline_core),
            "core_best": max(baseline_core),
        },
        "sensitivity": sensitivity_report(sensitivity, dataset),
    }
    report["sensitivity"]["figure"] = str(
        plot_sensitivity(sensitivity, x, dataset.labels, dataset, run_dir / "sensitivity.png")
    )
    (run_dir / "crossvalidation.json").write_text(json.dumps(report, indent=2))
    return report
