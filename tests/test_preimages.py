"""ReLU preimages (thesis 3.3, Theorem 3.3): the configurations of Fig. 3.2, k = 0, and random cases against
brute-force checks."""

import math

import pytest
import torch
from torch import nn

from invertnet.analysis import is_omnidirectional, relu_mlp_preimages, relu_preimage

SQRT3_2 = math.sqrt(3) / 2
TRIANGLE = torch.tensor([[1.0, 0.0], [-0.5, SQRT3_2], [-0.5, -SQRT3_2]], dtype=torch.float64)
P = torch.tensor([0.3, -0.2], dtype=torch.float64)


def _in_preimage(A, b, y, x, tol=1e-7):
    return bool((torch.relu(A @ x + b) - y).abs().max() <= tol)


def test_figure_3_2_a_omnidirectional_for_p_is_a_single_point():
    result = relu_preimage(TRIANGLE, -TRIANGLE @ P, torch.zeros(3))
    assert result.kind == "point" and result.null_dimension == 2
    torch.testing.assert_close(result.point, P, atol=1e-9, rtol=0)


@pytest.mark.parametrize("rows", [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
def test_figure_3_2_b_c_vector_free_halfspaces_are_unbounded(rows):
    A = torch.tensor(rows, dtype=torch.float64)
    result = relu_preimage(A, -A @ P, torch.zeros(len(rows)))
    assert result.kind == "unbounded" and not is_omnidirectional(A)
    far = result.point + 1e3 * result.direction
    assert _in_preimage(A, -A @ P, torch.zeros(len(rows)), far)  # the witness direction really escapes


def test_figure_3_2_d_omnidirectional_without_common_point_is_a_bounded_polytope():
    b = torch.full((3,), -1.0, dtype=torch.float64)
    result = relu_preimage(TRIANGLE, b, torch.zeros(3))
    assert result.kind == "polytope" and is_omnidirectional(TRIANGLE)
    assert result.extent == pytest.approx(2 * math.sqrt(3), rel=1e-9)  # the triangle's width along x_2
    assert _in_preimage(TRIANGLE, b, torch.zeros(3), result.point)


def test_full_rank_active_rows_give_the_input_back():
    A = torch.randn(5, 3, dtype=torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    b = -A @ x + 1.0  # every unit active
    result = relu_preimage(A, b, torch.relu(A @ x + b))
    assert result.kind == "point" and result.null_dimension == 0
    torch.testing.assert_close(result.point, x, atol=1e-9, rtol=0)


def test_outputs_off_the_range_are_empty_and_bad_shapes_refused():
    A = torch.ones(2, 1, dtype=torch.float64)
    assert relu_preimage(A, torch.zeros(2), torch.tensor([1.0, 2.0])).kind == "empty"
    with pytest.raises(ValueError, match="negative"):
        relu_preimage(A, torch.zeros(2), torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match="need A"):
        relu_preimage(A, torch.zeros(3), torch.zeros(2))


def test_random_layers_agree_with_sampling_checks():
    generator = torch.Generator().manual_seed(0)
    kinds = set()
    for trial in range(40):
        m, n = (3, 2) if trial % 2 else (6, 3)
        A = torch.randn(m, n, generator=generator, dtype=torch.float64)
        b = torch.randn(m, generator=generator, dtype=torch.float64)
        x = torch.randn(n, generator=generator, dtype=torch.float64)
        y = torch.relu(A @ x + b)
        result = relu_preimage(A, b, y)
        kinds.add(result.kind)
        assert _in_preimage(A, b, y, result.point)
        nearby = result.point + 1e-3 * torch.randn(2000, n, generator=generator, dtype=torch.float64)
        inside = [_in_preimage(A, b, y, point) for point in nearby]
        if result.kind == "point":
            assert not any(inside)  # nothing else nearby maps to y
        elif result.kind == "unbounded":
            assert _in_preimage(A, b, y, result.point + 1e4 * result.direction)
        else:  # polytope: more than one point, and nothing far away maps to y
            assert result.extent > 1e-9
            directions = torch.randn(200, n, generator=generator, dtype=torch.float64)
            far = result.point + 1e4 * directions / directions.norm(dim=1, keepdim=True)
            assert not any(_in_preimage(A, b, y, point) for point in far)
    assert kinds == {"point", "polytope", "unbounded"}  # every branch checked


def test_layer_by_layer_through_a_relu_mlp():
    torch.manual_seed(0)
    wide = nn.Linear(2, 16).double()
    narrow = nn.Linear(16, 1).double()
    results = relu_mlp_preimages([wide, narrow], torch.randn(2, dtype=torch.float64))
    assert len(results) == 2
    assert results[1].kind == "unbounded"  # 1 output for 16 inputs cannot determine them
    assert results[0].kind in ("point", "polytope", "unbounded")


def test_layers_without_bias_are_handled():
    torch.manual_seed(1)
    results = relu_mlp_preimages([nn.Linear(2, 4, bias=False).double()], torch.randn(2, dtype=torch.float64))
    assert results[0].kind in ("point", "polytope", "unbounded")
