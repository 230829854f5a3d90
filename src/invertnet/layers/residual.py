r"""The invertible residual block F(x) = x + g(x) with Lip(g) < 1 (thesis Theorem 4.1)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from invertnet.core import (
    InverseResult,
    IterativeInvertibleModule,
    SolverOptions,
    TransposedSolve,
    check_dtype,
    check_input,
)
from invertnet.layers.conditional import ContextBoundBranch, bind_context, is_conditional
from invertnet.layers.lipschitz_nets import LipschitzMLP, ResidualBranch
from invertnet.logdet.dense import DenseExactLogDet
from invertnet.logdet.exact import ExactLogDet
from invertnet.logdet.series import PowerSeriesLogDet
from invertnet.solvers.common import FIXED_POINT_MAX_ITER
from invertnet.solvers.fixed_point import fixed_point
from invertnet.solvers.implicit import residual_transposed_solve
from invertnet.solvers.inverse_error import ESTIMATE_RTOL

__all__ = ["EXACT_EVALUATION_FEATURES", "InvertibleResidual", "LogDetEstimator"]

#: (g, x) -> (g(x), log|det(I + J_g(x))|) with shapes (B, ...) and (B,).
LogDetEstimator = Callable[[Callable[[Tensor], Tensor], Tensor], tuple[Tensor, Tensor]]

#: What a branch that does not derive from ResidualBranch is taken to declare.
_DEFAULT_BRANCH = ResidualBranch()
_DENSE_EXACT = DenseExactLogDet()

EXACT_EVALUATION_FEATURES = 256
"""Widest dense branch (:class:`~invertnet.layers.LipschitzMLP` on (B, d)) whose log-det eval mode computes
exactly by default: one :class:`~invertnet.logdet.DenseExactLogDet` pass costs O(B d h (h + d)) for width h plus a
d x d LU per sample, below the series' terms over several probe passes that a stated bias and standard error
need at these sizes (docs/defaults.md)."""


class InvertibleResidual(IterativeInvertibleModule):
    r"""i-ResNet block :math:`F(x) = x + g(x)`, invertible when Lip(g) < 1 (thesis Theorem 4.1).

    The forward log-determinant :math:`\log\det(I + J_g(x))` comes from the configured estimator
    (:class:`~invertnet.logdet.ExactLogDet`, :class:`~invertnet.logdet.PowerSeriesLogDet`,
    :class:`~invertnet.logdet.UnbiasedLogDet`). The inverse solves x = y - g(x) by fixed-point iteration (thesis
    Algorithm 1) to a per-sample residual tolerance, with the error bound of Lemma 4.5 taken from
    ``g.lipschitz_bound()``, a certified bound (a block whose bound is >= 1 reports ``NOT_CONTRACTIVE``); it is
    differentiable by implicit differentiation (backward: v = u - J_g^T v).

    Arguments:
        g: The residual branch, a map from shape (B, ...) to the same shape: a
            :class:`~invertnet.layers.ResidualBranch` such as :class:`~invertnet.layers.LipschitzMLP` or
            :class:`~invertnet.layers.LipschitzConvNet`, or any ``nn.Module`` (then with the branch defaults:
            2-norm, unknown Lipschitz bound).
        log_det: The log-det estimator (default: power series with 10 terms and one Rademacher probe).
        atol, rtol: Default residual tolerances of the inverse (``None``: by dtype, see
            :func:`~invertnet.solvers.default_tolerances`).
        max_iter: Default iteration budget of the inverse.
        solver: ``"iteration"`` (plain Banach iteration, the default) or ``"anderson"`` (Anderson
            acceleration). Anderson needs a quarter of the evaluations of g when the block contracts slowly
            (rate 0.97); on freshly initialised blocks, which contract far faster than their bound, it
            takes plain steps and matches plain iteration (``benchmarks/iresnet_block.py``).
        eval_log_det: The log-det in eval mode. ``"auto"`` (default): exact for a dense branch of at most
            :data:`EXACT_EVALUATION_FEATURES` features (:class:`~invertnet.logdet.DenseExactLogDet`: the same
            number every call, no bias), else ``log_det`` (then random for stochastic estimators: see
            :attr:`exact_log_det`); ``"training"``: always ``log_det``; or an estimator.

    Examples:
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
        max_iter: int = FIXED_POINT_MAX_ITER,
        solver: Literal["iteration", "anderson"] = "iteration",
        eval_log_det: LogDetEstimator | Literal["auto", "training"] = "auto",
    ) -> None:
        super().__init__()
        self.g = g
        self.log_det_estimator = PowerSeriesLogDet() if log_det is None else log_det
        if not (eval_log_det in ("auto", "training") or callable(eval_log_det)):
            raise ValueError(
                f"InvertibleResidual: eval_log_det must be 'auto', 'training' or an estimator, got {eval_log_det!r}"
            )
        self.eval_log_det = eval_log_det
        self.solver_options = SolverOptions(atol=atol, rtol=rtol, max_iter=max_iter)
        if solver not in ("iteration", "anderson"):
            raise ValueError(f"InvertibleResidual: solver must be 'iteration' or 'anderson', got {solver!r}")
        self.solver = solver

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        """Whether g takes a context, g(x, c) (:class:`~invertnet.layers.ConditionalLipschitzMLP`)."""
        return is_conditional(self.g)

    def at(self, context: Tensor) -> InvertibleResidual:
        """The block x + g(x, c) at the context c: a block sharing this one's parameters, estimator and solver
        settings, whose branch is g(., c); contractive with g's bound for every c."""
        if not self.conditional:
            return self
        view = copy.copy(self)  # shares the parameters and buffers; its own table of submodules
        view._modules = {**self._modules, "g": bind_context(self.g, context)}
        return view

    @property
    def exact_log_det(self) -> bool:  # type: ignore[override]
        """Whether the log-det of the current mode (training or eval) is exact."""
        return isinstance(self.active_log_det_estimator, ExactLogDet)

    @property
    def active_log_det_estimator(self) -> LogDetEstimator:
        """The estimator :meth:`forward_and_log_det` uses now: ``log_det`` in training mode, ``eval_log_det``'s
        choice in eval mode."""
        if self.training or self.eval_log_det == "training" or isinstance(self.log_det_estimator, ExactLogDet):
            return self.log_det_estimator
        if self.eval_log_det != "auto":
            return self.eval_log_det  # type: ignore[return-value]
        dense = self.g.branch if isinstance(self.g, ContextBoundBranch) else self.g
        if isinstance(dense, LipschitzMLP) and dense.event_shape[0] <= EXACT_EVALUATION_FEATURES:
            return _DENSE_EXACT
        return self.log_det_estimator

    @property
    def branch(self) -> ResidualBranch:
        """g's declarations (norm, Lipschitz bound, input check): g itself, or the defaults for plain modules."""
        return self.g if isinstance(self.g, ResidualBranch) else _DEFAULT_BRANCH

    @property
    def norm_order(self) -> float:  # type: ignore[override]
        """Order p of the norm in which Lip(g) is bounded and residuals are measured."""
        return float(self.branch.norm_order)

    def lipschitz_bound(self) -> float | None:
        """g's own certified Lipschitz bound (thesis Eq. 4.6), or ``None`` if it declares none."""
        bound = self.branch.lipschitz_bound()
        return None if bound is None else float(bound)

    def use_log_det_estimator(self, estimator: LogDetEstimator) -> None:
        """Compute the forward log-det with ``estimator`` from now on (e.g. a longer series for evaluation).

        Arguments:
            estimator: (g, x) -> (g(x), log_det), e.g. :class:`~invertnet.logdet.ExactLogDet`,
                :class:`~invertnet.logdet.PowerSeriesLogDet`, :class:`~invertnet.logdet.UnbiasedLogDet`.
        """
        if not callable(estimator):
            raise TypeError(f"InvertibleResidual: the estimator must be callable, got {type(estimator).__name__}")
        self.log_det_estimator = estimator

    def validate(self, x: Tensor, where: str) -> None:
        check_input(x, None, f"{type(self).__name__}.{where}")
        check_dtype(x, self, f"{type(self).__name__}.{where}")
        self.branch.check_input_shape(x, f"{type(self).__name__}.{where}")

    def inverse_lipschitz_bound(self) -> float | None:
        """1 / (1 - Lip(g)) (thesis Lemma 4.6) when g's bound is below 1 and in the 2-norm, else ``None``."""
        lipschitz = self.lipschitz_bound()
        if lipschitz is None or lipschitz >= 1 or self.norm_order != 2:
            return None
        return 1.0 / (1.0 - lipschitz)

    def forward(self, x: Tensor) -> Tensor:
        self.validate(x, "forward")
        return x + self.g(x)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.validate(x, "forward_and_log_det")
        g_x, log_det = self.active_log_det_estimator(self.g, x)
        return x + g_x, log_det

    def solve(self, y: Tensor, options: SolverOptions) -> InverseResult:
        """The fixed point of T(x) = y - g(x) from x = y (thesis Algorithm 1), in g's norm, with its bound."""
        return fixed_point(
            lambda x: y - self.g(x),
            y.detach(),
            atol=options.atol,
            rtol=options.rtol,
            max_iter=options.max_iter,
            norm=self.norm_order,
            lipschitz=self.lipschitz_bound(),
            method=self.solver,
            strict=False,
        )

    def transposed_solver(self, x: Tensor, options: SolverOptions) -> TransposedSolve:
        """(I + J_g(x))^T v = u by the fixed-point iteration v = u - J_g^T v, at the forward's tolerances."""
        return residual_transposed_solve(
            lipschitz=self.lipschitz_bound(), atol=options.atol, rtol=options.rtol, max_iter=options.max_iter
        )

    def jacobian_solve(self, x: Tensor, v: Tensor) -> Tensor:
        """The solution u of (I + J_g(x)) u = v per sample, by the contraction u = v - J_g(x) u (rate Lip(g)),
        to the relative accuracy of an estimate (1e-2): what :func:`~invertnet.solvers.linearized_inverse_error`
        needs of a block.

        Shapes: x, v and u are (B, ...) of the block's input.
        """
        with torch.no_grad():
            branch_jvp = self.g.linearize(x).jvp if hasattr(self.g, "linearize") else self._autograd_jvp(x)
            return fixed_point(
                lambda u: v - branch_jvp(u),
                v,
                atol=0.0,
                rtol=ESTIMATE_RTOL,
                max_iter=self.solver_options.max_iter,
                norm=self.norm_order,
                strict=False,
            ).value

    def _autograd_jvp(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        return lambda u: jvp(self.g, (x,), (u,))[1]

    def implicit_map(self, x: Tensor) -> Tensor:
        """g: F - g is the identity, which has no parameters."""
        return self.g(x)

    def extra_repr(self) -> str:
        evaluation = "" if self.eval_log_det == "auto" else f", eval_log_det={self.eval_log_det!r}"
        return (
            f"log_det={self.log_det_estimator!r}{evaluation}, solver={self.solver!r}, "
            f"max_iter={self.solver_options.max_iter}"
        )
