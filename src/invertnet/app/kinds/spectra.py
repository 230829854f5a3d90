r"""Mass-spectra classifiers (thesis ch. 7): ``isotopenet`` (Table 7.2) and ``residualnet`` (Table A.1),
trained on one grouped cross-validation fold of synthetic spectra or an imzML file.

A finished run reports cross-entropy, accuracy and balanced accuracy, and the sensitivity map averaged over the
test spectra with its peaks against the peptides that differ (synthetic data); writes ``sensitivity.png`` and
``sensitivity.safetensors`` (the map, which ``invertnet crossvalidate`` averages over folds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from invertnet._files import save_tensors
from invertnet.analysis.sensitivity import sensitivity_map, top_sensitive_bins
from invertnet.app.kinds.base import KindConfig, ModelKind, RunData
from invertnet.data import SpectraDataset, grouped_folds, read_imzml, synthetic_spectra
from invertnet.figures import save_figure, subplots
from invertnet.models.roc_lda import RocLda, roc_statistics
from invertnet.models.spectra import IsotopeNet, ResidualNet
from invertnet.training.objectives import CrossEntropy, balanced_accuracy, core_balanced_accuracy

if TYPE_CHECKING:
    from invertnet.app.config import DataConfig, RunConfig

__all__ = [
    "IsotopeNetConfig",
    "ResidualNetConfig",
    "SpectraKind",
    "load_spectra_dataset",
    "plot_sensitivity",
    "sensitivity_report",
]


class IsotopeNetConfig(KindConfig):
    """``isotopenet``: :class:`~invertnet.models.IsotopeNet` (thesis Table 7.2)."""

    kind: Literal["isotopenet"] = "isotopenet"
    builder: ClassVar = IsotopeNet
    locally_connected_kernel: int = Field(
        3, gt=0, le=1001, description="odd kernel size of the locally connected layer"
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="dropout before the locally connected layer")
    locally_connected_norm: bool = Field(
        True, description="batch norm and ReLU after the locally connected layer (not in Table 7.2's rows)"
    )
    legacy_names: ClassVar[dict[str, str]] = {"kernel_size": "locally_connected_kernel"}


class ResidualNetConfig(KindConfig):
    """``residualnet``: :class:`~invertnet.models.ResidualNet` (thesis Table A.1)."""

    kind: Literal["residualnet"] = "residualnet"
    builder: ClassVar = ResidualNet
    layout: Literal["fitted", "table"] = Field(
        "fitted", description="depth fitted to the stated parameter count (15 layers) or Table A.1's 12 rows"
    )


class SpectraKind(ModelKind):
    """A spectrum classifier trained with cross-entropy on one fold of grouped cross-validation."""

    family: ClassVar[str] = "spectrum classifier"
    validated: ClassVar[bool] = False  # grouped folds: a random hold-out would leak groups
    augmentations: ClassVar[frozenset[str]] = frozenset({"augment_shift"})
    requires: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("matplotlib.figure", "plots", "a spectra run's sensitivity.png"),
    )

    def load_data(self, config: RunConfig) -> RunData:
        train, test, split = load_spectra(config)
        return RunData(train, test, n_classes=max(int(split.dataset.labels.max()) + 1, 2), extra=split)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        model = config.model
        return model.builder(data.train[0].shape[-1], data.n_classes, **model.builder_arguments())

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        return CrossEntropy(model, max_shift=config.data.augment_shift)

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        return finish_spectra(model, run_dir, data.test, data.extra, data.train)


def load_spectra_dataset(config: RunConfig) -> SpectraDataset:
    """The whole data set: ``synthetic_spectra`` or an imzML file (``data.root``, labels from ``data.labels``),
    each spectrum scaled to total ion count = number of bins (TIC normalisation). The last data set read is
    kept, so a run's training, its summary and the folds of a cross-validation read the file once; treat it as
    read-only."""
    key = (config.data.model_dump_json(exclude={"fold"}), config.model.kind, config.train.seed)
    if key not in _LAST_DATASET:
        _LAST_DATASET.clear()
        _LAST_DATASET[key] = _read_dataset(config.data, config.model.kind, config.train.seed)
    return _LAST_DATASET[key]


_LAST_DATASET: dict[tuple[str, str, int], SpectraDataset] = {}


def _read_dataset(data: DataConfig, kind: str, seed: int) -> SpectraDataset:
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


@dataclass(frozen=True)
class SpectraSplit:
    """The data set of a spectra run and the group (tissue core) of every test spectrum."""

    dataset: SpectraDataset
    test_groups: Tensor


def load_spectra(config: RunConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], SpectraSplit]:
    """``((x, y) train, (x, y) test, split)`` for fold ``data.fold`` of ``data.n_folds`` grouped folds (no
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
    split = SpectraSplit(dataset, dataset.groups[test_index])
    return (x[train_index], dataset.labels[train_index]), (x[test_index], dataset.labels[test_index]), split


#: The numbers K of discriminative m/z values the ROC / LDA baseline is run with (thesis 7.4.1: 5 to 100).
BASELINE_FEATURES = (5, 10, 20, 50, 100)


def roc_lda_report(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], groups: Tensor) -> dict[str, Any]:
    """The ROC / LDA baseline (:class:`~invertnet.models.RocLda`) fitted on ``train`` for every K of
    :data:`BASELINE_FEATURES`, its worst and best balanced accuracy on ``test`` per spot and per core (thesis
    Fig. 7.5 reports both ends)."""
    spot, core = [], []
    statistics = roc_statistics(*train)  # one ranking of the m/z values for every K
    for k in BASELINE_FEATURES:
        predictions = RocLda(k).fit(*train, statistics=statistics).predict(test[0])
        spot.append(balanced_accuracy(predictions, test[1]))
        core.append(core_balanced_accuracy(predictions, test[1], groups))
    return {
        "features": list(BASELINE_FEATURES),
        "balanced_accuracy": spot,
        "core_balanced_accuracy": core,
        "worst": min(spot),
        "best": max(spot),
        "core_worst": min(core),
        "core_best": max(core),
    }


def finish_spectra(
    model: nn.Module,
    run_dir: Path,
    test: tuple[Tensor, Tensor],
    split: SpectraSplit,
    train: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """Test metrics (cross-entropy, accuracy, balanced accuracy per spot and per core, the majority vote of a
    core's spots), the ROC / LDA baseline on the same split (when ``train`` is given), the sensitivity map
    averaged over the test spectra with its peaks against the known discriminative m/z (synthetic data), and
    ``sensitivity.png``."""
    model.eval()
    x, y = test
    dataset = split.dataset
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    metrics = CrossEntropy(model).evaluate(test)
    metrics["balanced_accuracy"] = balanced_accuracy(predictions, y)
    metrics["core_balanced_accuracy"] = core_balanced_accuracy(predictions, y, split.test_groups)
    sensitivity = sensitivity_map(model, x, y, method="gradient_times_input")[0]
    report: dict[str, Any] = {"run_dir": str(run_dir), "test": metrics}
    report["sensitivity"] = sensitivity_report(sensitivity, dataset)
    report["sensitivity"]["figure"] = str(plot_sensitivity(sensitivity, x, y, dataset, run_dir / "sensitivity.png"))
    save_tensors({"sensitivity": sensitivity}, run_dir / "sensitivity.safetensors")
    if isinstance(model, IsotopeNet):
        report["receptive_field_bins"] = model.receptive_field()
    if train is not None:
        report["roc_lda"] = roc_lda_report(train, test, split.test_groups)
    return report


def sensitivity_report(sensitivity: Tensor, dataset: SpectraDataset) -> dict[str, Any]:
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


def plot_sensitivity(sensitivity: Tensor, x: Tensor, y: Tensor, dataset: SpectraDataset, path: Path) -> Path:
    """The mean spectrum per class above the sensitivity map, the differing peptides marked (synthetic data)."""
    mz = dataset.mz.numpy()
    figure, (top, bottom) = subplots(2, 1, figsize=(10, 5), feature="sensitivity.png", sharex=True)
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
