r"""Training objectives as modules (so that DistributedDataParallel sees the forward pass), with evaluation.

An objective maps a batch to a scalar loss (``forward``) and a data set to its test metrics (``evaluate``);
``name`` is the metric the loss reports (``train_<name>`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from invertnet.models.flows import FlowDistribution

__all__ = [
    "AdversarialLoss",
    "BitsPerDim",
    "ConditionalGAN",
    "CrossEntropy",
    "bits_per_sample",
    "mean_and_standard_error",
]

Batch = Tensor | tuple[Tensor, ...]


@torch.no_grad()
def bits_per_sample(flow: FlowDistribution, data: Tensor, batch_size: int = 256) -> Tensor:
    """bits/dim of every sample of ``data``, shape (N,), computed in chunks of ``batch_size``."""
    return torch.cat([flow.bits_per_dim(chunk) for chunk in data.split(batch_size)])


def mean_and_standard_error(bits: Tensor) -> dict[str, float]:
    """``{"bits_per_dim": mean, "standard_error": std / sqrt(N)}`` over samples."""
    return {"bits_per_dim": bits.mean().item(), "standard_error": (bits.std() / math.sqrt(len(bits))).item()}


class BitsPerDim(nn.Module):
    r"""Maximum likelihood: the batch's mean -log p(x) / (d ln 2) (thesis Eq. 5.3).

    Arguments:
        flow: The :class:`~invertnet.models.FlowDistribution` trained; batches are tensors (B, ...).
    """

    name = "bits_per_dim"

    def __init__(self, flow: FlowDistribution) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, batch: Tensor) -> Tensor:
        return self.flow.bits_per_dim(batch).mean()

    def evaluate(self, data: Tensor, batch_size: int = 256) -> dict[str, float]:
        """Mean bits/dim over ``data`` and its standard error over samples."""
        return mean_and_standard_error(bits_per_sample(self.flow, data, batch_size))


def random_shift(images: Tensor, max_shift: int, fill: float) -> Tensor:
    """Each image (B, C, H, W) translated by its own random offsets in [-max_shift, max_shift] pixels, the
    uncovered border filled with ``fill`` (thesis A.1: shifts of up to two pixels for MNIST)."""
    if max_shift <= 0:
        return images
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2))
    height, width = images.shape[-2:]
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets.tolist())])


class CrossEntropy(nn.Module):
    r"""Classification: the batch's mean cross-entropy of ``classifier(x)`` against labels y.

    Arguments:
        classifier: A module mapping (B, ...) inputs to (B, n_classes) logits; batches are ``(x, y)``.
        max_shift: Data augmentation in training mode: random translations of up to this many pixels
            (thesis A.1), the border filled with the batch's smallest value (the background).
    """

    name = "cross_entropy"

    def __init__(self, classifier: nn.Module, max_shift: int = 0) -> None:
        super().__init__()
        self.classifier, self.max_shift = classifier, max_shift

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        if self.training and self.max_shift:
            x = random_shift(x, self.max_shift, x.min().item())
        return F.cross_entropy(self.classifier(x), y)

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Mean cross-entropy and accuracy over ``data``, with the binomial standard error of the accuracy."""
        x, y = data
        logits = torch.cat([self.classifier(chunk) for chunk in x.split(batch_size)])
        correct = (logits.argmax(dim=1) == y).double()
        accuracy = correct.mean().item()
        return {
            "cross_entropy": F.cross_entropy(logits, y).item(),
            "accuracy": accuracy,
            "accuracy_standard_error": math.sqrt(accuracy * (1 - accuracy) / len(y)),
        }


class ConditionalGAN(nn.Module):
    """A generator and a discriminator trained together (seed 003, 4.3); the trainer's model for GANs.

    Arguments:
        generator: Maps (z (B, latent_dim), labels (B,)) to images.
        discriminator: Maps (images, labels) to logits (B,).
        latent_dim: Dimension of z, drawn from N(0, I).
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.generator, self.discriminator, self.latent_dim = generator, discriminator, latent_dim

    def sample(self, labels: Tensor) -> Tensor:
        """Images G(z, labels) for fresh z ~ N(0, I), one per label."""
        z = torch.randn(len(labels), self.latent_dim, device=labels.device, dtype=next(self.parameters()).dtype)
        return self.generator(z, labels)


class AdversarialLoss(nn.Module):
    r"""The non-saturating GAN objective as one scalar whose gradient trains both players in one step.

    .. math:: L = \underbrace{-\log D(x, c) - \log(1 - D(G(z, c), c))}_{\text{discriminator}}
        \; \underbrace{- \log D_{\bar\theta}(G(z, c), c)}_{\text{generator}}

    The discriminator term sees detached fakes, and the generator term evaluates the discriminator with
    detached parameters (``torch.func.functional_call``), so the discriminator's parameters receive only the
    gradient of their own loss and the generator's only of theirs: one optimiser step is a simultaneous
    gradient step of the min-max game. Batches are ``(images, labels)``.

    Arguments:
        gan: The :class:`ConditionalGAN`.
    """

    name = "gan_loss"

    def __init__(self, gan: ConditionalGAN) -> None:
        super().__init__()
        self.gan = gan

    def _losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        discriminator = self.gan.discriminator
        fake = self.gan.sample(labels)
        real_logits = discriminator(images, labels)
        fake_logits = discriminator(fake.detach(), labels)
        d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_loss = d_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        frozen = {name: value.detach() for name, value in discriminator.named_parameters()}
        fooled = functional_call(discriminator, frozen, (fake, labels))
        g_loss = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        return d_loss, g_loss

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        d_loss, g_loss = self._losses(*batch)
        return d_loss + g_loss

    @torch.no_grad()
    def evaluate(self, data: tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
        """Discriminator and generator losses on held-out real images (eval mode), and the discriminator's
        accuracy at telling them from fresh fakes."""
        images, labels = data
        d_total = g_total = correct = 0.0
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            d_loss, g_loss = self._losses(chunk, chunk_labels)
            d_total += d_loss.item() * len(chunk)
            g_total += g_loss.item() * len(chunk)
            fake = self.gan.sample(chunk_labels)
            correct += (self.gan.discriminator(chunk, chunk_labels) > 0).sum().item()
            correct += (self.gan.discriminator(fake, chunk_labels) <= 0).sum().item()
        n = len(images)
        return {
            "discriminator_loss": d_total / n,
            "generator_loss": g_total / n,
            "discriminator_accuracy": correct / (2 * n),
        }
