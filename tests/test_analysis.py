"""Certificates (thesis Remark 4.9, Lemmas 4.6, 5.5) and exact singular values of convolutions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invertnet.analysis import certify, conv_norm_bounds, conv_singular_values, spectral
from invertnet.analysis.spectral import conv_matrix
from invertnet.core import InvertibleSequential
from invertnet.layers import ActNorm, InvertibleResidual, LipschitzConvNet, LipschitzMLP, refine_spectral_norms
from invertnet.logdet import ExactLogDet
from tests.tolerances import assert_close


def _circular_matrix(weight: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    channels, height, width = shape
    n = channels * height * width
    basis = torch.eye(n, dtype=torch.float64).view(n, channels, height, width)
    p = weight.shape[-1] // 2
    return F.conv2d(F.pad(basis, (p, p, p, p), mode="circular"), weight).reshape(n, -1).T


@pytest.mark.parametrize(
    "c_out, c_in, kernel, height, width", [(3, 2, 3, 5, 6), (2, 4, 1, 4, 4), (2, 2, 5, 4, 4), (4, 4, 3, 3, 3)]
)
def test_fft_singular_values_equal_the_svd_of_the_circular_operator(c_out, c_in, kernel, height, width):
    weight = torch.randn(c_out, c_in, kernel, kernel, dtype=torch.float64)
    expected = torch.linalg.svdvals(_circular_matrix(weight, (c_in, height, width)))
    actual = conv_singular_values(weight, (c_in, height, width))
    assert actual.shape == (height * width * min(c_out, c_in),)
    assert_close(actual, expected[: len(actual)], atol=1e-8, rtol=0)


def test_kernels_larger_than_the_torus_wrap_around():
    weight = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    folded = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    for a in range(5):
        for b in range(5):
            folded[0, 0, a % 3, b % 3] += weight[0, 0, a, b]
    assert_close(conv_singular_values(weight, (3, 3)), conv_singular_values(folded, (3, 3)))


@pytest.mark.parametrize("stride, padding, size", [(1, 1, 8), (2, 1, 8), (2, 0, 7), (1, 0, 6)])
def test_conv_norm_bounds_bracket_the_exact_norm(monkeypatch, stride, padding, size):
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(conv_matrix(weight, (3, size, size), stride, padding), ord=2).item()
    small = conv_norm_bounds(weight, (3, size, size), stride, padding)
    assert small.lower == pytest.approx(exact, rel=1e-12)  # exact SVD path; the upper adds the rounding margin
    assert small.lower <= small.upper <= small.lower * (1 + 1e-10)
    monkeypatch.setattr(spectral, "EXACT_MATRIX_ENTRIES", 0)  # force power iteration + torus bound
    bounds = conv_norm_bounds(weight, (3, size, size), stride, padding, rtol=1e-12, max_iter=20_000)
    assert bounds.converged and bounds.lower <= exact * (1 + 1e-12) <= bounds.upper * (1 + 1e-12)
    assert bounds.lower == pytest.approx(exact, rel=1e-5)


def _trained_flow() -> tuple[InvertibleSequential, torch.Tensor]:
    flow = InvertibleSequential(
        ActNorm(2),
        InvertibleResidual(LipschitzConvNet(2, 6, coeff=0.9), log_det=ExactLogDet()),
        InvertibleResidual(LipschitzConvNet(2, 6, kernel_sizes=(3, 1, 3), coeff=0.7), log_det=ExactLogDet()),
    ).double()
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    flow.train()
    for _ in range(20):  # a little training moves the weights away from their initialisation
        y, log_det = flow.forward_and_log_det(x)
        loss = (0.5 * y.pow(2).flatten(1).sum(1) - log_det).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    refine_spectral_norms(flow)
    return flow.eval(), x


@pytest.mark.integration
def test_trained_iresnet_is_certified_with_valid_constants_and_log_det_bounds():
    flow, x = _trained_flow()
    certificate = certify(flow, x)
    assert certificate.certified and "certified" in certificate.verdict
    blocks = certificate.blocks
    assert [block.name for block in blocks] == ["parts.1", "parts.2"] and blocks[0].dimension == 32
    for block, coeff in zip(blocks, (0.9, 0.7), strict=True):
        assert block.lipschitz_upper <= coeff**3 * (1 + 1e-6)  # three layers, each normalised to <= coeff
        assert block.inverse_lipschitz == pytest.approx(1 / (1 - block.lipschitz_upper))
    with torch.no_grad():
        exact = sum(part.forward_and_log_det(part_input)[1] for part, part_input in _block_inputs(flow, x))
    assert (certificate.log_det_lower <= exact).all() and (exact <= certificate.log_det_upper).all()
    assert "Lip(g) <=" in certificate.table()


def _block_inputs(flow: InvertibleSequential, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    pairs = []
    for part in flow:
        if isinstance(part, InvertibleResidual):
            pairs.append((part, x))
        x = part(x)
    return pairs


def test_a_block_with_scaled_up_weights_fails_by_name_and_amount():
    flow, x = _trained_flow()
    block = flow[2]
    layers = [
        nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding)
        if isinstance(layer, nn.Conv2d)
        else nn.ELU()
        for layer in block.g
    ]
    plain = nn.Sequential(*layers).double()
    with torch.no_grad():
        for source, target in zip(block.g, plain, strict=True):
            if isinstance(source, nn.Conv2d):
                target.weight.copy_(2.0 * source.normalized_weight())  # the same branch, weights doubled
                target.bias.copy_(source.bias)
    flow.parts[2] = InvertibleResidual(plain)
    certificate = certify(flow, x)
    failing = certificate.blocks[1]
    assert not certificate.certified and certificate.blocks[0].certified and not failing.certified
    assert failing.lipschitz_upper > 1 and certificate.log_det_lower is None
    assert f"'parts.2' has Lip(g) <= {failing.lipschitz_upper:.6f}, exceeding 1 by" in certificate.verdict


def test_unknown_modules_are_reported_not_guessed():
    branch = nn.Sequential(nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 3))
    certificate = certify(InvertibleResidual(branch), torch.randn(2, 3))
    assert not certificate.certified and "Sigmoid" in certificate.verdict
    mlp = InvertibleResidual(LipschitzMLP(3, 8, coeff=0.5))
    assert certify(mlp, torch.randn(2, 3)).certified
    assert "no residual blocks" in certify(nn.Linear(2, 2), torch.randn(1, 2)).verdict


def test_certify_respects_same_padding_and_leaves_the_model_untouched():
    branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding="same"), nn.ELU(), nn.Conv2d(2, 2, 3, padding="same")).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    block = InvertibleResidual(branch)
    certificate = certify(block, x)
    exact = 1.0
    for layer in (branch[0], branch[2]):
        exact *= torch.linalg.matrix_norm(conv_matrix(layer.weight, (2, 6, 6), 1, 1), ord=2).item()
    assert certificate.blocks[0].lipschitz_upper == pytest.approx(exact, rel=1e-10)
    flow, x = _trained_flow()
    flow.train()
    before = {name: value.clone() for name, value in flow.state_dict().items()}
    certify(flow, x)
    assert flow.training and all(torch.equal(before[name], value) for name, value in flow.state_dict().items())
