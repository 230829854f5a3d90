"""The worked examples of the formalML tutorial "Inverse and Implicit Function Theorems" with invertnet's solvers:
run ``python examples/implicit_functions.py``.

- Example 12: x = cos x by fixed-point iteration, with the contraction rate sin(1) and the a-priori bound.
- Examples 6 and 8: the unit circle x^2 + y^2 = 1 as the implicit function y = g(x), found by Newton, with
  dy/dx = -x / y from implicit differentiation (Proposition 2) against the explicit sqrt(1 - x^2).
- Example 4 (Proposition 1): the inverse Jacobian of polar coordinates from one linear solve per tangent,
  against the derivative of the explicit inverse (r, theta) = (|p|, atan2(p_2, p_1)); and Newton reporting the
  singular Jacobian at the origin instead of an arbitrary angle.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from invertnet.solvers import fixed_point, implicit_fixed_point, inverse_jvp, newton

DOTTIE = 0.7390851332151607  # the fixed point of cos


def cosine_contraction(n: int = 20) -> dict[str, float]:
    """Example 12: iterate x <- cos x from x_0 = 0 on [0, 1], where |cos'| = |sin| <= sin 1 = L < 1. Returns the
    true error of x_n, the a-priori bound L^n / (1 - L) |x_1 - x_0| (Banach) and the a-posteriori bound
    |cos x_n - x_n| / (1 - L) that the solver reports (thesis Lemma 4.5)."""
    rate = math.sin(1.0)
    start = torch.zeros(1, 1, dtype=torch.float64)
    record = fixed_point(torch.cos, start, max_iter=n + 1, atol=1e-300, rtol=0.0, lipschitz=rate, strict=False)
    return {  # n + 1 evaluations of cos measure the residual of x_n, the value returned
        "rate": rate,
        "n": n,
        "error": abs(record.value.item() - DOTTIE),
        "a_priori_bound": rate**n / (1 - rate) * 1.0,  # |x_1 - x_0| = cos 0 - 0 = 1
        "a_posteriori_bound": record.error_bound.item(),  # type: ignore[union-attr]
    }


def circle_branch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Examples 6 and 8: for F(x, y) = x^2 + y^2 - 1 near (x, y) with y > 0, y = g(x) solves F = 0 (Newton
    from y = 1) and the implicit function is differentiated through the fixed point y = y - F(x, y) / 2
    (a contraction near the upper semicircle), giving dy/dx = -F_x / F_y = -x / y (Proposition 2)."""
    start = torch.ones_like(x)
    y = newton(lambda y: x.detach() ** 2 + y**2 - 1.0, start).value
    x = x.requires_grad_(True) if not x.requires_grad else x
    implicit, _ = implicit_fixed_point(lambda y, x: y - (x**2 + y**2 - 1.0) / 2.0, x, y, method="iteration")
    (slope,) = torch.autograd.grad(implicit.sum(), x)
    return implicit.detach(), slope


class PolarCoordinates(torch.nn.Module):
    """p = (r cos theta, r sin theta) for samples (B, 2) of (r, theta); det J = r (Example 1)."""

    def forward(self, q: Tensor) -> Tensor:
        r, theta = q[:, 0], q[:, 1]
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)

    def inverse(self, p: Tensor) -> Tensor:
        return torch.stack([p.norm(dim=1), torch.atan2(p[:, 1], p[:, 0])], dim=1)


def polar_inverse_jacobian(p: Tensor) -> tuple[Tensor, Tensor]:
    """Example 4: J_{F^{-1}}(p) column by column as solutions of J_F(q) w = e_i (Proposition 1), and the
    Jacobian of the explicit inverse by autograd, both (B, 2, 2)."""
    polar = PolarCoordinates()
    q = polar.inverse(p)
    columns = [inverse_jvp(polar, p, torch.eye(2, dtype=p.dtype)[i].expand_as(p), q).value for i in range(2)]
    from_solves = torch.stack(columns, dim=2)
    direct = torch.func.vmap(torch.func.jacrev(lambda point: polar.inverse(point[None])[0]))(p)
    return from_solves, direct


def main() -> None:
    contraction = cosine_contraction()
    print(
        f"x = cos x: rate L = sin 1 = {contraction['rate']:.4f}; x_{contraction['n']} has error "
        f"{contraction['error']:.2e} <= a-posteriori bound {contraction['a_posteriori_bound']:.2e} "
        f"<= a-priori bound {contraction['a_priori_bound']:.2e}"
    )
    x = torch.tensor([[0.5], [0.8]], dtype=torch.float64)
    y, slope = circle_branch(x.clone())
    print(f"circle: y = {y.flatten().tolist()} (sqrt(1 - x^2) = {torch.sqrt(1 - x**2).flatten().tolist()})")
    print(f"        dy/dx = {slope.flatten().tolist()} (-x / y = {(-x / y).flatten().tolist()})")
    p = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    from_solves, direct = polar_inverse_jacobian(p)
    print(f"polar: inverse Jacobian at (1, 1) by a solve {from_solves[0].tolist()}, directly {direct[0].tolist()}")
    origin = torch.zeros(1, 2, dtype=torch.float64)
    record = newton(PolarCoordinates(), torch.tensor([[1.0, 0.3]], dtype=torch.float64), origin, strict=False)
    print(f"polar: Newton for the origin: {record.summary()}")


if __name__ == "__main__":
    main()
