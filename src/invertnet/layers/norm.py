r"""Activation normalisation (Kingma & Dhariwal 2018; thesis A.1/A.2 place it before each block)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertnet.core import InvertibleModule, check_input

__all__ = ["ActNorm"]


class ActNorm(InvertibleModule):
    r"""Per-channel affine map :math:`y = (x - \mu) \odot e^{-s}` with data-dependent initialisation.

    On the first forward call in training mode, :math:`\mu` and :math:`e^{s}` are set to the per-channel mean
    and standard deviation of the batch, so the output starts standardised. Channels are dimension 1; every
    further dimension (e.g. H, W) shares the channel's parameters, so

    .. math:: \log|\det J| = -\,\frac{d}{C} \sum_{c=1}^{C} s_c, \qquad d = \text{event size}.

    Arguments:
        channels: Number of channels C of inputs with shape (B, C, ...).
        eps: Floor on the initial standard deviation.

    Example:
        >>> layer = ActNorm(3)
        >>> y, log_det = layer.forward_and_log_det(5 + 2 * torch.randn(64, 3, 4, 4))
        >>> round(y.mean().item(), 4), log_det.shape
        (0.0, torch.Size([64]))
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, parameter: Tensor, x: Tensor) -> Tensor:
        return parameter.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"ActNorm.{where}")
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"ActNorm.{where}: expected input of shape (B, {self.channels}, ...), got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        per_channel = x.transpose(0, 1).flatten(1)
        self.loc.copy_(per_channel.mean(dim=1))
        self.log_scale.copy_(per_channel.std(dim=1, unbiased=False).clamp_min(self.eps).log())
        self.initialized.fill_(True)

    def _log_det(self, x: Tensor) -> Tensor:
        spatial = x[0, 0].numel()
        return (-spatial * self.log_scale.sum()).expand(x.shape[0])

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        if self.training and not self.initialized:
            self._initialize(x)
        y = (x - self._view(self.loc, x)) * torch.exp(-self._view(self.log_scale, x))
        return y, self._log_det(x)

    def inverse_and_log_det(self, y: Tensor, **options: object) -> tuple[Tensor, Tensor]:
        self._check(y, "inverse")
        x = y * torch.exp(self._view(self.log_scale, y)) + self._view(self.loc, y)
        return x, -self._log_det(y)

    def inverse_lipschitz_bound(self) -> float:
        """max_c e^{s_c}: the largest per-channel scale of the inverse x = y e^{s} + mu."""
        return float(self.log_scale.detach().max().exp())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={bool(self.initialized)}"
