"""Certified operator-norm bounds versus power-iteration estimates (thesis Remark 4.9; Delattre et al. 2023).

The truth everywhere is the largest singular value of the explicit operator matrix, by a float64 SVD.
"""

import itertools
import math

import pytest
import torch

from invertnet import ConvergenceError, SolverStatus
from invertnet.layers import (
    DEQ,
    ContractiveCell,
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    SpectralNormConv2d,
    SpectralNormLinear,
    operator_norms,
    refine_spectral_norms,
)
from invertnet.layers.operator_norms import (
    conv_matrix,
    conv_operator_norm_bound,
    gram_iteration_bound,
    matrix_norm_bound,
    mixed_norm_factor,
    top_singular_pair,
)


def _svd_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix.detach().double(), ord=2).item()


def _true_norm(layer) -> float:
    """The 2-norm of the normalised operator the layer applies in eval mode, from its explicit matrix."""
    with torch.no_grad():
        weight = layer.normalized_weight().double()
    if isinstance(layer, SpectralNormConv2d):
        return _svd_norm(conv_matrix(weight, tuple(layer.v.shape[1:]), layer.stride, layer.padding))
    return _svd_norm(weight)


def _train(module, x, steps=5):
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    module.train()
    for _ in range(steps):
        loss = module(x).pow(2).mean() - module(x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return module.eval()


def _mis_normalise(layer) -> None:
    """Replace the weight in eval mode by 3 x a fresh random one, leaving u, v stale. A dense weight is also made to
    kill v, so that the estimate says 0 and the normalisation does nothing."""
    with torch.no_grad():
        weight = 3 * torch.randn_like(layer.weight)
        if isinstance(layer, SpectralNormLinear):
            weight -= torch.outer(weight @ layer.v, layer.v) / layer.v.dot(layer.v)
        layer.weight.copy_(weight)


def _prepared(module, input_shape, state):
    """A spectrally normalised layer, or a branch of them (every layer alike), fresh, trained or mis-normalised."""
    module(torch.randn(2, *input_shape, dtype=torch.float64))
    if state == "trained":
        _train(module, torch.randn(8, *input_shape, dtype=torch.float64))
    module.eval()
    if state == "mis-normalised":
        for layer in module.normalized_layers() if hasattr(module, "normalized_layers") else [module]:
            _mis_normalise(layer)
    return module


STATES = ["fresh", "trained", "mis-normalised"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("shape", [(5, 3), (16, 16), (7, 40)])
def test_linear_bound_holds_for_fresh_trained_and_mis_normalised_weights(state, shape):
    torch.manual_seed(0)
    layer = _prepared(SpectralNormLinear(shape[1], shape[0], coeff=0.9).double(), (shape[1],), state)
    true = _true_norm(layer)
    assert true <= layer.operator_norm_bound() <= true * (1 + 1e-10)
    if state == "mis-normalised":
        assert layer.operator_norm_estimate() < 0.1 < 1 < true, "the estimate is fooled, the bound is not"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize(
    "stride, padding, size, exact_entries",
    [(1, 1, 6, None), (2, 1, 7, None), (1, 0, 6, None), (2, 0, 8, None), (1, 1, 9, 0), (2, 1, 9, 0), (2, 0, 8, 0)],
)
def test_conv_bound_holds_on_the_exact_and_the_torus_path(monkeypatch, state, stride, padding, size, exact_entries):
    torch.manual_seed(1)
    if exact_entries is not None:  # larger than the exact threshold: the FFT torus bound
        monkeypatch.setattr(operator_norms, "EXACT_MATRIX_ENTRIES", exact_entries)
    conv = SpectralNormConv2d(3, 4, 3, stride=stride, padding=padding, coeff=0.9).double()
    conv = _prepared(conv, (3, size, size), state)
    true = _true_norm(conv)
    bound = conv.operator_norm_bound()
    assert bound >= true
    if exact_entries is None:
        assert bound <= true * (1 + 1e-10)


def test_the_containing_torus_bounds_every_small_zero_padded_convolution():
    torch.manual_seed(2)
    for kernel, stride, padding, size in itertools.product([1, 2, 3, 5], [1, 2, 3], [0, 1, 2, 4], [3, 4, 7]):
        if size + 2 * padding < kernel:
            continue
        weight = torch.randn(3, 2, kernel, kernel, dtype=torch.float64)
        true = _svd_norm(conv_matrix(weight, (2, size, size), stride, padding))
        torus = conv_operator_norm_bound(weight, (2, size, size), stride, padding, exact_entries=0)
        assert torus >= true, (kernel, stride, padding, size)


def test_the_torus_bound_tightens_with_the_image_size():
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    ratios = []
    for size in (4, 8, 16):
        true = conv_operator_norm_bound(weight, (4, size, size), 1, 1)
        ratios.append(conv_operator_norm_bound(weight, (4, size, size), 1, 1, exact_entries=0) / true)
    assert ratios[0] >= ratios[1] >= ratios[2] >= 1 and ratios[2] < 1.05


@pytest.mark.parametrize("shape", [(6, 4), (4, 9), (30, 30), (3, 5, 5)])
def test_gram_iteration_bounds_the_svd_norm_and_converges(shape):
    torch.manual_seed(3)
    matrix = torch.randn(*shape, dtype=torch.float64)
    true = torch.linalg.matrix_norm(matrix, ord=2).max().item()
    bounds = [gram_iteration_bound(matrix, max_iter=steps) for steps in (0, 1, 2, 4, 20)]
    assert all(bound >= true for bound in bounds)
    assert all(later <= earlier for earlier, later in zip(bounds, bounds[1:], strict=False)), "never increases"
    assert bounds[0] == pytest.approx(torch.linalg.matrix_norm(matrix, ord="fro").max().item(), rel=1e-12)
    assert bounds[-1] <= true * (1 + 1e-9)


def test_gram_iteration_handles_complex_and_extreme_scales():
    matrix = torch.randn(5, 3, 4, dtype=torch.complex128)
    true = torch.linalg.matrix_norm(matrix, ord=2).max().item()
    assert true <= gram_iteration_bound(matrix) <= true * (1 + 1e-9)
    real = torch.randn(8, 8, dtype=torch.float64)
    for scale in (1e-150, 1e150):  # G_t = (W^T W)^(2^t) would under- or overflow without rescaling
        true = torch.linalg.matrix_norm(scale * real, ord=2).item()
        assert true <= gram_iteration_bound(scale * real) <= true * (1 + 1e-9)
    assert gram_iteration_bound(torch.zeros(3, 3)) == 0.0


def test_matrix_norm_bound_takes_the_gram_path_for_large_matrices(monkeypatch):
    matrix = torch.randn(40, 25, dtype=torch.float64)
    true = _svd_norm(matrix)
    exact = matrix_norm_bound(matrix)
    monkeypatch.setattr(operator_norms, "EXACT_MATRIX_ENTRIES", 0)
    gram = matrix_norm_bound(matrix)
    assert true <= exact <= true * (1 + 1e-12) and true <= gram <= true * (1 + 1e-9)


@pytest.mark.parametrize("p, q", [(1.5, 1.5), (3.0, 3.0), (1.5, 3.0), (3.0, 1.5), (2.0, 1.2), (4.0, 2.0)])
def test_mixed_norm_bound_holds_where_the_norm_is_known(p, q):
    # ||1_m 1_n^T||_{p->q} = ||1_m||_q ||1_n||_{p*} exactly (rank one)
    m, n = 5, 7
    layer = SpectralNormLinear(n, m, bias=False, coeff=1e6, domain_order=p, codomain_order=q).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    exact = m ** (1 / q) * n ** (1 - 1 / p)
    record = layer.refine_spectral_norm(tol=1e-9)
    assert record.estimate <= exact * (1 + 1e-9) <= record.bound * (1 + 1e-9)
    assert layer.operator_norm_bound() >= exact
    assert mixed_norm_factor(p, q, n, m) >= 1


def test_mixed_norm_layers_are_certified_after_refinement_though_loosely():
    torch.manual_seed(4)
    layer = SpectralNormLinear(6, 6, coeff=0.9, domain_order=3.0, codomain_order=3.0).double()
    layer.weight.data.mul_(5)
    record = layer.refine_spectral_norm()
    assert record.status is SolverStatus.STALLED and record.gap > 1e-3, "the dimension factors are loose"
    assert record.normalized_bound <= 0.9 and layer.operator_norm_bound() <= 0.9
    directions = torch.randn(100_000, 6, dtype=torch.float64)
    with torch.no_grad():
        images = directions @ layer.eval().normalized_weight().T
    ratios = torch.linalg.vector_norm(images, ord=3, dim=1) / torch.linalg.vector_norm(directions, ord=3, dim=1)
    assert ratios.max().item() <= 0.9


def _slowly_converging_layer(coeff: float) -> SpectralNormLinear:
    """A float32 layer whose two largest singular values differ by 1e-4: power iteration crawls."""
    torch.manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    singular = torch.linspace(0.5, 2.0, 32, dtype=torch.float64).flip(0)
    singular[1] = 2.0 * (1 - 1e-4)
    layer = SpectralNormLinear(32, 32, coeff=coeff)
    with torch.no_grad():
        layer.weight.copy_((left * singular) @ right.T)
    return layer


def test_after_refinement_the_normalised_norm_is_at_most_coeff_in_float64():
    layer = _slowly_converging_layer(0.9)
    record = layer.refine_spectral_norm()
    assert record.iterations <= 1, "the exact SVD's top singular vector starts the iteration"
    assert record.estimate <= _svd_norm(layer.weight) <= record.bound
    assert record.normalized_bound <= 0.9
    assert _true_norm(layer.eval()) <= layer.operator_norm_bound() <= 0.9
    assert layer.operator_norm_estimate() <= 0.9


def test_refine_stops_on_the_certified_gap_not_on_a_small_change(monkeypatch):
    layer = _slowly_converging_layer(0.9)
    monkeypatch.setattr(operator_norms, "EXACT_MATRIX_ENTRIES", 0)  # Gram bound; power iteration from v, no SVD start
    record = layer.refine_spectral_norm(tol=1e-8, max_iter=100_000)
    assert record.success and record.gap <= 1e-8
    assert record.iterations > 50, "a small change per step (slow convergence) does not stop it"
    assert "certified bound" in record.summary() and "estimate" in record.summary()


def test_old_state_dicts_without_the_inflation_load_with_inflation_one():
    layer = SpectralNormLinear(4, 4, coeff=0.5)
    layer.weight.data.mul_(10)
    layer.refine_spectral_norm()
    state = {name: value for name, value in layer.state_dict().items() if name != "inflation"}
    fresh = SpectralNormLinear(4, 4, coeff=0.5)
    fresh.inflation.fill_(3.0)
    fresh.load_state_dict(state)
    assert fresh.inflation.item() == 1.0 and torch.equal(fresh.v, layer.v)


def test_the_bound_is_cached_and_follows_every_weight_change(monkeypatch):
    layer = SpectralNormLinear(8, 8, coeff=1e6).double()  # never scaled: the bound is linear in the weight
    calls = []
    original = layer._two_norm_bound
    monkeypatch.setattr(layer, "_two_norm_bound", lambda weight: calls.append(1) or original(weight))
    first = layer.operator_norm_bound()
    assert layer.operator_norm_bound() == first and len(calls) == 1, "a repeated call reuses the bound"
    layer.weight.data.mul_(0.5)  # through .data: no version bump, still seen
    assert layer.operator_norm_bound() == pytest.approx(first * 0.5, rel=1e-12) and len(calls) == 2
    layer.train()(torch.randn(2, 8, dtype=torch.float64))  # a power step moves v
    layer.operator_norm_bound()
    assert len(calls) == 3


@pytest.mark.parametrize("state", STATES)
def test_lipschitz_mlp_bound_is_at_least_the_product_of_true_layer_norms(state):
    torch.manual_seed(6)
    g = _prepared(LipschitzMLP(4, 12, n_layers=3, coeff=0.9).double(), (4,), state)
    product = math.prod(_true_norm(layer) for layer in g.normalized_layers())
    assert product <= g.lipschitz_bound() <= product * (1 + 1e-9)
    a, b = torch.randn(2, 1000, 4, dtype=torch.float64)
    with torch.no_grad():
        ratios = (g(a) - g(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert ratios.max().item() <= g.lipschitz_bound()


@pytest.mark.parametrize("state", STATES)
def test_lipschitz_conv_net_bound_is_at_least_the_product_of_true_layer_norms(state):
    torch.manual_seed(7)
    g = _prepared(LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), coeff=0.9).double(), (2, 5, 5), state)
    product = math.prod(_true_norm(layer) for layer in g.normalized_layers())
    assert product <= g.lipschitz_bound() <= product * (1 + 1e-9)
    if state == "fresh":
        assert g.lipschitz_estimate() <= 0.9**3 * (1 + 1e-6)


def test_a_stale_block_no_longer_inverts_to_success_with_a_wrong_bound():
    torch.manual_seed(8)
    block = InvertibleResidual(LipschitzMLP(4, 16, n_layers=2, coeff=0.9)).double()
    refine_spectral_norms(block)
    block.eval()
    for layer in block.g.normalized_layers():
        _mis_normalise(layer)
        with torch.no_grad():  # true norm sqrt(1.2): the product bound exceeds 1, yet g still contracts near y
            layer.weight.mul_(math.sqrt(1.2) / _svd_norm(layer.weight))
    assert block.g.lipschitz_estimate() < 0.1, "the estimate still claims a contraction"
    assert block.lipschitz_bound() == pytest.approx(1.2, rel=1e-9) and block.inverse_lipschitz_bound() is None
    y = torch.randn(3, 4, dtype=torch.float64)
    result = block.inverse_result(y, strict=False)
    assert result.status is SolverStatus.NOT_CONTRACTIVE and result.error_bound is None
    with pytest.raises(ConvergenceError, match="not_contractive"):
        block.inverse(y)
    refine_spectral_norms(block)  # the remedy the message names
    assert block.lipschitz_bound() <= 0.81 and block.inverse_result(y).status is SolverStatus.SUCCESS


def test_a_fresh_contractive_cell_is_certified_at_its_coefficient():
    torch.manual_seed(9)
    cell = ContractiveCell(64, 8, coeff=0.9)
    true = _true_norm(cell.recurrent.eval())
    assert true <= cell.lipschitz_bound() <= 0.9
    layer = DEQ(cell).double()
    layer(torch.randn(4, 8, dtype=torch.float64))
    assert layer.last_result.status is SolverStatus.SUCCESS


def test_a_trained_deq_cell_keeps_a_valid_bound():
    torch.manual_seed(10)
    layer = DEQ(ContractiveCell(16, 3, coeff=0.8)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(5):
        loss = layer.train()(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cell = layer.cell.eval()
    assert _true_norm(cell.recurrent) <= cell.lipschitz_bound()


def test_deq_refuses_a_cell_that_is_not_certified_to_contract():
    torch.manual_seed(11)
    layer = DEQ(ContractiveCell(6, 3, coeff=0.9)).double().eval()
    _mis_normalise(layer.cell.recurrent)
    assert layer.cell.lipschitz_estimate() < 0.1 < 1 < layer.cell.lipschitz_bound()
    with pytest.raises(ValueError, match=r"ContractiveCell.*certified bound.*estimate.*refine_spectral_norms"):
        layer(torch.randn(2, 3, dtype=torch.float64))
    refine_spectral_norms(layer)
    layer(torch.randn(2, 3, dtype=torch.float64))
    assert layer.last_result.status is SolverStatus.SUCCESS


def test_a_conv_branch_that_has_seen_no_input_has_no_bound_yet_and_its_block_still_inverts():
    from invertnet.layers import InvertibleResidual, LipschitzConvNet

    block = InvertibleResidual(LipschitzConvNet(2, 4, kernel_sizes=(3, 1, 3), coeff=0.9)).eval()
    assert block.lipschitz_bound() is None  # the operator's size is unknown: nothing to certify
    result = block.inverse_result(torch.randn(3, 2, 5, 5))
    assert result.success and result.error_bound is None
    assert block.lipschitz_bound() is not None


def test_a_failing_lapack_svd_falls_back_to_certified_bounds(monkeypatch):
    """LAPACK's SVD can fail to converge on matrices with many repeated singular values (seen on the explicit
    matrix of a trained 1280 x 1280 convolution): the bound then comes from Gram iteration, the start vector from
    eigh, and a refinement still certifies the layer."""
    torch.manual_seed(0)
    matrix = torch.randn(12, 7, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(matrix, ord=2).item()
    top = torch.linalg.svd(matrix).Vh[0]

    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fails)
    monkeypatch.setattr(torch.linalg, "svdvals", fails)
    bound, vector = top_singular_pair(matrix)
    assert exact <= bound <= exact * (1 + 1e-9)
    assert abs(torch.dot(vector, top).item()) == pytest.approx(1.0, abs=1e-10)
    assert exact <= matrix_norm_bound(matrix) <= exact * (1 + 1e-9)
    conv = SpectralNormConv2d(2, 3, 3, coeff=0.9).double()
    conv(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    record = conv.refine_spectral_norm()
    assert record.success and conv.operator_norm_bound() <= 0.9
