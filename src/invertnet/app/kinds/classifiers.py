r"""Invertible classifiers trained with cross-entropy on labelled images scaled to [-0.5, 0.5]:
``mintnet_classifier`` (Song, Meng & Ermon 2019, section 5.1), ``iresnet_classifier`` (thesis A.1, with the
vanilla / batch-norm baselines) and ``fully_invertible_classifier`` (thesis Def. 6.7), optionally trained with
the independence cross-entropy (thesis Def. 6.14, Eq. 6.13).

A finished run reports test accuracy and the reconstruction error of inputs from their features through the
body's inverse; fully invertible classifiers also report a fresh probe of what their nuisance variables know
about the label (thesis Lemma 6.15).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from invertnet.analysis import nuisance_probe
from invertnet.app.datasets import labelled_images
from invertnet.app.kinds.base import ModelKind, RunData
from invertnet.app.kinds.fields import MAX_BLOCKS, MAX_WIDTH, KernelSizes, MintNetLayers, ResidualStages
from invertnet.core import InvertibleSequential
from invertnet.layers import InjectivePad
from invertnet.models import (
    FullyInvertibleClassifier,
    InvertibleClassifier,
    fully_invertible_classifier,
    iresnet_classifier,
    mintnet_classifier,
)
from invertnet.training import CrossEntropy, IndependenceCrossEntropy

if TYPE_CHECKING:
    from torch import Tensor

    from invertnet.app.config import RunConfig

__all__ = [
    "ClassifierKind",
    "FullyInvertibleClassifierConfig",
    "IndependenceSettings",
    "IResNetClassifierConfig",
    "MintNetClassifierConfig",
]


class MintNetClassifierConfig(MintNetLayers):
    """``mintnet_classifier``: :func:`~invertnet.models.mintnet_classifier`."""

    kind: Literal["mintnet_classifier"] = "mintnet_classifier"
    builder: ClassVar = staticmethod(mintnet_classifier)
    pad_channels: int = Field(16, gt=0, le=MAX_WIDTH, description="channels after injective zero padding")


class IResNetClassifierConfig(ResidualStages):
    """``iresnet_classifier``: :func:`~invertnet.models.iresnet_classifier` (``n_blocks`` per stage)."""

    kind: Literal["iresnet_classifier"] = "iresnet_classifier"
    builder: ClassVar = staticmethod(iresnet_classifier)
    kernel_sizes: KernelSizes = Field([3, 1, 3], description="odd kernel size of each branch layer")
    coeff: float = Field(0.97, gt=0, lt=1, description="Lipschitz coefficient of each residual branch (i-ResNet)")
    pad_channels: int = Field(16, gt=0, le=MAX_WIDTH, description="channels after injective zero padding")
    variant: Literal["iresnet", "vanilla", "batchnorm"] = Field(
        "iresnet", description="Lipschitz-constrained, or the vanilla / batch-norm baselines"
    )


class IndependenceSettings(BaseModel):
    """The independence cross-entropy (thesis Def. 6.14 with the likelihood term of Eq. 6.13)."""

    model_config = ConfigDict(extra="forbid")

    nuisance_weight: float = Field(1.0, ge=0, description="weight of the nuisance term")
    likelihood_weight: float = Field(
        1.0, ge=0, description="weight of the per-dimension nuisance likelihood term (Eq. 6.13 as written: d)"
    )
    nuisance_objective: Literal["confusion", "cross_entropy"] = Field(
        "confusion", description="drive D(z_n) to uniform (bounded) or maximise its cross-entropy (Def. 6.14)"
    )


class FullyInvertibleClassifierConfig(ResidualStages):
    """``fully_invertible_classifier``: :func:`~invertnet.models.fully_invertible_classifier`; with
    ``independence`` set, trained with the independence cross-entropy instead of plain cross-entropy."""

    kind: Literal["fully_invertible_classifier"] = "fully_invertible_classifier"
    builder: ClassVar = staticmethod(fully_invertible_classifier)
    application_fields: ClassVar[frozenset[str]] = frozenset({"independence"})
    coeff: float = Field(0.97, gt=0, lt=1, description="Lipschitz coefficient of each residual branch")
    dense_blocks: int = Field(
        0, ge=0, le=MAX_BLOCKS, description="dense blocks on the flattened features after the stages"
    )
    dense_hidden: int = Field(128, gt=0, le=MAX_WIDTH, description="width of the dense blocks")
    independence: IndependenceSettings | None = Field(
        None, description="train with the independence cross-entropy (thesis Def. 6.14)"
    )

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """invertnet 0.1 had a flag ``independence`` and its settings beside it."""
        section = super().from_legacy({key: value for key, value in flat.items() if key != "independence"})
        if flat.get("independence"):
            section["independence"] = {
                "nuisance_weight": flat.get("independence_weight", 1.0),
                "likelihood_weight": flat.get("likelihood_weight", 1.0),
                "nuisance_objective": flat.get("nuisance_objective", "confusion"),
            }
        return section


def _classifier_of(model: nn.Module) -> InvertibleClassifier:
    """The classifier of a trained module: itself, or the classifier player of the independence game."""
    return model.classifier if isinstance(model, IndependenceCrossEntropy) else model  # type: ignore[return-value]


class ClassifierKind(ModelKind):
    """An invertible classifier (:class:`~invertnet.models.InvertibleClassifier`) trained on labelled images;
    with the independence cross-entropy the trained module holds both players (classifier and nuisance
    classifier)."""

    family: ClassVar[str] = "classifier"
    augmentations: ClassVar[frozenset[str]] = frozenset({"augment_shift", "augment_flip", "normalization"})

    def load_data(self, config: RunConfig) -> RunData:
        train, test, n_classes = labelled_images(config.data)
        return RunData(train, test, n_classes=n_classes)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        assert data.n_classes is not None
        model = config.model
        classifier = model.builder(tuple(data.train[0].shape[1:]), data.n_classes, **model.builder_arguments())
        settings = getattr(model, "independence", None)
        if settings is None:
            return classifier
        return IndependenceCrossEntropy(
            classifier,  # type: ignore[arg-type]
            data.train[0][0].numel() - data.n_classes,
            nuisance_weight=settings.nuisance_weight,
            likelihood_weight=settings.likelihood_weight,
            nuisance_objective=settings.nuisance_objective,
            max_shift=config.data.augment_shift,
            flip=config.data.augment_flip,
        )

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        if isinstance(model, IndependenceCrossEntropy):
            return model
        return CrossEntropy(model, max_shift=config.data.augment_shift, flip=config.data.augment_flip)

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        classifier = _classifier_of(model)
        summary: dict[str, Any] = {"run_dir": str(run_dir)}
        summary["test"] = (model if isinstance(model, IndependenceCrossEntropy) else CrossEntropy(model)).evaluate(
            data.test
        )
        summary["reconstruction"] = feature_reconstruction(classifier, data.test[0][:256])
        if isinstance(classifier, FullyInvertibleClassifier):  # how much z_n knows about y (thesis 6.4.2)
            summary["nuisance_probe"] = nuisance_probe(classifier, data.train, data.test)
        return summary

    def invert(self, model: nn.Module, config: RunConfig, data: RunData) -> dict[str, Any]:
        return feature_reconstruction(_classifier_of(model), data.test[0][:256])

    def invertible_part(self, model: nn.Module) -> nn.Module:
        return _classifier_of(model)

    def metameric_classifier(self, model: nn.Module) -> nn.Module:
        classifier = _classifier_of(model)
        if not isinstance(classifier, FullyInvertibleClassifier):
            return super().metameric_classifier(model)
        return classifier


@torch.no_grad()
def feature_reconstruction(model: InvertibleClassifier, x: Tensor) -> dict[str, Any]:
    """Max-abs error of x -> features -> x through the inverse of the classifier's invertible body, computed on
    a float64 copy (so the error measures invertibility, not float32 rounding), with the solver's record. A
    leading zero padding is applied, not inverted, so a failing inverse is reported rather than refused."""
    parts = list(copy.deepcopy(model.body).double().eval())
    x = x.double()
    if parts and isinstance(parts[0], InjectivePad):
        x, parts = parts[0](x), parts[1:]
    body = InvertibleSequential(*parts)
    result = body.inverse_result(body(x))
    error = (result.value - x).abs().max().item()
    return {"max_abs_error": error, "status": result.status.name.lower(), "iterations": result.iterations}
