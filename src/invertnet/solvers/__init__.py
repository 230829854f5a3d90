"""Iterative solvers that report iterations, residuals and convergence, and never fail silently.

``fixed_point`` (contractions), ``newton`` (dense or Jacobian-free Newton-Krylov), ``gmres``, the triangular
solves of MintNet (``triangular_newton``, ``sequential_solve``, with the condition estimate
``triangular_condition``); derivatives of inverses (``inverse_jvp``, ``inverse_vjp``) and implicit
differentiation (``implicit_fixed_point``, ``attach_implicit_gradient``). What they share (tolerances,
budgets, option checks, the status decision, Jacobians and condition numbers) is in
:mod:`invertnet.solvers.common`. Every solver takes ``strict`` and raises :class:`~invertnet.ConvergenceError`
by default.
"""

from invertnet.core import attach_implicit_gradient as attach_implicit_gradient
from invertnet.solvers.common import batched_jacobian as batched_jacobian
from invertnet.solvers.common import condition_numbers as condition_numbers
from invertnet.solvers.common import decide_status as decide_status
from invertnet.solvers.common import default_max_condition as default_max_condition
from invertnet.solvers.common import default_tolerances as default_tolerances
from invertnet.solvers.fixed_point import a_priori_iterations as a_priori_iterations
from invertnet.solvers.fixed_point import fixed_point as fixed_point
from invertnet.solvers.implicit import implicit_fixed_point as implicit_fixed_point
from invertnet.solvers.implicit import residual_transposed_solve as residual_transposed_solve
from invertnet.solvers.implicit_function import LagrangeSolution as LagrangeSolution
from invertnet.solvers.implicit_function import SolutionPath as SolutionPath
from invertnet.solvers.implicit_function import follow_solutions as follow_solutions
from invertnet.solvers.implicit_function import implicit_derivatives as implicit_derivatives
from invertnet.solvers.implicit_function import implicit_function as implicit_function
from invertnet.solvers.implicit_function import lagrange_multipliers as lagrange_multipliers
from invertnet.solvers.inverse_derivatives import inverse_jvp as inverse_jvp
from invertnet.solvers.inverse_derivatives import inverse_vjp as inverse_vjp
from invertnet.solvers.inverse_error import jacobian_solve as jacobian_solve
from invertnet.solvers.inverse_error import linearized_inverse_error as linearized_inverse_error
from invertnet.solvers.krylov import gmres as gmres
from invertnet.solvers.newton import newton as newton
from invertnet.solvers.triangular import sequential_solve as sequential_solve
from invertnet.solvers.triangular import triangular_condition as triangular_condition
from invertnet.solvers.triangular import triangular_newton as triangular_newton
from invertnet.solvers.triangular import triangular_transposed_solve as triangular_transposed_solve

__all__ = [
    "lagrange_multipliers",
    "implicit_function",
    "implicit_derivatives",
    "follow_solutions",
    "SolutionPath",
    "LagrangeSolution",
    "a_priori_iterations",
    "attach_implicit_gradient",
    "batched_jacobian",
    "condition_numbers",
    "decide_status",
    "default_max_condition",
    "default_tolerances",
    "fixed_point",
    "gmres",
    "implicit_fixed_point",
    "inverse_jvp",
    "inverse_vjp",
    "jacobian_solve",
    "linearized_inverse_error",
    "newton",
    "residual_transposed_solve",
    "sequential_solve",
    "triangular_condition",
    "triangular_newton",
    "triangular_transposed_solve",
]
