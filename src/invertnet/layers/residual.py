r"""The invertible residual block F(x) = x + g(x) with Lip(g) < 1 (thesis Theorem 4.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from invertnet.core import InverseResult, IterativeInvertibleModule, check_input, frozen_mode
from invertnet.logdet.exact import ExactLogDet
from invertnet.logdet.series import PowerSeriesLogDet
from invertnet.solvers.fixed_point import fixed_point
from invertnet.solvers.implicit import attach_inverse_gradient

__all__ = ["InvertibleResidual"]

LogDetEstimator = Callable[[Callable[[Tensor], Tensor], Tensor], tuple[Tensor, Tensor]]


class InvertibleResidual(IterativeInvertibleModule):
    r"""i-ResNet block :math:`F(x) = x + g(x)`, invertible when Lip(g) < 1 (thesis Theorem 4.1).

    The forward log-determinant :math:`\log\det(I + J_g(x))` comes from the configured estimator
    (:class:`~invertnet.logdet.ExactLogDet`, :class:`~invertnet.logdet.PowerSeriesLogDet`,
    :class:`~invertnet.logdet.UnbiasedLogDet`). The inverse solves x = y - g(x) by fixed-point iteration
    (thesis Algorithm 1) to a per-sample residual tolerance, with the error bound of Lemma 4.5 taken from
    ``g.lipschitz_bound()`` when g has one; it is differentiable by implicit differentiation.

    Arguments:
        g: The residual branch, a map from shape (B, ...) to the same shape, e.g.
            :class:`~invertnet.layers.LipschitzMLP` or :class:`~invertnet.layers.LipschitzConvNet`.
        log_det: The log-det estimator (default: power series with 10 terms and one Gaussian probe).
        atol, rtol: Default residual tolerances of the inverse (``None``: by dtype, see
            :func:`~invertnet.solvers.default_tolerances`).
        max_iter: Default iteration budget of the inverse.
        solver: ``"iteration"`` (plain Banach iteration, the default) or ``"anderson"`` (Anderson
            acceleration). Anderson needs a quarter of the evaluations of g when the block contracts slowly
            (rate 0.97); on freshly initialised blocks, which contract far faster than their bound, it
            takes plain steps and matches plain iteration (``benchmarks/iresnet_block.py``).

    Example:
        >>> from invertnet.layers import LipschitzMLP
        >>> block = InvertibleResidual(LipschitzMLP(2, 32, n_layers=3, coeff=0.9)).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> bool((block.inverse(block(x)) - x).abs().max() < 1e-8)
        True
    """

    def __init__(
        self,
        g: nn.Module,
        log_det: LogDetEstimator | None = None,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = 1000,
        solver: Literal["iteration", "anderson"] = "iteration",
    ) -> None:
        super().__init__()
        self.g = g
        self.log_det_estimator = PowerSeriesLogDet() if log_det is None else log_det
        self.atol = atol
        self.rtol = rtol
        self.max_iter = max_iter
        if solver not in ("iteration", "anderson"):
            raise ValueError(f"InvertibleResidual: solver must be 'iteration' or 'anderson', got {solver!r}")
        self.solver = solver

    @property
    def exact_log_det(self) -> bool:  # type: ignore[override]
        return isinstance(self.log_det_estimator, ExactLogDet)

    @property
    def norm_order(self) -> float:
        """Order p of the norm in which Lip(g) is bounded and residuals are measured."""
        return float(getattr(self.g, "norm_order", 2.0))

    def lipschitz_bound(self) -> float | None:
        """g's own Lipschitz bound (thesis Eq. 4.6) if it offers one, else ``None``."""
        bound = getattr(self.g, "lipschitz_bound", None)
        return None if bound is None else float(bound())

    def _check(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"{type(self).__name__}.{where}")
        check_shape = getattr(self.g, "check_input_shape", None)
        if check_shape is not None:
            check_shape(x, f"{type(self).__name__}.{where}")

    def inverse_lipschitz_bound(self) -> float | None:
        """1 / (1 - Lip(g)) (thesis Lemma 4.6) when g's bound is below 1 and in the 2-norm, else ``None``."""
        lipschitz = self.lipschitz_bound()
        if lipschitz is None or lipschitz >= 1 or self.norm_order != 2:
            return None
        return 1.0 / (1.0 - lipschitz)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, "forward")
        return x + self.g(x)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward_and_log_det")
        g_x, log_det = self.log_det_estimator(self.g, x)
        return x + g_x, log_det

    def inverse_result(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> InverseResult:
        """Solve F(x) = y without raising; returns the :class:`~invertnet.InverseResult`.

        The residual branch is evaluated in eval mode, so the solve does not move the power iterations.
        """
        self._check(y, "inverse")
        with frozen_mode(self.g):
            lipschitz = self.lipschitz_bound()
            return fixed_point(
                lambda x: y - self.g(x),
                y.detach(),
                atol=self.atol if atol is None else atol,
                rtol=self.rtol if rtol is None else rtol,
                max_iter=self.max_iter if max_iter is None else max_iter,
                norm=self.norm_order,
                lipschitz=lipschitz,
                method=self.solver,
                strict=False,
            )

    def inverse(
        self,
        y: Tensor,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        strict: bool = True,
    ) -> Tensor:
        result = self.inverse_result(y, atol=atol, rtol=rtol, max_iter=max_iter)
        if strict:
            result.raise_if_failed()
        if not torch.is_grad_enabled():
            return result.value
        with frozen_mode(self.g):
            return attach_inverse_gradient(
                result.value,
                y,
                self.g,
                lipschitz=self.lipschitz_bound(),
                atol=self.atol if atol is None else atol,
                rtol=self.rtol if rtol is None else rtol,
                max_iter=self.max_iter if max_iter is None else max_iter,
            )

    def extra_repr(self) -> str:
        return f"log_det={self.log_det_estimator!r}, solver={self.solver!r}, max_iter={self.max_iter}"
