r"""Invertible linear maps in LU form: ``LULinear`` on vectors and Glow's invertible 1x1 convolution
(Kingma & Dhariwal 2018, section 3.2).

The weight is parameterised as

.. math:: W = P\, L\, (U + \mathrm{diag}(s)), \qquad \log|\det W| = \sum_i \log|s_i|,

with P a fixed permutation, L unit lower triangular, U strictly upper triangular and s = sign * exp(log_s)
(the sign fixed at initialisation), so the log-det costs O(d) instead of O(d^3) and the inverse is two
triangular solves. Both layers start from a random rotation (the LU factors of a random orthogonal matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.core import InvertibleModule, SolverOptions, check_input

__all__ = ["InvertibleConv1x1", "LULinear"]


class _LUInvertibleMap(InvertibleModule):
    """The LU-parameterised weight and the maps y = W x, x = W^{-1} y applied along dimension 1."""

    def __init__(self, features: int) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(
                f"{type(self).__name__}: the number of features must be a positive integer, got {features!r}"
            )
        self.features = features
        rotation = torch.linalg.qr(torch.randn(features, features)).Q
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", torch.sign(diagonal))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_scale = nn.Parameter(diagonal.abs().log())

    def _factors(self) -> tuple[Tensor, Tensor]:
        """L (unit lower triangular) and U + diag(s) (upper triangular)."""
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_scale))
        return lower, upper

    def weight(self) -> Tensor:
        """The assembled d x d matrix W = P L (U + diag(s))."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def log_abs_det_weight(self) -> Tensor:
        """log|det W| = sum_i log|s_i|, a scalar."""
        return self.log_scale.sum()

    def _spatial_size(self, x: Tensor) -> int:
        return x[0, 0].numel()

    def _check(self, x: Tensor, where: str) -> None:
        """Raise a ``ValueError`` naming the layer and ``where`` for input of the wrong shape or values."""
        raise NotImplementedError

    def _multiply(self, x: Tensor, weight: Tensor) -> Tensor:
        """W applied along dimension 1 of x."""
        raise NotImplementedError

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward")
        y = self._multiply(x, self.weight())
        return y, (self._spatial_size(x) * self.log_abs_det_weight()).expand(x.shape[0])

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        r"""x_row = y_row W^{-T} by triangular solves: x_row (U+diag s)^T L^T = y_row P, right to left."""
        self._check(y, "inverse")
        lower, upper = self._factors()
        rows = y.movedim(1, -1) @ self.permutation  # (B, ..., d): the solves act on the last dimension
        rows = torch.linalg.solve_triangular(lower.T, rows, upper=True, left=False, unitriangular=True)
        rows = torch.linalg.solve_triangular(upper.T, rows, upper=False, left=False)
        x = rows.movedim(-1, 1).contiguous()
        return x, (-self._spatial_size(y) * self.log_abs_det_weight()).expand(y.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}"


class LULinear(_LUInvertibleMap):
    r"""An invertible d x d linear map y = W x with W = P L (U + diag(s)) (Kingma & Dhariwal 2018, section 3.2).

    .. math:: \log|\det J| = \sum_{i=1}^{d} \log|s_i|.

    The inverse solves L and U + diag(s) by ``torch.linalg.solve_triangular`` (W is never inverted). No bias: in
    the flows an :class:`~invertnet.layers.ActNorm` before it supplies the shift. Initialised from a random
    rotation (log-det 0).

    Arguments:
        features: d, for inputs of shape (B, d).

    Examples:
        >>> layer = LULinear(3)
        >>> x = torch.randn(4, 3)
        >>> y, log_det = layer.forward_and_log_det(x)
        >>> torch.allclose(layer.inverse(y), x, atol=1e-5), torch.allclose(log_det, torch.zeros(4), atol=1e-5)
        (True, True)
    """

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, (self.features,), f"LULinear.{where}")

    def _multiply(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight.T


class InvertibleConv1x1(_LUInvertibleMap):
    r"""Glow's invertible 1x1 convolution in LU form (Kingma & Dhariwal 2018, section 3.2).

    Every pixel's channel vector is multiplied by the same C x C matrix W = P L (U + diag(s)), so for inputs of
    shape (B, C, H, W)

    .. math:: \log|\det J| = H \cdot W \cdot \sum_{c=1}^{C} \log|s_c|.

    The inverse is two triangular solves per pixel. Initialised from a random rotation, as in Glow.

    Arguments:
        channels: C.

    Examples:
        >>> conv = InvertibleConv1x1(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(conv.inverse(conv(x)), x, atol=1e-5)
        True
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)

    def _multiply(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight.view(self.features, self.features, 1, 1))

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"InvertibleConv1x1.{where}")
        if x.dim() != 4 or x.shape[1] != self.features:
            raise ValueError(
                f"InvertibleConv1x1.{where}: expected input of shape (B, {self.features}, H, W), got {tuple(x.shape)}"
            )
