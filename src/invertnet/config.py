r"""Validated run configurations: data, model, log-det estimator, training and evaluation.

Configs are JSON files; the embedded ones live in ``invertnet/configs``. Unknown keys and bad values are
errors that name them. ``--set key.sub=value`` overrides parse the value as JSON when it is valid JSON.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["RunConfig", "apply_overrides", "embedded_configs", "load_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """The data set: ``digits`` (shipped), a toy density, or ``mnist`` / ``cifar10`` / ``image_folder`` (e.g.
    CelebA, as 1-channel grey images of ``image_size``) from ``root``; mass spectra: ``synthetic_spectra`` or
    ``imzml`` (the .imzML file ``root``, pixel labels from the CSV ``labels``), split into ``n_folds`` grouped
    cross-validation folds of which ``fold`` is the test part."""

    name: Literal[
        "digits",
        "mnist",
        "cifar10",
        "image_folder",
        "two_moons",
        "eight_gaussians",
        "checkerboard",
        "rings",
        "pinwheel",
        "two_spirals",
        "synthetic_spectra",
        "imzml",
    ]
    root: str | None = None
    image_size: int = Field(64, gt=0, description="image_folder: side of the square grey images")
    augment_shift: int = Field(0, ge=0, description="classifiers: random translations of up to this many pixels")
    n_train: int = Field(20_000, gt=0, description="toy densities: number of training points")
    n_test: int = Field(5_000, gt=0, description="toy densities: number of test points")
    labels: str | None = Field(None, description="imzml: CSV with columns x, y, label[, group] per pixel")
    n_bins: int | None = Field(None, gt=0, description="imzml: bin the spectra to this many equal m/z bins")
    mz_min: float | None = Field(None, gt=0, description="imzml: lower end of the m/z range")
    mz_max: float | None = Field(None, gt=0, description="imzml: upper end of the m/z range")
    n_per_class: int = Field(200, gt=0, description="synthetic_spectra: spectra per class")
    spectrum_length: int = Field(2000, gt=0, description="synthetic_spectra: m/z bins per spectrum")
    n_groups: int = Field(8, ge=2, description="synthetic_spectra: patients (groups of one class each)")
    n_folds: int = Field(4, ge=2, description="spectra: grouped cross-validation folds (thesis 7.4)")
    fold: int = Field(0, ge=0, description="spectra: the fold used as test data")


class ModelConfig(_Strict):
    """The model: flows ``dense`` (seed 001 C.3), ``multiscale`` (thesis A.2), ``mintnet`` (seed 000, 5.2); the
    classifiers ``mintnet_classifier`` (seed 000, 5.1), ``iresnet_classifier`` (thesis A.1) and
    ``fully_invertible_classifier`` (thesis Def. 6.7), trained with cross-entropy on labelled images; the
    conditional GAN ``dcgan`` (seed 003, 4.3), whose generator latent recovery works on; the spectrum
    classifiers ``isotopenet`` (thesis Table 7.2) and ``residualnet`` (Table A.1)."""

    kind: Literal[
        "dense",
        "multiscale",
        "mintnet",
        "mintnet_classifier",
        "iresnet_classifier",
        "fully_invertible_classifier",
        "dcgan",
        "isotopenet",
        "residualnet",
    ]
    n_blocks: int = Field(
        4, gt=0, description="dense: blocks; multiscale: blocks per scale; mintnet*: grouped layers in all"
    )
    hidden: int = Field(32, gt=0, description="dense, multiscale: hidden width")
    n_layers: int = Field(
        3, gt=0, description="dense: linear layers per residual branch; dcgan: transposed convolutions"
    )
    n_scales: int = Field(2, gt=0, description="multiscale, mintnet*: scales, one squeeze between two")
    hidden_factor: int = Field(8, gt=0, description="mintnet*: copies of each channel in the hidden layers")
    kernel_size: int = Field(
        3, gt=0, description="mintnet*: odd filter size of the masked convolutions; isotopenet: locally connected"
    )
    dropout: float = Field(0.3, ge=0, lt=1, description="isotopenet: dropout before the locally connected layer")
    actnorm: bool = Field(True, description="mintnet: ActNorm before every grouped layer")
    pad_channels: int = Field(16, gt=0, description="classifiers: channels after injective zero padding")
    memory_saving: bool = Field(
        False, description="flows: recompute activations through the inverses in backward (memory flat in depth)"
    )
    dense_blocks: int = Field(
        0, ge=0, description="fully_invertible_classifier: dense blocks on the flattened features after the stages"
    )
    dense_hidden: int = Field(128, gt=0, description="fully_invertible_classifier: width of the dense blocks")
    independence: bool = Field(
        False, description="fully_invertible_classifier: train with the independence cross-entropy (Def. 6.14)"
    )
    independence_weight: float = Field(1.0, ge=0, description="independence: weight of the nuisance term")
    nuisance_objective: Literal["confusion", "cross_entropy"] = Field(
        "confusion", description="independence: drive D(z_n) to uniform (bounded) or maximise its CE (Def. 6.14)"
    )
    likelihood_weight: float = Field(
        1.0, ge=0, description="independence: weight of the nuisance likelihood term (thesis Eq. 6.13)"
    )
    variant: Literal["iresnet", "vanilla", "batchnorm"] = Field(
        "iresnet", description="iresnet_classifier: Lipschitz-constrained, or the vanilla / batch-norm baselines"
    )
    latent_dim: int = Field(10, gt=0, description="dcgan: latent dimension (small keeps G expansive)")
    width: int = Field(64, gt=0, description="dcgan: channels of the first feature map")
    logit_alpha: float = Field(0.05, gt=0, lt=0.5, description="image data: margin of the logit transform")
    kernel_sizes: list[int] = [3, 1, 3]
    coeff: float = Field(0.97, gt=0)
    activation: Literal["elu", "softplus", "lipswish"] = "elu"
    log_det: Literal["power_series", "unbiased", "exact"] = "power_series"
    n_terms: int = Field(5, gt=0, description="power_series: terms during training")


class TrainSettings(_Strict):
    """Fields of :class:`~invertnet.training.TrainConfig`."""

    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamax", "amsgrad"] = "adam"
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay of the optimiser")
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_size: int = Field(1000, gt=0)
    gamma: float = Field(0.5, gt=0)
    milestones: list[int] = Field([], description="step schedule: steps at which the rate is multiplied by gamma")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    seed: int = 0


class EvalSettings(_Strict):
    """Evaluation (thesis A.2): series terms chosen so that the truncation bias is below ``bias_bits``, and
    passes with fresh Hutchinson probes averaged until their standard error is below ``probe_standard_error_bits``."""

    bias_bits: float = Field(1e-3, gt=0, description="bound on the bits/dim bias of the truncated series")
    max_terms: int = Field(200, gt=0)
    probe_standard_error_bits: float = Field(1e-3, gt=0, description="stop averaging probe passes below this")
    max_passes: int = Field(20, ge=2, description="most passes over the test set with fresh probes")


class RunConfig(_Strict):
    """A whole run: data, model, training, evaluation, and where runs are written."""

    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainSettings = TrainSettings()
    evaluation: EvalSettings = EvalSettings()
    output_dir: str = "runs"


def embedded_configs() -> list[str]:
    """Names of the configs shipped with invertnet."""
    folder = resources.files("invertnet") / "configs"
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config dict; values are parsed as JSON when possible."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"--set {override!r}: expected key=value, e.g. train.lr=0.001")
        key, text = override.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        target = raw
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {override!r}: {part!r} is not a section")
        target[leaf] = value
    return raw


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load an embedded config by name or a JSON file by path, apply overrides and validate.

    Raises:
        ValueError: Naming the unknown config, the unreadable file, or each invalid key and value.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        text = path.read_text()
    elif name_or_path in embedded_configs():
        text = (resources.files("invertnet") / "configs" / f"{name_or_path}.json").read_text()
    else:
        raise ValueError(f"unknown config {name_or_path!r}: not a file, and not one of {embedded_configs()}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config {name_or_path}: invalid JSON ({error})") from error
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"config {name_or_path}: {problems}") from error
