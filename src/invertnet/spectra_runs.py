r"""Runs of the mass-spectra classifiers (thesis ch. 7): data by grouped cross-validation fold, the IsotopeNet /
ResidualNet models, and what a finished run reports (balanced accuracy, the averaged sensitivity map against
the peptides that differ), cross-validation over all folds, and the receptive field against isotope-pattern
widths (Fig. 7.3)."""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from invertnet.analysis.sensitivity import sensitivity_map, top_sensitive_bins  # noqa: E402
from invertnet.config import DataConfig, RunConfig  # noqa: E402
from invertnet.data import SpectraDataset, isotope_pattern_bin_counts, read_imzml, synthetic_spectra  # noqa: E402
from invertnet.data.folds import grouped_folds  # noqa: E402
from invertnet.figures import save_figure  # noqa: E402
from invertnet.models.spectra import IsotopeNet, ResidualNet  # noqa: E402
from invertnet.training.objectives import CrossEntropy, balanced_accuracy  # noqa: E402

__all__ = [
    "build_spectra_model",
    "finish_spectra",
    "is_spectra",
    "load_spectra",
    "load_spectra_dataset",
    "receptive_field_study",
]

SPECTRA_MODELS = ("isotopenet", "residualnet")


def is_spectra(config: RunConfig) -> bool:
    """Whether the config trains a spectrum classifier (``isotopenet`` or ``residualnet``)."""
    return config.model.kind in SPECTRA_MODELS


def load_spectra_dataset(config: RunConfig) -> SpectraDataset:
    """The whole data set: ``synthetic_spectra`` or an imzML file (``data.root``, labels from ``data.labels``),
    each spectrum scaled to total ion count = number of bins (TIC normalisation). The last data set read is
    kept, so a run's training, its summary and the folds of a cross-validation read the file once; treat it as
    read-only."""
    return _load_dataset(config.data.model_dump_json(exclude={"fold"}), config.model.kind, config.train.seed)


@functools.lru_cache(maxsize=1)
def _load_dataset(data_json: str, kind: str, seed: int) -> SpectraDataset:
    data = DataConfig.model_validate_json(data_json)
    if data.name == "synthetic_spectra":
        dataset = synthetic_spectra(
            n_per_class=data.n_per_class, length=data.spectrum_length, n_groups=data.n_groups, seed=seed
        )
    elif data.name == "imzml":
        if data.root is None:
            raise ValueError("data.root: the path of the .imzML file is required for data.name 'imzml'")
        mz_range = None if data.mz_min is None or data.mz_max is None else (data.mz_min, data.mz_max)
        dataset = read_imzml(data.root, labels=data.labels, mz_range=mz_range, n_bins=data.n_bins)
    else:
        raise ValueError(f"data.name: {kind} needs spectra ('synthetic_spectra' or 'imzml'), got {data.name!r}")
    totals = dataset.spectra.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dataset.spectra.dtype).tiny)
    dataset.spectra = dataset.spectra / totals * dataset.spectra.shape[1]
    return dataset


def load_spectra(config: RunConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], SpectraDataset]:
    """``((x, y) train, (x, y) test, dataset)`` for fold ``data.fold`` of ``data.n_folds`` grouped folds (no
    group in both parts, thesis 7.4) when the data has at least ``n_folds`` groups (patients / cores, e.g. the
    labels CSV's group column), else folds over spectra; stratified by class; spectra shaped (N, 1, L)."""
    dataset = load_spectra_dataset(config)
    if not 0 <= config.data.fold < config.data.n_folds:
        raise ValueError(f"data.fold must lie in [0, {config.data.n_folds}), got {config.data.fold}")
    groups = dataset.groups
    if len(torch.unique(groups)) < config.data.n_folds:  # no patients / cores given: folds over spectra
        groups = torch.arange(len(groups))
    folds = grouped_folds(groups, config.data.n_folds, seed=config.train.seed, labels=dataset.labels)
    train_index, test_index = folds[config.data.fold]
    x = dataset.spectra.unsqueeze(1)
    return (x[train_index], dataset.labels[train_index]), (x[test_index], dataset.labels[test_index]), dataset


def build_spectra_model(config: RunConfig, length: int, n_classes: int) -> nn.Module:
    """IsotopeNet (Table 7.2) or ResidualNet (Table A.1) for spectra of ``length`` bins."""
    if config.model.kind == "isotopenet":
        return IsotopeNet(length, n_classes, config.model.kernel_size, config.model.dropout)
    return ResidualNet(length, n_classes)


def finish_spectra(model: nn.Module, config: RunConfig, run_dir: Path, test: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """Test metrics (cross-entropy, accuracy, balanced accuracy), the sensitivity map averaged over the test
    spectra with its peaks against the known discriminative m/z (synthetic data), and ``sensitivity.png``."""
    model.eval()
    x, y = test
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    metrics = CrossEntropy(model).evaluate(test)
    metrics["balanced_accuracy"] = balanced_accuracy(predictions, y)
    dataset = load_spectra_dataset(config)
    sensitivity = sensitivity_map(model, x, y, method="gradient_times_input")[0]
    report: dict[str, Any] = {"run_dir": str(run_dir), "test": metrics}
    report["sensitivity"] = _sensitivity_report(sensitivity, dataset)
    report["sensitivity"]["figure"] = str(_plot_sensitivity(sensitivity, x, y, dataset, run_dir / "sensitivity.png"))
    torch.save(sensitivity, run_dir / "sensitivity.pt")
    if isinstance(model, IsotopeNet):
        report["receptive_field_bins"] = model.receptive_field()
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2))
    return report


def _sensitivity_report(sensitivity: Tensor, dataset: SpectraDataset) -> dict[str, Any]:
    """The m/z of the largest sensitivities; for synthetic data, which differing peptides they find (a peak
    from 1 Da below to 4 Da above a peptide's monoisotopic m/z, the span of its main isotopes)."""
    targets = getattr(dataset, "discriminative_mz", None)
    k = 5 if targets is None else max(5, len(targets))
    peaks = dataset.mz[top_sensitive_bins(sensitivity, k, min_separation=max(1, len(sensitivity) // 200))]
    report: dict[str, Any] = {"top_mz": [round(float(value), 3) for value in peaks]}
    if targets is not None:
        found = [bool(((peaks >= target - 1.0) & (peaks <= target + 4.0)).any()) for target in targets.tolist()]
        report["discriminative_mz"] = [round(float(value), 3) for value in targets]
        report["discriminative_found"] = found
    return report


def _plot_sensitivity(sensitivity: Tensor, x: Tensor, y: Tensor, dataset: SpectraDataset, path: Path) -> Path:
    mz = dataset.mz.numpy()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for label in torch.unique(y).tolist():
        top.plot(mz, x[y == label, 0].mean(0).numpy(), linewidth=0.7, label=f"class {label} mean")
    top.set(ylabel="TIC-normalised intensity")
    top.legend(fontsize=7)
    bottom.plot(mz, sensitivity.numpy(), color="black", linewidth=0.7)
    bottom.set(xlabel="m/z", ylabel="mean |x d logit / d x|", title="sensitivity map (test spectra)")
    targets = getattr(dataset, "discriminative_mz", None)
    for target in [] if targets is None else targets.tolist():
        for axis in (top, bottom):
            axis.axvline(target, color="tab:red", linewidth=0.6, linestyle="--")
    return save_figure(figure, path)


def crossvalidate(config: RunConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train one run per fold (``run_dir/fold-k``) and report the balanced accuracy per fold, its median and
    interquartile range (thesis Fig. 7.5), and the sensitivity map averaged over folds
    (``run_dir/sensitivity.png``)."""
    from invertnet.run import train_run

    run_dir.mkdir(parents=True, exist_ok=True)
    folds, maps = [], []
    for fold in range(config.data.n_folds):
        fold_config = config.model_copy(deep=True)
        fold_config.data.fold = fold
        summary = train_run(fold_config, run_dir / f"fold-{fold}", progress=progress)
        folds.append(summary["test"]["balanced_accuracy"])
        maps.append(torch.load(run_dir / f"fold-{fold}" / "sensitivity.pt"))
    dataset = load_spectra_dataset(config)
    sensitivity = torch.stack(maps).mean(0)
    quartiles = statistics.quantiles(folds, n=4) if len(folds) > 1 else [folds[0]] * 3
    x = dataset.spectra.unsqueeze(1)
    report = {
        "balanced_accuracy_per_fold": folds,
        "median_balanced_accuracy": statistics.median(folds),
        "interquartile_range": quartiles[2] - quartiles[0],
        "sensitivity": _sensitivity_report(sensitivity, dataset),
    }
    report["sensitivity"]["figure"] = str(
        _plot_sensitivity(sensitivity, x, dataset.labels, dataset, run_dir / "sensitivity.png")
    )
    (run_dir / "crossvalidation.json").write_text(json.dumps(report, indent=2))
    return report


def receptive_field_study(
    output_dir: Path, mz_range: tuple[float, float] = (800.0, 3500.0), mean_bin_width: float = 0.163
) -> dict[str, Any]:
    """Thesis Fig. 7.3: bins covered by an Averagine isotope pattern (t_iso = 0.005) over the mass range on a
    TOF-like grid whose bin width grows with m/z (mean ``mean_bin_width`` Da), against IsotopeNet's receptive
    field. Saves ``receptive_field.png``."""
    low, high = mz_range
    centre = (low + high) / 2
    n_bins = int((high - low) / mean_bin_width)
    widths = mean_bin_width * np.linspace(low, high, n_bins) / centre  # bin width proportional to m/z
    edges = low + np.concatenate([[0.0], np.cumsum(widths)]) * (high - low) / widths.sum()
    masses = np.linspace(low + 50, high - 50, 60)
    bins = isotope_pattern_bin_counts(masses, edges, edges=True).tolist()
    network = IsotopeNet(n_bins)
    field, with_local = network.receptive_field(), network.receptive_field(include_locally_connected=True)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(masses, bins, label="isotope pattern (Averagine, t_iso = 0.005)")
    axis.axhline(field, color="tab:red", label=f"IsotopeNet convolutions ({field} bins)")
    axis.axhline(with_local, color="tab:red", linestyle="--", label=f"with the locally connected layer ({with_local})")
    axis.set(xlabel="m/z", ylabel="bins", title="receptive field against isotope-pattern width")
    axis.legend(fontsize=8)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "figure": str(save_figure(figure, output_dir / "receptive_field.png")),
        "receptive_field_bins": field,
        "receptive_field_with_locally_connected_bins": with_local,
        "largest_pattern_bins": int(max(bins)),
        "covered_by_convolutions": bool(max(bins) <= field),
        "covered_with_locally_connected": bool(max(bins) <= with_local),
        "pattern_bins": dict(zip([round(float(m), 1) for m in masses[::10]], bins[::10], strict=True)),
    }
