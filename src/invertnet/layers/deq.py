r"""Deep equilibrium layers (formalML IFT notes, the DEQ section): the output is the fixed point
z* = f(z*, x; theta) of a cell, found by (Anderson-accelerated) fixed-point iteration and differentiated
implicitly, so training memory does not depend on how many iterations the solve took."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from invertnet.core import InverseResult, frozen_mode, validation_enabled
from invertnet.layers.activations import make_activation
from invertnet.layers.spectral import SpectralNormLinear
from invertnet.solvers.common import FIXED_POINT_MAX_ITER
from invertnet.solvers.implicit import implicit_fixed_point

__all__ = ["DEQ", "ContractiveCell", "EquilibriumCell"]


class EquilibriumCell(nn.Module):
    """Base of DEQ cells f(z, x) -> z: what :class:`DEQ` reads of a cell, with defaults. Any ``nn.Module``
    taking (z, x) can serve as a cell; one that does not derive from this class is treated as having these
    defaults.

    Attributes:
        state_features: Size of a flat state z (B, state_features), or ``None`` when the DEQ must be given
            ``state_shape``.
    """

    state_features: int | None = None

    def lipschitz_bound(self) -> float | None:
        """A certified upper bound on Lip_z(f), or ``None`` if unknown. Below 1 it gives the forward solve's
        error bound; at 1 or above :class:`DEQ` refuses the cell. Never an estimate."""
        return None


#: What a cell that does not derive from EquilibriumCell is taken to declare.
_DEFAULT_CELL = EquilibriumCell()


class ContractiveCell(EquilibriumCell):
    r"""f(z, x) = phi(W z + U x + b) with W spectrally normalised to norm ``coeff`` < 1 and phi 1-Lipschitz, so
    z -> f(z, x) is a contraction with rate ``coeff`` (Banach: one fixed point, found by iteration).

    The constructor refines W's power iteration (:meth:`~invertnet.layers.SpectralNormLayer.refine_spectral_norm`),
    so a fresh cell's certified rate is at most ``coeff``; training moves W, and the certified rate of
    :meth:`lipschitz_bound` follows the power iteration (one step per training call) from there.

    Arguments:
        state_features: Size of z; shapes z (B, state_features), x (B, input_features).
        input_features: Size of x.
        coeff: Lipschitz bound of f in z (Eq. 4.9 scaling of W).
        activation: ``"tanh"`` (the example layer of the formalML IFT notes, tanh(W z + x)), ``"elu"`` or any name
            :func:`~invertnet.layers.make_activation` knows.
    """

    def __init__(self, state_features: int, input_features: int, coeff: float = 0.9, activation: str = "tanh") -> None:
        super().__init__()
        if not 0 < coeff < 1:
            raise ValueError(f"ContractiveCell: coeff must lie in (0, 1) for a contraction, got {coeff}")
        self.state_features = state_features
        self.recurrent = SpectralNormLinear(state_features, state_features, bias=False, coeff=coeff)
        self.recurrent.refine_spectral_norm()
        self.injection = nn.Linear(input_features, state_features)
        self.activation = nn.Tanh() if activation == "tanh" else make_activation(activation)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.activation(self.recurrent(z) + self.injection(x))

    def lipschitz_bound(self) -> float:
        """Lip_z(f) <= Lip(phi) ||W~||, with the certified bound of the normalised W (at most ``coeff`` after a
        refinement)."""
        activation = float(getattr(self.activation, "lipschitz_constant", 1.0))  # tanh is 1-Lipschitz
        return self.recurrent.operator_norm_bound() * activation

    def lipschitz_estimate(self) -> float:
        """The power-iteration *estimate* of ||W~||: quick, not a bound."""
        return self.recurrent.operator_norm_estimate()


class DEQ(nn.Module):
    r"""z* = f(z*, x; theta) for a cell f, differentiable by :func:`~invertnet.solvers.implicit_fixed_point`.

    In training mode one cell evaluation first advances the spectral-norm power iterations; the solve and the
    backward pass then use that fixed map. The forward solve's record is kept in ``last_result``
    (iterations, residuals, status); a failed solve raises :class:`~invertnet.ConvergenceError`.

    Arguments:
        cell: f(z, x) -> z, e.g. :class:`ContractiveCell`; an :class:`EquilibriumCell` with a
            ``lipschitz_bound()`` gets the forward solve's Lemma 4.5 error bound; one whose certified bound is
            >= 1 is refused at the call with a ``ValueError`` naming it.
        state_shape: Shape of one sample's z (default ``(cell.state_features,)``).
        method, backward, atol, rtol, max_iter: As for :func:`~invertnet.solvers.implicit_fixed_point`.

    Examples:
        >>> layer = DEQ(ContractiveCell(8, 3, coeff=0.5))
        >>> layer(torch.randn(4, 3)).shape
        torch.Size([4, 8])
        >>> layer.last_result.status.name
        'SUCCESS'
    """

    last_result: InverseResult | None

    def __init__(
        self,
        cell: nn.Module,
        state_shape: Sequence[int] | None = None,
        *,
        method: Literal["iteration", "anderson"] = "anderson",
        backward: Literal["iteration", "gmres"] = "iteration",
        atol: float | None = None,
        rtol: float | None = None,
        max_iter: int = FIXED_POINT_MAX_ITER,
    ) -> None:
        super().__init__()
        declared = cell if isinstance(cell, EquilibriumCell) else _DEFAULT_CELL
        if state_shape is None:
            if declared.state_features is None:
                raise ValueError("DEQ: give state_shape, the shape of one sample's state z")
            state_shape = (int(declared.state_features),)
        self.cell, self.state_shape = cell, tuple(int(size) for size in state_shape)
        self.method, self.backward, self.atol, self.rtol, self.max_iter = method, backward, atol, rtol, max_iter
        self.last_result = None

    def forward(self, x: Tensor) -> Tensor:
        if validation_enabled() and not torch.isfinite(x).all():
            raise ValueError("DEQ: the input contains NaN or infinite values")
        z0 = torch.zeros(x.shape[0], *self.state_shape, dtype=x.dtype, device=x.device)
        if self.training:
            with torch.no_grad():
                self.cell(z0, x)  # advance the power iterations once per step, outside the solve
        with frozen_mode(self.cell):
            bound = self._certified_rate()
            z, self.last_result = implicit_fixed_point(
                self.cell,
                x,
                z0,
                method=self.method,
                backward=self.backward,
                atol=self.atol,
                rtol=self.rtol,
                max_iter=self.max_iter,
                lipschitz=bound,
            )
        return z

    def _certified_rate(self) -> float | None:
        """The cell's certified Lip_z(f), refusing a cell that is not certified to contract."""
        declared = self.cell if isinstance(self.cell, EquilibriumCell) else _DEFAULT_CELL
        bound = declared.lipschitz_bound()
        if bound is not None and bound >= 1:
            estimate = getattr(self.cell, "lipschitz_estimate", None)
            seen = f"; its power-iteration estimate is {estimate():.6g}" if callable(estimate) else ""
            raise ValueError(
                f"DEQ: the cell {type(self.cell).__name__} is not certified to contract: its certified bound on "
                f"Lip_z(f) is {bound:.6g} >= 1{seen}. Converge its spectral norms "
                "(invertnet.layers.refine_spectral_norms(cell)) or lower its coeff"
            )
        return bound
