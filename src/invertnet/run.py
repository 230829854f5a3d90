r"""Runs: build data and model from a :class:`~invertnet.config.RunConfig`, train, evaluate, sample, invert.

A run trains a flow (density estimation), an invertible classifier (``*_classifier`` kinds) or a conditional
GAN whose generator latent recovery inverts (``dcgan``). A run
folder holds ``run_config.json``, ``metrics.jsonl``, checkpoints (``step-*``, ``latest``), ``summary.json``
and, for flows, figures (``samples.png``; for 2-D data also ``density.png``, like thesis Fig. 5.2).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from invertnet.analysis import (  # noqa: E402
    Certificate,
    certify,
    metameric_sample,
    nuisance_probe,
    plot_certificate,
)
from invertnet.config import RunConfig  # noqa: E402
from invertnet.core import InvertibleSequential  # noqa: E402
from invertnet.data import (  # noqa: E402
    DIGITS_LEVELS,
    TOY_DENSITIES,
    load_cifar10,
    load_digits,
    load_image_folder,
    load_mnist,
    sample_toy,
)
from invertnet.layers import InjectivePad, InvertibleResidual, UniformDequantization, refine_spectral_norms  # noqa: E402
from invertnet.logdet import (  # noqa: E402
    ExactLogDet,
    PowerSeriesLogDet,
    UnbiasedLogDet,
    n_terms_for_bias,
    truncation_error_bound,
)
from invertnet.models import (  # noqa: E402
    ConditionalGAN,
    FlowDistribution,
    FullyInvertibleClassifier,
    InvertibleClassifier,
    dense_iresnet_flow,
    fully_invertible_classifier,
    iresnet_classifier,
    mintnet_classifier,
    mintnet_flow,
    multiscale_iresnet_flow,
)
from invertnet.recovery.gan_runs import build_gan, finish_gan, gan_images, recovery_check  # noqa: E402
from invertnet.spectra_runs import build_spectra_model, finish_spectra, is_spectra, load_spectra  # noqa: E402
from invertnet.training import (  # noqa: E402
    AdversarialLoss,
    CrossEntropy,
    IndependenceCrossEntropy,
    MemorySavingSequential,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
)
from invertnet.training.distributed import is_main_process  # noqa: E402
from invertnet.training.objectives import bits_per_sample, mean_and_standard_error  # noqa: E402

__all__ = [
    "build_classifier",
    "certify_run",
    "build_flow",
    "evaluate_run",
    "invert_run",
    "is_classifier",
    "load_data",
    "load_labelled_data",
    "metameric_run",
    "open_run",
    "sample_run",
    "train_run",
]


def _images(config: RunConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], int]:
    """``((x, y) train, (x, y) test, K)`` for the image data sets, images as levels 0..K-1."""
    data = config.data
    if data.name == "digits":
        return load_digits("train"), load_digits("test"), DIGITS_LEVELS
    if data.root is None:
        raise ValueError(f"data.root: the folder holding the {data.name} files is required")
    if data.name == "image_folder":
        return (
            load_image_folder(data.root, "train", data.image_size),
            load_image_folder(data.root, "test", data.image_size),
            256,
        )
    loader = load_mnist if data.name == "mnist" else load_cifar10
    return loader(data.root, "train"), loader(data.root, "test"), 256


def load_data(config: RunConfig) -> tuple[Tensor, Tensor, int | None]:
    """``(train, test, levels)``: levels is K for discrete image data, ``None`` for continuous toy data."""
    if config.data.name in TOY_DENSITIES:
        return (
            sample_toy(config.data.name, config.data.n_train, seed=0),
            sample_toy(config.data.name, config.data.n_test, seed=1),
            None,
        )
    train, test, levels = _images(config)
    return train[0], test[0], levels


def is_classifier(config: RunConfig) -> bool:
    """Whether the config trains a classifier (a ``*_classifier`` model kind) rather than a flow."""
    return config.model.kind.endswith("_classifier")


def is_gan(config: RunConfig) -> bool:
    """Whether the config trains a conditional GAN (``dcgan``)."""
    return config.model.kind == "dcgan"


def load_labelled_data(config: RunConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))`` for classifiers and GANs, images scaled to [-0.5, 0.5]."""
    if config.data.name in TOY_DENSITIES:
        raise ValueError(f"data.name: this model needs labelled images, not the toy density {config.data.name!r}")
    train, test, levels = _images(config)
    return tuple((x / (levels - 1) - 0.5, y) for x, y in (train, test))  # type: ignore[return-value]


def _check_monotone(config: RunConfig) -> None:
    """MintNet needs a strictly increasing activation (seed 000, section 3.3); name the setting otherwise."""
    if config.model.activation not in ("elu", "softplus"):
        raise ValueError(
            f"model.activation {config.model.activation!r} is not monotone; MintNet needs 'elu' or 'softplus'"
        )


def build_classifier(config: RunConfig, event_shape: tuple[int, ...], n_classes: int) -> InvertibleClassifier:
    """The invertible classifier the config describes: ``mintnet_classifier`` (seed 000, 5.1) or
    ``iresnet_classifier`` (thesis A.1; ``n_blocks`` per stage, ``n_scales`` stages)."""
    model = config.model
    if model.kind == "fully_invertible_classifier":
        return fully_invertible_classifier(
            event_shape,
            n_classes,
            model.n_blocks,
            model.hidden,
            model.n_scales,
            model.coeff,
            model.dense_blocks,
            model.dense_hidden,
        )
    if model.kind == "iresnet_classifier":
        return iresnet_classifier(
            event_shape,
            n_classes,
            model.n_blocks,
            model.hidden,
            model.n_scales,
            model.kernel_sizes,
            model.coeff,
            model.pad_channels,
            model.variant,
        )
    _check_monotone(config)
    return mintnet_classifier(
        event_shape,
        n_classes,
        model.n_blocks,
        model.hidden_factor,
        model.n_scales - 1,
        model.pad_channels,
        model.kernel_size,
        model.activation,
    )


def _training_estimator(config: RunConfig) -> Any:
    model = config.model
    if model.log_det == "exact":
        return ExactLogDet()
    if model.log_det == "unbiased":
        return UnbiasedLogDet()
    return PowerSeriesLogDet(model.n_terms)


def build_flow(config: RunConfig, event_shape: tuple[int, ...], levels: int | None) -> FlowDistribution:
    """The flow the config describes, for data of the given event shape; with ``model.memory_saving`` its
    transform recomputes activations through the inverses in the backward pass
    (:class:`~invertnet.training.MemorySavingSequential`)."""
    flow = _flow(config, event_shape, levels)
    if config.model.memory_saving:
        flow.transform = MemorySavingSequential(*flow.transform)
    return flow


def _flow(config: RunConfig, event_shape: tuple[int, ...], levels: int | None) -> FlowDistribution:
    model, estimator = config.model, _training_estimator(config)
    if model.kind == "dense":
        return dense_iresnet_flow(
            event_shape,
            model.n_blocks,
            model.hidden,
            model.n_layers,
            model.coeff,
            model.activation,
            estimator,
            levels=levels,
            logit_alpha=model.logit_alpha,
        )
    if model.kind == "mintnet":
        _check_monotone(config)
        return mintnet_flow(
            event_shape,
            model.n_blocks,
            model.hidden_factor,
            model.n_scales - 1,
            model.kernel_size,
            model.activation,
            actnorm=model.actnorm,
            levels=levels,
            logit_alpha=model.logit_alpha,
        )
    return multiscale_iresnet_flow(
        event_shape,
        model.n_scales,
        model.n_blocks,
        model.hidden,
        model.kernel_sizes,
        model.coeff,
        model.activation,
        estimator,
        levels=levels,
        logit_alpha=model.logit_alpha,
    )


def _residual_blocks(flow: FlowDistribution) -> list[InvertibleResidual]:
    return [module for module in flow.modules() if isinstance(module, InvertibleResidual)]


def _use_evaluation_estimator(flow: FlowDistribution, config: RunConfig, dim: int) -> dict[str, float]:
    """Thesis A.2: pick the series length so that the truncation bias is below ``bias_bits`` bits/dim."""
    blocks = _residual_blocks(flow)
    if config.model.log_det == "exact" or not blocks:
        return {"n_terms": 0, "bias_bound_bits": 0.0}
    refine_spectral_norms(flow)
    lipschitz = max(block.lipschitz_bound() or 0.0 for block in blocks)
    per_block_nats = config.evaluation.bias_bits * dim * math.log(2) / len(blocks)
    n_terms = min(n_terms_for_bias(lipschitz, dim, per_block_nats), config.evaluation.max_terms)
    bias_bits = len(blocks) * truncation_error_bound(lipschitz, dim, n_terms) / (dim * math.log(2))
    for block in blocks:
        block.log_det_estimator = PowerSeriesLogDet(n_terms, probe="rademacher")
    return {"n_terms": n_terms, "bias_bound_bits": bias_bits, "lipschitz_bound": lipschitz}


@torch.no_grad()
def _bits_per_dim(flow: FlowDistribution, data: Tensor, config: RunConfig, batch_size: int = 256) -> dict[str, Any]:
    """Test bits/dim averaged over passes with fresh probes until the probe standard error is small (thesis A.2).

    ``standard_error`` is over test samples (the data's spread, the usual error bar); ``probe_standard_error``
    is the Monte-Carlo error of the log-det estimator, from the spread of the pass means.
    """
    stochastic = any(not block.log_det_estimator.exact for block in _residual_blocks(flow))
    passes: list[Tensor] = []
    while True:
        passes.append(bits_per_sample(flow, data, batch_size))
        if not stochastic:
            probe_error = 0.0
            break
        if len(passes) >= 2:
            means = torch.stack([bits.mean() for bits in passes])
            probe_error = (means.std() / math.sqrt(len(passes))).item()
            if probe_error < config.evaluation.probe_standard_error_bits or len(passes) >= config.evaluation.max_passes:
                break
    summary: dict[str, Any] = mean_and_standard_error(torch.stack(passes).mean(dim=0))
    return {**summary, "probe_standard_error": probe_error, "probe_passes": len(passes)}


@torch.no_grad()
def _reconstruction(flow: FlowDistribution, data: Tensor) -> dict[str, float]:
    """Max-abs error of x -> F(x) -> F^{-1}(F(x)) on the continuous part of the flow (after dequantisation)."""
    parts = list(flow.transform)
    if parts and isinstance(parts[0], UniformDequantization):
        data, parts = parts[0](data), parts[1:]
    transform = InvertibleSequential(*parts)
    result = transform.inverse_result(transform(data))
    error = (result.value - data).abs().max().item()
    bound = result.error_bound.max().item() if result.error_bound is not None else None
    return {"max_abs_error": error, "error_bound": bound, "status": result.status.name.lower()}


@torch.no_grad()
def _figures(flow: FlowDistribution, run_dir: Path, levels: int | None, data: Tensor) -> None:
    samples = flow.sample((64,)).cpu()
    if samples.dim() == 4:
        grid = samples[:, 0] if samples.shape[1] == 1 else samples.permute(0, 2, 3, 1) / (levels or 1)
        figure, axes = plt.subplots(8, 8, figsize=(6, 6))
        for axis, image in zip(axes.flat, grid, strict=False):
            axis.imshow(image.numpy(), cmap="gray")
            axis.axis("off")
        figure.savefig(run_dir / "samples.png", dpi=100)
        plt.close(figure)
        return
    if samples.shape[1] == 2:
        side = torch.linspace(-5, 5, 200)
        points = torch.cartesian_prod(side, side)
        density = torch.cat([flow.log_prob(chunk).exp() for chunk in points.split(4096)]).view(200, 200)
        more = flow.sample((2000,)).cpu()
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
        left.imshow(density.T.numpy(), origin="lower", extent=(-5, 5, -5, 5))
        left.set_title("model density")
        right.scatter(more[:, 0], more[:, 1], s=1, label="samples")
        right.scatter(data[:2000, 0], data[:2000, 1], s=1, alpha=0.3, label="data")
        right.set(xlim=(-5, 5), ylim=(-5, 5), title="samples")
        right.legend()
        figure.savefig(run_dir / "density.png", dpi=100)
        plt.close(figure)


@torch.no_grad()
def _feature_reconstruction(model: InvertibleClassifier, x: Tensor) -> dict[str, Any]:
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


def _finish(model: torch.nn.Module, config: RunConfig, run_dir: Path, test: Any, levels: int | None) -> dict:
    model.eval()
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if is_spectra(config):
        return finish_spectra(model, config, run_dir, test)
    if isinstance(model, ConditionalGAN):
        summary = finish_gan(model, run_dir, test)
    elif isinstance(model, IndependenceCrossEntropy):
        summary["test"] = model.evaluate(test)
        summary["reconstruction"] = _feature_reconstruction(model.classifier, test[0][:256])
        summary["nuisance_probe"] = nuisance_probe(model.classifier, load_labelled_data(config)[0], test)
    elif isinstance(model, InvertibleClassifier):
        summary["test"] = CrossEntropy(model).evaluate(test)
        summary["reconstruction"] = _feature_reconstruction(model, test[0][:256])
        if isinstance(model, FullyInvertibleClassifier):  # how much z_n knows about y (thesis 6.4.2)
            summary["nuisance_probe"] = nuisance_probe(model, load_labelled_data(config)[0], test)
    else:
        summary["evaluation_estimator"] = _use_evaluation_estimator(model, config, test[0].numel())
        summary["test"] = _bits_per_dim(model, test, config)
        summary["reconstruction"] = _reconstruction(model, test[:256])
        _figures(model, run_dir, levels, test)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _build(config: RunConfig) -> tuple[torch.nn.Module, Any, Any, int | None]:
    """``(model, train, test, levels)``: data are tensors for flows and ``(x, y)`` pairs for classifiers and GANs."""
    if is_spectra(config):
        train, test, dataset = load_spectra(config)
        n_classes = max(int(dataset.labels.max()) + 1, 2)
        return build_spectra_model(config, train[0].shape[-1], n_classes), train, test, None
    if is_gan(config):
        train, test = load_labelled_data(config)
        n_classes = int(max(train[1].max(), test[1].max())) + 1
        gan = build_gan(config, train[0].shape[1], n_classes)
        size = gan.generator.image_shape[-1]
        return gan, gan_images(train, size), gan_images(test, size), None
    if is_classifier(config):
        train, test = load_labelled_data(config)
        n_classes = int(max(train[1].max(), test[1].max())) + 1
        classifier = build_classifier(config, tuple(train[0].shape[1:]), n_classes)
        if config.model.independence and config.model.kind != "fully_invertible_classifier":
            raise ValueError("model.independence needs model.kind 'fully_invertible_classifier' (logits and nuisance)")
        if config.model.independence:  # thesis Def. 6.14: the trained module holds both players
            nuisance = train[0][0].numel() - n_classes
            model = IndependenceCrossEntropy(
                classifier,  # type: ignore[arg-type]
                nuisance,
                nuisance_weight=config.model.independence_weight,
                likelihood_weight=config.model.likelihood_weight,
                nuisance_objective=config.model.nuisance_objective,
            )
            return model, train, test, None
        return classifier, train, test, None
    train, test, levels = load_data(config)
    return build_flow(config, tuple(train.shape[1:]), levels), train, test, levels


def _to(data: Any, device: torch.device | str) -> Any:
    return tuple(part.to(device) for part in data) if isinstance(data, tuple) else data.to(device)


def train_run(
    config: RunConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict:
    """Train the configured model in ``run_dir`` (default: a new folder under ``output_dir``) and evaluate it."""
    torch.manual_seed(config.train.seed)
    model, train, test, levels = _build(config)
    model, train, test = model.to(device), _to(train, device), _to(test, device)
    if run_dir is None:
        if not is_main_process():
            raise ValueError("multi-process training needs --run-dir, so that every process writes the same run")
        run_dir = Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(config.model_dump_json(indent=2))
    objective: Any = None
    if isinstance(model, InvertibleClassifier) or is_spectra(config):
        objective = CrossEntropy(model, max_shift=config.data.augment_shift)
    elif isinstance(model, IndependenceCrossEntropy):
        objective = model
    elif isinstance(model, ConditionalGAN):
        objective = AdversarialLoss(model)
    settings = TrainConfig(**config.train.model_dump())
    trainer = Trainer(model, train, settings, run_dir, test_data=None, progress=progress, objective=objective)
    if resume:
        trainer.resume()
    trainer.fit()
    if not is_main_process():
        return {"run_dir": str(run_dir)}
    with trainer.ema_weights():
        return _finish(model, config, run_dir, test, levels)


def open_run(run_dir: str | Path) -> tuple[RunConfig, torch.nn.Module, Any, int | None]:
    """Rebuild a trained run: its config, the model with the checkpoint's (EMA) weights, the test data, K."""
    run_dir = Path(run_dir)
    config_file = run_dir / "run_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: run_config.json is missing")
    config = RunConfig.model_validate_json(config_file.read_text())
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (the 'latest' file is missing)")
    _, state = load_checkpoint(checkpoint)
    model, _, test, levels = _build(config)
    model.load_state_dict(state["model"])
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter, average in zip(parameters, state["ema"], strict=False):
            parameter.copy_(average)
    return config, model.eval(), test, levels


def evaluate_run(run_dir: str | Path) -> dict:
    """Test metrics (flows: bits/dim with the series length from the truncation bound; classifiers: accuracy)
    and the reconstruction error through the inverse, of a trained run."""
    config, model, test, levels = open_run(run_dir)
    return _finish(model, config, Path(run_dir), test, levels)


def certify_run(run_dir: str | Path) -> tuple[Certificate, Path]:
    """Certify every residual block of a trained run (thesis Remark 4.9) on a batch of its test data; saves
    ``certificate.png`` (per-layer largest singular values, thesis Fig. 4.2) in the run folder."""
    _, model, test, _ = open_run(run_dir)
    if isinstance(model, ConditionalGAN):
        raise ValueError(f"{run_dir} trained a GAN, which has no residual blocks to certify")
    if isinstance(model, IndependenceCrossEntropy):
        model = model.classifier
    body = model.transform if isinstance(model, FlowDistribution) else model
    x = test[0][:16] if isinstance(test, tuple) else test[:16]
    certificate = certify(body, x)
    return certificate, plot_certificate(certificate, Path(run_dir) / "certificate.png")


@torch.no_grad()
def metameric_run(run_dir: str | Path, n: int = 8) -> dict[str, Any]:
    """Metameric samples (thesis Def. 6.8) of a trained fully invertible classifier: the logits of n test images
    with the nuisance variables of n others of different classes; saves ``metameric.png`` (rows: inputs,
    references, metameric samples) and reports how exactly logits and nuisances were kept."""
    _, model, test, _ = open_run(run_dir)
    if isinstance(model, IndependenceCrossEntropy):
        model = model.classifier
    if not isinstance(model, FullyInvertibleClassifier):
        raise ValueError(f"{run_dir} did not train a fully_invertible_classifier; metameric sampling needs one")
    model = copy.deepcopy(model).double()  # float64: the logits are kept to the inverse's 1e-12 residual
    images, labels = test
    images = images.double()
    x = images[:n]
    partner = [int(((labels != labels[i]).nonzero()[i % 5 + 1]).item()) for i in range(len(x))]
    reference = images[partner]
    x_met = metameric_sample(model, x, reference)
    semantic, _ = model.split(model.features(x_met))
    _, nuisance = model.split(model.features(x_met))
    grid = torch.cat([x, reference, x_met])
    figure, axes = plt.subplots(3, len(x), figsize=(len(x), 3.3), squeeze=False)
    for axis, image in zip(axes.flat, grid, strict=True):
        axis.imshow(image[0].numpy(), cmap="gray")
        axis.axis("off")
    for row, title in enumerate(("logits from", "nuisance from", "metameric")):
        axes[row][0].set_title(title, fontsize=7, loc="left")
    path = Path(run_dir) / "metameric.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return {
        "figure": str(path),
        "max_logit_difference": (semantic - model(x)).abs().max().item(),
        "max_nuisance_difference": (nuisance - model.split(model.features(reference))[1]).abs().max().item(),
        "predicted": model(x_met).argmax(1).tolist(),
        "reference_labels": labels[partner].tolist(),
    }


def sample_run(run_dir: str | Path, n: int = 64) -> Tensor:
    """Draw n samples from a trained flow or GAN run (GANs: labels 0, 1, ... in turn)."""
    model = open_run(run_dir)[1]
    if isinstance(model, ConditionalGAN):
        with torch.no_grad():
            return model.sample(torch.arange(n) % max(model.generator.n_classes, 1))
    if not isinstance(model, FlowDistribution):
        raise ValueError(f"{run_dir} trained a classifier, which has no samples; use evaluate or invert")
    return model.sample((n,))


def invert_run(run_dir: str | Path) -> dict:
    """Reconstruction error of test data through the inverse of a trained run (classifiers: of the features;
    GANs: latent recovery of generated images from half their pixels)."""
    config, model, test, _ = open_run(run_dir)
    if is_spectra(config):
        raise ValueError(f"{run_dir} trained {config.model.kind}, a spectrum classifier that is not invertible")
    if isinstance(model, ConditionalGAN):
        return recovery_check(model.generator)
    if isinstance(model, IndependenceCrossEntropy):
        model = model.classifier
    if isinstance(model, InvertibleClassifier):
        return _feature_reconstruction(model, test[0][:256])
    return _reconstruction(model, test[:256])
