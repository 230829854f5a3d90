r"""MintNet layers: masked (triangular) convolutions with exact log-determinants (Song et al. 2019, sections 3-4).

Positions of a (C, H, W) tensor are ordered by (channel, row, column). A convolution is *lower triangular*
when every output position depends only on input positions at or before it, *upper triangular* when only
on positions at or after it. Hidden layers of width kC hold k copies of each data channel: hidden channel
``c * k + m`` is copy m of channel c and sits at channel c's positions, so the three convolutions of Eq. 4
(C -> kC, kC -> kC, kC -> C) compose to a triangular map (the composition rules of section 3.2).

The diagonal of such a map's Jacobian only sees the *centre taps between copies of the same channel*
(a path p -> q -> q' -> p through a triangular chain needs p <= q <= q' <= p). Keeping those taps
non-negative (Eq. 2) and adding t * x with t > 0 (Eq. 3) makes the diagonal at least t everywhere,
which gives invertibility (Theorem 1) and an exact log-det from the diagonal at about the cost of the
forward pass.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.core import (
    InverseResult,
    InvertibleSequential,
    IterativeInvertibleModule,
    SolverOptions,
    SolverStatus,
    TransposedSolve,
    check_dtype,
    check_input,
)
from invertnet.layers.activations import ELU, Softplus
from invertnet.layers.conditional import ContextSpec, check_context, context_biases, context_map, context_shape
from invertnet.solvers.common import TRIANGULAR_MAX_ITER
from invertnet.solvers.triangular import sequential_solve, triangular_newton, triangular_transposed_solve

__all__ = ["MaskedConv2d", "MintBlock", "MintLayer", "triangular_mask"]

Direction = Literal["lower", "upper"]
_ACTIVATIONS = {"elu": ELU, "softplus": Softplus}


def _check_direction(direction: str, where: str) -> None:
    if direction not in ("lower", "upper"):
        raise ValueError(f"{where}: direction must be 'lower' or 'upper', got {direction!r}")


def triangular_mask(
    out_channels: int, in_channels: int, kernel_size: int, data_channels: int, direction: Direction = "lower"
) -> tuple[Tensor, Tensor]:
    r"""Masks of a triangular convolution: ``(mask, diagonal)``, both of shape (out, in, R, R).

    Channel h of a layer with ``k * data_channels`` channels sits at data channel ``h // k``. For a lower
    triangular map, the tap of weight[o, i, a, b] reads input offset (dy, dx) = (a - R//2, b - R//2) and is
    kept when input channel i sits at an earlier data channel than output channel o, or at the same one with
    (dy, dx) at or before (0, 0) in raster order. An upper triangular mask is the mirror image. ``diagonal``
    marks the centre taps between channels of the same data channel: the entries that reach the Jacobian's
    diagonal and must be non-negative (Eq. 2).

    Examples:
        >>> mask, diagonal = triangular_mask(1, 1, 3, 1)
        >>> mask[0, 0]
        tensor([[1., 1., 1.],
                [1., 1., 0.],
                [0., 0., 0.]])
    """
    _check_direction(direction, "triangular_mask")
    for name, channels in (("out_channels", out_channels), ("in_channels", in_channels)):
        if channels % data_channels:
            raise ValueError(f"triangular_mask: {name}={channels} is not a multiple of data_channels={data_channels}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"triangular_mask: kernel_size must be odd and positive, got {kernel_size}")
    out_position = torch.arange(out_channels) // (out_channels // data_channels)
    in_position = torch.arange(in_channels) // (in_channels // data_channels)
    offsets = torch.arange(kernel_size) - kernel_size // 2
    dy, dx = offsets.view(-1, 1), offsets.view(1, -1)
    causal = (dy < 0) | ((dy == 0) & (dx <= 0))  # (R, R): taps at or before the centre in raster order
    earlier = in_position.view(1, -1) < out_position.view(-1, 1)
    same = in_position.view(1, -1) == out_position.view(-1, 1)
    if direction == "upper":
        causal = causal.flip(0, 1)
        earlier = in_position.view(1, -1) > out_position.view(-1, 1)
    mask = earlier[..., None, None] | (same[..., None, None] & causal)
    centre = (dy == 0) & (dx == 0)
    diagonal = same[..., None, None] & centre
    return mask.to(torch.get_default_dtype()), diagonal


class MaskedConv2d(nn.Module):
    r"""A convolution whose operator is triangular over (channel, row, column) positions (Song et al. 2019, 3.4).

    ``weight`` is the raw parameter times :func:`triangular_mask`, with the diagonal centre taps replaced by
    their absolute values, so that Eq. 2 holds by construction: every entry that reaches the Jacobian's
    diagonal is non-negative. Zero padding keeps the shape (B, in, H, W) -> (B, out, H, W) and the
    triangular structure.

    Arguments:
        in_channels, out_channels: Multiples of ``data_channels``.
        kernel_size: Odd filter size R.
        data_channels: Number C of channels of the data the layer is part of (default: the smaller of
            ``in_channels`` and ``out_channels``).
        direction: ``"lower"`` or ``"upper"``.
        bias: Learn an additive bias.
        init_gain: Gain of the Xavier-normal initialisation (small values start the layer near zero).

    Examples:
        >>> conv = MaskedConv2d(1, 4, 3)
        >>> conv(torch.randn(2, 1, 5, 5)).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        data_channels: int | None = None,
        direction: Direction = "lower",
        bias: bool = True,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        data_channels = min(in_channels, out_channels) if data_channels is None else data_channels
        mask, diagonal = triangular_mask(out_channels, in_channels, kernel_size, data_channels, direction)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.data_channels, self.direction = data_channels, direction
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("diagonal_mask", diagonal, persistent=False)
        self.raw_weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        copies = (out_channels // data_channels) * (in_channels // data_channels)
        earlier_pairs, same_pairs = copies * data_channels * (data_channels - 1) // 2, copies * data_channels
        #: Entries of ``raw_weight`` the mask keeps (the layer's free weights), counted without the mask's values.
        self.free_weights = earlier_pairs * kernel_size**2 + same_pairs * (kernel_size**2 + 1) // 2
        nn.init.xavier_normal_(self.raw_weight, gain=init_gain)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def weight(self) -> Tensor:
        """The masked weight (out, in, R, R) with non-negative diagonal centre taps."""
        weight = self.raw_weight * self.mask
        return torch.where(self.diagonal_mask, weight.abs(), weight)

    def diagonal_taps(self, weight: Tensor | None = None) -> Tensor:
        """The diagonal centre taps as (C, k_out, k_in): entry [c, m, n] connects copy n of data channel c in
        the input to copy m in the output."""
        weight = self.weight if weight is None else weight
        centre = weight[..., self.kernel_size // 2, self.kernel_size // 2]  # (out, in)
        c = self.data_channels
        k_out, k_in = self.out_channels // c, self.in_channels // c
        blocks = centre.view(c, k_out, c, k_in)
        return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"data_channels={self.data_channels}, direction={self.direction!r}"
        )


class MintLayer(IterativeInvertibleModule):
    r"""One triangular residual layer r(x) = t * x + l(x) of MintNet (Song et al. 2019, Eq. 3-4).

    .. math::
        \ell(x) = M^3 \circledast h(M^2 \circledast h(M^1 \circledast x + b^1) + b^2) + b^3

    with masked convolutions M^1: C -> kC, M^2: kC -> kC, M^3: kC -> C (:class:`MaskedConv2d`), a strictly
    increasing activation h with h' > 0, and a per-channel scale t = exp(log_t) > 0 (Eq. 3 allows a t per
    position; per channel keeps the layer independent of the image size). The Jacobian is triangular with
    diagonal

    .. math::
        d_p = t_c + \sum_{a} M^3_{c,a} h'(u^2_{a,p}) \sum_{b} M^2_{a,b} h'(u^1_{b,p}) M^1_{b,c}

    over the centre taps between the k copies of p's channel c, which is >= t_c (Eq. 2), so
    log|det J| = sum_p log d_p exactly, computed alongside the forward pass.

    With ``context_features=k`` the layer is conditional (the context as a bias of the masked convolutions):
    every b^i becomes b^i + E^i c, one bias per channel constant over the image, with E^i (zero at
    initialisation) unconstrained; an image context gives a bias per channel and position (E^i a 1x1
    convolution of the context at the layer's resolution, :func:`~invertnet.layers.context_shape_at`). A bias
    does not depend on x, so r(., c) is triangular with the diagonal above at the shifted pre-activations:
    invertible with d_p >= t_c and an exact log-det for *every* context. Use it at a context through :meth:`at`.

    The inverse solves r(x) = y by the parallel safeguarded Newton iteration of
    :func:`~invertnet.solvers.triangular_newton` (``solver="newton"``, the default) or coordinate by
    coordinate (``solver="sequential"``, the proof of Theorem 1; slow on large inputs). Parallel Newton can
    diverge on strongly coupled layers (measured: residuals of 1e10 and more once the off-diagonal weights are
    large against t); the layer then solves again sequentially, which converges. It is differentiable
    by implicit differentiation (:func:`~invertnet.solvers.triangular_transposed_solve`).

    Arguments:
        channels: Data channels C; input shape (B, C, H, W).
        hidden_factor: k, the copies per channel in the hidden layers (Song et al.'s MNIST model: 45).
        kernel_size: Odd filter size of the three convolutions.
        direction: ``"lower"`` or ``"upper"`` triangular.
        activation: ``"elu"`` or ``"softplus"``: strictly increasing, as section 3.3 requires (Song, Meng & Ermon
            name no activation for their experiments; ELU is this library's default).
        init_gain: Xavier gain of the convolutions; small values start r near t * x.
        atol, rtol, max_iter, solver: Defaults of the inverse.
        context_features: Size k of a context c of shape (B, k) (conditional flows), or the shape (C', H, W) of an
            image context at the layer's resolution; 0: unconditional.

    Examples:
        >>> layer = MintLayer(2, hidden_factor=3).double()
        >>> x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
        >>> bool((layer.inverse(layer(x)) - x).abs().max() < 1e-8)
        True
    """

    def __init__(
        self,
        channels: int,
        hidden_factor: int = 8,
        kernel_size: int = 3,
        direction: Direction = "lower",
        activation: Literal["elu", "softplus"] = "elu",
        *,
        init_gain: float = 0.1,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = TRIANGULAR_MAX_ITER,
        solver: Literal["newton", "sequential"] = "newton",
        context_features: ContextSpec = 0,
    ) -> None:
        super().__init__()
        _check_direction(direction, "MintLayer")
        shape = context_shape(context_features, "MintLayer")
        if channels < 1 or hidden_factor < 1:
            raise ValueError(f"MintLayer: channels and hidden_factor must be positive, got {channels}, {hidden_factor}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MintLayer: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if solver not in ("newton", "sequential"):
            raise ValueError(f"MintLayer: solver must be 'newton' or 'sequential', got {solver!r}")
        hidden = hidden_factor * channels
        options = dict(data_channels=channels, direction=direction, init_gain=init_gain)
        self.conv1 = MaskedConv2d(channels, hidden, kernel_size, **options)
        self.conv2 = MaskedConv2d(hidden, hidden, kernel_size, **options)
        self.conv3 = MaskedConv2d(hidden, channels, kernel_size, **options)
        self.activation = _ACTIVATIONS[activation]()
        self.log_t = nn.Parameter(torch.zeros(channels, 1, 1))
        self.channels, self.hidden_factor, self.direction = channels, hidden_factor, direction
        self.solver_options = SolverOptions(atol=atol, rtol=rtol, max_iter=max_iter)
        self.solver = solver
        self.context_features = context_features if isinstance(context_features, int) else shape
        self.context: Tensor | None = None  # the context of a view made by ``at``
        if shape:
            self.context_map = context_map(shape, 2 * hidden + channels)

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        return bool(self.context_features) and self.context is None

    def at(self, context: Tensor) -> MintLayer:
        """The layer r(., c) at the context c: a view sharing this layer's parameters (see the class docstring)."""
        if not self.conditional:
            return self
        view = copy.copy(self)  # shares the parameters and buffers
        view.context = check_context(context, self.context_features, "MintLayer")
        return view

    def _biases(self, x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """b^1, b^2, b^3 of the three convolutions: the parameters, or (B, out, 1, 1) with the context's E^i c."""
        biases = (self.conv1.bias, self.conv2.bias, self.conv3.bias)
        if not self.context_features:
            return biases
        if self.context is None:
            check_context(None, self.context_features, "MintLayer")  # raises: the layer needs its context
        shifts = context_biases(self.context_map, self.context, x, "MintLayer")
        if shifts.dim() == 2:  # a vector context: one bias per channel, constant over the image
            shifts = shifts[..., None, None]
        sizes = [self.conv1.out_channels, self.conv2.out_channels, self.conv3.out_channels]
        return tuple(  # type: ignore[return-value]
            shift + (0.0 if bias is None else bias[:, None, None])
            for shift, bias in zip(shifts.split(sizes, dim=1), biases, strict=True)
        )

    def _branch(self, x: Tensor, weights: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """l(x) of Eq. 4 with the given masked weights, and the activation derivatives h'(u^1), h'(u^2)."""
        padding = self.conv1.kernel_size // 2
        u = x
        derivatives = []
        for index, (weight, bias) in enumerate(zip(weights, self._biases(x), strict=True)):
            if bias is None or bias.dim() == 1:
                u = F.conv2d(u, weight, bias, padding=padding)
            else:
                u = F.conv2d(u, weight, None, padding=padding) + bias
            if index < 2:
                u, derivative = self.activation.forward_and_derivative(u)
                derivatives.append(derivative)
        return u, derivatives[0], derivatives[1]

    @property
    def t(self) -> Tensor:
        """The positive scale t with shape (C, 1, 1); the Jacobian's diagonal is at least t."""
        return self.log_t.exp()

    def validate(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"MintLayer.{where}")
        check_dtype(x, self, f"MintLayer.{where}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"MintLayer.{where}: expected (B, {self.channels}, H, W), got {tuple(x.shape)}")

    def map_and_diagonal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """r(x) and the diagonal of its Jacobian, both (B, C, H, W)."""
        w1, w2, w3 = self.conv1.weight, self.conv2.weight, self.conv3.weight
        branch, dh1, dh2 = self._branch(x, (w1, w2, w3))
        value = self.t * x + branch
        batch, c, height, width = x.shape
        k = self.hidden_factor
        d1 = self.conv1.diagonal_taps(w1)[..., 0]  # (C, k)
        d2 = self.conv2.diagonal_taps(w2)  # (C, k, k)
        d3 = self.conv3.diagonal_taps(w3)[:, 0, :]  # (C, k)
        inner = dh1.view(batch, c, k, height, width) * d1[..., None, None]
        mixed = torch.einsum("cab,ncbhw->ncahw", d2, inner) * dh2.view(batch, c, k, height, width)
        diagonal = self.t + torch.einsum("ca,ncahw->nchw", d3, mixed)
        return value, diagonal

    def forward(self, x: Tensor) -> Tensor:
        self.validate(x, "forward")
        if not self.context_features:
            return self.t * x + self.conv3(self.activation(self.conv2(self.activation(self.conv1(x)))))
        return self.t * x + self._branch(x, (self.conv1.weight, self.conv2.weight, self.conv3.weight))[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.validate(x, "forward_and_log_det")
        value, diagonal = self.map_and_diagonal(x)
        return value, diagonal.log().flatten(1).sum(dim=1)

    def solve(self, y: Tensor, options: SolverOptions) -> InverseResult:
        """Solve r(x) = y from x = y; ``max_iter`` is per coordinate for the sequential solver. A parallel Newton
        solve that diverges or overflows (strongly coupled layers: every coordinate steps on stale predecessors)
        is redone by the sequential solver, whose convergence Theorem 1's argument gives."""
        slope = self.t.detach()
        common = dict(lower=self.direction == "lower", atol=options.atol, rtol=options.rtol, strict=False)
        if self.solver == "newton":
            result = triangular_newton(self.map_and_diagonal, y, slope, max_iter=options.max_iter, **common)
            if result.status not in (SolverStatus.DIVERGED, SolverStatus.NONFINITE):
                return result
        return sequential_solve(self.map_and_diagonal, y, slope, max_iter_per_coordinate=options.max_iter, **common)

    def transposed_solver(self, x: Tensor, options: SolverOptions) -> TransposedSolve:
        """J_r(x)^T v = u by the Jacobi iteration, exact after at most n steps; the diagonal is taken now."""
        with torch.no_grad():
            diagonal = self.map_and_diagonal(x)[1]
        return triangular_transposed_solve(diagonal, atol=options.atol, rtol=options.rtol)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden_factor={self.hidden_factor}, direction={self.direction!r}, "
            f"solver={self.solver!r}" + (f", context_features={self.context_features}" if self.context_features else "")
        )


class MintBlock(InvertibleSequential):
    r"""A grouped MintNet layer: a lower then an upper triangular :class:`MintLayer` (Song et al. 2019, section 4).

    The product of the two Jacobians is not triangular, so the block is not restricted to autoregressive
    structure, while its log-det stays exact: the sum of the two layers' log-dets.

    Arguments:
        channels, hidden_factor, kernel_size, activation: As for :class:`MintLayer`.
        **options: Keyword options passed to both layers (``init_gain``, ``atol``, ``rtol``, ``max_iter``,
            ``solver``).

    Examples:
        >>> block = MintBlock(1, hidden_factor=2)
        >>> y, log_det = block.forward_and_log_det(torch.randn(3, 1, 4, 4))
        >>> y.shape, log_det.shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3]))
    """

    def __init__(
        self,
        channels: int,
        hidden_factor: int = 8,
        kernel_size: int = 3,
        activation: Literal["elu", "softplus"] = "elu",
        **options: object,
    ) -> None:
        super().__init__(
            MintLayer(channels, hidden_factor, kernel_size, "lower", activation, **options),  # type: ignore[arg-type]
            MintLayer(channels, hidden_factor, kernel_size, "upper", activation, **options),  # type: ignore[arg-type]
        )
