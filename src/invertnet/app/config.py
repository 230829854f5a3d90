r"""Validated run configurations: data, model, training and evaluation.

Configs are JSON files; the embedded ones live in ``invertnet/app/configs``. The ``model`` section is the
config class of its ``kind`` (:mod:`invertnet.app.kinds`), holding only that kind's fields. Unknown keys and
bad values are errors that name them. ``--set key.sub=value`` overrides parse the value as JSON when it is
valid JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from invertnet.app.embedded import embedded_config_text, embedded_configs
from invertnet.app.kinds import KINDS
from invertnet.training import TrainConfig

__all__ = [
    "CONFIG_VERSION",
    "DataConfig",
    "EvalSettings",
    "RunConfig",
    "apply_overrides",
    "embedded_configs",
    "load_config",
    "read_run_config",
]

CONFIG_VERSION = 2
"""The run-config format written now (``config_version`` of ``run_config.json``); version 1 (no
``config_version`` key, one flat model section for all kinds) is converted."""

DEFAULT_CONFIG = "digits_dense"
"""The embedded config ``invertnet train`` (and ``make run``) trains without ``--config``: the dense i-ResNet flow
on the digits (2.00 test bits/dim in about a minute on 2 cores; the multi-scale ``digits`` config: 2.21)."""

ModelConfig = Annotated[Union[tuple(kind.config for kind in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007


MAX_POINTS = 10_000_000
"""Most points of a toy density sample (``data.n_train``, ``data.n_test``)."""
MAX_BINS = 1_000_000
"""Most m/z bins of a spectrum (``data.n_bins``, ``data.spectrum_length``)."""
MAX_EVALUATION_TERMS = 5000
"""Most power-series terms of the evaluation estimator (``evaluation.max_terms``)."""


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
    image_size: int = Field(64, gt=0, le=4096, description="image_folder: side of the square grey images")
    augment_shift: int = Field(
        0, ge=0, le=1024, description="classifiers: random translations of up to this many pixels"
    )
    augment_flip: bool = Field(
        False, description="image classifiers: random horizontal flips in training (Behrmann et al. 2019, C.2: CIFAR)"
    )
    normalization: Literal["centered", "standardized"] = Field(
        "centered",
        description="image classifiers: levels scaled to [-0.5, 0.5] (centered; MNIST in Behrmann et al. 2019, C.2) "
        "or, per channel, minus the training set's mean and divided by its standard deviation (standardized; CIFAR)",
    )
    n_train: int = Field(20_000, gt=0, le=MAX_POINTS, description="toy densities: number of training points")
    n_test: int = Field(5_000, gt=0, le=MAX_POINTS, description="toy densities: number of test points")
    validation_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of the training data held out (fixed seeded draw) to choose between the trained and "
        "the averaged (EMA) weights; 0: no split (the average is kept unverified); spectra and GANs: unused",
    )
    labels: str | None = Field(None, description="imzml: CSV with columns x, y, label[, group] per pixel")
    n_bins: int | None = Field(
        None, gt=0, le=MAX_BINS, description="imzml: bin the spectra to this many equal m/z bins"
    )
    mz_min: float | None = Field(None, gt=0, description="imzml: lower end of the m/z range")
    mz_max: float | None = Field(None, gt=0, description="imzml: upper end of the m/z range")
    n_per_class: int = Field(200, gt=0, le=1_000_000, description="synthetic_spectra: spectra per class")
    spectrum_length: int = Field(2000, gt=0, le=MAX_BINS, description="synthetic_spectra: m/z bins per spectrum")
    n_groups: int = Field(8, ge=2, le=10_000, description="synthetic_spectra: patients (groups of one class each)")
    n_folds: int = Field(4, ge=2, le=100, description="spectra: grouped cross-validation folds (thesis 7.4)")
    fold: int = Field(0, ge=0, description="spectra: the fold used as test data")


class EvalSettings(_Strict):
    """Evaluation (thesis A.2): series terms chosen so that the truncation bias is below ``bias_bits``, and
    passes with fresh Hutchinson probes averaged until their standard error is below ``probe_standard_error_bits``."""

    bias_bits: float = Field(1e-3, gt=0, description="bound on the bits/dim bias of the truncated series")
    max_terms: int = Field(
        200, gt=0, le=MAX_EVALUATION_TERMS, description="most series terms (one vector-Jacobian product each)"
    )
    probe_standard_error_bits: float = Field(1e-3, gt=0, description="stop averaging probe passes below this")
    max_passes: int | None = Field(
        20, ge=2, le=1_000_000, description="most passes over the test set with fresh probes (null: no cap)"
    )


class RunConfig(_Strict):
    """A whole run: data, model, training, evaluation, and where runs are written."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="run name: letters, digits, '.', '_', '-' (it names the run folder under output_dir)",
    )
    data: DataConfig
    model: ModelConfig  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()
    evaluation: EvalSettings = EvalSettings()
    output_dir: str = "runs"
    config_version: Literal[2] = Field(CONFIG_VERSION, description="layout of this file (run folders record it)")


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
        text = embedded_config_text(name_or_path)
    else:
        raise ValueError(f"unknown config {name_or_path!r}: not a file, and not one of {embedded_configs()}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config {name_or_path}: invalid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"config {name_or_path}: expected a JSON object with data, model, ... sections")
    if raw and "model" not in raw and set(raw) <= set(TrainConfig.model_fields):
        raise ValueError(
            f"config {name_or_path}: holds only training settings (a Trainer's train_config.json, or the config.json "
            "of older run folders); give a run config, e.g. RUN_DIR/run_config.json"
        )
    if _is_flat_legacy(raw):  # e.g. a run_config.json of invertnet 0.1 given as --config
        raw = _upgraded(raw)
    return _validate(apply_overrides(raw, overrides or []), f"config {name_or_path}")


def read_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of a run folder's ``run_config.json``, with ``key.sub=value`` overrides applied. Files written
    by invertnet 0.1 (no ``config_version``: one flat model section for all kinds) are converted to the kind's
    section.

    Raises:
        ValueError: Naming the file and what is wrong with it (unreadable JSON, an unknown kind, a field that
            no longer validates).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {path.parent} is not a run folder")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable run config ({error})") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path}: not a run config (no 'model' section)")
    if "config_version" not in raw:  # run folders of invertnet 0.1 recorded the flat model section
        raw = _upgraded(raw, str(path))
    kind = KINDS.get(str(raw["model"].get("kind")))
    if kind is not None:  # a field the run did not record has the value it was trained with, not today's default
        raw = {**raw, "model": {**kind.config.recorded_before, **raw["model"]}}
    return _validate(apply_overrides(raw, overrides or []), str(path))


# The fields every invertnet 0.1 run folder recorded in its one flat model section (later 0.1 releases added more).
_FLAT_MODEL_FIELDS = frozenset(
    {"kind", "n_blocks", "hidden", "n_layers", "n_scales", "hidden_factor", "kernel_size", "kernel_sizes", "coeff"}
)


def _is_flat_legacy(raw: Any) -> bool:
    """Whether ``raw`` is a config of invertnet 0.1: no version, a model section with all the flat fields."""
    model = raw.get("model") if isinstance(raw, dict) else None
    return "config_version" not in raw and isinstance(model, dict) and _FLAT_MODEL_FIELDS <= set(model)


def _upgraded(raw: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``raw`` with its flat invertnet 0.1 model section converted to its kind's section (``from_legacy``)."""
    kind = KINDS.get(str(raw["model"].get("kind")))
    if kind is None:
        raise ValueError(f"{where}: model kind {raw['model'].get('kind')!r} is unknown to this invertnet")
    return {**raw, "model": kind.config.from_legacy(raw["model"])}


def _validate(raw: Any, where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{where}: {'; '.join(_problem(e, raw) for e in error.errors())}") from error


def _problem(error: Any, raw: Any) -> str:
    """One validation error as ``key.sub: message``, without pydantic's union tag in the key; a key the model
    kind does not have names the kind and the keys it has."""
    loc = [str(part) for part in error["loc"]]
    if loc[:1] == ["model"] and len(loc) > 1 and loc[1] in KINDS:
        kind, loc = KINDS[loc[1]], loc[:1] + loc[2:]
        if error["type"] == "extra_forbidden" and len(loc) == 2:
            fields = ", ".join(name for name in kind.config.model_fields if name != "kind") or "none"
            return f"{'.'.join(loc)}: not a setting of model kind {kind.name!r} (its settings: {fields})"
        if error["type"] == "extra_forbidden":
            section = _section_class(kind.config, loc[1:-1])
            fields = ", ".join(section.model_fields) if section else "see the docs"
            return f"{'.'.join(loc)}: not a setting of {'.'.join(loc[:-1])} (its settings: {fields})"
    if loc == ["model"] and error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"model.kind: must be one of {sorted(KINDS)}"
    return f"{'.'.join(loc)}: {error['msg'].removeprefix('Value error, ')}{_got(error)}"


def _got(error: Any) -> str:
    """`` (got VALUE)`` for a rejected number or short string, so that the message names the value; empty for
    sections and for messages that already name it."""
    value = error.get("input")
    if isinstance(value, bool) or not isinstance(value, int | float | str) or error["type"] == "value_error":
        return ""
    text = repr(value)
    return f" (got {text})" if len(text) <= 40 else ""


def _section_class(config: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    """The pydantic class of the nested section at ``path`` (field names) of ``config``, if there is one."""
    current: type[BaseModel] | None = config
    for name in path:
        field = current.model_fields.get(name) if current else None
        candidates = [field.annotation, *get_args(field.annotation)] if field else []
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current
