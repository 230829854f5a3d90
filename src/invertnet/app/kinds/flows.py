r"""Density models: the i-ResNet flows ``dense`` (Behrmann et al. 2019, appendix C.3) and ``multiscale``
(thesis A.2), ``mintnet`` (Song, Meng & Ermon 2019, section 5.2) and the coupling flows ``realnvp`` (Dinh et
al. 2017), ``glow`` (Kingma & Dhariwal 2018) and ``spline`` (Durkan et al. 2019), trained by maximum likelihood.

A finished flow run reports test bits/dim with the series length chosen for a stated truncation bias (thesis
A.2), the reconstruction error through the inverse, and writes ``samples.png`` (images) or ``density.png``
(2-D data, like thesis Fig. 5.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from invertnet.app.datasets import unlabelled_data
from invertnet.app.kinds.base import KindConfig, ModelKind, RunData
from invertnet.app.kinds.fields import MAX_BLOCKS, MAX_SCALES, MAX_WIDTH, KernelSizes, MintNetLayers
from invertnet.core import InvertibleSequential
from invertnet.figures import save_figure, subplots
from invertnet.layers import (
    MemorySavingSequential,
    UniformDequantization,
    VariationalDequantization,
    refine_spectral_norms,
)
from invertnet.layers.lipschitz_nets import CONV_POWER_ITERATIONS, POWER_ITERATIONS
from invertnet.logdet import DenseExactLogDet, PowerSeriesLogDet, UnbiasedLogDet
from invertnet.models import (
    FlowDistribution,
    dense_iresnet_flow,
    evaluate_log_prob,
    glow_flow,
    mintnet_flow,
    multiscale_iresnet_flow,
    realnvp_flow,
    spline_flow,
)
from invertnet.models.preprocessing import Dequantization
from invertnet.solvers import linearized_inverse_error
from invertnet.training import BitsPerDim

if TYPE_CHECKING:
    from invertnet.app.config import RunConfig

__all__ = [
    "DenseFlowConfig",
    "FlowKind",
    "GlowFlowConfig",
    "MintNetFlowConfig",
    "MultiscaleFlowConfig",
    "RealNVPFlowConfig",
    "SplineFlowConfig",
]

LogDetChoice = Literal["power_series", "unbiased", "exact"]

MAX_TRAINING_TERMS = 200
"""Most power-series terms during training (each term is one vector-Jacobian product per step)."""


class _FlowConfig(KindConfig):
    application_fields: ClassVar[frozenset[str]] = frozenset({"memory_saving"})
    image_data: ClassVar[bool] = True
    """The builder takes images (C, H, W); the dense flow takes any event shape."""
    logit_alpha: float = Field(0.05, gt=0, lt=0.5, description="image data: margin of the logit transform")
    dequantization: Dequantization = Field(
        "uniform",
        description="image data: uniform noise, or a learned q(u | x) (Ho et al. 2019, 3.1) with a dense or a "
        "convolutional conditioner",
    )
    memory_saving: bool = Field(
        False, description="recompute activations through the inverses in backward (memory flat in depth)"
    )


class _ResidualFlowConfig(_FlowConfig):
    application_fields: ClassVar[frozenset[str]] = frozenset({"memory_saving", "log_det", "n_terms"})
    recorded_before: ClassVar[dict[str, Any]] = {"n_power_iterations": 1}
    n_blocks: int = Field(4, gt=0, le=MAX_BLOCKS)
    coeff: float = Field(0.97, gt=0, lt=1, description="Lipschitz coefficient of each residual branch")
    activation: Literal["elu", "softplus", "lipswish", "clipswish"] = "elu"
    log_det: LogDetChoice = Field("power_series", description="training log-det estimator of the residual blocks")
    n_terms: int | None = Field(
        None, gt=0, le=MAX_TRAINING_TERMS, description="power_series: terms during training (None: 5)"
    )

    @model_validator(mode="after")
    def _n_terms_needs_the_power_series(self) -> _ResidualFlowConfig:
        if self.n_terms is not None and self.log_det != "power_series":
            raise ValueError(f"n_terms sets the power series' length; log_det {self.log_det!r} does not read it")
        return self

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """invertnet 0.1 recorded ``n_terms`` whatever the estimator; only the power series reads it."""
        section = super().from_legacy(flat)
        if section.get("log_det", "power_series") != "power_series":
            section.pop("n_terms", None)
        return section

    def builder_arguments(self) -> dict[str, Any]:
        """The fields as keywords, with the training log-det estimator the config names."""
        return {**super().builder_arguments(), "log_det": self.training_estimator()}

    def training_estimator(self) -> Any:
        """The log-det estimator of the residual blocks during training."""
        if self.log_det == "exact":
            return DenseExactLogDet()  # from the Jacobian's factors for dense branches, else the brute force
        if self.log_det == "unbiased":
            return UnbiasedLogDet()
        return PowerSeriesLogDet(5 if self.n_terms is None else self.n_terms)


class DenseFlowConfig(_ResidualFlowConfig):
    """``dense``: :func:`~invertnet.models.dense_iresnet_flow` on flattened data."""

    kind: Literal["dense"] = "dense"
    builder: ClassVar = staticmethod(dense_iresnet_flow)
    image_data: ClassVar[bool] = False
    hidden_features: int = Field(32, gt=0, le=MAX_WIDTH, description="width of the residual branches")
    n_layers: int = Field(3, gt=0, le=100, description="linear layers per residual branch")
    n_power_iterations: int = Field(
        POWER_ITERATIONS, ge=1, le=100, description="power-iteration steps of every normalised layer per training step"
    )
    preactivation: bool = Field(True, description="apply the activation to each branch's input first (Eq. 4.5)")
    actnorm: Literal["before", "after", "none"] = Field(
        "before", description="ActNorm before every block, after every block (Behrmann et al. 2019, C.3), or none"
    )
    recorded_before: ClassVar[dict[str, Any]] = {"n_power_iterations": 1, "preactivation": False}
    legacy_names: ClassVar[dict[str, str]] = {"hidden": "hidden_features"}

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """invertnet 0.1's ``actnorm`` was MintNet's switch; its dense flows had an ActNorm before every block."""
        return super().from_legacy({key: value for key, value in flat.items() if key != "actnorm"})


class MultiscaleFlowConfig(_ResidualFlowConfig):
    """``multiscale``: :func:`~invertnet.models.multiscale_iresnet_flow` (``n_blocks`` per scale)."""

    kind: Literal["multiscale"] = "multiscale"
    builder: ClassVar = staticmethod(multiscale_iresnet_flow)
    n_scales: int = Field(2, gt=0, le=MAX_SCALES, description="scales, one squeeze between two")
    hidden_channels: int = Field(32, gt=0, le=MAX_WIDTH, description="channels of the residual branches")
    kernel_sizes: KernelSizes = Field([3, 1, 3], description="odd kernel size of each branch layer")
    n_power_iterations: int = Field(
        CONV_POWER_ITERATIONS,
        ge=1,
        le=100,
        description="power-iteration steps of every normalised layer per training step",
    )
    legacy_names: ClassVar[dict[str, str]] = {"hidden": "hidden_channels"}


class MintNetFlowConfig(MintNetLayers, _FlowConfig):
    """``mintnet``: :func:`~invertnet.models.mintnet_flow`."""

    kind: Literal["mintnet"] = "mintnet"
    builder: ClassVar = staticmethod(mintnet_flow)
    actnorm: bool = Field(True, description="ActNorm before every grouped layer")
    hidden_factor: int | None = Field(  # type: ignore[assignment]
        8, gt=0, le=1024, description="copies of each channel in the hidden layers (None with hidden_channels)"
    )
    hidden_channels: int | None = Field(
        None,
        gt=0,
        le=MAX_WIDTH,
        description="instead of hidden_factor: the hidden width of every layer at every scale (Song, Meng & Ermon "
        "2019's 'filters')",
    )

    @model_validator(mode="after")
    def _one_width(self) -> MintNetFlowConfig:
        if self.hidden_channels is not None and self.hidden_factor is not None:
            if "hidden_factor" in self.model_fields_set:
                raise ValueError(
                    "hidden_factor and hidden_channels both set: give the copies per channel or the width (set "
                    "the other to null)"
                )
            self.hidden_factor = None
        return self


class _CouplingFlowConfig(_FlowConfig):
    image_data: ClassVar[bool] = False
    """The builders take vectors (d,) and images (C, H, W)."""
    n_scales: int | None = Field(None, gt=0, le=MAX_SCALES, description="image data: scales (None: 2); vectors: 1")
    hidden: int = Field(64, gt=0, le=MAX_WIDTH, description="units (vectors) or channels (images) of the conditioners")
    scale: Literal["exp", "sigmoid"]
    clamp: float | None

    @model_validator(mode="after")
    def _the_sigmoid_scale_takes_no_clamp(self) -> _CouplingFlowConfig:
        if self.scale == "sigmoid" and self.clamp is not None:
            raise ValueError(
                f"clamp bounds the 'exp' scale; the 'sigmoid' scale lies in (0, 1), got clamp={self.clamp}"
            )
        return self


class RealNVPFlowConfig(_CouplingFlowConfig):
    """``realnvp``: :func:`~invertnet.models.realnvp_flow` (Dinh et al. 2017), exact log-det."""

    kind: Literal["realnvp"] = "realnvp"
    builder: ClassVar = staticmethod(realnvp_flow)
    n_steps: int = Field(3, gt=0, le=MAX_BLOCKS, description="couplings per mask type and scale")
    scale: Literal["exp", "sigmoid"] = "exp"
    clamp: float | None = Field(3.0, gt=0, description="'exp' scale: bound of the log-scale (None: unbounded)")


class GlowFlowConfig(_CouplingFlowConfig):
    """``glow``: :func:`~invertnet.models.glow_flow` (Kingma & Dhariwal 2018), exact log-det."""

    kind: Literal["glow"] = "glow"
    builder: ClassVar = staticmethod(glow_flow)
    n_steps: int = Field(4, gt=0, le=MAX_BLOCKS, description="steps (ActNorm, 1x1 convolution, coupling) per scale")
    scale: Literal["exp", "sigmoid"] = "sigmoid"
    clamp: float | None = Field(None, gt=0, description="'exp' scale: bound of the log-scale (None: unbounded)")


class SplineFlowConfig(_FlowConfig):
    """``spline``: :func:`~invertnet.models.spline_flow` (Durkan et al. 2019) on flattened data, exact log-det."""

    kind: Literal["spline"] = "spline"
    builder: ClassVar = staticmethod(spline_flow)
    image_data: ClassVar[bool] = False
    n_steps: int = Field(8, gt=0, le=MAX_BLOCKS, description="steps (ActNorm, LU linear map, spline coupling)")
    hidden: int = Field(64, gt=0, le=MAX_WIDTH, description="units of the conditioners")
    bins: int = Field(16, ge=2, le=256, description="bins of every rational-quadratic spline")
    bound: float = Field(3.0, gt=0, le=100, description="the splines act on [-bound, bound], the identity outside")
    linear: bool | None = Field(
        None, description="LU mixing before every coupling (None: when the data have more than 2 features)"
    )


class FlowKind(ModelKind):
    """A normalising flow (:class:`~invertnet.models.FlowDistribution`) trained on unlabelled data."""

    family: ClassVar[str] = "flow"
    requires: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("matplotlib.figure", "plots", "a flow run's samples.png / density.png"),
    )

    def load_data(self, config: RunConfig) -> RunData:
        train, test, levels = unlabelled_data(config.data)
        if config.model.image_data and train.dim() != 4:
            raise ValueError(
                f"model kind {self.name!r} needs images (N, C, H, W); data.name {config.data.name!r} gives samples "
                f"of shape {tuple(train.shape[1:])} (the dense kind takes any shape)"
            )
        return RunData(train, test, levels=levels)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        model = config.model
        flow = model.builder(tuple(data.train.shape[1:]), levels=data.levels, **model.builder_arguments())
        if model.memory_saving:
            flow.transform = MemorySavingSequential(*flow.transform)
        return flow

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        return BitsPerDim(model)  # type: ignore[arg-type]

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        flow: FlowDistribution = model  # type: ignore[assignment]
        summary: dict[str, Any] = {"run_dir": str(run_dir), **evaluation_summary(flow, data.test, config)}
        summary["reconstruction"] = reconstruction(flow, data.test[:256])
        _figures(flow, run_dir, data.levels, data.test)
        return summary

    def invert(self, model: nn.Module, config: RunConfig, data: RunData) -> dict[str, Any]:
        refine_spectral_norms(model)  # as evaluation does (finish: use_evaluation_estimator refines)
        return reconstruction(model, data.test[:256])  # type: ignore[arg-type]

    def sample(self, model: nn.Module, n: int) -> Tensor:
        refine_spectral_norms(model)  # a checkpoint's power iterations lag: certify Lip(g) <= coeff for the inverse
        return model.sample((n,))  # type: ignore[operator]

    def invertible_part(self, model: nn.Module) -> nn.Module:
        return model.transform  # type: ignore[return-value]


def evaluation_summary(
    flow: FlowDistribution,
    x: Tensor,
    config: RunConfig,
    context: Tensor | None = None,
    figure: str = "bits_per_dim",
) -> dict[str, Any]:
    """``{"evaluation_estimator", "test"}`` of a run's summary: :func:`~invertnet.models.evaluate_log_prob` of the
    test data (given the contexts) with the run's evaluation settings, the test figure named ``figure``."""
    settings = config.evaluation
    result = evaluate_log_prob(
        flow,
        x,
        context=context,
        bias_bits=settings.bias_bits,
        max_terms=settings.max_terms,
        standard_error_bits=settings.probe_standard_error_bits,
        max_passes=settings.max_passes,
        warn=False,  # the summary records whether the target was reached
    )
    estimator: dict[str, Any] = {"n_terms": result.n_terms, "bias_bound_bits": result.bias_bound_bits}
    if result.lipschitz_bound is not None:
        estimator["lipschitz_bound"] = result.lipschitz_bound
    return {
        "evaluation_estimator": {**estimator, "exact_blocks": result.exact_blocks},
        "test": {
            figure: result.bits_per_dim,
            "standard_error": result.standard_error,
            "probe_standard_error": result.probe_standard_error,
            "probe_passes": result.probe_passes,
            "probe_target_reached": result.probe_target_reached,
        },
    }


@torch.no_grad()
def reconstruction(flow: FlowDistribution, data: Tensor) -> dict[str, Any]:
    """Max-abs error of x -> F(x) -> F^{-1}(F(x)) on the continuous part of the flow (after dequantisation),
    with the inverse's status, its rigorous error bound (the largest per-sample 2-norm bound, composed over the
    parts) and the first-order estimate of the error (the largest |delta|_inf of
    :func:`~invertnet.solvers.linearized_inverse_error`: the same norm as ``max_abs_error``).

    The flow's spectral norms must be refined (``refine_spectral_norms``, which ``use_evaluation_estimator``
    runs): the power iterations of a checkpoint lag behind its last optimiser step, so its certified Lipschitz
    bounds can exceed 1 (status ``not_contractive``) though the map contracts."""
    parts = list(flow.transform)
    if parts and isinstance(parts[0], (UniformDequantization, VariationalDequantization)):
        data, parts = parts[0](data), parts[1:]
    transform = InvertibleSequential(*parts)
    y = transform(data)
    result = transform.inverse_result(y)
    error = (result.value - data).abs().max().item()
    bound = result.error_bound.max().item() if result.error_bound is not None else None
    estimate = linearized_inverse_error(transform, result.value, y).abs().max().item()
    return {
        "max_abs_error": error,
        "error_estimate": estimate,
        "error_bound": bound,
        "status": result.status.name.lower(),
    }


@torch.no_grad()
def _figures(flow: FlowDistribution, run_dir: Path, levels: int | None, data: Tensor) -> None:
    """``samples.png`` (8 x 8 samples) for images, ``density.png`` (model density and samples) for 2-D data."""
    samples = flow.sample((64,)).cpu()
    if samples.dim() == 4:
        grid = samples[:, 0] if samples.shape[1] == 1 else samples.permute(0, 2, 3, 1) / (levels or 1)
        figure, axes = subplots(8, 8, figsize=(6, 6), feature="samples.png")
        for axis, image in zip(axes.flat, grid, strict=False):
            axis.imshow(image.numpy(), cmap="gray")
            axis.axis("off")
        save_figure(figure, run_dir / "samples.png")
    elif samples.shape[1] == 2:
        side = torch.linspace(-5, 5, 200)
        points = torch.cartesian_prod(side, side)
        density = torch.cat([flow.log_prob(chunk).exp() for chunk in points.split(4096)]).view(200, 200)
        more = flow.sample((2000,)).cpu()
        figure, (left, right) = subplots(1, 2, figsize=(10, 5), feature="density.png")
        left.imshow(density.T.numpy(), origin="lower", extent=(-5, 5, -5, 5))
        left.set_title("model density")
        right.scatter(more[:, 0], more[:, 1], s=1, label="samples")
        right.scatter(data[:2000, 0], data[:2000, 1], s=1, alpha=0.3, label="data")
        right.set(xlim=(-5, 5), ylim=(-5, 5), title="samples")
        right.legend()
        save_figure(figure, run_dir / "density.png")
