r"""Residual branches g with a certified-by-construction Lipschitz bound (thesis Eq. 4.5-4.7).

With 1-Lipschitz activations, Lip(g) <= prod_i ||A_i|| (thesis Eq. 4.6). :meth:`LipschitzNet.lipschitz_bound`
multiplies *certified* bounds of the normalised layers
(:meth:`~invertnet.layers.SpectralNormLayer.operator_norm_bound`); :meth:`LipschitzNet.lipschitz_estimate`
multiplies their power-iteration estimates. After
:func:`~invertnet.layers.refine_spectral_norms` each certified ||A_i|| <= c, so Lip(g) <= c^n for certain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from invertnet.layers.activations import ConcatenatedDerivative, make_activation, width_factor
from invertnet.layers.spectral import SpectralNormConv2d, SpectralNormLayer, SpectralNormLinear

__all__ = ["LipschitzConvNet", "LipschitzMLP", "LipschitzNet", "Linearization", "ResidualBranch"]

POWER_ITERATIONS = 16
"""Power-iteration steps per training step of :class:`LipschitzMLP`'s normalised layers (the layers' own default
is 1, as ``torch.nn.utils.spectral_norm``'s). With few steps the estimate lags behind the weights (trained layers
have many singular values near the cap, where power iteration converges slowly): after 600 Adam steps of a
64-128-128-64 dense flow on digits with one step the layers' certified norms were 1.01-1.07 for coeff 0.97, so the
refinement before evaluation (:func:`~invertnet.layers.refine_spectral_norms`) changed the trained map. Five steps
gained 0.12 test bits/dim, sixteen another 0.04 per 60 s at lr 3e-3; sixteen cost about what five did once
:class:`~invertnet.layers.SpectralNormLinear` took them by Gram squaring (docs/defaults.md)."""

CONV_POWER_ITERATIONS = 1
"""The same for :class:`LipschitzConvNet`: one step. A convolution's power step (a convolution and a transposed
convolution of a whole image) is dearer: five steps made the multi-scale digits flow of ``make run`` 60 % slower per
training step with no better test figure (docs/defaults.md)."""


@dataclass
class Linearization:
    r"""g(x) with the factors of its Jacobian, :math:`J_g(x) = A_n D_{n-1} A_{n-1} \cdots D_1 A_1 (D_0)`.

    A_i are the normalised linear layers (weights with their graph) and D_i the diagonal matrices of the
    activations' derivatives at the pre-activations (with their graph), or for a concatenating activation
    (:class:`~invertnet.layers.activations.CLipSwish`) the stacked diagonals of a
    :class:`~invertnet.layers.activations.ConcatenatedDerivative`. Built by
    :meth:`LipschitzNet.linearize`; used by the series log-det estimators to apply J_g^T without autograd
    and to differentiate w^T J_g v as a forward-mode chain instead of a double backward pass.

    Attributes:
        output: g(x), with shape (B, ...).
        factors: In forward order, ``(layer, weight)`` pairs for A_i, tensors (diagonals) or
            ``ConcatenatedDerivative`` for D_i.
    """

    output: Tensor
    factors: list[tuple[nn.Module, Tensor] | Tensor]

    def vjp(self, w: Tensor) -> Tensor:
        """w^T J_g(x) for w with the output's shape, without building a graph."""
        with torch.no_grad():
            for factor in reversed(self.factors):
                if isinstance(factor, tuple):
                    layer, weight = factor
                    w = layer.adjoint(weight, w)
                elif isinstance(factor, ConcatenatedDerivative):
                    w = factor.adjoint(w)
                else:
                    w = w * factor
        return w

    def jvp(self, v: Tensor) -> Tensor:
        """J_g(x) v, differentiable with respect to x and the parameters through the factors."""
        for factor in self.factors:
            if isinstance(factor, tuple):
                layer, weight = factor
                v = layer.operator(weight, v)
            elif isinstance(factor, ConcatenatedDerivative):
                v = factor.apply(v)
            else:
                v = factor * v
        return v


class ResidualBranch(nn.Module):
    """Base of residual branches g of :class:`~invertnet.layers.InvertibleResidual`: what the block reads of
    g, with the defaults of a branch that knows nothing about itself.

    Any ``nn.Module`` from (B, ...) to the same shape can serve as a branch; one that does not derive from this
    class is treated as having these defaults.

    Attributes:
        norm_order: The order p of the per-sample vector norm in which :meth:`lipschitz_bound` holds; the
            block's inverse measures residuals in it.
    """

    norm_order: float = 2.0

    def lipschitz_bound(self) -> float | None:
        """A certified upper bound on Lip(g) in the ``norm_order`` norm, or ``None`` if unknown (no error bound,
        no check). Never an estimate: solvers derive guarantees from it."""
        return None

    def check_input_shape(self, x: Tensor, where: str) -> None:
        """Raise a ``ValueError`` naming ``where`` for input g cannot take; the default accepts any shape."""


def _interface_orders(norm_orders: float | Sequence[float], n_layers: int) -> list[float]:
    """Norm orders p_0, ..., p_n at the interfaces of n layers; p_0 = p_n so that g maps a space to itself."""
    if isinstance(norm_orders, (int, float)):
        return [float(norm_orders)] * (n_layers + 1)
    orders = [float(order) for order in norm_orders]
    if len(orders) != n_layers + 1:
        raise ValueError(f"norm_orders: need {n_layers + 1} orders for {n_layers} layers, got {len(orders)}")
    if orders[0] != orders[-1]:
        raise ValueError(f"norm_orders: the first and last order must agree (residual map), got {orders}")
    return orders


def _layer_input_sizes(sizes: list[int], activation: str, preactivation: bool, orders: list[float]) -> list[int]:
    """Input features (channels) of each layer for interface sizes ``sizes``: multiplied by the activation's
    width factor after an activation (:class:`~invertnet.layers.activations.CLipSwish` doubles them)."""
    factor = width_factor(activation)
    if factor != 1 and any(order != 2.0 for order in orders):
        raise ValueError(
            f"activation {activation!r} is certified 1-Lipschitz only in the 2-norm; norm orders {orders} need an "
            "elementwise activation"
        )
    return [size * (factor if index > 0 or preactivation else 1) for index, size in enumerate(sizes[:-1])]


def _interleave_activations(layers: list[nn.Module], activation: str, preactivation: bool) -> list[nn.Module]:
    """layers[0], phi, layers[1], phi, ..., layers[-1], with a leading phi when ``preactivation``."""
    modules: list[nn.Module] = [make_activation(activation)] if preactivation else []
    for index, layer in enumerate(layers):
        if index > 0:
            modules.append(make_activation(activation))
        modules.append(layer)
    return modules


class LipschitzNet(ResidualBranch, nn.Sequential):
    """A sequence of spectrally normalised layers and 1-Lipschitz activations.

    Attributes:
        norm_order: The order p of the vector norm in which :meth:`lipschitz_bound` holds.
    """

    norm_order: float = 2.0
    #: Shape of one input sample with unknown sizes as None, e.g. (C, None, None); set by the builders.
    event_shape: tuple[int | None, ...] = ()

    def check_input_shape(self, x: Tensor, where: str) -> None:
        """Raise a ``ValueError`` naming ``where`` unless x has shape (B, *event_shape)."""
        sample_shape = tuple(x.shape[1:])
        matches = len(sample_shape) == len(self.event_shape) and all(
            expected is None or expected == size for expected, size in zip(self.event_shape, sample_shape, strict=False)
        )
        if not matches:
            expected = ", ".join(["B", *("*" if size is None else str(size) for size in self.event_shape)])
            raise ValueError(f"{where}: expected input of shape ({expected}), got {tuple(x.shape)}")

    def chain(self) -> list[nn.Module]:
        """The layers and activations of g, in order (a conditional branch leaves out its context maps)."""
        return list(self)

    def normalized_layers(self) -> list[SpectralNormLayer]:
        """The spectrally normalised layers, in order."""
        return [module for module in self.chain() if isinstance(module, SpectralNormLayer)]

    def linearize(self, x: Tensor) -> Linearization:
        """Compute g(x) and the factors of J_g(x) in one pass (one power-iteration step per layer in training).

        Arguments:
            x: Input with shape (B, *event_shape).
        """
        return self._linearized(x, None)

    def _linearized(self, x: Tensor, shifts: Iterator[Tensor] | None) -> Linearization:
        """:meth:`linearize`, with ``next(shifts)`` added to each linear layer's output when given (the context
        biases of a conditional branch: they move the pre-activations, not the structure of J_g)."""
        factors: list[tuple[nn.Module, Tensor] | Tensor] = []
        for module in self.chain():
            if isinstance(module, SpectralNormLayer):
                weight = module.normalized_weight(x)
                factors.append((module, weight))
                x = module.affine(x, weight)
                if shifts is not None:
                    x = x + next(shifts)
            else:
                x, derivative = module.forward_and_derivative(x)
                factors.append(derivative)
        return Linearization(output=x, factors=factors)

    def lipschitz_bound(self) -> float | None:
        """A certified bound on Lip(g): prod_i ||A~_i|| bounds times the activations' Lipschitz constants
        (thesis Eq. 4.6), or ``None`` if a module declares no ``lipschitz_constant`` or a convolution has not
        seen an input yet (its operator, and so its norm, depends on the input size).

        Each layer's bound is computed when first asked and cached (:meth:`SpectralNormLayer.operator_norm_bound`);
        it is at most the layer's ``coeff`` after :func:`~invertnet.layers.refine_spectral_norms`, and may exceed
        it before (the power iteration then lags behind the weights).
        """
        bound = 1.0
        for module in self.chain():
            if isinstance(module, SpectralNormLayer):
                if not module.v.numel():
                    return None
                bound *= module.operator_norm_bound()
            elif (constant := getattr(module, "lipschitz_constant", None)) is not None:
                bound *= float(constant)
            else:
                return None
        return bound

    def lipschitz_estimate(self) -> float:
        """prod_i of the layers' power-iteration estimates: a quick *estimate* of Lip(g), not a bound."""
        estimate = 1.0
        for layer in self.normalized_layers():
            estimate *= layer.operator_norm_estimate()
        return estimate


class LipschitzMLP(LipschitzNet):
    r"""g(x) = A_n phi(... phi(A_1 x + b_1) ...) + b_n with spectrally normalised linear layers.

    Arguments:
        features: Input and output size d; input shape (B, d).
        hidden_features: Width of the hidden layers.
        n_layers: Number of linear layers (at least 1).
        coeff: Spectral-normalisation coefficient c of every layer (Eq. 4.9), so Lip(g) <= c^n_layers.
        activation: ``"elu"``, ``"softplus"``, ``"lipswish"`` or ``"clipswish"`` (concatenated: the layer after
            each activation takes twice the features, so the parameter count grows).
        n_power_iterations: Power-iteration steps per training step (default :data:`POWER_ITERATIONS`).
        norm_orders: One order p for every interface, or n_layers + 1 orders (first = last) for the induced
            mixed norms of Residual Flows.
        preactivation: Apply the activation to the input first, as thesis Eq. 4.5 does.

    Examples:
        >>> g = LipschitzMLP(2, 64, n_layers=3, coeff=0.9)
        >>> g(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        n_layers: int = 3,
        coeff: float = 0.97,
        activation: str = "elu",
        *,
        n_power_iterations: int = POWER_ITERATIONS,
        norm_orders: float | Sequence[float] = 2.0,
        preactivation: bool = False,
    ) -> None:
        if n_layers < 1:
            raise ValueError(f"LipschitzMLP: n_layers must be at least 1, got {n_layers}")
        orders = _interface_orders(norm_orders, n_layers)
        sizes = [features] + [hidden_features] * (n_layers - 1) + [features]
        inputs = _layer_input_sizes(sizes, activation, preactivation, orders)
        layers = [
            SpectralNormLinear(
                inputs[i],
                sizes[i + 1],
                coeff=coeff,
                n_power_iterations=n_power_iterations,
                domain_order=orders[i],
                codomain_order=orders[i + 1],
            )
            for i in range(n_layers)
        ]
        super().__init__(*_interleave_activations(layers, activation, preactivation))
        self.norm_order = orders[0]
        self.event_shape = (features,)


class LipschitzConvNet(LipschitzNet):
    r"""g(x) = A_3 phi(A_2 phi(A_1 phi(x) + b_1) + b_2) + b_3 (thesis Eq. 4.5), any number of convolutions.

    Convolutions keep the spatial size (zero "same" padding); their operator norms on the input size are
    normalised (thesis 4.2.1).

    Arguments:
        channels: Input and output channels C; input shape (B, C, H, W).
        hidden_channels: Channels of the hidden feature maps.
        kernel_sizes: Kernel size of each convolution (the thesis uses 3-1-3).
        coeff, activation, norm_orders: As for :class:`LipschitzMLP`.
        n_power_iterations: Power-iteration steps per training step (default :data:`CONV_POWER_ITERATIONS`).
        preactivation: Apply the activation to the input first (thesis Eq. 4.5, the default).

    Examples:
        >>> g = LipschitzConvNet(4, 16, coeff=0.9)
        >>> g(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        coeff: float = 0.97,
        activation: str = "elu",
        *,
        n_power_iterations: int = CONV_POWER_ITERATIONS,
        norm_orders: float | Sequence[float] = 2.0,
        preactivation: bool = True,
    ) -> None:
        n_layers = len(kernel_sizes)
        if n_layers < 1:
            raise ValueError("LipschitzConvNet: need at least one kernel size")
        if any(kernel_size % 2 == 0 for kernel_size in kernel_sizes):
            raise ValueError(f"LipschitzConvNet: kernel sizes must be odd to keep the size, got {kernel_sizes}")
        orders = _interface_orders(norm_orders, n_layers)
        sizes = [channels] + [hidden_channels] * (n_layers - 1) + [channels]
        inputs = _layer_input_sizes(sizes, activation, preactivation, orders)
        layers = [
            SpectralNormConv2d(
                inputs[i],
                sizes[i + 1],
                kernel_size,
                coeff=coeff,
                n_power_iterations=n_power_iterations,
                domain_order=orders[i],
                codomain_order=orders[i + 1],
            )
            for i, kernel_size in enumerate(kernel_sizes)
        ]
        super().__init__(*_interleave_activations(layers, activation, preactivation))
        self.norm_order = orders[0]
        self.event_shape = (channels, None, None)
