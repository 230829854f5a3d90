r"""Preprocessing bijections for discrete data: uniform dequantisation and the logit transform (thesis 5.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from invertnet.core import InvertibleModule, SolverOptions, check_input, validation_enabled

__all__ = ["Logit", "UniformDequantization"]


def check_levels(x: Tensor, levels: int, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless x lies in [0, K - 1] (only while :func:`validation_enabled`:
    the check reads the minimum and maximum back from the device)."""
    if validation_enabled() and (x.min() < 0 or x.max() > levels - 1):
        raise ValueError(
            f"{where}: expected levels in [0, {levels - 1}], got values in "
            f"[{x.min().item():g}, {x.max().item():g}]; scale the data to integer levels first"
        )


class UniformDequantization(InvertibleModule):
    r"""Discrete levels x in {0, ..., K-1} to y = (x + u) / K in [0, 1), u ~ U[0, 1)^d (thesis Lemma 5.10).

    As a map of the dequantised value x + u, the Jacobian is I / K, so

    .. math:: \log|\det J| = -d \log K .

    A flow whose transform starts with this layer therefore has
    :math:`\log p(x) = \log p_Y(y) - d \log K`, the log-density of x + u in the units of the discrete
    data, whose expectation over u lower-bounds the discrete log-likelihood (Lemma 5.10); bits/dim follow as
    :math:`-\log p(x) / (d \ln 2)` (thesis 5.3, "Evaluation": the :math:`+\log_2 K` term is this log-det).

    The inverse quantises: x = clamp(floor(K y), 0, K - 1); it returns the discrete level, so it is
    piecewise constant (``quantized_inverse = True``).

    Arguments:
        levels: Number K of discrete levels (256 for 8-bit images, 17 for scikit-learn's digits).
        noise: ``"uniform"`` draws u per call (training and evaluation of the bound); ``"midpoint"`` uses
            u = 1/2, a deterministic map for tests and reproducible evaluation.

    Examples:
        >>> layer = UniformDequantization(4, noise="midpoint")
        >>> y, log_det = layer.forward_and_log_det(torch.tensor([[0.0, 3.0]]))
        >>> y, round(log_det.item(), 4), layer.inverse(y)
        (tensor([[0.1250, 0.8750]]), -2.7726, tensor([[0., 3.]]))
    """

    volume_preserving = False
    quantized_inverse = True

    def __init__(self, levels: int, noise: str = "uniform") -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"UniformDequantization: levels must be at least 2, got {levels}")
        if noise not in ("uniform", "midpoint"):
            raise ValueError(f"UniformDequantization: noise must be 'uniform' or 'midpoint', got {noise!r}")
        self.levels = levels
        self.noise = noise

    def _log_det(self, x: Tensor) -> Tensor:
        return x.new_full((x.shape[0],), -x[0].numel() * math.log(self.levels))

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, None, "UniformDequantization.forward")
        check_levels(x, self.levels, "UniformDequantization.forward")
        if not x.is_floating_point():  # integer levels: the noise and the result are real
            x = x.to(torch.get_default_dtype())
        u = torch.rand_like(x) if self.noise == "uniform" else torch.full_like(x, 0.5)
        return (x + u) / self.levels, self._log_det(x)

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        check_input(y, None, "UniformDequantization.inverse")
        x = torch.floor(y * self.levels).clamp(0, self.levels - 1)
        return x, -self._log_det(y)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, noise={self.noise!r}"


class Logit(InvertibleModule):
    r"""y = logit(alpha + (1 - 2 alpha) x) for x in [0, 1] (Dinh et al. 2017), elementwise.

    The map is a bijection from (-alpha / (1 - 2 alpha), (1 - alpha) / (1 - 2 alpha)) onto R; inputs anywhere in
    that interval are accepted (a computed inverse of data may leave [0, 1] by its error), others are refused.

    With p = alpha + (1 - 2 alpha) x,

    .. math:: \log|\det J| = \sum_i \big[\log(1 - 2\alpha) - \log p_i - \log(1 - p_i)\big].

    Arguments:
        alpha: Margin keeping p inside (0, 1); 0 < alpha < 1/2.

    Examples:
        >>> layer = Logit(alpha=0.05)
        >>> x = torch.tensor([[0.2, 0.9]])
        >>> torch.allclose(layer.inverse(layer(x)), x)
        True
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"Logit: alpha must lie in (0, 1/2), got {alpha}")
        self.alpha = alpha

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, None, "Logit.forward")
        p = self.alpha + (1 - 2 * self.alpha) * x
        if validation_enabled() and (p.min() <= 0 or p.max() >= 1):
            low, high = -self.alpha / (1 - 2 * self.alpha), (1 - self.alpha) / (1 - 2 * self.alpha)
            raise ValueError(
                f"Logit.forward: expected data in [0, 1] (the map is defined on ({low:.4g}, {high:.4g})), got values "
                f"in [{x.min().item():g}, {x.max().item():g}]; scale the data to [0, 1] first"
            )
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(dim=1)
        return y, log_det

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        check_input(y, None, "Logit.inverse")
        p = torch.sigmoid(y)
        x = (p - self.alpha) / (1 - 2 * self.alpha)
        # log|dx/dy| = log p + log(1 - p) - log(1 - 2 alpha), with log(1 - p) = log sigmoid(-y)
        log_det = (F.logsigmoid(y) + F.logsigmoid(-y) - math.log(1 - 2 * self.alpha)).flatten(1).sum(dim=1)
        return x, log_det

    def inverse_lipschitz_bound(self) -> float:
        """max sigmoid'(y) / (1 - 2 alpha) = 1 / (4 (1 - 2 alpha))."""
        return 1.0 / (4.0 * (1.0 - 2.0 * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
