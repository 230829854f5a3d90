"""The fourteen worked examples of the formalML tutorial "Inverse and Implicit Function Theorems" with
invertnet's solvers: run ``python examples/implicit_functions.py``.

- Example 1: polar coordinates, det J = r, and Newton reporting the singular Jacobian at the origin.
- Example 2: the exponential map (e^x cos y, e^x sin y): det J = e^{2x} > 0 everywhere, yet two Newton solves
  find two preimages of one point (locally, not globally, invertible).
- Example 3: the complex squaring map, its inverse Jacobian at (1, 1) by one solve, singular at the origin.
- Example 4 (Proposition 1): the inverse Jacobian of polar coordinates from one linear solve per tangent,
  against the derivative of the explicit inverse (r, theta) = (|p|, atan2(p_2, p_1)).
- Example 5: the inverse Jacobian of an affine coupling layer by one solve, against the closed-form inverse.
- Examples 6 and 8: the unit circle x^2 + y^2 = 1 as the implicit function y = g(x), found by Newton, with
  dy/dx = -x / y from implicit differentiation (Proposition 2) against the explicit sqrt(1 - x^2), and the
  second derivative -1 / y^3 of Remark 4.
- Example 7: two equations in four variables, y = g(x) and dg/dx = -F_y^{-1} F_x.
- Example 9: the elliptic curve y^2 = x^3 - x: the slope 11 / (2 sqrt 6) at x = 2, and ``SINGULAR`` at the
  origin, where F_y = 0.
- Examples 10 and 11 (Theorem 4): maximum entropy on the simplex by Lagrange multipliers (the uniform
  distribution, lambda = log 3 - 1), the nearest point of a plane, and a constraint that fails the constraint
  qualification reported ``SINGULAR``.
- Example 12: x = cos x by fixed-point iteration, with the contraction rate sin(1) and the a-priori bounds.
- Example 13: the fold of the critical points of x^3 - t x at t = 0, found by continuation.
- Example 14: a one-unit ReLU network's loss: Newton on the gradient map ends on a curve of minima, where the
  Hessian is singular (critical points are not isolated).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from invertnet.layers import AffineCoupling
from invertnet.solvers import (
    batched_jacobian,
    fixed_point,
    follow_solutions,
    implicit_derivatives,
    implicit_fixed_point,
    implicit_function,
    inverse_jvp,
    lagrange_multipliers,
    newton,
)

DOTTIE = 0.7390851332151607  # the fixed point of cos


def cosine_contraction(n: int = 20) -> dict[str, float]:
    """Example 12: iterate x <- cos x from x_0 = 0 on [0, 1], where |cos'| = |sin| <= sin 1 = L < 1. Returns the
    true error of x_n, the a-priori bound L^n / (1 - L) |x_1 - x_0| (Banach) and the a-posteriori bound
    |cos x_n - x_n| / (1 - L) that the solver reports (thesis Lemma 4.5)."""
    rate = math.sin(1.0)
    start = torch.zeros(1, 1, dtype=torch.float64)
    record = fixed_point(torch.cos, start, max_iter=n + 1, atol=1e-300, rtol=0.0, lipschitz=rate, strict=False)
    tight = fixed_point(torch.cos, start, atol=1e-10, rtol=0.0, lipschitz=rate)
    return {  # n + 1 evaluations of cos measure the residual of x_n, the value returned
        "rate": rate,
        "n": n,
        "error": abs(record.value.item() - DOTTIE),
        "a_priori_bound": rate**n / (1 - rate) * 1.0,  # |x_1 - x_0| = cos 0 - 0 = 1
        "a_posteriori_bound": record.error_bound.item(),  # type: ignore[union-attr]
        "iterations_for_1e-10": tight.iterations,
        "a_priori_iterations_for_1e-10": tight.iteration_bound.item(),  # type: ignore[union-attr]
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


def polar_determinant(q: Tensor) -> Tensor:
    """Example 1: det J of polar coordinates at (r, theta) samples (B, 2); it equals r."""
    return torch.linalg.det(batched_jacobian(PolarCoordinates(), q)[1])


def exponential_preimages() -> tuple[Tensor, Tensor, Tensor]:
    """Example 2: F(x, y) = (e^x cos y, e^x sin y) has det J = e^{2x} > 0, but Newton from two starts finds two
    preimages of (1, 0), (0, 0) and (0, 2 pi): ``(preimages (2, 2), their images (2, 2), det J (2,))``."""

    def exponential(q: Tensor) -> Tensor:
        return torch.exp(q[:, :1]) * torch.cat([torch.cos(q[:, 1:]), torch.sin(q[:, 1:])], dim=1)

    starts = torch.tensor([[0.2, 0.3], [0.2, 6.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    preimages = newton(exponential, starts, target).value
    return preimages, exponential(preimages), torch.linalg.det(batched_jacobian(exponential, preimages)[1])


def squaring_map(q: Tensor) -> Tensor:
    """Example 3: (x, y) -> (x^2 - y^2, 2 x y), the complex map z -> z^2 on samples (B, 2)."""
    return torch.stack([q[:, 0] ** 2 - q[:, 1] ** 2, 2 * q[:, 0] * q[:, 1]], dim=1)


class _Map(torch.nn.Module):
    def __init__(self, f) -> None:  # noqa: ANN001
        super().__init__()
        self.f = f

    def forward(self, q: Tensor) -> Tensor:
        return self.f(q)


def squaring_inverse_jacobian(q: Tensor) -> Tensor:
    """Example 3: J_{F^{-1}} at F(q) by one solve per column, (B, 2, 2); at (1, 1) it is [[1, 1], [-1, 1]] / 4."""
    columns = [
        inverse_jvp(_Map(squaring_map), squaring_map(q), torch.eye(2, dtype=q.dtype)[i].expand_as(q), q).value
        for i in range(2)
    ]
    return torch.stack(columns, dim=2)


def coupling_inverse_jacobian() -> tuple[Tensor, Tensor]:
    """Example 5: the inverse Jacobian of an affine coupling layer by one solve per column, and by autograd
    through its closed-form inverse, both (1, 4, 4)."""
    torch.manual_seed(0)
    layer = AffineCoupling((4,), "half", hidden=8).double().eval()
    with torch.no_grad():
        layer.conditioner[-1].weight.normal_(0.0, 0.5)
    y = torch.randn(1, 4, dtype=torch.float64)
    columns = [inverse_jvp(layer, y, torch.eye(4, dtype=y.dtype)[i].expand_as(y)).value for i in range(4)]
    direct = torch.func.jacrev(lambda point: layer.inverse(point[None])[0])(y[0])
    return torch.stack(columns, dim=2), direct[None]


def circle_curvature(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Examples 6 and 8 with Remark 4: y = g(x) on the upper semicircle by :func:`implicit_function`, and g', g''
    from :func:`implicit_derivatives` (-x / y and -1 / y^3), each (B, 1)."""
    circle = lambda x, y: x**2 + y**2 - 1  # noqa: E731
    y = implicit_function(circle, x, torch.ones_like(x)).value.detach()
    first, second = implicit_derivatives(circle, x, y)
    return y, first.reshape(-1, 1), second.reshape(-1, 1)


def two_equations_in_four_variables() -> tuple[Tensor, Tensor, Tensor]:
    """Example 7: F(x, y) = (x1 + y1^2 + y2 - 3, x2 y1 + y2^2 - 2) = 0 near (x, y) = (1, 1, 1, 1), where
    F_y = [[2, 1], [1, 2]] is invertible: ``(g(x) (1, 2), dg/dx by autograd (2, 2), -F_y^{-1} F_x (2, 2))``."""

    def equations(x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([x[:, 0] + y[:, 0] ** 2 + y[:, 1] - 3, x[:, 1] * y[:, 0] + y[:, 1] ** 2 - 2], dim=1)

    x = torch.ones(1, 2, dtype=torch.float64)
    y = implicit_function(equations, x, torch.full((1, 2), 1.2, dtype=torch.float64)).value
    solve = lambda point: implicit_function(equations, point, y.detach()).value  # noqa: E731
    derivative = torch.autograd.functional.jacobian(solve, x)[0, :, 0, :]  # (2 outputs, 2 inputs)
    formula = -torch.linalg.inv(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    return y.detach(), derivative, formula


def elliptic_curve() -> dict[str, object]:
    """Example 9: F(x, y) = y^2 - x^3 + x. At x = 2, y = sqrt 6 and dy/dx = (3 x^2 - 1) / (2 y) = 11 / (2 sqrt 6);
    at the origin (on the curve) F_y = 2 y = 0, where the implicit function theorem does not apply."""
    curve = lambda x, y: y**2 - x**3 + x  # noqa: E731
    x = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    y = implicit_function(curve, x, torch.tensor([[2.0]], dtype=torch.float64)).value
    (slope,) = torch.autograd.grad(y.sum(), x)
    origin = implicit_function(curve, torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1).double(), strict=False)
    return {"y": y.item(), "slope": slope.item(), "origin_status": origin.status}


def maximum_entropy(n: int = 3) -> tuple[Tensor, Tensor]:
    """Example 10: minimise sum p log p subject to sum p = 1: ``(p (1, n), lambda (1, 1))``, uniform and log n - 1."""
    solution = lagrange_multipliers(
        lambda p: (p * p.log()).sum(),
        lambda p: p.sum(dim=0, keepdim=True) - 1,
        torch.linspace(0.1, 0.5, n, dtype=torch.float64)[None],
    )
    return solution.x, solution.multipliers


def nearest_points() -> dict[str, object]:
    """Example 11: the point of the plane x1 + x2 + x3 = 1 nearest the origin, (1, 1, 1) / 3 with lambda = -2/3;
    and the same sphere written as h = (|x|^2 - 1)^2, whose Jacobian vanishes on it: no multiplier exists
    (the constraint qualification fails), reported ``SINGULAR``."""
    distance = lambda x: (x**2).sum()  # noqa: E731
    plane = lagrange_multipliers(distance, lambda x: x.sum(dim=0, keepdim=True) - 1, torch.rand(1, 3).double())
    degenerate = lagrange_multipliers(
        lambda x: x[0],
        lambda x: ((x**2).sum(dim=0, keepdim=True) - 1) ** 2,
        torch.tensor([[-0.9, 0.1, 0.1]], dtype=torch.float64),
        strict=False,
    )
    return {"point": plane.x, "multiplier": plane.multipliers, "degenerate_status": degenerate.record.status}


def fold() -> tuple[float, float]:
    """Example 13: the critical points x = +-sqrt(t / 3) of x^3 - t x, followed from t = 1 through the fold at
    t = 0 (where F_x = 6 x = 0): ``(t at the fold, the smallest t on the path)``."""
    path = follow_solutions(lambda t, x: 3 * x**2 - t, 1.0, torch.tensor([[0.6]], dtype=torch.float64), step=-0.1)
    return path.folds[0][0], path.parameters.min().item()


def relu_landscape() -> dict[str, object]:
    """Example 14: loss L(w) = (w2 relu(w1 x) - y)^2 at x = 1, y = 1; Newton on the gradient map from (0.5, 1.5)
    reaches a minimum on the curve w1 w2 = 1, where the Hessian (the gradient map's Jacobian) has rank 1."""

    def gradient(w: Tensor) -> Tensor:
        return torch.func.vmap(torch.func.grad(lambda v: (v[1] * torch.relu(v[0]) - 1.0) ** 2))(w)

    record = newton(gradient, torch.tensor([[0.5, 1.5]], dtype=torch.float64), strict=False)
    hessian = batched_jacobian(gradient, record.value)[1][0]
    return {"point": record.value[0], "status": record.status, "hessian_rank": int(torch.linalg.matrix_rank(hessian))}


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
    determinants = polar_determinant(torch.tensor([[0.5, 1.0], [2.0, 0.3]], dtype=torch.float64))
    print(f"polar: det J at r = 0.5, 2 is {determinants.tolist()}")
    preimages, images, determinants = exponential_preimages()
    print(f"exp map: preimages {preimages.tolist()} of {images.tolist()}, det J {determinants.tolist()}")
    print(f"z^2: inverse Jacobian at (1, 1) {squaring_inverse_jacobian(torch.ones(1, 2).double())[0].tolist()}")
    from_solve, direct = coupling_inverse_jacobian()
    print(f"coupling: inverse Jacobian by solves matches autograd: {torch.allclose(from_solve, direct)}")
    y, first, second = circle_curvature(torch.tensor([[0.6]], dtype=torch.float64))
    print(f"circle at x = 0.6: y = {y.item():.6f}, g' = {first.item():.6f}, g'' = {second.item():.6f}")
    g, derivative, formula = two_equations_in_four_variables()
    print(f"two equations: g(1, 1) = {g.tolist()}, dg/dx = {derivative.tolist()} (formula {formula.tolist()})")
    curve = elliptic_curve()
    print(f"elliptic curve: y(2) = {curve['y']:.6f}, slope {curve['slope']:.6f}; origin: {curve['origin_status'].name}")
    p, multiplier = maximum_entropy()
    print(f"maximum entropy: p = {p.tolist()}, lambda = {multiplier.item():.6f} (log 3 - 1 = {math.log(3) - 1:.6f})")
    nearest = nearest_points()
    print(f"nearest point of the plane: {nearest['point'].tolist()}; degenerate: {nearest['degenerate_status'].name}")
    t_fold, t_min = fold()
    print(f"fold of x^3 - t x: at t = {t_fold:.2e}; the path never goes below t = {t_min:.2e}")
    landscape = relu_landscape()
    print(
        f"ReLU loss: Newton ends at {landscape['point'].tolist()} ({landscape['status'].name}), Hessian rank "
        f"{landscape['hessian_rank']}"
    )


if __name__ == "__main__":
    main()
