r"""Class-conditional density models: ``conditional_dense``, the dense i-ResNet flow p(x | y) with the label's
one-hot code as the context of every residual branch (contractive in x for every label).

A finished run reports the test bits/dim given the labels (exact log-dets of the dense blocks), the
reconstruction error through the inverse at the test labels, and writes ``samples.png``: one row of samples per
class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.app.datasets import labelled_levels
from invertnet.app.kinds.base import RunData
from invertnet.app.kinds.flows import DenseFlowConfig, FlowKind, evaluation_summary, reconstruction
from invertnet.figures import save_figure, subplots
from invertnet.layers import MemorySavingSequential, refine_spectral_norms
from invertnet.models import FlowDistribution
from invertnet.training import ConditionalBitsPerDim

if TYPE_CHECKING:
    from invertnet.analysis import Certificate
    from invertnet.app.config import RunConfig

__all__ = ["ConditionalDenseFlowConfig", "ConditionalFlowKind"]

SAMPLES_PER_CLASS = 8
"""Columns of ``samples.png``: samples of each class."""


class ConditionalDenseFlowConfig(DenseFlowConfig):
    """``conditional_dense``: :func:`~invertnet.models.dense_iresnet_flow` with ``context_features`` = the number
    of classes, trained on labelled images."""

    kind: Literal["conditional_dense"] = "conditional_dense"  # type: ignore[assignment]
    image_data: ClassVar[bool] = False


class ConditionalFlowKind(FlowKind):
    """A flow p(x | y) trained on labelled images (labels as one-hot contexts)."""

    family: ClassVar[str] = "conditional flow"

    def load_data(self, config: RunConfig) -> RunData:
        train, test, levels, n_classes = labelled_levels(config.data)
        return RunData(train, test, levels=levels, n_classes=n_classes)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        model = config.model
        shape = tuple(data.train[0].shape[1:])
        flow = model.builder(shape, levels=data.levels, context_features=data.n_classes, **model.builder_arguments())
        if model.memory_saving:
            flow.transform = MemorySavingSequential(*flow.transform)
        return flow

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        return ConditionalBitsPerDim(model, _classes(model))  # type: ignore[arg-type]

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        flow: FlowDistribution = model  # type: ignore[assignment]
        images, labels = data.test
        contexts = _one_hot(flow, labels)
        summary: dict[str, Any] = {
            "run_dir": str(run_dir),
            **evaluation_summary(flow, images, config, context=contexts, figure="bits_per_dim_given_label"),
            "reconstruction": reconstruction(_at(flow, contexts[:256]), images[:256]),
        }
        _class_rows(flow, run_dir / "samples.png", data.n_classes or _classes(flow))
        return summary

    def invert(self, model: nn.Module, config: RunConfig, data: RunData) -> dict[str, Any]:
        refine_spectral_norms(model)
        images, labels = data.test
        return reconstruction(_at(model, _one_hot(model, labels[:256])), images[:256])  # type: ignore[arg-type]

    def sample(self, model: nn.Module, n: int) -> Tensor:
        """``n`` samples, of the classes 0, 1, ... in turn."""
        refine_spectral_norms(model)
        labels = torch.arange(n) % _classes(model)
        return model(_one_hot(model, labels)).sample()

    def certify(self, model: nn.Module, data: RunData) -> Certificate:
        raise self._unsupported("certify", ": its blocks are conditional (certify the flow at a label: flow.at(c))")


def _at(flow: FlowDistribution, contexts: Tensor) -> FlowDistribution:
    """The flow at the contexts with its transform bound now (the parts listed, as ``reconstruction`` reads)."""
    return FlowDistribution(flow.transform.at(contexts), flow.base)


def _classes(flow: nn.Module) -> int:
    return next(block.g.context_features for block in flow.residual_blocks())  # type: ignore[operator]


def _one_hot(flow: nn.Module, labels: Tensor) -> Tensor:
    parameter = next(flow.parameters())
    return F.one_hot(labels.long(), _classes(flow)).to(device=parameter.device, dtype=parameter.dtype)


@torch.no_grad()
def _class_rows(flow: FlowDistribution, path: Path, n_classes: int) -> None:
    """One row of samples per class."""
    labels = torch.arange(n_classes).repeat_interleave(SAMPLES_PER_CLASS)
    images = flow(_one_hot(flow, labels)).sample().cpu()
    figure, axes = subplots(
        n_classes,
        SAMPLES_PER_CLASS,
        figsize=(SAMPLES_PER_CLASS * 0.8, n_classes * 0.8),
        squeeze=False,
        feature="samples.png",
    )
    for axis, image in zip(axes.flat, images, strict=True):
        axis.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(), cmap="gray")
        axis.axis("off")
    save_figure(figure, path)
