"""The generic solver suite: every solver on every problem it applies to, through the same checks (STYLE.md 4-5).

A problem is a map F acting per sample with a target y; a solver adapter solves F(x) = y and says in which
per-sample norm it measures the residual. The expected status of each (problem, solver) pair is listed
explicitly, so a success is as much a claim as a reported failure (lineax ``tests/test_singular.py``).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from invertnet import ConvergenceError, InverseResult, SolverStatus
from invertnet.solvers import fixed_point, gmres, newton, sequential_solve, triangular_newton

DOUBLE = torch.float64
BATCH, DIM = 3, 4


@dataclass
class Problem:
    """F(x) = y per sample; ``diagonal`` (triangular problems) is the diagonal of J_F and ``min_slope`` its
    lower bound; ``lipschitz`` bounds Lip(F - id) when that is a contraction; ``matrix`` for linear maps."""

    f: Callable[[torch.Tensor], torch.Tensor]
    y: torch.Tensor
    x0: torch.Tensor
    lipschitz: float | None = None
    diagonal: Callable[[torch.Tensor], torch.Tensor] | None = None
    min_slope: float | None = None
    linear: bool = False


def _matrix(scale: float) -> torch.Tensor:
    """A fixed random matrix with spectral norm ``scale``."""
    a = torch.randn(DIM, DIM, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
    return scale * a / torch.linalg.matrix_norm(a, ord=2)


def _apply(matrix: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x @ matrix.T


def _targets() -> torch.Tensor:
    return torch.randn(BATCH, DIM, dtype=DOUBLE, generator=torch.Generator().manual_seed(2))


def _contraction() -> Problem:
    """F(x) = x + 0.6 tanh(A x), ||A|| = 1: Lip(F - id) = 0.6 (Banach: one root, found by iteration)."""
    a = _matrix(1.0)
    y = _targets()
    return Problem(lambda x: x + 0.6 * torch.tanh(x @ a.T), y, y.clone(), lipschitz=0.6)


def _linear() -> Problem:
    """F(x) = (I + B) x with ||B|| = 0.3: well conditioned, also a contraction in fixed-point form."""
    matrix = torch.eye(DIM, dtype=DOUBLE) + _matrix(0.3)
    y = _targets()
    return Problem(_apply(matrix), y, y.clone(), lipschitz=0.3, linear=True)


def _smooth() -> Problem:
    """F(x) = x^3 + x + 0.5 A x with ||A|| = 1, from a far start: not a contraction, Newton's problem."""
    a = _matrix(1.0)
    y = 5 * _targets()
    return Problem(lambda x: x**3 + x + 0.5 * x @ a.T, y, torch.zeros_like(y))


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def _triangular() -> Problem:
    """F_p(x) = x_p / 2 + tanh(x_p + x_{p-1}): lower triangular Jacobian with diagonal >= 1/2."""
    y = 2 * _targets()

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + torch.tanh(x + _shift(x))

    def diagonal(x: torch.Tensor) -> torch.Tensor:
        return 0.5 + 1 - torch.tanh(x + _shift(x)) ** 2

    return Problem(f, y, y.clone(), diagonal=diagonal, min_slope=0.5)


def _singular() -> Problem:
    """F(x) = P x with P the projection on the first two coordinates, y outside the range: no solution."""
    projection = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DOUBLE))
    y = _targets()
    return Problem(_apply(projection), y, torch.zeros_like(y), linear=True)


def _divergent() -> Problem:
    """F(x) = -2x: harmless for Newton and GMRES, but x <- y - g(x) with g(x) = -3x expands threefold."""
    y = _targets()
    return Problem(lambda x: -2 * x, y, y.clone(), linear=True)


def _decreasing_triangular() -> Problem:
    """F(x) = -2 x claimed increasing with slope >= 1: the triangular solvers' precondition is violated."""
    y = _targets()
    return Problem(lambda x: -2 * x, y, y.clone(), diagonal=lambda x: torch.full_like(x, -2.0), min_slope=1.0)


def _expanding_triangular() -> Problem:
    """F(x) = -x^3 - x claimed increasing (diagonal 3 x^2 + 1): both triangular solvers run away from the root."""
    y = _targets()
    return Problem(lambda x: -(x**3) - x, y, y.clone(), diagonal=lambda x: 3 * x**2 + 1, min_slope=1.0)


#: Dimension of the ill-conditioned triangular problem: cond_inf(J) is about 3 * 2^n.
ILL_DIM = 48


def _ill_conditioned_triangular() -> Problem:
    """F_p(x) = x_p + 2 x_{p-1} + tanh(x_p) / 10: triangular with diagonal in [1, 1.1], a unique root, and
    J^{-1} with entries up to 2^(n-1), so cond_inf(J) ~ 1e15 > 1 / (1000 eps): a small residual leaves about
    cond * eps ~ 0.1 of error. The parallel iteration's transient grows like 2^k (Jacobi on a bidiagonal)."""
    x_true = torch.randn(BATCH, ILL_DIM, dtype=DOUBLE, generator=torch.Generator().manual_seed(4))

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 2 * _shift(x) + 0.1 * torch.tanh(x)

    def diagonal(x: torch.Tensor) -> torch.Tensor:
        return 1 + 0.1 * (1 - torch.tanh(x) ** 2)

    y = f(x_true)
    return Problem(f, y, y.clone(), diagonal=diagonal, min_slope=1.0)


def _with_nan(problem: Problem) -> Problem:
    y = problem.y.clone()
    y[1, 2] = float("nan")
    problem.y = y
    problem.x0 = torch.where(torch.isfinite(problem.x0), problem.x0, 0.0)
    return problem


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "contraction": _contraction,
    "linear": _linear,
    "smooth": _smooth,
    "triangular": _triangular,
    "singular": _singular,
    "divergent": _divergent,
    "decreasing_triangular": _decreasing_triangular,
    "expanding_triangular": _expanding_triangular,
    "ill_conditioned_triangular": _ill_conditioned_triangular,
    "nan_contraction": lambda: _with_nan(_contraction()),
    "nan_linear": lambda: _with_nan(_linear()),
    "nan_triangular": lambda: _with_nan(_triangular()),
}


@dataclass
class Solver:
    """An adapter: ``solve(problem, strict)`` and the order of the norm its residual is measured in."""

    solve: Callable[[Problem, bool], InverseResult]
    norm: float


def _fixed_point(method: str) -> Solver:
    def solve(p: Problem, strict: bool) -> InverseResult:
        return fixed_point(lambda x: x - (p.f(x) - p.y), p.x0, lipschitz=p.lipschitz, method=method, strict=strict)

    return Solver(solve, 2.0)


def _newton(jacobian: str) -> Solver:
    return Solver(lambda p, strict: newton(p.f, p.x0, p.y, jacobian=jacobian, strict=strict), 2.0)


def _gmres(p: Problem, strict: bool) -> InverseResult:
    return gmres(p.f, p.y, strict=strict)


def _map_and_diagonal(p: Problem) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return lambda x: (p.f(x), p.diagonal(x))


def _triangular_newton(p: Problem, strict: bool) -> InverseResult:
    return triangular_newton(_map_and_diagonal(p), p.y, p.min_slope, x0=p.x0, strict=strict)


def _sequential(p: Problem, strict: bool) -> InverseResult:
    return sequential_solve(_map_and_diagonal(p), p.y, p.min_slope, strict=strict)


SOLVERS: dict[str, Solver] = {
    "fixed_point": _fixed_point("iteration"),
    "anderson": _fixed_point("anderson"),
    "newton_dense": _newton("dense"),
    "newton_krylov": _newton("krylov"),
    "gmres": Solver(_gmres, 2.0),
    "triangular_newton": Solver(_triangular_newton, math.inf),
    "sequential": Solver(_sequential, math.inf),
}

S = SolverStatus
#: (problem, solver) -> expected status, for every pair where the solver applies: fixed-point solvers need
#: F - id contractive or report why not, GMRES needs a linear map, triangular solvers a triangular one.
EXPECTED: dict[tuple[str, str], SolverStatus] = {
    **{("contraction", s): S.SUCCESS for s in ("fixed_point", "anderson", "newton_dense", "newton_krylov")},
    **{("linear", s): S.SUCCESS for s in ("fixed_point", "anderson", "newton_dense", "newton_krylov", "gmres")},
    **{("smooth", s): S.SUCCESS for s in ("newton_dense", "newton_krylov")},
    ("smooth", "fixed_point"): S.DIVERGED,  # x <- y - x^3 - 0.5 A x blows up from the far start
    **{("triangular", s): S.SUCCESS for s in ("triangular_newton", "sequential", "newton_dense", "newton_krylov")},
    ("singular", "newton_dense"): S.SINGULAR,
    ("singular", "newton_krylov"): S.SINGULAR,
    ("singular", "gmres"): S.SINGULAR,  # the Hessenberg matrix's condition number bounds cond(P) = inf
    ("singular", "fixed_point"): S.MAX_ITER,
    ("divergent", "fixed_point"): S.DIVERGED,
    ("divergent", "newton_dense"): S.SUCCESS,
    ("divergent", "gmres"): S.SUCCESS,
    ("decreasing_triangular", "triangular_newton"): S.DIVERGED,
    ("decreasing_triangular", "sequential"): S.MAX_ITER,  # its brackets walk away from the root, more slowly
    **{("expanding_triangular", s): S.DIVERGED for s in ("triangular_newton", "sequential")},
    ("ill_conditioned_triangular", "sequential"): S.ILL_CONDITIONED,  # residual 1e-12, error ~1e-4
    ("ill_conditioned_triangular", "triangular_newton"): S.DIVERGED,  # the 2^k transient, before n steps
    **{("nan_contraction", s): S.NONFINITE for s in ("fixed_point", "anderson", "newton_dense", "newton_krylov")},
    ("nan_linear", "gmres"): S.NONFINITE,
    **{("nan_triangular", s): S.NONFINITE for s in ("triangular_newton", "sequential")},
}
CASES = sorted(EXPECTED)


def test_every_solver_and_problem_is_exercised():
    assert {solver for _, solver in EXPECTED} == set(SOLVERS)
    assert {problem for problem, _ in EXPECTED} == set(PROBLEMS)


@pytest.fixture(params=CASES, ids=[f"{problem}-{solver}" for problem, solver in CASES])
def case(request):
    problem_name, solver_name = request.param
    return PROBLEMS[problem_name](), SOLVERS[solver_name], EXPECTED[request.param]


def _residual(problem: Problem, x: torch.Tensor, order: float) -> torch.Tensor:
    return torch.linalg.vector_norm((problem.f(x) - problem.y).flatten(1), ord=order, dim=1)


def test_status_and_record(case):
    problem, solver, expected = case
    result = solver.solve(problem, False)
    assert result.status is expected, result.summary()
    assert result.value.shape == problem.y.shape
    assert result.converged.shape == (BATCH,) and result.converged.dtype == torch.bool
    assert result.residual is not None and result.residual.shape == (BATCH,)
    assert result.residual_history
    assert result.success == (expected is S.SUCCESS)
    if expected is S.NONFINITE:  # found before or at the first evaluation
        assert not result.converged.all()
        return
    assert result.iterations >= 1
    # the recorded residual is that of the returned value
    torch.testing.assert_close(result.residual, _residual(problem, result.value, solver.norm), rtol=1e-6, atol=1e-14)
    if expected is S.SUCCESS:
        assert result.converged.all()
        tolerance = 1e-10 * (1 + torch.linalg.vector_norm(problem.y.flatten(1), ord=solver.norm, dim=1))
        assert (result.residual <= tolerance).all()
    else:
        assert not result.converged.all()


def test_strict_raises_naming_the_status(case):
    problem, solver, expected = case
    if expected is S.SUCCESS:
        assert solver.solve(problem, True).status is S.SUCCESS
        return
    with pytest.raises(ConvergenceError, match=expected.name.lower()) as caught:
        solver.solve(problem, True)
    assert caught.value.result.status is expected
    assert expected.value in str(caught.value)


def test_error_bound_holds_where_a_lipschitz_bound_is_known():
    """Lemma 4.5 of the thesis restarted at x: |x - x*| <= |F(x) - y| / (1 - L), checked against a tight solve."""
    problem = _contraction()
    loose = fixed_point(lambda x: x - (problem.f(x) - problem.y), problem.x0, atol=1e-4, rtol=0.0, lipschitz=0.6)
    exact = fixed_point(lambda x: x - (problem.f(x) - problem.y), problem.x0, atol=1e-14, rtol=0.0, lipschitz=0.6)
    distance = torch.linalg.vector_norm(loose.value - exact.value, dim=1)
    assert loose.error_bound is not None and (distance <= loose.error_bound).all()
    assert (distance > 0).all()


def test_gmres_gives_the_same_answer_twice():
    """Restarted GMRES solves the same small least-squares problems each time: bit-identical results."""
    from invertnet.solvers import gmres

    generator = torch.Generator().manual_seed(3)
    a = torch.randn(4, 12, 12, generator=generator, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    runs = [gmres(lambda v: (a @ v.unsqueeze(-1)).squeeze(-1), b, restart=3, max_iter=60, strict=False) for _ in "ab"]
    assert torch.equal(runs[0].value, runs[1].value) and runs[0].iterations == runs[1].iterations


#: What each solver's record says its condition number is (None: it measures no conditioning).
CONDITION_KIND = {
    "fixed_point": None,
    "anderson": None,
    "newton_dense": "exact",
    "newton_krylov": "lower_bound",
    "gmres": "lower_bound",
    "triangular_newton": "estimate",
    "sequential": "estimate",
}


def test_the_condition_figure_is_present_and_named(case):
    """Every conditioning solver reports a condition number per sample and names its kind in the record and
    the summary; triangular solves skip it after non-finite values or divergence (no solution to judge)."""
    problem, solver, expected = case
    result = solver.solve(problem, False)
    kind = CONDITION_KIND[next(name for name, s in SOLVERS.items() if s is solver)]
    if kind is None or (kind == "estimate" and expected in (S.NONFINITE, S.DIVERGED)):
        assert result.condition_number is None and result.condition_kind is None
        return
    assert result.condition_kind == kind and result.condition_number.shape == (BATCH,)
    assert f"condition number ({kind.replace('_', ' ')})" in result.summary()
    if expected is not S.NONFINITE:
        assert (result.condition_number >= 1 - 1e-12).all()


def test_every_failure_status_a_solver_can_reach_is_exercised():
    """Divergence for the solvers whose residual can grow (Newton and GMRES decrease it monotonically), NaN
    for every solver, and ill-conditioning for the triangular ones."""
    reached = {(solver, status) for (_, solver), status in EXPECTED.items()}
    for solver in ("fixed_point", "triangular_newton", "sequential"):
        assert (solver, S.DIVERGED) in reached
    assert {solver for solver, status in reached if status is S.NONFINITE} == set(SOLVERS)
    assert {("triangular_newton", S.SUCCESS), ("sequential", S.ILL_CONDITIONED)} <= reached


def test_an_ill_conditioned_triangular_solve_estimates_its_condition_and_forward_error():
    """The estimate is within a factor 3 of the exact cond_inf(J) (Hager's lower estimate, times the exact
    |J|_inf here), and the forward-error estimate |J^{-1}|_inf |r|_inf is not below the measured error."""
    problem = _ill_conditioned_triangular()
    result = sequential_solve(_map_and_diagonal(problem), problem.y, problem.min_slope, strict=False)
    x_true = torch.randn(BATCH, ILL_DIM, dtype=DOUBLE, generator=torch.Generator().manual_seed(4))
    jacobian = torch.func.vmap(torch.func.jacrev(lambda v: problem.f(v.unsqueeze(0)).squeeze(0)))(result.value)
    exact = torch.linalg.cond(jacobian, p=math.inf)
    assert (exact / 3 <= result.condition_number).all() and (result.condition_number <= 3 * exact).all()
    error = (result.value - x_true).abs().amax(dim=1)
    assert (result.residual <= 1e-10).all() and (error > 1e-8).all()  # small residual, large error
    assert (result.forward_error_estimate >= error).all()
    with pytest.raises(ConvergenceError, match="ill_conditioned") as caught:
        sequential_solve(_map_and_diagonal(problem), problem.y, problem.min_slope)
    assert caught.value.result.forward_error_estimate is not None
    assert "forward error estimate" in str(caught.value)


def test_gmres_finds_a_numerically_singular_system_its_krylov_space_cannot_see():
    """A = diag(1, 1e-14), b = (1, 1e-14): one Arnoldi step meets atol with x = (1, 1e-14) (the solution is
    (1, 1)) and a Hessenberg matrix of condition 1; the probe's lower bound 1e14 makes it SINGULAR."""
    matrix = torch.diag(torch.tensor([1.0, 1e-14], dtype=DOUBLE))
    b = torch.tensor([[1.0, 1e-14]], dtype=DOUBLE)
    result = gmres(_apply(matrix), b, strict=False)
    assert result.status is S.SINGULAR and not result.converged.any()
    assert result.condition_kind == "lower_bound"
    # cond(A) = 1e14; sigma_min(H) = 1e-14 carries a rounding error of about eps * sigma_max, 1e-2 of itself
    assert 0.99e14 <= result.condition_number.item() <= 1.01e14
    assert gmres(_apply(matrix), b, strict=False, condition_probe=0).status is S.SUCCESS  # without the probe
    with pytest.raises(ConvergenceError, match="singular"):
        gmres(_apply(matrix), b)


BAD_OPTIONS = [
    ("atol", float("nan")),
    ("atol", float("inf")),
    ("rtol", -1e-3),
    ("rtol", float("nan")),
    ("max_iter", 0),
    ("max_iter", 2.5),
    ("max_iter", float("nan")),
]


@pytest.mark.parametrize("solver_name", sorted(SOLVERS))
@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_every_solver_refuses_non_finite_negative_or_fractional_options(solver_name, option, value):
    problem = _triangular()
    map_and_diagonal = _map_and_diagonal(problem)
    calls = {
        "fixed_point": lambda **o: fixed_point(lambda x: x - (problem.f(x) - problem.y), problem.x0, **o),
        "anderson": lambda **o: fixed_point(lambda x: x, problem.x0, method="anderson", **o),
        "newton_dense": lambda **o: newton(problem.f, problem.x0, problem.y, jacobian="dense", **o),
        "newton_krylov": lambda **o: newton(problem.f, problem.x0, problem.y, jacobian="krylov", **o),
        "gmres": lambda **o: gmres(problem.f, problem.y, **o),
        "triangular_newton": lambda **o: triangular_newton(map_and_diagonal, problem.y, 0.5, **o),
        "sequential": lambda **o: sequential_solve(
            map_and_diagonal,
            problem.y,
            0.5,
            **{"max_iter_per_coordinate" if k == "max_iter" else k: v for k, v in o.items()},
        ),
    }
    with pytest.raises(ValueError, match=option if solver_name != "sequential" else option.split("_")[0]):
        calls[solver_name](**{option: value})


@pytest.mark.parametrize("max_condition", [float("nan"), 0.5, -1.0])
def test_conditioning_solvers_refuse_a_meaningless_max_condition(max_condition):
    problem = _triangular()
    for call in (
        lambda: newton(problem.f, problem.x0, problem.y, max_condition=max_condition),
        lambda: gmres(problem.f, problem.y, max_condition=max_condition),
        lambda: triangular_newton(_map_and_diagonal(problem), problem.y, 0.5, max_condition=max_condition),
    ):
        with pytest.raises(ValueError, match="max_condition"):
            call()


def test_gmres_reads_the_device_about_once_per_product(request):
    # A GPU waits for every read of a tensor's value by Python: an Arnoldi step reads its stop test once, a restart
    # cycle its residuals once, the record its status: fewer reads than products (each cycle ends with a product).
    a = torch.eye(20, dtype=torch.float64) + 0.05 * torch.randn(20, 20, dtype=torch.float64)
    b = torch.randn(4, 20, dtype=torch.float64)
    reads = request.getfixturevalue("host_reads")
    result = gmres(lambda v: v @ a.T, b, restart=8)
    assert result.success and result.iterations > 16  # at least two restarts
    assert len(reads) <= result.iterations, reads
