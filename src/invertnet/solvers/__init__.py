"""Iterative solvers that report iterations, residuals and convergence, and never fail silently.

``fixed_point`` (contractions), ``newton`` (dense or Jacobian-free Newton-Krylov), ``gmres``; derivatives of
inverses (``inverse_jvp``, ``inverse_vjp``); implicit differentiation (``implicit_fixed_point``,
``attach_implicit_gradient``) and the triangular solves of MintNet.
"""

from invertnet.solvers.fixed_point import default_tolerances as default_tolerances
from invertnet.solvers.fixed_point import fixed_point as fixed_point
from invertnet.solvers.implicit import attach_implicit_gradient as attach_implicit_gradient
from invertnet.solvers.implicit import attach_inverse_gradient as attach_inverse_gradient
from invertnet.solvers.implicit import implicit_fixed_point as implicit_fixed_point
from invertnet.solvers.inverse_derivatives import inverse_jvp as inverse_jvp
from invertnet.solvers.inverse_derivatives import inverse_vjp as inverse_vjp
from invertnet.solvers.krylov import default_max_condition as default_max_condition
from invertnet.solvers.krylov import gmres as gmres
from invertnet.solvers.newton import batched_jacobian as batched_jacobian
from invertnet.solvers.newton import newton as newton
from invertnet.solvers.triangular import attach_triangular_inverse_gradient as attach_triangular_inverse_gradient
from invertnet.solvers.triangular import sequential_solve as sequential_solve
from invertnet.solvers.triangular import triangular_newton as triangular_newton

__all__ = [
    "attach_implicit_gradient",
    "attach_inverse_gradient",
    "attach_triangular_inverse_gradient",
    "batched_jacobian",
    "default_max_condition",
    "default_tolerances",
    "fixed_point",
    "gmres",
    "implicit_fixed_point",
    "inverse_jvp",
    "inverse_vjp",
    "newton",
    "sequential_solve",
    "triangular_newton",
]
