r"""The one core abstraction: invertible modules and the record of an inverse.

Every bijection in invertnet is an :class:`InvertibleModule`. Iterative inverses take their options as one
:class:`SolverOptions`, return an :class:`InverseResult` and raise :class:`ConvergenceError` when they fail,
unless asked not to.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from invertnet.transforms import ModuleTransform

__all__ = [
    "ConvergenceError",
    "InverseResult",
    "InvertibleModule",
    "InvertibleSequential",
    "IterativeInvertibleModule",
    "SolverOptions",
    "SolverStatus",
    "TransposedProduct",
    "TransposedSolve",
    "attach_implicit_gradient",
    "check_input",
    "check_dtype",
    "frozen_mode",
    "set_validation",
    "validation",
    "validation_enabled",
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
        "the residual grew by many orders of magnitude: the iteration runs away (a fixed-point inverse: the map "
        "is not contractive; check the block's Lipschitz coefficient and that the spectral norms have converged)"
    )
    SINGULAR = (
        "the Jacobian is singular or numerically singular (condition number beyond the solver's "
        "max_condition, 1 / (1000 eps) by default): the inverse is not locally unique or has no reliable digits"
    )
    ILL_CONDITIONED = (
        "the solution is unique but the Jacobian is so badly conditioned (condition estimate beyond the solver's "
        "max_condition, 1 / (1000 eps) by default) that a small residual does not make the solution accurate: "
        "see the record's forward_error_estimate; solve in float64 or make the map better conditioned"
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
    ANALYTIC = "closed-form inverse: no iterations and no residual check; exact up to rounding"

    def __str__(self) -> str:
        return f"{self.name.lower()}: {self.value}"


#: What a record's condition number is (:attr:`InverseResult.condition_kind`).
ConditionKind = Literal["exact", "lower_bound", "estimate"]


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
        condition_number: Tensor with shape (B,): a condition number of the Jacobian at the returned value, of
            the kind ``condition_kind`` says, or ``None`` for solvers that do not measure conditioning.
        condition_kind: What ``condition_number`` is: ``"exact"`` (2-norm, from the singular values of the
            dense Jacobian), ``"lower_bound"`` (2-norm, from the Hessenberg matrices of Krylov spaces: GMRES,
            Newton-Krylov), ``"estimate"`` (infinity-norm, Hager's estimate for a triangular Jacobian: a lower
            bound in exact arithmetic, usually close, less reliable beyond 1 / eps), or ``None``.
        forward_error_estimate: Tensor with shape (B,) estimating |x - F^{-1}(y)| in the solver's norm from the
            conditioning (triangular solvers: |J^{-1}|_inf estimate times the max-abs residual, the first-order
            error of a linearised solve), or ``None`` for solvers that do not compute it. An estimate, not a
            bound: compare ``error_bound``.
        iteration_bound: Tensor with shape (B,): for fixed-point solves with a known Lipschitz bound 0 < L < 1, the
            a-priori number of iterations after which the Contraction Mapping Theorem guarantees an error below
            the tolerance, log(tol (1 - L) / |x_1 - x_0|) / log L rounded up (formalML IFT notes, Theorem 2).
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
    condition_kind: ConditionKind | None = None
    forward_error_estimate: Tensor | None = None
    iteration_bound: Tensor | None = None

    @property
    def success(self) -> bool:
        """True when the solve converged for every sample, or the inverse is analytic (closed-form)."""
        return self.status in (SolverStatus.SUCCESS, SolverStatus.ANALYTIC)

    @property
    def advice(self) -> str:
        """What to do about a failed solve: the status' user-facing message (the message of its ConvergenceError)."""
        return self.status.value

    def summary(self) -> str:
        """One line per solve: status, iterations, the worst residual / error bound and, when measured, the
        worst condition number (named by its kind) and forward-error estimate."""
        worst = "n/a" if self.residual is None else f"{self.residual.max().item():.3e}"
        bound = "n/a" if self.error_bound is None else f"{self.error_bound.max().item():.3e}"
        n_ok = int(self.converged.sum())
        extra = ""
        if self.condition_number is not None:
            kind = (self.condition_kind or "unnamed").replace("_", " ")
            extra += f", max condition number ({kind}) {self.condition_number.max().item():.3e}"
        if self.forward_error_estimate is not None:
            extra += f", max forward error estimate {self.forward_error_estimate.max().item():.3e}"
        return (
            f"{self.status.name.lower()}: {n_ok}/{self.converged.numel()} samples converged in "
            f"{self.iterations} iterations, max residual {worst}, max error bound {bound}{extra}"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`ConvergenceError` carrying this record unless the solve succeeded."""
        if not self.success:
            raise ConvergenceError(self)


class ConvergenceError(RuntimeError):
    """An iterative inverse (or another iteration, e.g. a power iteration) failed; ``error.result`` is its record
    (an :class:`InverseResult` for inverses) with the diagnostics. The message is the record's ``summary()`` and
    its ``advice``."""

    def __init__(self, result: InverseResult) -> None:
        self.result = result
        super().__init__(f"{result.summary()}. {result.advice}")


@dataclass(frozen=True)
class SolverOptions:
    """The options of an iterative inverse, travelling as one object from the caller to the solver.

    ``None`` means "the layer's default": a layer keeps its own defaults in ``solver_options`` and a call's
    options override them field by field (:meth:`over`). Analytic inverses ignore the options.

    Attributes:
        atol, rtol: Per-sample residual tolerance, |F(x) - y| <= atol + rtol |y| (``None``: by dtype, see
            :func:`~invertnet.solvers.default_tolerances`).
        max_iter: Iteration budget (``None``: the layer's, see :mod:`invertnet.solvers.common`).
        strict: Raise :class:`ConvergenceError` when the solve fails (default); ``False`` returns the best
            iterate, whose record :meth:`InvertibleModule.inverse_result` gives.

    Examples:
        >>> SolverOptions.of(None, {"max_iter": 5}).over(SolverOptions(atol=1e-8, max_iter=100))
        SolverOptions(atol=1e-08, rtol=None, max_iter=5, strict=True)
    """

    atol: float | None = None
    rtol: float | None = None
    max_iter: int | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        """Refuse a NaN, infinite or negative tolerance and a ``max_iter`` that is not an integer >= 1."""
        for name in ("atol", "rtol"):
            check_tolerance(getattr(self, name), name, "solver options")
        if self.max_iter is not None:
            check_iteration_budget(self.max_iter, "max_iter", "solver options")
        if not isinstance(self.strict, bool):
            raise TypeError(f"solver options: strict must be True or False, got {self.strict!r}")

    @classmethod
    def of(cls, options: SolverOptions | None, overrides: dict[str, object]) -> SolverOptions:
        """``options`` (default: all defaults) with the keyword ``overrides`` put in; unknown names raise."""
        base = cls() if options is None else options
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"solver options: unknown option(s) {unknown}; use atol, rtol, max_iter, strict")
        return dataclasses.replace(base, **overrides) if overrides else base  # type: ignore[arg-type]

    def over(self, defaults: SolverOptions) -> SolverOptions:
        """These options with every ``None`` field taken from ``defaults`` (``strict`` is always this one's)."""
        return SolverOptions(
            atol=defaults.atol if self.atol is None else self.atol,
            rtol=defaults.rtol if self.rtol is None else self.rtol,
            max_iter=defaults.max_iter if self.max_iter is None else self.max_iter,
            strict=self.strict,
        )


def check_tolerance(value: object, name: str, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` and ``name`` unless ``value`` is ``None`` or a finite real >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real | Tensor):
        raise TypeError(f"{where}: {name} must be a non-negative finite number or None, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: {name} must be a non-negative finite number or None, got {number}")


def check_iteration_budget(value: object, name: str, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` and ``name`` unless ``value`` is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1, got {value}")


#: The value of one keyword override of :class:`SolverOptions` (``atol=1e-8``, ``strict=False``, ...).
SolverOverride = float | int | bool | None
#: v -> J_h(x*)^T v, the vector-Jacobian product of the map h at the solution.
TransposedProduct = Callable[[Tensor], Tensor]
#: (cotangent u, vjp) -> v solving the transposed linear system of an inverse, J_F(x*)^T v = u.
TransposedSolve = Callable[[Tensor, TransposedProduct], Tensor]


def attach_implicit_gradient(
    x_star: Tensor, y: Tensor, h: Callable[[Tensor], Tensor], solve_transposed: TransposedSolve
) -> Tensor:
    r"""Return ``x_star`` (value unchanged) carrying the implicit gradient of the solution x* of F(x*) = y.

    ``h`` must differ from F by a map without parameters (h = g for F = id + g, h = F for triangular maps), so
    that J_F = J_h + (that map's Jacobian). By the implicit function theorem,
    dx*/dy = J_F(x*)^{-1} and dx*/dtheta = -J_F(x*)^{-1} dh/dtheta (formalML, "Inverse and Implicit Function
    Theorems", Theorem 3): the image y - h(x*) has derivative I in y and -dh/dtheta in the parameters, and its
    cotangent u is replaced by v = solve_transposed(u, vjp), the solution of J_F(x*)^T v = u, with
    ``vjp(v) = J_h(x*)^T v``. Memory does not depend on the forward solve's iterations; only first-order
    gradients are supported.

    Arguments:
        x_star: The solution with shape (B, ...).
        y: The input of the inverse, shape (B, ...).
        h: The map whose parameters receive gradients.
        solve_transposed: (cotangent, vjp) -> the solution v of the transposed system.
    """
    x_star = x_star.detach()
    with torch.enable_grad():
        x_leaf = x_star.clone().requires_grad_(True)
        h_of_x = h(x_leaf)
        image = y - h(x_star)
    if not image.requires_grad:
        return x_star

    def vjp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(h_of_x, x_leaf, v, retain_graph=True)[0]

    def backward_hook(cotangent: Tensor | None) -> Tensor | None:
        return None if cotangent is None else solve_transposed(cotangent, vjp)  # undefined stays undefined

    image.register_hook(backward_hook)
    return x_star + (image - image.detach())


_VALIDATION = {"enabled": True}


def set_validation(enabled: bool) -> None:
    """Switch the value checks of every layer on or off (default on), as ``torch.distributions``'
    ``Distribution.set_default_validate_args`` does for its argument checks.

    Value checks read tensor values (finite inputs, data in a layer's domain): on a GPU each is a device-to-host
    synchronisation, and under ``torch.compile`` a graph break, so they are always off inside compiled code.
    Shape, dtype and empty-batch checks need no values and always run.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_validation: expected True or False, got {enabled!r}")
    _VALIDATION["enabled"] = enabled


@contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager with value checks on or off (:func:`set_validation`), restoring the previous setting.

    Examples:
        >>> from invertnet.layers import ActNorm
        >>> with validation(False):
        ...     _ = ActNorm(2)(torch.tensor([[float("nan"), 0.0]]))  # not checked: no host synchronisation
    """
    previous = _VALIDATION["enabled"]
    set_validation(enabled)
    try:
        yield
    finally:
        _VALIDATION["enabled"] = previous


def validation_enabled() -> bool:
    """Whether layers check input values now: :func:`set_validation` is on and the code is not being compiled."""
    return _VALIDATION["enabled"] and not torch.compiler.is_compiling()


def check_input(x: Tensor, event_shape: tuple[int, ...] | None, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``x`` is a finite tensor of shape (B, *event_shape), B >= 1
    (finiteness only while :func:`validation_enabled`).

    Layers refuse empty batches (B = 0) by name: solvers and log-det estimators reduce over the batch.
    :meth:`invertnet.models.FlowDistribution.sample` of ``(0,)`` samples returns an empty tensor instead.

    Arguments:
        x: The tensor to check.
        event_shape: The expected trailing shape, or ``None`` to check only that x has a batch dimension.
        where: Name of the layer and direction, used in the message.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{where}: expected a batched tensor of shape (B, ...), got a scalar")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: expected at least one sample, got an empty batch of shape {tuple(x.shape)}")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        expected = ", ".join(["B", *map(str, event_shape)])
        raise ValueError(
            f"{where}: expected input of shape ({expected}), got {tuple(x.shape)}; add a batch dimension "
            "with x.unsqueeze(0) if you passed a single sample"
        )
    if validation_enabled() and not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{where}: input contains {n_bad} NaN or infinite values")


def check_dtype(x: Tensor, module: nn.Module, where: str) -> None:
    """Raise a ``ValueError`` naming ``where``, the input's and the parameters' dtypes when ``x`` is a
    floating-point tensor of another dtype than the first floating-point parameter of ``module``.

    A comparison of dtypes in Python, without a device synchronisation; integer inputs (levels) and modules
    without parameters pass.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    dtype = next((parameter.dtype for parameter in module.parameters() if parameter.is_floating_point()), None)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        raise ValueError(
            f"{where}: the input is {x.dtype} but the model's parameters are {dtype}; convert the input "
            f"(x.to({dtype})) or the model (model.to({x.dtype}))"
        )


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
    * ``m.inverse_result(y)`` returns the :class:`InverseResult` without raising on a failed solve; for
      analytic inverses its status is ``ANALYTIC`` (nothing was checked, nothing needed to be);
    * ``m.inv`` is the inverse as a module, with ``m.inv.inv is m``.

    Subclass requirements:

    * analytic inverses implement the pair :meth:`forward_and_log_det` and :meth:`inverse_and_log_det`
      (which receives a :class:`SolverOptions` it may ignore); iterative inverses derive from
      :class:`IterativeInvertibleModule` instead;
    * override :meth:`forward` / :meth:`inverse` when the map alone is cheaper than the fused call;
    * set the class attributes below, which the generic test suite reads.

    Attributes:
        exact_log_det: The log-determinant is exact (not a stochastic or truncated estimate).
        analytic_inverse: The inverse is closed-form (no iterative solve).
        volume_preserving: The log-determinant is identically zero.
        bijective: The map is onto its codomain. Injective-only maps (zero padding) invert only on their
            range, and their log-det is the volume change 1/2 log det(J^T J).
        quantized_inverse: The inverse rounds to a lattice (dequantisation): it is piecewise constant, so
            the inverse has no useful Jacobian.
        batch_statistics_in_training: In training mode the output depends on the statistics of the whole
            batch (batch normalisation), so samples are not independent and the input cannot be
            reconstructed from the output by the (running-average) inverse.
        norm_order: Order p of the per-sample norm in which the layer's residuals and error bounds are
            measured; bounds compose through a sequence only when every part uses the 2-norm.
    """

    bijective: bool = True
    quantized_inverse: bool = False
    exact_log_det: bool = True
    analytic_inverse: bool = True
    volume_preserving: bool = False
    batch_statistics_in_training: bool = False
    norm_order: float = 2.0

    def forward(self, x: Tensor) -> Tensor:
        """Compute y = F(x) for x of shape (B, ...)."""
        return self.forward_and_log_det(x)[0]

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(y, log_det)`` with ``log_det`` of shape (B,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_and_log_det")

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(x, log_det)`` with x = F^{-1}(y) and log_det = log|det dF^{-1}/dy|, shape (B,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement inverse_and_log_det")

    def inverse(self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride) -> Tensor:
        """Compute x = F^{-1}(y). Iterative inverses raise :class:`ConvergenceError` unless ``strict=False``.

        Arguments:
            y: Tensor with shape (B, ...).
            options: The :class:`SolverOptions` (``None``: the layer's defaults).
            **overrides: Fields of :class:`SolverOptions` by keyword (``atol``, ``rtol``, ``max_iter``,
                ``strict``), put into ``options``.
        """
        return self.inverse_and_log_det(y, SolverOptions.of(options, overrides))[0]

    def inverse_result(
        self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride
    ) -> InverseResult:
        """Invert without raising on a failed solve and return the full :class:`InverseResult`.

        For analytic inverses the record says so: status ``ANALYTIC``, zero iterations, every sample
        converged and no residual (none was measured). A layer with an iterative inverse must derive from
        :class:`IterativeInvertibleModule`, whose record reports the solve; here it is refused.
        """
        if not self.analytic_inverse:
            raise TypeError(
                f"{type(self).__name__}: analytic_inverse is False, so its inverse is a solve whose record this base "
                "cannot give; derive from IterativeInvertibleModule"
            )
        with torch.no_grad():
            x = self.inverse(y, options, **overrides)
        return InverseResult(
            value=x,
            converged=torch.ones(x.shape[0], dtype=torch.bool, device=x.device),
            iterations=0,
            residual=None,
            error_bound=None,
            status=SolverStatus.ANALYTIC,
        )

    def inverse_lipschitz_bound(self) -> float | None:
        """A bound on Lip(F^{-1}) in the per-sample 2-norm, or ``None`` if unknown.

        Used to propagate inverse errors through compositions (:meth:`InvertibleSequential.inverse_result`).
        """
        return None

    #: The map takes a context c (conditional flows): call it through :meth:`at`.
    conditional: bool = False

    def at(self, context: Tensor) -> InvertibleModule:
        """This map at a fixed context c, an ordinary (unconditional) module sharing the parameters; ``self`` for a
        map that takes no context.

        Arguments:
            context: (M, k) or (k,): one context for every sample, or M contexts, which a batch of B samples takes
                tiled (B a multiple of M: sample ``i`` gets context ``i % M``).
        """
        return self

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one output sample for input samples of shape ``event_shape``; most layers keep it.

        Layers that change shapes (squeeze, flatten, padding) override it and :meth:`event_shape_before`;
        :meth:`as_transform` and :class:`~invertnet.models.FlowDistribution` read them, so no sample is run to
        learn a shape.
        """
        return tuple(int(size) for size in event_shape)

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one input sample for output samples of shape ``event_shape`` (the inverse of
        :meth:`event_shape_after`)."""
        return tuple(int(size) for size in event_shape)

    def as_transform(self, event_shape: Sequence[int] | None = None) -> ModuleTransform:
        """This map as a ``torch.distributions.Transform`` on tensors of shape (*batch, *event_shape).

        Arguments:
            event_shape: Shape of one input sample; ``None`` uses the module's ``event_shape`` attribute (layers
                built for one shape have it), else a ``ValueError`` asks for it.

        Returns:
            A :class:`~invertnet.transforms.ModuleTransform` sharing this module's parameters; ``.inv`` is the
            inverse, for ``TransformedDistribution(base, [module.as_transform(shape).inv])``.
        """
        from invertnet.transforms import ModuleTransform

        if event_shape is None:
            event_shape = getattr(self, "event_shape", None)
            if event_shape is None:
                raise ValueError(
                    f"{type(self).__name__}.as_transform: this layer works on any sample shape; pass the shape of "
                    "one sample, e.g. as_transform((2,)) or as_transform((3, 32, 32))"
                )
        return ModuleTransform(self, event_shape)

    @property
    def inv(self) -> InvertibleModule:
        """The inverse map as an :class:`InvertibleModule` sharing this module's parameters; ``m.inv.inv is m``."""
        return _InverseView(self)


class _InverseView(InvertibleModule):
    """The inverse of a module, sharing its parameters. Created by :attr:`InvertibleModule.inv`.

    Its forward is the base's inverse (with the base's default solver options) and its inverse is the base's
    forward, which is explicit: the view's inverse is analytic whatever the base's is.
    """

    def __init__(self, base: InvertibleModule) -> None:
        super().__init__()
        self.base = base
        self.exact_log_det = base.exact_log_det
        self.volume_preserving = base.volume_preserving
        self.bijective = base.bijective

    def forward(self, x: Tensor) -> Tensor:
        return self.base.inverse(x)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.inverse_and_log_det(x)

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        return self.base.forward_and_log_det(y)

    def inverse(self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride) -> Tensor:
        return self.base(y)

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        return self.base.conditional

    def at(self, context: Tensor) -> InvertibleModule:
        return self.base.at(context).inv if self.base.conditional else self

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        return self.base.event_shape_before(event_shape)

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        return self.base.event_shape_after(event_shape)

    @property
    def inv(self) -> InvertibleModule:
        return self.base


class IterativeInvertibleModule(InvertibleModule):
    """Base of layers whose inverse is an iterative solve (i-ResNet blocks, MintNet layers).

    This class owns the inverse: it merges the call's :class:`SolverOptions` over the layer's
    ``solver_options``, checks the input (:meth:`validate`), runs the subclass's :meth:`solve` with every
    submodule in eval mode (:func:`frozen_mode`: the map does not change under the solver), raises
    :class:`ConvergenceError` when ``strict``, and attaches the implicit gradient (:func:`attach_implicit_gradient`)
    with the subclass's transposed solve. The inverse's log-determinant is minus the forward one at the
    solution.

    Subclass requirements:

    * :meth:`forward_and_log_det` (and :meth:`forward` if cheaper);
    * :meth:`solve`: one solve of F(x) = y returning an :class:`InverseResult`, without raising on
      failure and without building a graph;
    * :meth:`transposed_solver`: the solve of J_F(x*)^T v = u for backpropagation, and :meth:`implicit_map`
      when the parameters enter through a map other than F itself;
    * ``solver_options``: the layer's defaults (set in ``__init__``).
    """

    analytic_inverse = False
    solver_options: SolverOptions = SolverOptions()

    def validate(self, x: Tensor, where: str) -> None:
        """Raise a ``ValueError`` naming the layer and ``where`` for input the layer cannot take."""
        check_input(x, None, f"{type(self).__name__}.{where}")

    def solve(self, y: Tensor, options: SolverOptions) -> InverseResult:
        """Solve F(x) = y for y of shape (B, ...) with the merged ``options``, without raising on failure."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve")

    def transposed_solver(self, x: Tensor, options: SolverOptions) -> TransposedSolve:
        """The function (u, vjp) -> v solving J_F(x)^T v = u at the solution x, with vjp the products of
        :meth:`implicit_map`'s transposed Jacobian; prepared once per inverse, called once per backward."""
        raise NotImplementedError(f"{type(self).__name__} must implement transposed_solver")

    def implicit_map(self, x: Tensor) -> Tensor:
        """The map h through which the parameters enter: F minus a parameter-free map (default F itself)."""
        return self(x)

    def resolved_options(self, options: SolverOptions | None, overrides: dict[str, object]) -> SolverOptions:
        """The call's options and keyword overrides, merged over the layer's ``solver_options``."""
        return SolverOptions.of(options, overrides).over(self.solver_options)

    def inverse_result(
        self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride
    ) -> InverseResult:
        """Solve F(x) = y without raising on a failed solve; returns the :class:`InverseResult`."""
        options = self.resolved_options(options, overrides)
        check_dtype(y, self, f"{type(self).__name__}.inverse")
        self.validate(y, "inverse")
        with frozen_mode(self), torch.no_grad():
            return self.solve(y, options)

    def inverse(self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride) -> Tensor:
        """x = F^{-1}(y), differentiable by implicit differentiation; raises :class:`ConvergenceError` when the
        solve fails, unless ``strict=False`` (then the best iterate is returned)."""
        options = self.resolved_options(options, overrides)
        result = self.inverse_result(y, options)
        if options.strict:
            result.raise_if_failed()
        if not torch.is_grad_enabled():
            return result.value
        with frozen_mode(self):
            return attach_implicit_gradient(
                result.value, y, self.implicit_map, self.transposed_solver(result.value.detach(), options)
            )

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        x = self.inverse(y, options)
        _, log_det = self.forward_and_log_det(x)
        return x, -log_det


class InvertibleSequential(InvertibleModule):
    r"""Composition :math:`F = f_T \circ \dots \circ f_1` with summed log-determinants.

    .. math:: \log|\det J_F(x)| = \sum_{t=1}^{T} \log|\det J_{f_t}(x_{t-1})|

    Arguments:
        *modules: The invertible modules, applied in order in the forward direction.

    Examples:
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

    @property
    def batch_statistics_in_training(self) -> bool:  # type: ignore[override]
        return any(part.batch_statistics_in_training for part in self.parts)

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        return any(part.conditional for part in self.parts)

    def at(self, context: Tensor) -> InvertibleModule:
        """The composition of the parts at the context (unconditional parts as they are): a shallow copy of this
        sequence (its class kept, e.g. memory saving) whose parts are the parts' views."""
        if not self.conditional:
            return self
        view = copy.copy(self)
        view._modules = {**self._modules, "parts": nn.ModuleList(part.at(context) for part in self.parts)}
        return view

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Iterator[InvertibleModule]:
        return iter(self.parts)

    def __getitem__(self, index: int) -> InvertibleModule:
        return self.parts[index]

    def _check(self, x: Tensor, where: str) -> None:
        check_dtype(x, self, f"{type(self).__name__}.{where}")

    def event_shape_after(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(event_shape)
        for part in self.parts:
            shape = part.event_shape_after(shape)
        return shape

    def event_shape_before(self, event_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(event_shape)
        for part in reversed(self.parts):
            shape = part.event_shape_before(shape)
        return shape

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, "forward")
        for part in self.parts:
            x = part(x)
        return x

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, "forward_and_log_det")
        total = x.new_zeros(x.shape[0])
        for part in self.parts:
            x, log_det = part.forward_and_log_det(x)
            total = total + log_det
        return x, total

    def inverse(self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride) -> Tensor:
        options = SolverOptions.of(options, overrides)
        self._check(y, "inverse")
        for part in reversed(self.parts):
            y = part.inverse(y, options)
        return y

    def inverse_and_log_det(self, y: Tensor, options: SolverOptions | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, "inverse_and_log_det")
        total = y.new_zeros(y.shape[0])
        for part in reversed(self.parts):
            y, log_det = part.inverse_and_log_det(y, options)
            total = total + log_det
        return y, total

    def inverse_result(
        self, y: Tensor, options: SolverOptions | None = None, **overrides: SolverOverride
    ) -> InverseResult:
        """Invert part by part without raising on a failed solve; the record's ``parts`` hold each part's record.

        The composite converged when every part did. Its status is that of the first failing part; else
        ``SUCCESS`` when a part was solved iteratively, and ``ANALYTIC`` when every part is analytic.
        """
        options = SolverOptions.of(options, overrides)
        self._check(y, "inverse_result")
        records = []
        for part in reversed(self.parts):
            record = part.inverse_result(y, options)
            records.append(record)
            y = record.value
        failed = [record for record in records if not record.success]
        solved = any(record.status is SolverStatus.SUCCESS for record in records)
        converged = torch.stack([record.converged for record in records]).all(dim=0)
        residuals = [record.residual for record in records if record.residual is not None]
        if failed:
            status = failed[0].status
        else:
            status = SolverStatus.SUCCESS if solved else SolverStatus.ANALYTIC
        return InverseResult(
            value=y,
            converged=converged,
            iterations=sum(record.iterations for record in records),
            residual=torch.stack(residuals).amax(dim=0) if residuals else None,
            error_bound=self._composed_error_bound(records),
            status=status,
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
            if own is None or part.norm_order != 2.0:  # bounds must share the 2-norm
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
