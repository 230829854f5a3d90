r"""Spectrally normalised linear and convolutional layers (thesis 4.2.1, Eq. 4.9).

The norm normalised is that of the linear *operator* x -> A x, tracked by power iteration with A and its adjoint
A^T (for a convolution: the convolution and the transposed convolution on the actual input size, Gouk et al.
2018), never that of the reshaped kernel. With the power-iteration value sigma = ||A v|| for the current unit
vector v and an inflation factor r (1 until :meth:`~SpectralNormLayer.refine_spectral_norm` sets it), the layer uses

.. math:: \tilde A = A / \max(1, r \sigma / c) \qquad \text{(thesis Eq. 4.9)}

so a layer is only scaled down, never up.

Estimate or bound. sigma is an *estimate*: attained by a vector, it bounds ||A|| from below, and after a weight
change (an optimiser step, weights loaded or replaced) it can lag far behind. So the layer keeps two numbers
apart: :meth:`~SpectralNormLayer.operator_norm_estimate` (cheap, from sigma) and
:meth:`~SpectralNormLayer.operator_norm_bound`, a *certified* upper bound on the norm of the normalised operator
(:mod:`invertnet.layers.operator_norms`: SVD, Gram iteration or the FFT torus bound, computed when asked and
cached). Every Lipschitz number that feeds a guarantee uses the bound. ``refine_spectral_norm`` runs power
iteration until the certified gap closes, then sets r = bound / sigma, so that afterwards the certified norm of
the normalised layer is at most c (thesis Remark 4.9).

Besides the 2-norm, the induced mixed norm ||A||_{p->q} of Residual Flows (Chen et al. 2019) is available
through ``domain_order=p`` and ``codomain_order=q`` (1 < p, q < inf), estimated by the generalised power
method: v <- dual_{p*}(A^T dual_q(A v)), where dual_r(w) = sign(w)|w|^{r-1} / ||w||_r^{r-1}; its certified bound
goes through the 2-norm with dimension factors (:func:`~invertnet.layers.operator_norms.mixed_norm_factor`), which
is loose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invertnet.core import ConvergenceError, SolverStatus
from invertnet.layers import operator_norms
from invertnet.layers.operator_norms import (
    conv_operator_norm_bound,
    matrix_norm_bound,
    mixed_norm_factor,
    small_conv_matrix,
    top_singular_pair,
)

__all__ = [
    "PowerIterationResult",
    "SpectralNormConv2d",
    "SpectralNormLayer",
    "SpectralNormLinear",
    "linear_power_steps",
    "refine_spectral_norms",
]


@dataclass
class PowerIterationResult:
    """Record of :meth:`SpectralNormLayer.refine_spectral_norm`: power iteration run until the certified gap closed.

    Attributes:
        estimate: The power-iteration value ||A v|| of the raw operator (no normalisation) for the final vector v:
            a lower bound of ||A||, an estimate, nothing certified.
        bound: A certified upper bound of ||A|| (:mod:`invertnet.layers.operator_norms`).
        iterations: Number of power iterations run.
        status: ``SUCCESS`` (gap (bound - estimate) <= tol * bound), ``STALLED`` (the estimate stopped moving
            first: the bound is looser than ``tol`` for this operator, e.g. the FFT torus bound or a mixed norm)
            or ``MAX_ITER`` (the estimate was still rising).
        normalized_bound: A certified upper bound of the normalised layer's norm after the refinement, at most
            ``coeff`` whatever the status.
        inflation: The factor r = bound / sigma the normalisation now applies (thesis Eq. 4.9, module docstring).
        layer: Name of the layer, filled in by :func:`refine_spectral_norms`.
    """

    estimate: float
    bound: float
    iterations: int
    status: SolverStatus
    normalized_bound: float
    inflation: float
    layer: str = ""

    @property
    def success(self) -> bool:
        return self.status is SolverStatus.SUCCESS

    @property
    def advice(self) -> str:
        """What to do about a refinement that did not succeed (the message of its ConvergenceError)."""
        if self.status is SolverStatus.MAX_ITER:
            return (
                "the estimate was still rising when max_iter was reached (close top singular values converge "
                "slowly): raise max_iter or loosen tol of refine_spectral_norms"
            )
        return self.status.value

    @property
    def gap(self) -> float:
        """(bound - estimate) / bound: how far the certificate may be from the true norm, relatively."""
        return (self.bound - self.estimate) / self.bound if self.bound > 0 else 0.0

    def summary(self) -> str:
        where = f"{self.layer}: " if self.layer else ""
        return (
            f"{where}power iteration {self.status.name.lower()} after {self.iterations} iterations, "
            f"estimate {self.estimate:.8g} <= ||A|| <= certified bound {self.bound:.8g} (gap {self.gap:.2e}); "
            f"normalised layer certified <= {self.normalized_bound:.8g}"
        )


def _dual(w: Tensor, order: float) -> Tensor:
    """dual_r(w) = sign(w) |w|^{r-1} / ||w||_r^{r-1}: the unit dual-norm vector aligned with w."""
    norm = torch.linalg.vector_norm(w, ord=order).clamp_min(torch.finfo(w.dtype).tiny)
    if order == 2:
        return w / norm
    return torch.sign(w) * (w.abs() / norm) ** (order - 1)


def _conjugate(order: float) -> float:
    return order / (order - 1)


class SpectralNormLayer(nn.Module):
    """Base of the spectrally normalised layers: persistent power-iteration vectors u, v, the scaling of
    Eq. 4.9 and the certified bound of the normalised operator. In training mode each call advances the power
    iteration by one step; in eval mode it does not.

    Subclasses provide ``weight``, ``operator(weight, v)`` (the linear map without bias), its adjoint
    ``adjoint(weight, u)``, ``affine(x, weight)`` (with bias), all batched, and ``_two_norm_bound(weight)`` (a
    certified bound of ||A||_2 on the layer's input size), and call ``_init_spectral_norm`` in their constructor.

    Buffers: ``u``, ``v`` (power-iteration vectors), ``sigma`` (the last ||A v||, an estimate) and ``inflation``
    (the factor r of the module docstring; state_dicts saved before it existed load with r = 1).
    """

    weight: Tensor
    u: Tensor
    v: Tensor
    sigma: Tensor
    inflation: Tensor
    #: This call's normalised weight when a batched group computed it (:mod:`invertnet.layers.spectral_groups`).
    _grouped_weight: Tensor | None = None

    def _init_spectral_norm(
        self, coeff: float, n_power_iterations: int, domain_order: float, codomain_order: float
    ) -> None:
        if coeff <= 0:
            raise ValueError(f"{type(self).__name__}: coeff must be positive, got {coeff}")
        if n_power_iterations < 0:
            raise ValueError(f"{type(self).__name__}: n_power_iterations must be >= 0")
        for order in (domain_order, codomain_order):
            if not 1 < order < math.inf:
                raise ValueError(f"{type(self).__name__}: norm orders must lie in (1, inf), got {order}")
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)
        self.domain_order = float(domain_order)
        self.codomain_order = float(codomain_order)
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("inflation", torch.ones(()))
        # (weight, v, inflation, coeff) the cached bound was computed for, and the bound
        self._bound_cache: tuple[tuple[Tensor, Tensor, Tensor], float, float] | None = None

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        """The linear map A v (no bias) with the given weight, for v of the layer's input shape."""
        raise NotImplementedError

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        """The adjoint A^T u, for u of the layer's output shape."""
        raise NotImplementedError

    def affine(self, x: Tensor, weight: Tensor) -> Tensor:
        """The affine layer A x + b with the given (normalised) weight."""
        raise NotImplementedError

    def _two_norm_bound(self, weight: Tensor) -> float:
        """A certified upper bound on ||A||_2 with the given weight on the layer's input size."""
        raise NotImplementedError

    def _small_matrix(self, weight: Tensor) -> Tensor | None:
        """The explicit float64 matrix of A if small enough for an exact SVD, else ``None``."""
        raise NotImplementedError

    def _input_vector_shape(self, x: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _ensure_vectors(self, shape: tuple[int, ...]) -> None:
        if tuple(self.v.shape) == shape:
            return
        if self.v.numel() and not self.training:
            raise ValueError(
                f"{type(self).__name__}: spectral norm was estimated for inputs of shape {tuple(self.v.shape)}"
                f" but got {shape}; call the layer in training mode or refine_spectral_norm() on the new size"
            )
        with torch.no_grad():
            v = torch.randn(shape, dtype=self.weight.dtype, device=self.weight.device)
            self.v = _dual(v, self.domain_order)
            self.u = _dual(self.operator(self.weight, self.v), self.codomain_order).contiguous()
            self.inflation = torch.ones_like(self.inflation)  # an inflation set for another size means nothing here
            self._power_step(self.weight.detach())
            self.sigma = self._sigma(self.weight.detach()).detach()

    def _power_vectors(self, weight: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the (generalised) power method from v: u = dual_q(A v), v' = dual_{p*}(A^T u)."""
        # stored contiguous (not channels-last) so that state_dicts save as safetensors
        u = _dual(self.operator(weight, v), self.codomain_order).contiguous()
        return u, _dual(self.adjoint(weight, u), _conjugate(self.domain_order)).contiguous()

    def _power_step(self, weight: Tensor) -> None:
        self.u, self.v = self._power_vectors(weight, self.v)

    def _power_steps(self, weight: Tensor, steps: int) -> None:
        """Advance the power iteration by ``steps`` steps (subclasses may take a cheaper route to the same vectors)."""
        for _ in range(steps):
            self._power_step(weight)

    def _sigma(self, weight: Tensor, v: Tensor | None = None) -> Tensor:
        """||A v||_q for the unit vector v (default: the layer's): a lower bound of ||A||_{p->q}, an estimate."""
        return torch.linalg.vector_norm(self.operator(weight, self.v if v is None else v), ord=self.codomain_order)

    def _factor(self, sigma: Tensor) -> Tensor:
        """max(1, r sigma / c): what Eq. 4.9 divides the weight by (differentiable in sigma)."""
        return torch.clamp(sigma * self.inflation / self.coeff, min=1.0)

    def normalized_weight(self, x: Tensor | None = None) -> Tensor:
        """The weight scaled by Eq. 4.9. In training mode, first runs ``n_power_iterations`` steps.

        Arguments:
            x: An input batch, used only to size the power-iteration vectors on the first call.
        """
        if self._grouped_weight is not None:  # power steps and scaling already taken with the layer's group
            return self._grouped_weight
        if x is not None:
            self._ensure_vectors(self._input_vector_shape(x))
        elif not self.v.numel():
            raise RuntimeError(f"{type(self).__name__}: call the layer on an input before using its weight")
        if self.training and self.n_power_iterations:
            with torch.no_grad():
                self._power_steps(self.weight, self.n_power_iterations)
        sigma = self._sigma(self.weight)
        self.sigma = sigma.detach()
        return self.weight / self._factor(sigma)

    @torch.no_grad()
    def operator_norm_estimate(self) -> float:
        """The power-iteration *estimate* of the normalised layer's norm, sigma / max(1, r sigma / c), with
        sigma = ||A v|| for the current weight and vector (no power step).

        Not a bound: sigma approaches ||A|| from below and lags behind weight changes. Use
        :meth:`operator_norm_bound` for anything that must hold.
        """
        if not self.v.numel():
            raise RuntimeError(f"{type(self).__name__}: the input size is unknown; call the layer on an input first")
        sigma = float(self._sigma(self.weight.detach()))
        return sigma / max(1.0, sigma * float(self.inflation) / self.coeff)

    def _raw_bound(self, weight: Tensor) -> float:
        """A certified bound on ||A||_{p->q} with the given weight (2-norm bound times the mixed-norm factor)."""
        factor = mixed_norm_factor(self.domain_order, self.codomain_order, self.v.numel(), self.u.numel())
        return self._two_norm_bound(weight) * factor

    @torch.no_grad()
    def operator_norm_bound(self) -> float:
        """A certified upper bound on ||A~||_{p->q} of the normalised operator on the layer's input size.

        A~ is the weight divided as in Eq. 4.9 with the current vectors: what an evaluation-mode call applies
        (and a training-mode call before its next power step). Computed in float64 by
        :mod:`invertnet.layers.operator_norms` (exact SVD for small operators, else Gram iteration or the FFT
        torus bound; for p, q != 2 the loose dimension factors) when asked, never in the forward pass, and
        cached until the weight, the vectors, the inflation or ``coeff`` change (compared by value).
        """
        if not self.v.numel():
            raise RuntimeError(f"{type(self).__name__}: the input size is unknown; call the layer on an input first")
        weight = self.weight.detach()
        key = (weight, self.v, self.inflation)
        if self._bound_cache is not None:
            cached_key, coeff, bound = self._bound_cache
            if coeff == self.coeff and all(_same(old, new) for old, new in zip(cached_key, key, strict=True)):
                return bound
        bound = self._raw_bound(weight / self._factor(self._sigma(weight)))
        self._bound_cache = (tuple(tensor.clone() for tensor in key), self.coeff, bound)  # type: ignore[assignment]
        return bound

    @torch.no_grad()
    def refine_spectral_norm(self, tol: float = 1e-8, max_iter: int = 10_000) -> PowerIterationResult:
        """Run power iteration (in float64) until the certified gap closes, then certify the normalisation.

        Stops when (bound - estimate) <= ``tol`` * bound, with ``bound`` the certified bound of the raw ||A|| and
        ``estimate`` the power-iteration value (``SUCCESS``); when the estimate has converged short of that
        (``STALLED``: a step changed it by at most 1e-3 ``tol`` relatively and ten times the geometric extrapolation of
        the remaining rise still leaves a gap above ``tol``, so the bound is looser than ``tol``); or after
        ``max_iter`` steps (``MAX_ITER``). A slowly converging estimate (close top singular values) is not
        stalled. Small 2-norm operators start from the top singular vector of their exact SVD, so they need no
        iterations. Then it sets the inflation r = bound / sigma (raised further if rounding requires), so that
        whatever the status the certified norm of the normalised layer is at most ``coeff``; the closer the gap,
        the less the layer is scaled below ``coeff``. The vectors u, v persist.

        Arguments:
            tol: Relative certified gap to reach, in (0, 1).
            max_iter: Most power iterations.
        """
        if not self.v.numel():
            raise RuntimeError(f"{type(self).__name__}: the input size is unknown; call the layer on an input first")
        if not 0 < tol < 1:
            raise ValueError(f"{type(self).__name__}.refine_spectral_norm: tol must lie in (0, 1), got {tol}")
        weight = self.weight.detach().double()
        bound, u, v = self._refinement_start(weight)
        estimate = float(self._sigma(weight, v))
        status, iterations, change = SolverStatus.MAX_ITER, 0, math.inf
        while bound - estimate > tol * bound and iterations < max_iter:
            u, v = self._power_vectors(weight, v)
            iterations += 1
            previous, estimate = estimate, float(self._sigma(weight, v))
            change, previous_change = estimate - previous, change
            if _stalled(estimate, change, previous_change, bound, tol):
                status = SolverStatus.STALLED
                break
        if bound - estimate <= tol * bound:
            status = SolverStatus.SUCCESS
        self.u, self.v = u.to(self.weight.dtype).contiguous(), v.to(self.weight.dtype).contiguous()
        normalized_bound = self._certify_normalisation(bound)
        return PowerIterationResult(
            estimate=estimate,
            bound=bound,
            iterations=iterations,
            status=status,
            normalized_bound=normalized_bound,
            inflation=float(self.inflation),
        )

    def _refinement_start(self, weight: Tensor) -> tuple[float, Tensor, Tensor]:
        """(certified bound of ||A||_{p->q}, u, v) to start refining from: for small 2-norm operators the exact
        SVD gives both the bound and the top singular vector, so the power iteration has nothing left to do."""
        matrix = self._small_matrix(weight) if (self.domain_order, self.codomain_order) == (2.0, 2.0) else None
        if matrix is None:
            return self._raw_bound(weight), self.u.double(), self.v.double()
        bound, top = top_singular_pair(matrix)
        return bound, self.u.double(), top.view_as(self.v).to(weight.device)

    def _certify_normalisation(self, bound: float) -> float:
        """Set the inflation r so that r sigma >= ``bound``, then check the certified bound of the normalised layer
        against ``coeff``, raising r by the excess if rounding left it above; returns that bound."""
        self.sigma = self._sigma(self.weight.detach())
        sigma = float(self.sigma)
        if sigma <= 0 < bound:
            raise RuntimeError(
                f"{type(self).__name__}: the power-iteration vector lies in the null space of the weight "
                f"(||A v|| = 0 < bound {bound:.6g}); the normalisation cannot be certified"
            )
        self.inflation = torch.full_like(self.inflation, bound / sigma if sigma > 0 else 1.0)
        for _ in range(4):
            normalized = self.operator_norm_bound()
            if normalized <= self.coeff:
                return normalized
            excess = normalized / self.coeff * (1 + 8 * torch.finfo(self.inflation.dtype).eps)
            self.inflation = self.inflation * excess
        raise RuntimeError(
            f"{type(self).__name__}: the certified norm {normalized:.10g} of the normalised layer stays above "
            f"coeff {self.coeff} after raising the inflation to {float(self.inflation):.10g}"
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # u and v are sized by the first input; adopt the saved sizes before the regular copy.
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved))
        if prefix + "v" in state_dict and prefix + "inflation" not in state_dict:
            state_dict[prefix + "inflation"] = torch.ones_like(self.inflation)  # saved before the inflation existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        orders = ""
        if (self.domain_order, self.codomain_order) != (2.0, 2.0):
            orders = f", norm={self.domain_order:g}->{self.codomain_order:g}"
        return f"{super().extra_repr()}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}{orders}"


def _stalled(estimate: float, change: float, previous_change: float, bound: float, tol: float) -> bool:
    """Whether power iteration has converged short of the bound: the last step changed the estimate by at most
    1e-3 ``tol`` relatively, and even 10 times the geometric extrapolation of the remaining rise (rate rho = change /
    previous change) leaves a gap above ``tol``. Close top singular values (rho near 1) extrapolate to a large
    rise and are not stalled; a false verdict would cost only tightness, never the certificate."""
    if abs(change) > 1e-3 * tol * estimate or previous_change == math.inf:
        return False
    if previous_change == 0.0:  # no rate to extrapolate: stalled only if two steps in a row left it unchanged
        return change == 0.0 and bound - estimate > tol * bound
    rate = min(max(change / previous_change, 0.0), 1 - 1e-6)
    remaining = 10 * abs(change) * rate / (1 - rate)
    return bound - (estimate + remaining) > tol * bound


def _same(cached: Tensor, current: Tensor) -> bool:
    """Whether two tensors hold the same values with the same shape, dtype and device."""
    return (
        cached.shape == current.shape
        and cached.dtype == current.dtype
        and cached.device == current.device
        and torch.equal(cached, current)
    )


class SpectralNormLinear(SpectralNormLayer, nn.Linear):
    r"""Linear layer y = \tilde W x + b with \tilde W from Eq. 4.9 of the thesis.

    Arguments:
        in_features, out_features: Sizes, as for ``nn.Linear``.
        bias: Whether to learn an additive bias.
        coeff: The coefficient c: the layer is scaled so that its norm estimate is at most c.
        n_power_iterations: Power-iteration steps per forward pass in training mode.
        domain_order, codomain_order: Orders p, q of the induced norm ||W||_{p->q} (default: 2, 2).

    Examples:
        >>> layer = SpectralNormLinear(4, 3, coeff=0.9)
        >>> record = layer.refine_spectral_norm()
        >>> record.success and layer.operator_norm_bound() <= 0.9
        True
        >>> bool(torch.linalg.matrix_norm(layer.eval().normalized_weight().double(), ord=2) <= 0.9)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        domain_order: float = 2.0,
        codomain_order: float = 2.0,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_spectral_norm(coeff, n_power_iterations, domain_order, codomain_order)
        self._ensure_vectors((in_features,))

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.linear(v, weight)

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        return u @ weight

    def affine(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def _two_norm_bound(self, weight: Tensor) -> float:
        return matrix_norm_bound(weight)

    def _small_matrix(self, weight: Tensor) -> Tensor | None:
        return weight.double() if weight.numel() <= operator_norms.EXACT_MATRIX_ENTRIES else None

    def _input_vector_shape(self, x: Tensor) -> tuple[int, ...]:
        return (self.in_features,)

    def _power_steps(self, weight: Tensor, steps: int) -> None:
        """k power steps of the 2-norm by :func:`linear_power_steps` (Gram squaring when it pays); other norms
        one generalised step at a time."""
        if (self.domain_order, self.codomain_order) != (2.0, 2.0):
            super()._power_steps(weight, steps)
            return
        u, v = linear_power_steps(weight, self.v, steps)
        self.u, self.v = u.contiguous(), v.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(x, self.normalized_weight(x))


#: Multiply-adds one power step one vector at a time costs in per-operation overhead (two matrix-vector products,
#: two normalisations): about 2.5e6 on 2 CPU cores (measured, 64-256 features, torch 2.13); a GPU's launch overhead
#: is worth more multiply-adds still, so the rule below errs towards the plain loop there.
POWER_STEP_OVERHEAD_MACS = 2.5e6


def gram_power_pays(shape: torch.Size | tuple[int, int], steps: int) -> bool:
    """Whether ``steps`` power steps of an (out, in) weight go faster through squarings of its smaller Gram matrix
    (log2(steps) products of side^3 multiply-adds, :func:`_gram_power`) than one step at a time: from 8 steps on,
    when side^3 log2(steps) <= :data:`POWER_STEP_OVERHEAD_MACS` x steps (side 128 from 8 steps, 256 from 40)."""
    return steps >= 8 and min(shape) ** 3 * math.log2(steps) <= POWER_STEP_OVERHEAD_MACS * steps


def _matvec(matrix: Tensor, v: Tensor) -> Tensor:
    """matrix @ v for matrices (..., m, n) and vectors (..., n), as the row vector v^T matrix^T: for a stack of
    matrices CPU matmul runs 2-7x faster on rows than on columns (measured: 6 x 128 x 128 and 3 x 256 x 256,
    float32, 2 threads), and as fast for a single matrix."""
    return (v.unsqueeze(-2) @ matrix.mT).squeeze(-2)


def _unit(v: Tensor) -> Tensor:
    """v / ||v||_2 along the last dimension (a zero vector stays zero)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def linear_power_steps(weight: Tensor, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` steps of the 2-norm power method u = W v / ||W v||, v = W^T u / ||W^T u|| from unit vectors v,
    for weights (..., out, in) and vectors (..., in), so a stack of same-shaped layers advances in one set of
    batched operations. Returns (u, v) of shapes (..., out), (..., in).

    From 8 steps on, when :func:`gram_power_pays`, by repeated squaring of the smaller Gram matrix, W (W^T W)^(k-1) v or
    (W W^T)^(k-1) W v (:func:`_gram_power`); else one step at a time. Call without gradients."""
    if steps < 1:
        raise ValueError(f"linear_power_steps: steps must be positive, got {steps}")
    if gram_power_pays(weight.shape[-2:], steps):
        if weight.shape[-1] <= weight.shape[-2]:  # u = W (W^T W)^(k-1) v
            u = _unit(_matvec(weight, _gram_power(weight.mT @ weight, v, steps - 1)))
        else:  # u = (W W^T)^(k-1) W v
            u = _unit(_gram_power(weight @ weight.mT, _matvec(weight, v), steps - 1))
        return u, _unit(_matvec(weight.mT, u))
    for _ in range(steps):
        u = _unit(_matvec(weight, v))
        v = _unit(_matvec(weight.mT, u))
    return u, v


def _gram_power(gram: Tensor, v: Tensor, steps: int) -> Tensor:
    """The direction of gram^steps v (not normalised) by binary powering, for positive semi-definite grams
    (..., n, n) and vectors (..., n).

    The powers are rescaled by their Frobenius norm, so each factor applied to v has its top eigenvalue in
    [1 / sqrt(n), 1]: nothing overflows, and v shrinks by at most about n^(-1/2) per product when warm-started
    near the top eigenvector (about 1 / n from a random start), in at most log2(steps) + 1 products: far from
    float32's underflow for the sides :func:`gram_power_pays` allows, so v is normalised in between only in half
    precision (the caller normalises the result)."""
    tiny = torch.finfo(gram.dtype).tiny
    power = gram / torch.linalg.matrix_norm(gram, keepdim=True).clamp_min(tiny)
    half = v.element_size() < 4
    while steps:
        if steps & 1:
            v = _matvec(power, v)
            if half:
                v = _unit(v)
        steps >>= 1
        if steps:
            power = power @ power
            power = power / torch.linalg.matrix_norm(power, keepdim=True).clamp_min(tiny)
    return v


def _channels_last(x: Tensor) -> Tensor:
    """Batched images in channels-last memory layout, where CPU convolutions (oneDNN) run 2-5x faster
    than in the default layout for the small images of flows (measured: 64x4x14x14, 3x3, 64 channels).
    The values and shape are unchanged; a no-op for tensors already in that layout."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def conv2d_adjoint(
    u: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], input_size: tuple[int, int]
) -> Tensor:
    """The adjoint of ``F.conv2d(., weight, stride=stride, padding=padding)`` on inputs of ``input_size`` (H, W):
    the transposed convolution, with the output padding that restores the rows and columns a stride skipped."""
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + k)
        for size, out, s, p, k in zip(input_size, u.shape[-2:], stride, padding, weight.shape[-2:], strict=True)
    )
    return F.conv_transpose2d(u, weight, stride=stride, padding=padding, output_padding=output_padding)


class SpectralNormConv2d(SpectralNormLayer, nn.Conv2d):
    r"""2-D convolution whose *operator* norm, on the actual input size, is normalised by Eq. 4.9.

    The power iteration alternates the convolution A (without bias) and its adjoint, the transposed
    convolution, on vectors of shape (1, C, H, W) sized by the first input (thesis 4.2.1, Gouk et al. 2018).
    Inputs of another spatial size re-estimate the norm in training mode and are refused in evaluation mode.
    Convolutions run in channels-last memory layout (faster on CPU); outputs keep that layout.

    Arguments:
        in_channels, out_channels, kernel_size: As for ``nn.Conv2d``.
        stride, padding, bias: As for ``nn.Conv2d``; the default padding keeps the size ("same").
        coeff, n_power_iterations, domain_order, codomain_order: As for :class:`SpectralNormLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        *,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        domain_order: float = 2.0,
        codomain_order: float = 2.0,
    ) -> None:
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_spectral_norm(coeff, n_power_iterations, domain_order, codomain_order)

    def operator(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(_channels_last(v), weight, stride=self.stride, padding=self.padding)

    def adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        return conv2d_adjoint(_channels_last(u), weight, self.stride, self.padding, tuple(self.v.shape[-2:]))

    def _two_norm_bound(self, weight: Tensor) -> float:
        return conv_operator_norm_bound(weight, tuple(self.v.shape[1:]), self.stride, self.padding)  # type: ignore[arg-type]

    def _small_matrix(self, weight: Tensor) -> Tensor | None:
        return small_conv_matrix(weight, tuple(self.v.shape[1:]), self.stride, self.padding)  # type: ignore[arg-type]

    def _input_vector_shape(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() != 4:
            raise ValueError(f"SpectralNormConv2d: expected input of shape (B, C, H, W), got {tuple(x.shape)}")
        return (1, *x.shape[1:])

    def affine(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(_channels_last(x), weight, self.bias, stride=self.stride, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.affine(x, self.normalized_weight(x))


def refine_spectral_norms(
    model: nn.Module, tol: float = 1e-8, max_iter: int = 10_000, strict: bool = True
) -> list[PowerIterationResult]:
    """Refine every spectrally normalised layer of ``model`` (thesis Remark 4.9): afterwards each one's certified
    norm is at most its ``coeff`` (see :meth:`SpectralNormLayer.refine_spectral_norm`).

    Returns one :class:`PowerIterationResult` per layer; with ``strict=True`` raises
    :class:`~invertnet.ConvergenceError` for the first layer whose power iteration was still rising after
    ``max_iter`` steps (``MAX_ITER``). ``STALLED`` layers (a certified bound looser than ``tol``) are certified
    too, only scaled further below ``coeff`` than needed, and are not an error.
    """
    records = []
    for name, module in model.named_modules():
        if isinstance(module, SpectralNormLayer):
            record = module.refine_spectral_norm(tol=tol, max_iter=max_iter)
            record.layer = name or type(module).__name__
            if strict and record.status is SolverStatus.MAX_ITER:
                raise ConvergenceError(record)  # type: ignore[arg-type]
            records.append(record)
    return records
