r"""Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows", section 3.2).

A :class:`~invertnet.layers.Coupling` whose entrywise map is a monotonic rational-quadratic spline
(:func:`~invertnet.layers.splines.rational_quadratic_spline`) with K bins on [-B, B] and the identity outside:
the conditioner gives each transformed entry 3K - 1 raw parameters (K widths, K heights, K - 1 interior
derivatives). The log-det is exact (a sum of log-derivatives) and the inverse closed-form (a quadratic per
entry).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from invertnet.layers.conditional import ContextSpec
from invertnet.layers.coupling import Coupling, MaskName
from invertnet.layers.splines import rational_quadratic_spline, spline_parameter_count

__all__ = ["SplineCoupling"]


class SplineCoupling(Coupling):
    r"""Coupling layer with monotonic rational-quadratic splines (Durkan et al. 2019, Eq. 4-8).

    .. math:: y_a = x_a, \qquad y_b = \mathrm{RQS}(x_b; \theta(x_a)), \qquad
        \log|\det J| = \sum_b \log \mathrm{RQS}'(x_b; \theta(x_a)).

    Each transformed entry has its own spline: K bins on [-B, B] whose widths and heights are a floored softmax
    of the conditioner's raw outputs and whose interior knot derivatives are a floored softplus, with derivative
    1 at +-B so that the identity tails outside [-B, B] join smoothly. The default conditioner
    (:func:`~invertnet.layers.default_conditioner`, zero last layer) starts the layer at the identity. Masks,
    layouts and contexts are those of :class:`~invertnet.layers.Coupling` with P = 3K - 1: output channel
    p n_b + j holds parameter p of transformed channel j (p < K widths, then K heights, then K - 1
    derivatives).

    Arguments:
        event_shape, mask, flip, conditioner, hidden, context_features: As :class:`~invertnet.layers.Coupling`.
        bins: Number K of bins.
        bound: B. Inputs are best standardised (an :class:`~invertnet.layers.ActNorm` before the layer) so that
            they fall inside; entries outside pass unchanged.

    Examples:
        >>> layer = SplineCoupling((2,), "half", hidden=8, bins=4)
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(layer(x), x, atol=1e-6)  # the identity at initialisation
        True
        >>> _ = nn.init.normal_(layer.conditioner[-1].weight)
        >>> y, log_det = layer.forward_and_log_det(x)
        >>> torch.allclose(layer.inverse(y), x, atol=1e-5), log_det.shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        mask: MaskName | Tensor = "half",
        *,
        flip: bool = False,
        conditioner: nn.Module | None = None,
        hidden: int = 64,
        bins: int = 8,
        bound: float = 3.0,
        context_features: ContextSpec = 0,
    ) -> None:
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"SplineCoupling: bins must be an integer of at least 2, got {bins!r}")
        if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"SplineCoupling: bound must be a positive finite number, got {bound!r}")
        self.parameters_per_entry = spline_parameter_count(bins)
        super().__init__(
            event_shape, mask, flip=flip, conditioner=conditioner, hidden=hidden, context_features=context_features
        )
        self.bins, self.bound = bins, float(bound)

    def transform_entries(self, x: Tensor, parameters: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return rational_quadratic_spline(x, parameters.movedim(1, -1), self.bound, inverse=inverse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound:g}"
