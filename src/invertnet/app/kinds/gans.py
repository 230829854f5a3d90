r"""The conditional DCGAN ``dcgan`` (Ma, Ayaz & Karaman 2018, section 4.3), trained adversarially on labelled
images; a finished run saves the generator, a sample grid per class, and checks latent recovery of generated
images from partial measurements."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from invertnet.analysis import plot_weight_histograms, weight_normality
from invertnet.app.datasets import labelled_images
from invertnet.app.kinds.base import KindConfig, ModelKind, RunData
from invertnet.app.kinds.fields import MAX_WIDTH
from invertnet.figures import save_figure, subplots
from invertnet.models.gan import ConditionalGAN, conditional_dcgan
from invertnet.models.generators import DCGANGenerator, dcgan_image_size, save_generator
from invertnet.recovery.masks import make_mask
from invertnet.recovery.recover import recover
from invertnet.training.objectives import AdversarialLoss

if TYPE_CHECKING:
    from invertnet.app.config import RunConfig

__all__ = ["DCGANConfig", "GANKind", "gan_images", "recovery_check"]


class DCGANConfig(KindConfig):
    """``dcgan``: :func:`~invertnet.models.conditional_dcgan`."""

    kind: Literal["dcgan"] = "dcgan"
    builder: ClassVar = staticmethod(conditional_dcgan)
    application_fields: ClassVar[frozenset[str]] = frozenset({"recovery_problems"})
    latent_dim: int = Field(
        10, gt=0, le=MAX_WIDTH, description="latent dimension (small keeps the generator expansive)"
    )
    n_layers: int = Field(
        3, gt=0, le=10, description="transposed convolutions of the generator (images of 4 * 2^(n_layers - 1) pixels)"
    )
    width: int = Field(64, gt=0, le=MAX_WIDTH, description="channels of the first feature map")
    recovery_problems: int = Field(
        64, gt=0, le=4096, description="generated images whose codes the latent-recovery check recovers"
    )


class GANKind(ModelKind):
    """A conditional GAN (generator and discriminator in one module), trained by one adversarial objective."""

    family: ClassVar[str] = "GAN"
    validated: ClassVar[bool] = False  # adversarial losses rank no weights: the generator average is kept
    requires: ClassVar[tuple[tuple[str, str, str], ...]] = (("matplotlib.figure", "plots", "a GAN run's samples.png"),)

    def load_data(self, config: RunConfig) -> RunData:
        train, test, n_classes = labelled_images(config.data)
        size = dcgan_image_size(config.model.n_layers)
        return RunData(gan_images(train, size), gan_images(test, size), n_classes=n_classes)

    def construct(self, config: RunConfig, data: RunData) -> nn.Module:
        model = config.model
        return model.builder(data.n_classes, data.train[0].shape[1], **model.builder_arguments())

    def objective(self, model: nn.Module, config: RunConfig) -> nn.Module:
        return AdversarialLoss(model)  # type: ignore[arg-type]

    def finish(self, model: nn.Module, config: RunConfig, run_dir: Path, data: RunData) -> dict[str, Any]:
        return finish_gan(model, run_dir, data.test, config.model.recovery_problems)  # type: ignore[arg-type]

    def invert(self, model: nn.Module, config: RunConfig, data: RunData) -> dict[str, Any]:
        return recovery_check(copy.deepcopy(model.generator), config.model.recovery_problems)  # type: ignore[arg-type]

    def sample(self, model: nn.Module, n: int) -> Tensor:
        """``n`` generated images, labels 0, 1, ... in turn."""
        gan: ConditionalGAN = model  # type: ignore[assignment]
        device = next(gan.parameters()).device
        with torch.no_grad():
            return gan.sample(torch.arange(n, device=device) % max(gan.generator.n_classes, 1))


def gan_images(data: tuple[Tensor, Tensor], image_size: int) -> tuple[Tensor, Tensor]:
    """Images in [-0.5, 0.5] (as loaded for classifiers) mapped to tanh's [-1, 1] and padded with -1 (black
    background) to the generator's size, e.g. MNIST 28x28 -> 32x32 as in Ma, Ayaz & Karaman (2018)."""
    images, labels = data
    missing = image_size - images.shape[-1]
    if missing < 0 or image_size - images.shape[-2] != missing:
        raise ValueError(
            f"dcgan: images of size {tuple(images.shape[-2:])} do not fit a {image_size}x{image_size} generator"
        )
    images = F.pad(2 * images, (missing // 2, missing - missing // 2) * 2, value=-1.0)
    return images, labels


def recovery_check(generator: DCGANGenerator, n: int = 64, rate: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Ma, Ayaz & Karaman 2018, section 4.3 and Fig. 5: recover the codes of ``n`` generated images from a
    fraction ``rate`` of their pixels with the paper's five masks (uniform random pixels, the top, bottom, left
    and right halves), with 4 restarts. Reported per mask: exact recovery
    (relative latent error < 1e-3), images completed (|G(z) - G(z*)| < 1e-3 |G(z*)| over all pixels, observed or not),
    measurements fitted (the optimisation converged) and non-unique (a distinct code fits too: the generator is
    many-to-one there, e.g. mode collapse). The generator is converted
    to float64 and eval mode in place (pass a copy to keep the original)."""
    generator = generator.double().eval()
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    z_true = torch.randn(n, generator.latent_dim, generator=rng, dtype=torch.float64).to(device)
    labels = torch.randint(0, max(generator.n_classes, 1), (n,), generator=rng).to(device)
    condition = labels if generator.n_classes else None
    with torch.no_grad():
        images = generator(z_true, condition) if condition is not None else generator(z_true)
    report: dict[str, Any] = {"rate": rate, "problems": n}
    for kind in ("uniform", "top", "bottom", "left", "right"):
        mask = make_mask(kind, images.shape[-2:], rate, batch=n if kind == "uniform" else None, generator=rng)  # type: ignore[arg-type]
        result = recover(
            generator, images, mask, z_true=z_true, condition=condition, method="adam", restarts=4, seed=seed + 1
        )
        assert result.relative_error is not None
        full_error = (result.completed - images).flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1)
        report[kind] = {
            "exact_recovery": (result.relative_error < 1e-3).double().mean().item(),
            "image_completed": (full_error < 1e-3).double().mean().item(),
            "measurements_fitted": result.converged.double().mean().item(),
            "non_unique": result.non_unique.double().mean().item(),
            "median_relative_error": result.relative_error.median().item(),
            "iterations": result.iterations,
        }
    return report


@torch.no_grad()
def _sample_grid(gan: ConditionalGAN, path: Path, n_classes: int) -> None:
    device = next(gan.parameters()).device
    labels = torch.arange(max(n_classes, 1), device=device).repeat_interleave(8)
    images = gan.sample(labels).cpu()
    figure, axes = subplots(max(n_classes, 1), 8, figsize=(8, max(n_classes, 1)), squeeze=False, feature="samples.png")
    for axis, image in zip(axes.flat, images, strict=True):
        axis.imshow(image[0].numpy() if image.shape[0] == 1 else (image.permute(1, 2, 0).numpy() + 1) / 2, cmap="gray")
        axis.axis("off")
    save_figure(figure, path)


def finish_gan(
    gan: ConditionalGAN, run_dir: Path, test: tuple[Tensor, Tensor], recovery_problems: int
) -> dict[str, Any]:
    """Evaluate, save the generator (``generator.safetensors``, for ``invertnet recover``), draw a sample grid
    per class (``samples.png``), the histograms of the generator's weights against normal laws
    (``weights.png``, Ma, Ayaz & Karaman 2018, Fig. 3) and run the latent-recovery check on
    ``recovery_problems`` generated images."""
    gan.eval()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "test": AdversarialLoss(gan).evaluate(test)}
    generator: DCGANGenerator = gan.generator  # type: ignore[assignment]
    summary["generator"] = str(save_generator(generator, run_dir / "generator.safetensors"))
    _sample_grid(gan, run_dir / "samples.png", generator.n_classes)
    layers = weight_normality(generator)
    plot_weight_histograms(layers, run_dir / "weights.png")
    summary["weight_laws"] = {
        layer.name: {
            "mean_over_std": layer.mean / layer.std,
            "skewness": layer.skewness,
            "excess_kurtosis": layer.excess_kurtosis,
            "ks_distance": layer.ks_distance,
            "ks_critical_5_percent": layer.ks_critical,
        }
        for layer in layers
    }
    summary["recovery"] = recovery_check(copy.deepcopy(generator), recovery_problems)
    return summary
