"""Iterative solvers that report iterations, residuals and convergence, and never fail silently."""

from invertnet.solvers.fixed_point import default_tolerances as default_tolerances
from invertnet.solvers.fixed_point import fixed_point as fixed_point
from invertnet.solvers.implicit import attach_implicit_gradient as attach_implicit_gradient
from invertnet.solvers.implicit import attach_inverse_gradient as attach_inverse_gradient
from invertnet.solvers.triangular import attach_triangular_inverse_gradient as attach_triangular_inverse_gradient
from invertnet.solvers.triangular import sequential_solve as sequential_solve
from invertnet.solvers.triangular import triangular_newton as triangular_newton

__all__ = [
    "attach_implicit_gradient",
    "attach_inverse_gradient",
    "attach_triangular_inverse_gradient",
    "default_tolerances",
    "fixed_point",
    "sequential_solve",
    "triangular_newton",
]
