r"""A first-order estimate of the error of a computed inverse, beside the rigorous bound.

For y = F(x*) and a computed inverse x_hat, Taylor's theorem gives F(x_hat) - y = J_F(x_hat) (x_hat - x*) +
O(|x_hat - x*|^2), so

.. math:: x_{\text{hat}} - x^* \approx \delta = J_F(x_{\text{hat}})^{-1} \bigl(F(x_{\text{hat}}) - y\bigr),

the Newton correction at x_hat (Proposition 1 of the formalML IFT notes: J_{F^{-1}} = J_F^{-1}). For a composition
F = f_L o ... o f_1 the solve runs part by part, J_F^{-1} = J_{f_1}^{-1} ... J_{f_L}^{-1}, each Jacobian taken at the
part's input on the forward pass from x_hat:

* closed-form inverses: the derivative of the inverse, a Jacobian-vector product of ``f.inverse`` at f(x);
* parts with their own ``jacobian_solve(x, v)`` method (residual blocks: the Neumann / fixed-point iteration
  u = v - J_g(x) u, a contraction with the block's rate);
* any other iterative part: :func:`~invertnet.solvers.inverse_jvp` (LU or GMRES).

This is an *estimate*, not a bound: it is exact to first order, and is what a careful user compares with the
rigorous composed bound of :meth:`~invertnet.InvertibleSequential.inverse_result`. That bound multiplies the
parts' inverse Lipschitz bounds 1 / (1 - L_t) over the depth (Lemmas 4.5 and 4.6 of Behrmann et al. 2019),
which for a deep flow is vast even when every solve met its tolerance: the estimate says what the error is,
the bound what it cannot exceed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp

from invertnet.core import InvertibleModule, InvertibleSequential, frozen_mode
from invertnet.solvers.inverse_derivatives import inverse_jvp

__all__ = ["jacobian_solve", "linearized_inverse_error"]

#: Relative accuracy of the linear solves inside the estimate: an estimate needs one digit.
ESTIMATE_RTOL = 1e-2


def linearized_inverse_error(module: InvertibleModule, x_hat: Tensor, y: Tensor) -> Tensor:
    r"""The first-order error delta = J_F(x_hat)^{-1} (F(x_hat) - y) of a computed inverse x_hat of y.

    Arguments:
        module: The bijection F (evaluated in its current mode without advancing power iterations).
        x_hat: A computed inverse, shape (B, ...) of F's input.
        y: The points inverted, shape (B, ...) of F's output.

    Returns:
        delta with the shape of ``x_hat``: x_hat - F^{-1}(y) up to second-order terms (an estimate, see the module
        docstring). Its per-sample norm estimates the inverse's error.

    Examples:
        >>> from invertnet.layers import InvertibleResidual, LipschitzMLP
        >>> block = InvertibleResidual(LipschitzMLP(3, 16, n_layers=2, coeff=0.5)).double().eval()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> x_hat = x + 1e-6 * torch.randn_like(x)  # a perturbed inverse of y = F(x)
        >>> delta = linearized_inverse_error(block, x_hat, block(x))
        >>> bool((delta - (x_hat - x)).norm() < 1e-2 * (x_hat - x).norm())
        True
    """
    if x_hat.shape[0] != y.shape[0]:
        raise ValueError(
            f"linearized_inverse_error: x_hat has {x_hat.shape[0]} samples but y has {y.shape[0]}; give one x_hat per y"
        )
    with frozen_mode(module), torch.no_grad():
        residual = module(x_hat) - y
        return jacobian_solve(module, x_hat, residual)


def jacobian_solve(module: InvertibleModule, x: Tensor, v: Tensor) -> Tensor:
    """The solution u of J_F(x) u = v per sample (shapes: x of F's input, v of its output, u of x), part by part
    for an :class:`~invertnet.InvertibleSequential` (see the module docstring for the rule per part)."""
    with torch.no_grad():
        if isinstance(module, InvertibleSequential):
            return _sequential_solve(module, x, v)
        own_solve = getattr(module, "jacobian_solve", None)
        if callable(own_solve):
            return own_solve(x, v)
        if module.analytic_inverse:
            return jvp(module.inverse, (module(x),), (v,))[1]
        return inverse_jvp(module, module(x), v, x=x, atol=0.0, rtol=ESTIMATE_RTOL, strict=False).value


def _sequential_solve(module: InvertibleSequential, x: Tensor, v: Tensor) -> Tensor:
    inputs = [x]
    for part in module.parts[:-1]:
        inputs.append(part(inputs[-1]))
    for part, point in zip(reversed(module.parts), reversed(inputs), strict=True):
        v = jacobian_solve(part, point, v)
    return v
