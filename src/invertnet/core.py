r"""The one core abstraction: invertible modules and the record of an inverse.

Every bijection in invertnet is an :class:`InvertibleModule`. Iterative inverses return an
:class:`InverseResult` and raise :class:`ConvergenceError` when they fail, unless asked not to.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "ConvergenceError",
    "InverseResult",
    "InvertibleModule",
    "InvertibleSequential",
    "IterativeInvertibleModule",
    "SolverStatus",
    "check_input",
    "frozen_mode",
]


class SolverStatus(enum.Enum):
    """Outcome of an iterative solve. The value of each member is its user-facing message."""

    SUCCESS = "converged: every sample's residual is within atol + rtol * |y|"
    MAX_ITER = (
        "max_iter reached before every sample's residual fell within atol + rtol * |y|; increase "
        "`max_iter`, loosen `atol`/`rtol`, or (residual blocks) lower the Lipschitz coefficient"
    )
    NONFINITE = (
        "the iterates became NaN or infinite; the map is probably not contractive (Lip(g) >= 1) or the "
        "input is not finite"
    )
    DIVERGED = (
        "the residual grew by many orders of magnitude: the map is expanding, not contractive; check the "
        "block's Lipschitz coefficient and that the spectral norms have converged"
    )
    SINGULAR = (
        "the Jacobian is singular or numerically singular (condition number beyond the solver's "
        "max_condition, seed 002 Remark 7): the inverse is not locally unique or has no reliable digits"
    )
    STALLED = (
        "the residual stopped decreasing before reaching the tolerance (GMRES: a cycle without progress; "
        "Newton: no step along the Newton direction reduces it): the system is singular or nearly so, or "
        "|F(x) - y| has a local minimum that is not a solution"
    )
    NOT_CONTRACTIVE = (
        "the Lipschitz bound of the residual branch is >= 1, so the fixed point is neither guaranteed to "
        "exist nor to be unique; converge the spectral norms (`refine_spectral_norms`) or lower `coeff`"
    )

    def __str__(self) -> str:
        return f"{self.name.lower()}: {self.value}"


@dataclass
class InverseResult:
    """Record of an iterative inverse (thesis Algorithm 1, Lemma 4.5).

    Attributes:
        value: The approximate solution x, with the shape of the input y.
        converged: Boolean tensor with shape (B,): per-sample convergence.
        iterations: Number of evaluations of the map that were performed.
        residual: Tensor with shape (B,): per-sample norm of F(x) - y of the returned ``value``.
        error_bound: Tensor with shape (B,) bounding the distance |x - F^{-1}(y)| when a Lipschitz bound
            L < 1 of the residual branch is known (Lemma 4.5/4.6: residual / (1 - L)), else ``None``.
        status: A :class:`SolverStatus`; its value is the user-facing message.
        residual_history: Largest per-sample residual after each iteration, for plots and diagnostics.
        parts: For composite modules, the records of the parts, in the order they were inverted.
        condition_number: Tensor with shape (B,): the condition number of the Jacobian at the returned value
            (Newton solves: exact for dense Jacobians, an estimate from the Krylov space otherwise), or ``None``.
    """

    value: Tensor
    converged: Tensor
    iterations: int
    residual: Tensor | None
    error_bound: Tensor | None
    status: SolverStatus
    residual_history: list[float] = field(default_factory=list)
    parts: list[InverseResult] = field(default_factory=list)
    condition_number: Tensor | None = None

    @property
    def success(self) -> bool:
        """True when the solve converged for every sample."""
        return self.status is SolverStatus.SUCCESS

    def summary(self) -> str:
        """One line per solve: status, iterations and the worst residual / error bound."""
        worst = "n/a" if self.residual is None else f"{self.residual.max().item():.3e}"
        bound = "n/a" if self.error_bound is None else f"{self.error_bound.max().item():.3e}"
        n_ok = int(self.converged.sum())
        condition = "" if self.condition_number is None else f", max condition number {self.condition_number.max():.3e}"
        return (
            f"{self.status.name.lower()}: {n_ok}/{self.converged.numel()} samples converged in "
            f"{self.iterations} iterations, max residual {worst}, max error bound {bound}{condition}"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`ConvergenceError` carrying this record unless the solve succeeded."""
        if not self.success:
            raise ConvergenceError(self)


class ConvergenceError(RuntimeError):
    """An iterative inverse failed; ``error.result`` is the :class:`InverseResult` with the diagnostics."""

    def __init__(self, result: InverseResult) -> None:
        self.result = result
        super().__init__(f"{result.summary()}. {result.status.value}")


def check_input(x: Tensor, event_shape: tuple[int, ...] | None, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` when ``x`` is not a finite tensor of shape (B, *event_shape).

    Arguments:
        x: The tensor to check.
        event_shape: The expected trailing shape, or ``None`` to check only that x has a batch dimension.
        where: Name of the layer and direction, used in the message.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{where}: expected a batched tensor of shape (B, ...), got a scalar")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        expected = ", ".join(["B", *map(str, event_shape)])
        raise ValueError(
            f"{where}: expected input of shape ({expected}), got {tuple(x.shape)}; add a batch dimension "
            "with x.unsqueeze(0) if you passed a single sample"
        )
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{where}: input contains {n_bad} NaN or infinite values")


@contextmanager
def frozen_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate ``module`` in eval mode, restoring each submodule's mode afterwards: spectral-norm power
    iterations do not advance, so repeated evaluations inside a solve see one fixed map."""
    modes = {name: sub.training for name, sub in module.named_modules()}
    module.eval()
    try:
        yield
    finally:
        for name, sub in module.named_modules():
            sub.training = modes[name]


class InvertibleModule(nn.Module):
    r"""A bijection y = F(x) with a log-determinant, usable as an ordinary ``nn.Module``.

    Contract, for x of shape (B, ...) in the layer's domain:

    * ``m(x)`` is F(x), with the shape the layer documents (most layers keep the shape);
    * ``m.forward_and_log_det(x)`` returns ``(y, log_det)`` with ``log_det`` of shape (B,) equal to
      :math:`\log|\det \partial F(x)/\partial x|` per sample (natural log). How it is computed (exact,
      power series, unbiased estimator) is the layer's own configuration;
    * ``m.inverse(m(x)) == x`` up to the solver tolerance, and ``m.inverse_and_log_det(y)`` returns
      ``(x, -log_det)``: the log-determinant of the inverse map, the negative of the forward one;
    * ``m.inv`` is the inverse as a module, with ``m.inv.inv is m``.

    Subclass requirements:

    * implement :meth:`forward_and_log_det` and :meth:`inverse_and_log_det`;
    * override :meth:`forward` / :meth:`inverse` when the map alone is cheaper than the fused call;
    * iterative inverses take the solver options ``atol``, ``rtol``, ``max_iter``, ``strict`` and
      override :meth:`inverse_result` to return their :class:`InverseResult`; analytic inverses ignore
      the options;
    * set the class attributes below, which the generic test suite reads.

    Attributes:
        exact_log_det: The log-determinant is exact (not a stochastic or truncated estimate).
        analytic_inverse: The inverse is closed-form (no iterative solve).
        volume_preserving: The log-determinant is identically zero.
        bijective: The map is onto its codomain. Injective-only maps (zero padding) invert only on their
            range, and their log-det is the volume change 1/2 log det(J^T J).
        quantized_inverse: The inverse rounds to a lattice (dequantisation): it is piecewise constant, so
            the inverse has no useful Jacobian.
    """

    bijective: bool = True
    quantized_inverse: bool = False
    exact_log_det: bool = True
    analytic_inverse: bool = True
    volume_preserving: bool = False

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = F(x) for x of shape (B, ...)."""
        return self.forward_and_log_det(x)[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)`` with ``log_det`` of shape (B,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_and_log_det")

    def inverse_and_log_det(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        strict: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(x, log_det)`` with x = F^{-1}(y) and log_det = log|det dF^{-1}/dy|, shape (B,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement inverse_and_log_det")

    def inverse(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        strict: bool = True,
    ) -> Tensor:
        """Compute x = F^{-1}(y). Iterative inverses raise :class:`ConvergenceError` unless ``strict=False``.

        Arguments:
            y: Tensor with shape (B, ...).
            atol, rtol: Per-sample tolerance on the residual: |F(x) - y| <= atol + rtol * |y|.
                ``None`` uses the layer's default for the dtype.
            max_iter: Iteration budget of the solver; ``None`` uses the layer's default.
            strict: Raise on failure (default). With ``strict=False`` the best iterate is returned;
                use :meth:`inverse_result` to see the diagnostics.
        """
        options = dict(atol=atol, rtol=rtol, max_iter=max_iter, strict=strict)
        return self.inverse_and_log_det(y, **options)[0]

    def inverse_result(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> InverseResult:
        """Invert without raising and return the full :class:`InverseResult`.

        For analytic inverses the record reports zero iterations, convergence and no residual.
        """
        with torch.no_grad():
            x = self.inverse(y)
        batch = x.shape[0]
        return InverseResult(
            value=x,
            converged=torch.ones(batch, dtype=torch.bool, device=x.device),
            iterations=0,
            residual=None,
            error_bound=None,
            status=SolverStatus.SUCCESS,
        )

    def inverse_lipschitz_bound(self) -> float | None:
        """A bound on Lip(F^{-1}) in the per-sample 2-norm, or ``None`` if unknown.

        Used to propagate inverse errors through compositions (:meth:`InvertibleSequential.inverse_result`).
        """
        return None

    @property
    def inv(self) -> InvertibleModule:
        """The inverse map as an :class:`InvertibleModule`; ``m.inv.inv is m``."""
        return _InverseView(self)


class _InverseView(InvertibleModule):
    """The inverse of a module, sharing its parameters. Created by :attr:`InvertibleModule.inv`."""

    def __init__(self, base: InvertibleModule) -> None:
        super().__init__()
        self.base = base
        self.exact_log_det = base.exact_log_det
        self.analytic_inverse = base.analytic_inverse
        self.volume_preserving = base.volume_preserving
        self.bijective = base.bijective

    def forward(self, x: Tensor) -> Tensor:
        return self.base.inverse(x)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.inverse_and_log_det(x)

    def inverse(self, y: Tensor, **options: object) -> Tensor:
        return self.base(y)

    def inverse_and_log_det(self, y: Tensor, **options: object) -> tuple[Tensor, Tensor]:
        return self.base.forward_and_log_det(y)

    @property
    def inv(self) -> InvertibleModule:
        return self.base


class IterativeInvertibleModule(InvertibleModule):
    """Base of layers whose inverse is an iterative solve (i-ResNet blocks, MintNet layers).

    Subclasses implement :meth:`inverse` (with the solver options, raising :class:`ConvergenceError` when
    ``strict``) and :meth:`inverse_result`; the inverse's log-determinant is minus the forward one at the
    solution, computed here.
    """

    analytic_inverse = False

    def inverse(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        strict: bool = True,
    ) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")

    def inverse_and_log_det(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        strict: bool = True,
    ) -> tuple[Tensor, Tensor]:
        x = self.inverse(y, atol=atol, rtol=rtol, max_iter=max_iter, strict=strict)
        _, log_det = self.forward_and_log_det(x)
        return x, -log_det


class InvertibleSequential(InvertibleModule):
    r"""Composition :math:`F = f_T \circ \dots \circ f_1` with summed log-determinants.

    .. math:: \log|\det J_F(x)| = \sum_{t=1}^{T} \log|\det J_{f_t}(x_{t-1})|

    Arguments:
        *modules: The invertible modules, applied in order in the forward direction.

    Example:
        >>> from invertnet.layers import ActNorm, Squeeze
        >>> flow = InvertibleSequential(ActNorm(4), Squeeze())
        >>> y, log_det = flow.forward_and_log_det(torch.randn(2, 4, 8, 8))
        >>> y.shape, log_det.shape
        (torch.Size([2, 16, 4, 4]), torch.Size([2]))
    """

    def __init__(self, *modules: InvertibleModule) -> None:
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, InvertibleModule):
                raise TypeError(
                    f"InvertibleSequential: part {index} is a {type(module).__name__}, not an "
                    "InvertibleModule; wrap residual branches in InvertibleResidual"
                )
        self.parts = nn.ModuleList(modules)

    @property
    def exact_log_det(self) -> bool:  # type: ignore[override]
        return all(part.exact_log_det for part in self.parts)

    @property
    def analytic_inverse(self) -> bool:  # type: ignore[override]
        return all(part.analytic_inverse for part in self.parts)

    @property
    def volume_preserving(self) -> bool:  # type: ignore[override]
        return all(part.volume_preserving for part in self.parts)

    @property
    def bijective(self) -> bool:  # type: ignore[override]
        return all(part.bijective for part in self.parts)

    @property
    def quantized_inverse(self) -> bool:  # type: ignore[override]
        return any(part.quantized_inverse for part in self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[InvertibleModule]:
        return iter(self.parts)

    def __getitem__(self, index: int) -> InvertibleModule:
        return self.parts[index]

    def forward(self, x: Tensor) -> Tensor:
        for part in self.parts:
            x = part(x)
        return x

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for part in self.parts:
            x, log_det = part.forward_and_log_det(x)
            total = total + log_det
        return x, total

    def inverse(self, y: Tensor, **options: object) -> Tensor:
        for part in reversed(self.parts):
            y = part.inverse(y, **options)
        return y

    def inverse_and_log_det(self, y: Tensor, **options: object) -> tuple[Tensor, Tensor]:
        total = y.new_zeros(y.shape[0])
        for part in reversed(self.parts):
            y, log_det = part.inverse_and_log_det(y, **options)
            total = total + log_det
        return y, total

    def inverse_result(self, y: Tensor, **options: object) -> InverseResult:
        """Invert part by part without raising; the record's ``parts`` hold each part's record.

        The composite converged when every part did; its status is that of the first failing part.
        """
        records = []
        for part in reversed(self.parts):
            record = part.inverse_result(y, **options)
            records.append(record)
            y = record.value
        failed = [record for record in records if not record.success]
        converged = torch.stack([record.converged for record in records]).all(dim=0)
        residuals = [record.residual for record in records if record.residual is not None]
        return InverseResult(
            value=y,
            converged=converged,
            iterations=sum(record.iterations for record in records),
            residual=torch.stack(residuals).amax(dim=0) if residuals else None,
            error_bound=self._composed_error_bound(records),
            status=failed[0].status if failed else SolverStatus.SUCCESS,
            parts=records,
        )

    def _composed_error_bound(self, records: list[InverseResult]) -> Tensor | None:
        r"""Bound on |x_hat - F^{-1}(y)| per sample, from each part's error bound and inverse Lipschitz bound.

        Inverting f_T first, the error after inverting part t obeys (thesis Lemma 4.5, 4.6)

        .. math:: \epsilon_{t-1} \le e_t + \mathrm{Lip}(f_t^{-1})\, \epsilon_t, \qquad \epsilon_T = 0,

        with e_t the part's own solver bound (0 for analytic inverses). ``None`` when a needed bound is unknown.
        """
        bound: Tensor | None = None
        for part, record in zip(reversed(self.parts), records, strict=True):
            own = record.error_bound
            if own is None and part.analytic_inverse:
                own = torch.zeros_like(record.converged, dtype=record.value.dtype)
            if own is None or getattr(part, "norm_order", 2.0) != 2.0:  # bounds must share the 2-norm
                return None
            if bound is not None:
                lipschitz = part.inverse_lipschitz_bound()
                if lipschitz is None:
                    return None
                own = own + lipschitz * bound
            bound = own
        return bound

    def inverse_lipschitz_bound(self) -> float | None:
        """The product of the parts' inverse Lipschitz bounds, or ``None`` if one is unknown."""
        product = 1.0
        for part in self.parts:
            lipschitz = part.inverse_lipschitz_bound()
            if lipschitz is None:
                return None
            product *= lipschitz
        return product
