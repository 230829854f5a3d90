r"""A conditional GAN as one module: the generator and the discriminator trained together by
:class:`~invertnet.training.AdversarialLoss`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertnet.models.generators import DCGANDiscriminator, DCGANGenerator
from invertnet.models.saving import saveable

__all__ = ["ConditionalGAN", "conditional_dcgan"]


class ConditionalGAN(nn.Module):
    r"""A generator G(z, c) and a discriminator D(x, c) conditioned on class labels c (Mirza and Osindero, 2014),
    held in one module so that one optimiser, one EMA and one checkpoint serve both players.

    With DCGAN players (:class:`~invertnet.models.DCGANGenerator`, :class:`~invertnet.models.DCGANDiscriminator`;
    Radford, Metz and Chintala, ICLR 2016) this is the generator whose latent codes
    :func:`~invertnet.recovery.recover` inverts from partial measurements (Ma, Ayaz and Karaman, NeurIPS 2018,
    section 4.3).

    Arguments:
        generator: Maps (z (B, latent_dim), labels (B,)) to images (B, C, H, W).
        discriminator: Maps (images (B, C, H, W), labels (B,)) to logits (B,).
        latent_dim: Dimension of z, drawn from N(0, I).

    Examples:
        >>> from invertnet.models import DCGANDiscriminator, DCGANGenerator
        >>> gan = ConditionalGAN(DCGANGenerator(4, 3, 1, 2, 8), DCGANDiscriminator(3, 1, 2, 8), latent_dim=4)
        >>> gan.sample(torch.tensor([0, 1, 2])).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.generator, self.discriminator, self.latent_dim = generator, discriminator, latent_dim

    def sample(self, labels: Tensor) -> Tensor:
        """Images G(z, labels) for fresh z ~ N(0, I) (torch's global RNG), one per label of ``labels`` (B,)."""
        z = torch.randn(len(labels), self.latent_dim, device=labels.device, dtype=next(self.parameters()).dtype)
        return self.generator(z, labels)


@saveable
def conditional_dcgan(
    n_classes: int, channels: int = 1, latent_dim: int = 10, n_layers: int = 4, width: int = 128
) -> ConditionalGAN:
    """The conditional DCGAN of Ma, Ayaz & Karaman (2018, section 4.3): a :class:`~invertnet.models.DCGANGenerator`
    and a :class:`~invertnet.models.DCGANDiscriminator` of the same depth and width, images of side
    4 * 2^(n_layers - 1).

    Examples:
        >>> gan = conditional_dcgan(n_classes=3, latent_dim=4, n_layers=2, width=8)
        >>> gan.sample(torch.tensor([0, 2])).shape
        torch.Size([2, 1, 8, 8])
    """
    generator = DCGANGenerator(latent_dim, n_classes, channels, n_layers, width)
    return ConditionalGAN(generator, DCGANDiscriminator(n_classes, channels, n_layers, width), latent_dim)
