r"""Certified upper bounds on operator norms of dense and convolutional layers (thesis Remark 4.9).

Power iteration (:mod:`invertnet.layers.spectral`) approaches ||A|| from *below*; every Lipschitz constant that
feeds a guarantee (Banach error bounds, Lemma 4.6 inverse bounds, Lemma 5.5 log-det bounds) needs a bound from
*above*. This module gives them, computed in float64 from the layer's weights (a float32 weight converts to
float64 exactly):

* dense matrices: the largest singular value by an SVD when the matrix has at most
  :data:`EXACT_MATRIX_ENTRIES` entries, else Gram iteration (Delattre, Barthelemy, Araujo & Allauzen 2023,
  "Efficient Bound of Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023, Theorem 1):
  ||W||_2 <= ||G_t||_F^{1/2^t} with G_0 = W, G_{t+1} = G_t^* G_t;
* convolutions: the SVD of the explicit operator matrix (:func:`conv_matrix`) when small, else the largest
  singular value of the circular convolution on a torus that contains the zero-padded one
  (:func:`conv_torus_size`), which the FFT block-diagonalises (Sedghi, Gupta & Long 2019, Theorem 6);
* induced mixed norms ||A||_{p->q} (Residual Flows, Chen et al. 2019): the 2-norm bound times the norm-equivalence
  factors of :func:`mixed_norm_factor`.

Rounding. A computed value is inflated by a stated relative margin that exceeds the standard error bounds of
the arithmetic it rests on: an SVD returns the singular values of A + E with ||E||_2 <= p(m, n) eps ||A||_2 for a
modestly growing p (LAPACK Users' Guide, 3rd ed. 1999, section 4.9); we take p = 64 max(m, n). A matrix product
with inner dimension k errs entrywise by at most gamma_k |A||B|, gamma_k = k eps / (1 - k eps) (Higham 2002,
"Accuracy and Stability of Numerical Algorithms", Eq. 3.13), and an N-point FFT by (log2 N) eta relatively
(Higham 2002, Theorem 24.2). The bounds are bounds of the exact linear operator with the stored weights; the
rounding of the layer's own forward pass is not included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EXACT_MATRIX_ENTRIES",
    "conv_matrix",
    "conv_operator_norm_bound",
    "conv_singular_values",
    "conv_torus_size",
    "gram_iteration_bound",
    "matrix_norm_bound",
    "mixed_norm_factor",
    "small_conv_matrix",
    "top_singular_pair",
]

EXACT_MATRIX_ENTRIES = 4_000_000
"""Operators whose explicit matrix has at most this many entries get their norm from an SVD."""

_EPS = torch.finfo(torch.float64).eps


def _svd_margin(rows: int, columns: int) -> float:
    """1 / (1 - 64 max(m, n) eps): sigma <= sigma_hat + 64 max(m, n) eps sigma for a float64 SVD (Weyl)."""
    return 1.0 / (1.0 - 64 * max(rows, columns) * _EPS)


def _svd_norm(matrix: Tensor) -> float:
    """The largest singular value of ``matrix`` (..., m, n) over the batch, from a float64 SVD, with its margin.

    LAPACK's SVD can fail to converge on matrices with many repeated singular values (the explicit matrices of
    trained convolutions are such); then the bound is :func:`gram_iteration_bound`'s, also certified."""
    matrix = matrix.detach().to(torch.complex128 if matrix.is_complex() else torch.float64)
    if matrix.numel() == 0:
        return 0.0
    try:
        largest = torch.linalg.svdvals(matrix).amax().item()
    except torch.linalg.LinAlgError:
        return gram_iteration_bound(matrix)
    return largest * _svd_margin(*matrix.shape[-2:])


def top_singular_pair(matrix: Tensor) -> tuple[float, Tensor]:
    """(certified bound on ||W||_2, the top right singular vector (n,)) of a matrix (m, n), by a float64 SVD:
    the bound as :func:`matrix_norm_bound`'s exact path, the vector a perfect start for power iteration.

    Where LAPACK's SVD with vectors fails to converge (many repeated singular values; seen on the explicit matrix
    of a trained 1280 x 1280 convolution) the bound is :func:`_svd_norm`'s and the vector the top eigenvector of
    W^T W (``eigh``), a start as good; the bound never rests on the vector."""
    matrix = matrix.detach().double()
    try:
        _, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        return _svd_norm(matrix), torch.linalg.eigh(matrix.mT @ matrix).eigenvectors[:, -1]
    return singular[0].item() * _svd_margin(*matrix.shape), right[0]


def gram_iteration_bound(matrix: Tensor, max_iter: int = 20, rtol: float = 1e-12) -> float:
    r"""An upper bound on the largest spectral norm of the matrices (..., m, n) by Gram iteration.

    With G_0 = W and G_{t+1} = G_t^* G_t, ||G_t||_2 = ||W||_2^{2^t} and ||.||_2 <= ||.||_F, so
    ||W||_2 <= ||G_t||_F^{1/2^t} for every t (Delattre et al. 2023, Theorem 1); the bound never increases with
    t and tends to ||W||_2 (the Frobenius norm of G_t is dominated by its largest singular value). Before each
    product G_t is divided by a power of two near its Frobenius norm (exact in floating point) and the exponent
    is kept apart, so nothing overflows. Rounding: with alpha_t = ||G_t||_2 of the computed iterates and
    k the largest inner dimension, alpha_{t+1} >= alpha_t^2 (1 - r gamma_k) (r = rank bound min(m, n), using
    ||G||_F^2 <= r ||G||_2^2 and Higham 2002, Eq. 3.13), so the computed bound is at least
    ||W||_2 (1 - r gamma_k); it is divided by that factor.

    Arguments:
        matrix: Shape (m, n) or a batch (..., m, n), real or complex; computed in float64 / complex128.
        max_iter: Most Gram steps t.
        rtol: Stop when a step lowers the bound by less than this, relatively.

    Returns:
        The bound, a float >= max over the batch of ||W||_2.

    Examples:
        >>> gram_iteration_bound(torch.diag(torch.tensor([3.0, 1.0]))) >= 3.0
        True
    """
    gram = matrix.detach().to(torch.complex128 if matrix.is_complex() else torch.float64)
    if gram.shape[-2] < gram.shape[-1]:
        gram = gram.mT.conj()
    rows, columns = gram.shape[-2:]
    if gram.numel() == 0 or not bool((gram != 0).any()):
        return 0.0
    gamma = max(rows, columns) * _EPS / (1 - max(rows, columns) * _EPS)
    loss = min(rows, columns) * gamma
    if loss >= 0.5:
        raise ValueError(f"gram_iteration_bound: a {rows} x {columns} matrix is too large for a float64 bound")
    log_scale = torch.zeros(gram.shape[:-2], dtype=torch.float64, device=gram.device)  # log2 of G_t / stored
    best = math.inf
    for step in range(max_iter + 1):
        frobenius = torch.linalg.matrix_norm(gram, ord="fro")
        # log ||G_t||_F / 2^t, per matrix; a zero matrix contributes nothing
        log_bound = torch.where(frobenius > 0, (frobenius.log2() + log_scale) / 2**step, -math.inf)
        bound = 2.0 ** log_bound.max().item()
        converged = best - bound <= rtol * bound
        best = min(best, bound)
        if converged or step == max_iter:
            break
        exponent = torch.frexp(frobenius.clamp_min(torch.finfo(torch.float64).tiny)).exponent.double()
        gram = gram * torch.ldexp(torch.ones_like(frobenius), -exponent)[..., None, None]  # exact: a power of two
        log_scale = 2 * (log_scale + exponent)
        gram = gram.mT.conj() @ gram
    return best / (1 - loss) * (1 + 16 * _EPS)


def matrix_norm_bound(matrix: Tensor) -> float:
    """A certified upper bound on ||W||_2 of a matrix (m, n): SVD with its margin when it has at most
    :data:`EXACT_MATRIX_ENTRIES` entries, else :func:`gram_iteration_bound`."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix_norm_bound: expected a matrix (m, n), got shape {tuple(matrix.shape)}")
    if matrix.numel() <= EXACT_MATRIX_ENTRIES:
        return _svd_norm(matrix)
    return gram_iteration_bound(matrix)


def mixed_norm_factor(domain_order: float, codomain_order: float, in_dim: int, out_dim: int) -> float:
    r"""c with ||A||_{p->q} <= c ||A||_2 for every A from R^n (p-norm) to R^m (q-norm).

    ||A||_{p->q} <= ||I||_{2->q} ||A||_2 ||I||_{p->2}, with ||x||_2 <= n^{max(0, 1/2 - 1/p)} ||x||_p and
    ||y||_q <= m^{max(0, 1/q - 1/2)} ||y||_2 (Hoelder). Loose: the factors grow with the dimensions, so a
    mixed-norm layer normalised by its power-method estimate usually has a certified bound above its
    coefficient until :meth:`~invertnet.layers.SpectralNormLayer.refine_spectral_norm` scales it by the bound.

    Examples:
        >>> mixed_norm_factor(2.0, 2.0, 10, 10)
        1.0
    """
    domain = in_dim ** max(0.0, 0.5 - 1.0 / domain_order)
    codomain = out_dim ** max(0.0, 1.0 / codomain_order - 0.5)
    return domain * codomain


def conv_singular_values(weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    r"""All singular values of the circular convolution with ``weight`` on an H x W torus, descending.

    The 2-D DFT block-diagonalises a circular multi-channel convolution: its singular values are those of the
    C_out x C_in matrices K_hat[:, :, u, v] over the H W frequencies, K_hat the FFT of the kernel zero-padded to
    H x W (Sedghi, Gupta & Long 2019, Theorem 6).

    Arguments:
        weight: Kernel of shape (C_out, C_in, k_h, k_w) (``nn.Conv2d`` layout); kernels larger than the
            torus wrap around.
        input_shape: (H, W), or (C_in, H, W).

    Returns:
        Tensor of H W min(C_out, C_in) singular values (float64 for float64 weights, else float32).

    Examples:
        >>> weight = torch.zeros(1, 1, 3, 3); weight[0, 0, 1, 1] = 2.0  # 2 x identity
        >>> conv_singular_values(weight, (4, 4)).unique()
        tensor([2.])
    """
    return torch.linalg.svdvals(_frequency_blocks(weight, input_shape)).flatten().sort(descending=True).values


def _frequency_blocks(weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    """The C_out x C_in blocks K_hat[:, :, u, v] of the circular convolution, shape (H, W, C_out, C_in)."""
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
    return torch.fft.fft2(torus.view(c_out, c_in, height, width)).permute(2, 3, 0, 1)


def conv_matrix(
    weight: Tensor, input_shape: Sequence[int], stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0
) -> Tensor:
    """The explicit operator matrix (C_out H' W', C_in H W) of a zero-padded convolution (a test oracle and the
    exact norm for small inputs), built from the identity on the smaller side: columns A e_i by convolving the
    input basis, or rows A^T e_j by the transposed convolution of the output basis."""
    channels, height, width = (int(size) for size in input_shape)
    n_in = channels * height * width
    weight = weight.detach()
    out_h, out_w = _output_sizes((height, width), weight.shape[-2:], stride, padding)
    n_out = weight.shape[0] * out_h * out_w
    if n_in <= n_out:
        basis = torch.eye(n_in, dtype=weight.dtype, device=weight.device).view(n_in, channels, height, width)
        return F.conv2d(basis, weight, stride=stride, padding=padding).reshape(n_in, -1).T
    basis = torch.eye(n_out, dtype=weight.dtype, device=weight.device).view(n_out, weight.shape[0], out_h, out_w)
    rows = torch.nn.grad.conv2d_input((n_out, channels, height, width), weight, basis, stride=stride, padding=padding)
    return rows.reshape(n_out, n_in)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = (int(item) for item in value)
    return first, second


def _output_sizes(
    input_size: Sequence[int], kernel_size: Sequence[int], stride: int | Sequence[int], padding: int | Sequence[int]
) -> tuple[int, int]:
    """(H', W') of ``F.conv2d`` on (H, W): (size + 2 pad - kernel) // stride + 1 per axis."""
    first, second = (
        (int(size) + 2 * pad - kernel) // step + 1
        for size, kernel, step, pad in zip(input_size, kernel_size, _pair(stride), _pair(padding), strict=True)
    )
    return first, second


def conv_torus_size(
    input_size: Sequence[int], kernel_size: Sequence[int], stride: int | Sequence[int], padding: int | Sequence[int]
) -> tuple[int, int]:
    r"""The side N per axis of a torus on which the circular convolution contains the zero-padded one.

    Per axis, place the input x (length H) at positions p, ..., p + H - 1 of Z_N and zero elsewhere. Output i of
    ``F.conv2d`` reads the padded positions i, ..., i + k - 1; it equals the circular output i if every padded
    position it reads is data at the same residue or a zero at a residue holding no data. That holds when N >= H + p
    (the left padding and the read right padding, at most H + 2p - 1, fall on the N - H free residues), and the
    kept outputs 0, s, ..., (H' - 1) s are distinct residues when N > (H' - 1) s. Then the convolution is
    S C_N P with P an isometric embedding and S a coordinate selection, so its norm is at most ||C_N||. This torus
    is smaller than the H + 2p of the padded image, which tightens the bound.

    Arguments:
        input_size: (H, W); kernel_size: (k_h, k_w); stride, padding: ints or pairs, ``F.conv2d`` semantics.
    """
    sizes = []
    for size, kernel, step, pad in zip(input_size, kernel_size, _pair(stride), _pair(padding), strict=True):
        outputs = (size + 2 * pad - kernel) // step + 1
        if outputs < 1:
            raise ValueError(f"conv_torus_size: a size-{kernel} kernel does not fit input {size} with padding {pad}")
        sizes.append(max(size + pad, (outputs - 1) * step + 1))
    return sizes[0], sizes[1]


def small_conv_matrix(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    *,
    exact_entries: int | None = None,
) -> Tensor | None:
    """:func:`conv_matrix` in float64 if it has at most ``exact_entries`` (default :data:`EXACT_MATRIX_ENTRIES`)
    entries, else ``None``: the exact path of :func:`conv_operator_norm_bound`."""
    channels, height, width = (int(size) for size in input_shape)
    out_h, out_w = _output_sizes((height, width), weight.shape[-2:], stride, padding)
    entries = channels * height * width * weight.shape[0] * out_h * out_w
    if entries > (EXACT_MATRIX_ENTRIES if exact_entries is None else exact_entries):
        return None
    return conv_matrix(weight.detach().double(), input_shape, stride, padding)


def conv_operator_norm_bound(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    *,
    exact_entries: int | None = None,
) -> float:
    r"""A certified upper bound on the 2-norm of x -> ``F.conv2d(x, weight, stride, padding)`` on (C_in, H, W).

    The SVD of :func:`conv_matrix` when the operator matrix has at most ``exact_entries`` entries (exact up to
    the rounding margin); otherwise the largest singular value of the
    circular convolution on the torus of :func:`conv_torus_size` (float64 FFT and SVD per frequency), a bound
    that is loose when the image is small next to the kernel.

    Arguments:
        weight: (C_out, C_in, k_h, k_w).
        input_shape: (C_in, H, W).
        stride, padding: Of the convolution, ints or (h, w) pairs.
        exact_entries: The size limit of the exact path (default :data:`EXACT_MATRIX_ENTRIES`).

    Examples:
        >>> weight = torch.zeros(1, 1, 3, 3); weight[0, 0, 1, 1] = 2.0
        >>> 2.0 <= conv_operator_norm_bound(weight, (1, 40, 40), padding=1) < 2.0 + 1e-9
        True
    """
    channels, height, width = (int(size) for size in input_shape)
    if channels != weight.shape[1]:
        raise ValueError(f"conv_operator_norm_bound: {channels} input channels, but the weight takes {weight.shape[1]}")
    strides, paddings = _pair(stride), _pair(padding)
    matrix = small_conv_matrix(weight, input_shape, strides, paddings, exact_entries=exact_entries)
    if matrix is not None:
        return _svd_norm(matrix)
    torus = conv_torus_size((height, width), weight.shape[-2:], strides, paddings)
    blocks = _frequency_blocks(weight.detach().double(), torus)
    points = torus[0] * torus[1]
    fft_error = 64 * math.sqrt(weight.shape[0] * weight.shape[1] * points) * math.log2(2 * points) * _EPS
    return _svd_norm(blocks) / (1 - fft_error)
