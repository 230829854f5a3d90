r"""Any :class:`~invertnet.core.InvertibleModule` as a ``torch.distributions.Transform``.

``module.as_transform(event_shape)`` gives a :class:`ModuleTransform`: the module's map y = F(x) on tensors of
shape (*batch, *event_shape), with ``log_abs_det_jacobian(x, y)`` = log|det J_F(x)| of shape batch and ``inv``
the inverse (the module's solver for iterative inverses). It composes with torch's own transforms and goes into
``torch.distributions.TransformedDistribution``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.transforms import Transform

if TYPE_CHECKING:
    from invertnet.core import InvertibleModule

__all__ = ["ModuleTransform"]


def batch_shape_of(shape: Sequence[int], event_shape: tuple[int, ...], where: str) -> torch.Size:
    """The leading part of ``shape`` = (*batch, *event_shape); a ``ValueError`` naming ``where`` when the
    trailing dimensions are not ``event_shape``."""
    shape = tuple(shape)
    n_batch = len(shape) - len(event_shape)
    if n_batch < 0 or shape[n_batch:] != event_shape:
        raise ValueError(
            f"{where}: expected a tensor of shape (..., {', '.join(map(str, event_shape))}) (any batch shape, "
            f"then the event shape {event_shape}), got {shape}"
        )
    return torch.Size(shape[:n_batch])


def _checked_shape(x: object, where: str) -> torch.Size:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    return x.shape


class ModuleTransform(Transform):
    r"""The bijection y = F(x) of an invertible module, as a ``torch.distributions.Transform``.

    Inputs have any batch shape before ``event_shape``; the module sees them flattened to one batch dimension.
    ``log_abs_det_jacobian(x, y)`` has the batch shape: the log-det of one whole event (the domain and codomain
    are ``independent(real, len(event_shape))``). It is what the module's ``forward_and_log_det`` returns, so for
    residual blocks in training mode it is their log-det *estimator* (power series or Russian roulette); in
    eval mode, exact layers and exact estimators give the exact value. After ``y = t(x)`` or ``x = t.inv(y)``,
    the log-det of that pair is kept, so ``TransformedDistribution.log_prob`` and ``rsample`` run the module
    once; any other pair is recomputed from x.

    Arguments:
        module: The invertible module (its parameters stay the module's: train it as usual).
        event_shape: Shape of one input sample, e.g. ``(2,)`` or ``(1, 8, 8)``.

    Examples:
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> from invertnet.layers import ActNorm
        >>> layer = ActNorm(2)
        >>> base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> flow = TransformedDistribution(base, [layer.as_transform((2,)).inv])  # data = F^{-1}(z)
        >>> flow.sample((4, 3)).shape, flow.log_prob(torch.zeros(5, 2)).shape
        (torch.Size([4, 3, 2]), torch.Size([5]))
    """

    bijective = True

    def __init__(self, module: InvertibleModule, event_shape: Sequence[int]) -> None:
        super().__init__(cache_size=0)
        if not all(callable(getattr(module, name, None)) for name in ("forward_and_log_det", "inverse_and_log_det")):
            raise TypeError(f"ModuleTransform: expected an InvertibleModule, got {type(module).__name__}")
        self.module = module
        self.event_shape = tuple(int(size) for size in event_shape)
        self.output_event_shape = module.event_shape_after(self.event_shape)
        self.bijective = bool(module.bijective)
        self.domain = constraints.independent(constraints.real, len(self.event_shape))
        self.codomain = constraints.independent(constraints.real, len(self.output_event_shape))
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def _through(
        self, map_and_log_det: Callable[[Tensor], tuple[Tensor, Tensor]], t: Tensor, inward: bool, where: str
    ) -> tuple[Tensor, Tensor]:
        """``map_and_log_det`` of t (*batch, *shape in) flattened to one batch dimension and back: the result of
        shape (*batch, *shape out) and the log-det of shape batch. ``inward``: t is an output (the inverse)."""
        shape_in, shape_out = (
            (self.output_event_shape, self.event_shape) if inward else (self.event_shape, self.output_event_shape)
        )
        batch = batch_shape_of(_checked_shape(t, where), shape_in, where)
        if math.prod(batch) == 0:
            return t.new_zeros(*batch, *shape_out), t.new_zeros(batch)
        out, log_det = map_and_log_det(t.reshape(-1, *shape_in))
        return out.reshape(*batch, *shape_out), log_det.reshape(batch)

    def _call(self, x: Tensor) -> Tensor:
        y, log_det = self._through(self.module.forward_and_log_det, x, False, "ModuleTransform")
        self._last = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, inverse_log_det = self._through(self.module.inverse_and_log_det, y, True, "ModuleTransform.inv")
        self._last = (x, y, -inverse_log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """log|det dy/dx| of shape batch: kept from the call that produced this (x, y), else computed from x."""
        last = self._last
        if last is not None and last[0] is x and last[1] is y:
            self._last = None  # used once: hold no graph after it
            return last[2]
        return self._through(self.module.forward_and_log_det, x, False, "ModuleTransform.log_abs_det_jacobian")[1]

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        batch = batch_shape_of(shape, self.event_shape, "ModuleTransform.forward_shape")
        return torch.Size((*batch, *self.output_event_shape))

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        batch = batch_shape_of(shape, self.output_event_shape, "ModuleTransform.inverse_shape")
        return torch.Size((*batch, *self.event_shape))

    def __repr__(self) -> str:
        return f"ModuleTransform({type(self.module).__name__}, event_shape={self.event_shape})"
