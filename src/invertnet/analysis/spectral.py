r"""Exact and certified singular values of convolutions (thesis Remark 4.9; Sedghi et al. 2019).

A circular (periodic) multi-channel convolution on an H x W torus is block-diagonalised by the 2-D discrete
Fourier transform: its singular values are the union over the H W frequencies (u, v) of the singular values of
the C_out x C_in matrices K_hat[:, :, u, v], where K_hat is the FFT of the kernel zero-padded to H x W.

A zero-padded convolution on H x W is the circular convolution on the (H + 2p) x (W + 2p) torus restricted to
inputs that vanish on the border and cropped at the output; a strided one additionally drops outputs. Both
are compressions of that circular operator, so its largest singular value is a guaranteed **upper** bound on
their operator norm, while power iteration gives a lower bound that converges to it from below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from invertnet.layers.spectral import conv2d_adjoint

__all__ = ["EXACT_MATRIX_ENTRIES", "ConvNormBounds", "conv_matrix", "conv_norm_bounds", "conv_singular_values"]

#: Convolutions whose operator matrix has at most this many entries get their exact norm from an SVD.
EXACT_MATRIX_ENTRIES = 4_000_000


def conv_singular_values(weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    r"""All singular values of the circular convolution with ``weight`` on an H x W torus, descending.

    Arguments:
        weight: Kernel of shape (C_out, C_in, k_h, k_w) (``nn.Conv2d`` layout); kernels larger than the
            torus wrap around.
        input_shape: (H, W), or (C_in, H, W).

    Returns:
        Tensor of H W min(C_out, C_in) singular values (float64 for float64 weights, else float32).

    Example:
        >>> weight = torch.zeros(1, 1, 3, 3); weight[0, 0, 1, 1] = 2.0  # 2 x identity
        >>> conv_singular_values(weight, (4, 4)).unique()
        tensor([2.])
    """
    height, width = (int(size) for size in input_shape[-2:])
    if weight.dim() != 4:
        raise ValueError(f"conv_singular_values: weight must be (C_out, C_in, k_h, k_w), got {tuple(weight.shape)}")
    if len(input_shape) == 3 and int(input_shape[0]) != weight.shape[1]:
        raise ValueError(
            f"conv_singular_values: {input_shape[0]} input channels, but the weight takes {weight.shape[1]}"
        )
    c_out, c_in, k_h, k_w = weight.shape
    rows = torch.arange(k_h, device=weight.device).view(-1, 1) % height
    columns = torch.arange(k_w, device=weight.device).view(1, -1) % width
    positions = (rows * width + columns).flatten()
    torus = weight.new_zeros(c_out, c_in, height * width)
    torus.index_add_(2, positions, weight.detach().reshape(c_out, c_in, k_h * k_w))
    spectrum = torch.fft.fft2(torus.view(c_out, c_in, height, width))
    per_frequency = torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1))  # (H, W, min(C_out, C_in))
    return per_frequency.flatten().sort(descending=True).values


def conv_matrix(weight: Tensor, input_shape: Sequence[int], stride: int = 1, padding: int = 0) -> Tensor:
    """The explicit operator matrix (C_out H' W', C_in H W) of a zero-padded convolution (a test oracle and the
    exact norm for small inputs)."""
    channels, height, width = (int(size) for size in input_shape)
    n = channels * height * width
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).view(n, channels, height, width)
    return F.conv2d(basis, weight.detach(), stride=stride, padding=padding).reshape(n, -1).T


@dataclass
class ConvNormBounds:
    """Bounds on the operator norm of a zero-padded, possibly strided convolution.

    Attributes:
        lower: Power-iteration estimate (a lower bound: |A v| / |v| for the final vector v).
        upper: Largest singular value of the circular convolution on the padded torus (a guaranteed bound);
            for operators with at most ``EXACT_MATRIX_ENTRIES`` entries, lower = upper = the exact norm from an
            SVD of :func:`conv_matrix` (the torus bound is loose when the image is small next to the kernel).
        iterations: Power iterations performed.
        converged: The estimate changed by less than ``rtol`` relative in the last iteration.
    """

    lower: float
    upper: float
    iterations: int
    converged: bool


def conv_norm_bounds(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int = 1,
    padding: int = 0,
    *,
    rtol: float = 1e-8,
    max_iter: int = 2000,
    seed: int = 0,
) -> ConvNormBounds:
    r"""Lower (power iteration to ``rtol``) and upper (FFT on the padded torus) bounds on |conv|_2.

    Arguments:
        weight: (C_out, C_in, k, k).
        input_shape: (C_in, H, W) or (H, W).
        stride, padding: Of the convolution (``F.conv2d`` semantics, zero padding).
        rtol, max_iter, seed: Of the power iteration on A^T A.
    """
    height, width = (int(size) for size in input_shape[-2:])
    out_h, out_w = (
        (size + 2 * padding - k) // stride + 1 for size, k in zip((height, width), weight.shape[-2:], strict=True)
    )
    if weight.shape[0] * out_h * out_w * weight.shape[1] * height * width <= EXACT_MATRIX_ENTRIES:
        matrix = conv_matrix(weight.double(), (weight.shape[1], height, width), stride, padding)
        exact = torch.linalg.matrix_norm(matrix, ord=2).item()
        return ConvNormBounds(lower=exact, upper=exact, iterations=0, converged=True)
    upper = conv_singular_values(weight, (height + 2 * padding, width + 2 * padding))[0].item()
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, weight.shape[1], height, width, generator=generator, dtype=weight.dtype).to(weight.device)
    estimate, converged = 0.0, False
    weight = weight.detach()
    for iteration in range(1, max_iter + 1):
        v = v / v.norm()
        u = F.conv2d(v, weight, stride=stride, padding=padding)
        previous, estimate = estimate, u.norm().item()
        v = conv2d_adjoint(u, weight, (stride, stride), (padding, padding), (height, width))
        if iteration > 1 and abs(estimate - previous) <= rtol * estimate:
            converged = True
            break
    return ConvNormBounds(lower=estimate, upper=upper, iterations=iteration, converged=converged)
