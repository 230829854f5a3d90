"""Log-det estimators against the exact log-det: stated bias, unbiasedness, gradients, bounds."""

import math

import pytest
import torch

from invertnet import InvertibleSequential
from invertnet.layers import (
    ActNorm,
    InvertibleResidual,
    Linearization,
    LipschitzConvNet,
    LipschitzMLP,
    refine_spectral_norms,
)
from invertnet.logdet import (
    DenseExactLogDet,
    ExactLogDet,
    PowerSeriesLogDet,
    UnbiasedLogDet,
    log_det_bounds,
    n_terms_for_bias,
    truncation_error_bound,
)
from invertnet.models import dense_iresnet_flow, multiscale_iresnet_flow

#: Monte-Carlo comparisons accept the stated bias plus this many standard errors.
N_STANDARD_ERRORS = 4
#: Hutchinson probes per sample; with Lip(g) <= 0.73^3 the per-probe spread is O(0.1), so 4 SE is O(1e-2).
N_PROBES = 4000


def _residual_branch(coeff=0.73, features=4):
    g = LipschitzMLP(features, 16, n_layers=3, coeff=coeff).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(4.0)  # every layer at its cap
    refine_spectral_norms(g)
    return g.eval()


def _replicated_estimates(estimator, g, x, n_probes):
    """Estimates with shape (n_probes, B): one independent probe per replicated row."""
    _, log_det = estimator(g, x.repeat(n_probes, 1))
    return log_det.view(n_probes, x.shape[0])


@pytest.fixture
def problem():
    g = _residual_branch()
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        _, exact = ExactLogDet()(g, x)
    assert exact.abs().min() > 0.05, "non-trivial log-det"
    return g, x, exact


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n_terms", [1, 2, 5])
def test_power_series_mean_within_truncation_bound(problem, probe, n_terms):
    g, x, exact = problem
    with torch.no_grad():
        estimates = _replicated_estimates(PowerSeriesLogDet(n_terms, probe=probe), g, x, N_PROBES)
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(N_PROBES)
    bias_bound = truncation_error_bound(g.lipschitz_bound(), x.shape[1], n_terms)
    assert ((mean - exact).abs() <= bias_bound + N_STANDARD_ERRORS * standard_error).all()


def test_power_series_bias_is_visible_with_one_term(problem):
    """The bound is not vacuous: with one term the truncation bias exceeds the Monte-Carlo noise."""
    g, x, _ = problem
    with torch.no_grad():
        _, exact = ExactLogDet()(g, x)
        jac_traces = []
        for sample in x:
            jac = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0))[0], sample)
            jac_traces.append(torch.trace(jac))
    # PS(J, 1) = tr(J) exactly in expectation; it differs from the log-det by the series tail.
    tail = (torch.stack(jac_traces) - exact).abs()
    assert (tail <= truncation_error_bound(g.lipschitz_bound(), 4, 1)).all()
    assert tail.max() > 1e-4


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_unbiased_estimator_mean_within_standard_errors(problem, probe):
    g, x, exact = problem
    with torch.no_grad():
        estimates = _replicated_estimates(UnbiasedLogDet(probe=probe), g, x, N_PROBES)
    # one roulette draw per call: replicate calls so that N varies across probes too
    with torch.no_grad():
        more = torch.cat([_replicated_estimates(UnbiasedLogDet(probe=probe), g, x, 20) for _ in range(200)])
    estimates = torch.cat([estimates, more])
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(estimates.shape[0])
    assert ((mean - exact).abs() <= N_STANDARD_ERRORS * standard_error).all()


@pytest.mark.parametrize("estimator", [PowerSeriesLogDet, UnbiasedLogDet])
def test_default_probe_has_less_variance_than_gaussian_probes(problem, estimator):
    """The default (Rademacher) probe drops the diagonal's share 2 sum_i A_ii^2 of the Hutchinson variance: on a
    branch whose Jacobian has a non-zero diagonal its estimates spread less than Gaussian probes' at equal cost."""
    g, x, _ = problem
    torch.manual_seed(0)
    with torch.no_grad():
        spread = {
            probe: torch.cat([_replicated_estimates(make(), g, x, 20) for _ in range(100)]).var(0)
            for probe, make in (("default", estimator), ("gaussian", lambda: estimator(probe="gaussian")))
        }
    assert (spread["default"] < 0.9 * spread["gaussian"]).all()  # 0.34-0.76 measured; 2000 draws: +-3 %


def _gradient_projections(g, loss_fn, directions):
    g.zero_grad()
    loss_fn().backward()
    flat = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in g.parameters()])
    return directions @ flat


@pytest.mark.parametrize(
    "estimator", [PowerSeriesLogDet(n_terms=12), UnbiasedLogDet()], ids=["power_series", "unbiased"]
)
def test_gradients_agree_with_exact_gradient_in_expectation(estimator):
    g = _residual_branch(coeff=0.6)  # Lip(g) <= 0.216: the 12-term gradient bias is below 1e-8
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    n_params = sum(p.numel() for p in g.parameters())
    directions = torch.randn(3, n_params, dtype=torch.float64)
    exact = _gradient_projections(g, lambda: ExactLogDet()(g, x)[1].sum(), directions)
    n_batches, n_probes = 60, 100
    samples = torch.stack(
        [
            _gradient_projections(
                g, lambda: estimator(g, x.repeat(n_probes, 1))[1].view(n_probes, -1).mean(0).sum(), directions
            )
            for _ in range(n_batches)
        ]
    )
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(n_batches)
    assert ((mean - exact).abs() <= N_STANDARD_ERRORS * standard_error + 1e-8).all()
    assert standard_error.max() < 0.05 * exact.abs().max(), "the test must be able to see a wrong gradient"


def _graph_size(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_backward_graph_does_not_grow_with_the_number_of_terms():
    g = _residual_branch()
    x = torch.randn(2, 4, dtype=torch.float64)
    few = _graph_size(UnbiasedLogDet(p=1.0, n_exact_terms=2)(g, x)[1])
    many = _graph_size(UnbiasedLogDet(p=1.0, n_exact_terms=20)(g, x)[1])
    assert few == many
    assert _graph_size(PowerSeriesLogDet(n_terms=2)(g, x)[1]) == _graph_size(PowerSeriesLogDet(n_terms=20)(g, x)[1])


def test_unbiased_roulette_statistics():
    estimator = UnbiasedLogDet(p=0.5, n_exact_terms=2)
    draws = torch.tensor([estimator.sample_n_terms() for _ in range(20_000)], dtype=torch.float64)
    assert draws.min() == 2
    assert abs(draws.mean().item() - estimator.expected_terms) < 4 * draws.std().item() / math.sqrt(20_000)
    for k in (1, 2, 3, 5):
        assert (draws >= k).double().mean().item() == pytest.approx(estimator.survival(k), abs=0.015)


def test_estimators_without_grad_return_detached_values(problem):
    g, x, _ = problem
    with torch.no_grad():
        for estimator in (ExactLogDet(), PowerSeriesLogDet(), UnbiasedLogDet()):
            g_x, log_det = estimator(g, x)
            assert not g_x.requires_grad and not log_det.requires_grad
            assert log_det.shape == (3,)


def test_truncation_error_bound_hand_computation():
    # -d (log(1 - L) + sum_{k<=n} L^k / k) with L = 0.5, d = 2
    assert truncation_error_bound(0.5, 2, 1) == pytest.approx(2 * (math.log(2) - 0.5))
    assert truncation_error_bound(0.5, 2, 2) == pytest.approx(2 * (math.log(2) - 0.5 - 0.125))
    assert truncation_error_bound(0.0, 10, 0) == 0.0
    with pytest.raises(ValueError, match="lip"):
        truncation_error_bound(1.0, 2, 3)


@pytest.mark.parametrize("lip, dim, bias", [(0.5, 2, 1e-2), (0.9, 784, 1.0), (0.97, 3072, 0.1), (0.1, 1, 1e-12)])
def test_n_terms_for_bias_is_the_fewest(lip, dim, bias):
    n = n_terms_for_bias(lip, dim, bias)
    assert truncation_error_bound(lip, dim, n) <= bias
    if n > 0:
        assert truncation_error_bound(lip, dim, n - 1) > bias


def test_log_det_bounds_bracket_the_exact_log_det():
    model = InvertibleSequential(
        ActNorm(4),
        InvertibleResidual(_residual_branch(0.8), log_det=ExactLogDet()),
        InvertibleResidual(_residual_branch(0.9), log_det=ExactLogDet()),
    ).double()
    x = 3 * torch.randn(16, 4, dtype=torch.float64) + 1
    model(x)  # ActNorm's data-dependent initialisation
    model.eval()
    with torch.no_grad():
        _, exact = model.forward_and_log_det(x)
    lower, upper = log_det_bounds(model, x)
    assert (lower <= exact).all() and (exact <= upper).all()
    assert (upper - lower).min() > 0


def test_log_det_bounds_refuse_non_contractive_blocks():
    g = LipschitzMLP(2, 8, n_layers=2, coeff=2.0).double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(10)
    refine_spectral_norms(g)
    with pytest.raises(ValueError, match="Lemma 5.5"):
        log_det_bounds(InvertibleResidual(g), torch.randn(2, 2, dtype=torch.float64))


def test_invalid_estimator_options_are_refused():
    with pytest.raises(ValueError, match="probe"):
        PowerSeriesLogDet(probe="uniform")
    with pytest.raises(ValueError, match="p must"):
        UnbiasedLogDet(p=0.0)


@pytest.mark.parametrize("activation", ["elu", "softplus", "lipswish", "clipswish"])
@pytest.mark.parametrize(
    "estimator",
    [PowerSeriesLogDet(n_terms=6), PowerSeriesLogDet(n_terms=1, n_samples=2), UnbiasedLogDet(p=1.0, n_exact_terms=4)],
    ids=["series", "one-term", "roulette"],
)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_structured_jacobian_path_equals_autograd_path(activation, estimator, kind):
    """LipschitzNet.linearize (matrix products, forward-mode surrogate) == generic autograd VJPs, probe for
    probe (the default, without the first term's control variate, which only the factored path has:
    tests/test_trace_control.py)."""
    if kind == "mlp":
        g = LipschitzMLP(4, 8, n_layers=3, coeff=0.9, activation=activation, preactivation=True).double()
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    else:
        g = LipschitzConvNet(2, 3, coeff=0.9, activation=activation).double()
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    g(x)
    refine_spectral_norms(g)
    g.eval()
    results = []
    for branch in (g, lambda v: g(v)):  # the lambda hides `linearize`: autograd path
        torch.manual_seed(3)
        g.zero_grad()
        g_x, log_det = estimator(branch, x)
        (grad_x,) = torch.autograd.grad((log_det * torch.arange(1.0, 1 + len(log_det))).sum(), x, retain_graph=True)
        log_det.sum().backward()
        grads = [p.grad.clone() for p in g.parameters() if p.grad is not None]
        results.append((g_x.detach(), log_det.detach(), grad_x, grads))
    (g_fast, value_fast, grad_x_fast, grads_fast), (g_slow, value_slow, grad_x_slow, grads_slow) = results
    torch.testing.assert_close(g_fast, g_slow)
    torch.testing.assert_close(value_fast, value_slow)
    torch.testing.assert_close(grad_x_fast, grad_x_slow)
    assert len(grads_fast) == len(grads_slow) > 0
    for fast, slow in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(fast, slow)
    with torch.no_grad():  # the value alone, without graphs
        values = []
        for branch in (g, lambda v: g(v)):
            torch.manual_seed(3)
            values.append(estimator(branch, x)[1])
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], value_fast)


@pytest.mark.parametrize("n_terms", [1, 2, 5, 10])
def test_factored_power_series_takes_one_vector_jacobian_product_fewer_than_terms(n_terms, monkeypatch):
    """The n-th term v^T J^n v = (v^T J^(n-1)) (J v) reuses the gradient's forward-mode product J v."""
    calls = []
    vjp = Linearization.vjp
    monkeypatch.setattr(Linearization, "vjp", lambda self, w: calls.append(1) or vjp(self, w))
    g = LipschitzMLP(4, 8, n_layers=2, coeff=0.9)
    PowerSeriesLogDet(n_terms)(g, torch.randn(3, 4))[1].sum().backward()
    assert len(calls) == n_terms - 1


def test_evaluation_estimator_meets_its_bias_bound():
    """FlowDistribution.use_evaluation_estimator (thesis A.2): the chosen series length is the shortest whose
    truncation bound over all blocks is below ``bias_bits``, and it is installed in every stochastic block."""
    flow = dense_iresnet_flow(4, n_blocks=3, hidden_features=16).double()
    dim, bias_bits = 4, 1e-3
    chosen = flow.use_evaluation_estimator(dim, bias_bits=bias_bits, exact_features=0)
    blocks = flow.residual_blocks()
    lipschitz = max(block.lipschitz_bound() for block in blocks)
    assert chosen["lipschitz_bound"] == lipschitz < 1
    n_terms = chosen["n_terms"]
    bound_bits = len(blocks) * truncation_error_bound(lipschitz, dim, n_terms) / (dim * math.log(2))
    assert chosen["bias_bound_bits"] == pytest.approx(bound_bits) and bound_bits <= bias_bits
    assert len(blocks) * truncation_error_bound(lipschitz, dim, n_terms - 1) / (dim * math.log(2)) > bias_bits
    for block in blocks:
        assert isinstance(block.log_det_estimator, PowerSeriesLogDet)
        assert block.log_det_estimator.n_terms == n_terms and block.log_det_estimator.probe == "rademacher"
    capped = flow.use_evaluation_estimator(dim, bias_bits=1e-12, max_terms=3, exact_features=0)
    assert capped["n_terms"] == 3 and capped["bias_bound_bits"] > 1e-12


def test_evaluation_estimator_leaves_exact_blocks_alone():
    flow = dense_iresnet_flow(2, n_blocks=2, hidden_features=8, log_det=ExactLogDet())
    assert flow.use_evaluation_estimator(2) == {"n_terms": 0, "bias_bound_bits": 0.0, "exact_blocks": 2}
    assert all(type(block.log_det_estimator) is ExactLogDet for block in flow.residual_blocks())
    with pytest.raises(TypeError, match="callable"):
        flow.residual_blocks()[0].use_log_det_estimator(10)


def test_evaluation_is_exact_for_dense_branches_up_to_exact_features():
    """Dense branches of at most exact_features features are evaluated by DenseExactLogDet (the value of the
    brute-force Jacobian); wider ones, and convolutional branches, by the series; the norms are refined first."""
    flow = dense_iresnet_flow(4, n_blocks=2, hidden_features=16).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    flow.train()
    flow.log_prob(x)  # ActNorm's initialisation and a power-iteration step
    flow.eval()
    chosen = flow.use_evaluation_estimator(4)
    assert chosen == {"n_terms": 0, "bias_bound_bits": 0.0, "exact_blocks": 2}
    assert all(isinstance(block.log_det_estimator, DenseExactLogDet) for block in flow.residual_blocks())
    assert all(block.lipschitz_bound() <= 0.97**3 for block in flow.residual_blocks())  # refined
    structured = flow.log_prob(x)
    for block in flow.residual_blocks():
        block.use_log_det_estimator(ExactLogDet())
    torch.testing.assert_close(structured, flow.log_prob(x))
    wide = dense_iresnet_flow(4, n_blocks=2, hidden_features=16).double()
    assert wide.use_evaluation_estimator(4, exact_features=3)["exact_blocks"] == 0
    images = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4).double()
    images.train()
    images.log_prob(torch.randn(2, 1, 4, 4, dtype=torch.float64))
    assert images.use_evaluation_estimator(16)["exact_blocks"] == 0


@pytest.mark.parametrize(
    "n_layers, preactivation, activation",
    [(1, False, "lipswish"), (2, True, "lipswish"), (3, False, "lipswish"), (4, True, "lipswish")]
    + [(1, True, "clipswish"), (3, False, "clipswish"), (3, True, "clipswish")],
)
def test_dense_exact_log_det_equals_the_brute_force_value_and_gradient(n_layers, preactivation, activation):
    torch.manual_seed(n_layers)
    g = LipschitzMLP(5, 24, n_layers=n_layers, coeff=0.9, activation=activation, preactivation=preactivation)
    g = g.double()
    for layer in g.normalized_layers():
        layer.weight.data.mul_(3.0)  # at the cap: a log-det far from zero
    refine_spectral_norms(g)
    g.eval()
    x = 2 * torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    parameters = [x, *g.parameters()]
    values = {}
    for estimator in (DenseExactLogDet(), ExactLogDet()):
        g_x, log_det = estimator(g, x)
        gradients = torch.autograd.grad((log_det**2).sum() + g_x.sum(), parameters, allow_unused=True)
        values[type(estimator).__name__] = (log_det, gradients)
    structured, brute_force = values["DenseExactLogDet"], values["ExactLogDet"]
    assert structured[0].abs().max() > 1e-3  # a non-trivial log-det
    torch.testing.assert_close(structured[0], brute_force[0], rtol=1e-12, atol=1e-12)
    for mine, reference in zip(structured[1], brute_force[1], strict=True):
        assert (mine is None) == (reference is None)
        if mine is not None:
            torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


def test_dense_exact_log_det_falls_back_to_brute_force_for_convolutions():
    g = LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), coeff=0.9).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    g(x)
    g.eval()
    block = InvertibleResidual(g, log_det=DenseExactLogDet())
    assert block.exact_log_det and DenseExactLogDet.exact
    torch.testing.assert_close(block.forward_and_log_det(x)[1], ExactLogDet()(g, x)[1])
