r"""Normalisation layers: ActNorm (Kingma & Dhariwal 2018; thesis A.1/A.2), invertible batch norm (Song et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from invertnet.core import InvertibleModule, SolverOptions, check_input

__all__ = ["ActNorm", "InvertibleBatchNorm"]


class ActNorm(InvertibleModule):
    r"""Per-channel affine map :math:`y = (x - \mu) \odot e^{-s}` with data-dependent initialisation.

    On the first forward call in training mode, :math:`\mu` and :math:`e^{s}` are set to the per-channel mean
    and standard deviation of the batch, so the output starts standardised. Channels are dimension 1; every
    further dimension (e.g. H, W) shares the channel's parameters, so

    .. math:: \log|\det J| = -\,\frac{d}{C} \sum_{c=1}^{C} s_c, \qquad d = \text{event size}.

    Arguments:
        channels: Number of channels C of inputs with shape (B, C, ...).
        eps: Channels whose initial standard deviation is at most ``eps`` (constant channels, such as zero
            padding) start with scale 1 instead of 1 / std.

    Whether the layer is initialised is the ``initialized`` buffer (saved with the state dict); the layer reads it
    from the device once it holds True and then remembers it, so a training step on a GPU does not wait for the
    host. Loading a state dict makes the layer read the loaded value; a write to the buffer in place is not seen.

    Examples:
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
        self._initialized_read = False  # True once `initialized` is known to hold True (no device read any more)

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
        std = per_channel.std(dim=1, unbiased=False)
        self.loc.copy_(per_channel.mean(dim=1))
        # constant channels (e.g. injective zero padding) keep scale 1: a 1/eps scale would turn every later
        # change of their values into a huge output
        self.log_scale.copy_(torch.where(std > self.eps, std, torch.ones_like(std)).log())
        self.initialized.fill_(True)
        self._initialized_read = True

    def _needs_initialization(self) -> bool:
        """Whether the next training call initialises the layer: reads the buffer (a host synchronisation on a
        GPU) only until it has been seen to be True."""
        if not self._initialized_read:
            self._initialized_read = bool(self.initialized)
        return not self._initialized_read

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._initialized_read = False  # the loaded buffer decides; read it at the next training call

    def _log_det(self, x: Tensor) -> Tensor:
        spatial = x[0, 0].numel()
        return (-spatial * self.log_scale.sum()).expand(x.shape[0])

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        if self.training and not torch.compiler.is_compiling() and self._needs_initialization():
            self._initialize(x)  # data-dependent: compiled code assumes a layer already called once
        y = (x - self._view(self.loc, x)) * torch.exp(-self._view(self.log_scale, x))
        return y, self._log_det(x)

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, "inverse")
        x = y * torch.exp(self._view(self.log_scale, y)) + self._view(self.loc, y)
        return x, -self._log_det(y)

    def inverse_lipschitz_bound(self) -> float:
        """max_c e^{s_c}: the largest per-channel scale of the inverse x = y e^{s} + mu."""
        return float(self.log_scale.detach().max().exp())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={bool(self.initialized)}"


class InvertibleBatchNorm(InvertibleModule):
    r"""Batch normalisation as an invertible layer (Song et al. 2019, 5.1; Papamakarios et al. 2017, MAF).

    .. math:: y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        \log|\det J| = \frac{d}{C} \sum_c \Big(\log|\gamma_c| - \tfrac12 \log(\sigma_c^2 + \epsilon)\Big)

    In training mode, mu and sigma^2 are the batch's per-channel statistics (held constant in the log-det,
    as in MAF) and update the running averages; in eval mode the running averages are used, so the layer is
    a fixed affine map, batch-independent and exactly invertible. The inverse always uses the running
    averages: invert a trained model in eval mode.

    Arguments:
        channels: Number of channels C of inputs with shape (B, C, ...).
        momentum: Weight of the new batch in the running averages.
        eps: Added to the variance.

    Examples:
        >>> layer = InvertibleBatchNorm(3).eval()
        >>> x = torch.randn(4, 3, 2, 2)
        >>> bool((layer.inverse(layer(x)) - x).abs().max() < 1e-6)
        True
    """

    #: The training-mode output depends on the whole batch (the generic suite skips train/eval agreement).
    batch_statistics_in_training = True

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if channels < 1 or not 0 < momentum <= 1 or eps <= 0:
            raise ValueError(
                "InvertibleBatchNorm: need channels >= 1, 0 < momentum <= 1 and eps > 0; "
                f"got {channels}, {momentum}, {eps}"
            )
        self.channels, self.momentum, self.eps = channels, momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"InvertibleBatchNorm.{where}")
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"InvertibleBatchNorm.{where}: expected input of shape (B, {self.channels}, ...), got {tuple(x.shape)}"
            )

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        if x.shape[0] * x[0, 0].numel() < 2:
            raise ValueError("InvertibleBatchNorm.forward: batch statistics need more than one value per channel")
        per_channel = x.transpose(0, 1).flatten(1)
        mean, var = per_channel.mean(dim=1), per_channel.var(dim=1, unbiased=False)
        with torch.no_grad():
            unbiased = var * per_channel.shape[1] / (per_channel.shape[1] - 1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        return mean, var

    def _view(self, parameter: Tensor, x: Tensor) -> Tensor:
        return parameter.view(1, -1, *([1] * (x.dim() - 2)))

    def _log_scale(self, var: Tensor) -> Tensor:
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        mean, var = self._statistics(x)
        log_scale = self._log_scale(var)
        y = (x - self._view(mean, x)) * self._view(log_scale.exp(), x) + self._view(self.beta, x)
        return y, (x[0, 0].numel() * log_scale.sum()).expand(x.shape[0])

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, "inverse")
        log_scale = self._log_scale(self.running_var)
        x = (y - self._view(self.beta, y)) * self._view((-log_scale).exp(), y) + self._view(self.running_mean, y)
        return x, (-y[0, 0].numel() * log_scale.sum()).expand(y.shape[0])

    def inverse_lipschitz_bound(self) -> float:
        """max_c sqrt(var_c + eps) / |gamma_c| of the eval-mode map."""
        return float((-self._log_scale(self.running_var)).detach().max().exp())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, momentum={self.momentum}"
