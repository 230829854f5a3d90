r"""Exact and certified singular values of convolutions (thesis Remark 4.9; Sedghi et al. 2019).

A circular (periodic) multi-channel convolution on an H x W torus is block-diagonalised by the 2-D discrete
Fourier transform: its singular values are the union over the H W frequencies (u, v) of the singular values of
the C_out x C_in matrices K_hat[:, :, u, v], where K_hat is the FFT of the kernel zero-padded to H x W.

A zero-padded, possibly strided convolution is a compression of the circular convolution on a slightly larger
torus (:func:`~invertnet.layers.operator_norms.conv_torus_size`), so that operator's largest singular value is a
guaranteed **upper** bound on its norm, while power iteration gives a lower bound that converges from below.
The certified computations live in :mod:`invertnet.layers.operator_norms`, where the layers use them; this module
re-exports them and adds the two-sided :func:`conv_norm_bounds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from invertnet.layers.operator_norms import EXACT_MATRIX_ENTRIES as EXACT_MATRIX_ENTRIES
from invertnet.layers.operator_norms import conv_matrix as conv_matrix
from invertnet.layers.operator_norms import conv_operator_norm_bound, matrix_norm_bound, small_conv_matrix
from invertnet.layers.operator_norms import conv_singular_values as conv_singular_values
from invertnet.layers.spectral import conv2d_adjoint

__all__ = ["EXACT_MATRIX_ENTRIES", "ConvNormBounds", "conv_matrix", "conv_norm_bounds", "conv_singular_values"]


@dataclass
class ConvNormBounds:
    """Bounds on the operator norm of a zero-padded, possibly strided convolution.

    Attributes:
        lower: Power-iteration estimate (a lower bound: |A v| / |v| for the final vector v).
        upper: A certified upper bound (:func:`~invertnet.layers.operator_norms.conv_operator_norm_bound`): the
            largest singular value of the circular convolution on the containing torus; for operators with at most
            ``EXACT_MATRIX_ENTRIES`` entries, lower = the exact norm from an SVD of :func:`conv_matrix` and upper
            = the same with its rounding margin (the torus bound is loose when the image is small next to the
            kernel).
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
    r"""Lower (power iteration to ``rtol``) and certified upper (FFT on the containing torus) bounds on |conv|_2.

    Arguments:
        weight: (C_out, C_in, k, k).
        input_shape: (C_in, H, W) or (H, W).
        stride, padding: Of the convolution (``F.conv2d`` semantics, zero padding).
        rtol, max_iter, seed: Of the power iteration on A^T A.
    """
    height, width = (int(size) for size in input_shape[-2:])
    shape = (weight.shape[1], height, width)
    matrix = small_conv_matrix(weight, shape, stride, padding)
    if matrix is not None:  # the exact path of conv_operator_norm_bound, with its matrix built once
        exact = torch.linalg.matrix_norm(matrix, ord=2).item()
        return ConvNormBounds(lower=exact, upper=matrix_norm_bound(matrix), iterations=0, converged=True)
    upper = conv_operator_norm_bound(weight, shape, stride, padding)
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
