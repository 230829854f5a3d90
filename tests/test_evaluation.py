"""evaluate_log_prob: the evaluation protocol as a public function (exact dense blocks, the series' stated bias
and probe standard error for the others, the blocks' estimators restored)."""

import math

import pytest
import torch

import invertnet
from invertnet.logdet import ExactLogDet, PowerSeriesLogDet
from invertnet.models import dense_iresnet_flow, evaluate_log_prob, multiscale_iresnet_flow


def test_dense_flow_is_evaluated_exactly():
    torch.manual_seed(0)
    flow = dense_iresnet_flow(3, n_blocks=2, hidden_features=16).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    flow.log_prob(x)
    result = invertnet.evaluate_log_prob(flow, x)
    assert result.exact_blocks == 2 and result.n_terms == 0 and result.bias_bound_bits == 0.0
    assert result.probe_passes == 1 and result.probe_standard_error == 0.0
    for block in flow.residual_blocks():
        block.use_log_det_estimator(ExactLogDet())
    flow.eval()
    torch.testing.assert_close(result.log_prob, flow.log_prob(x))
    bits = -flow.log_prob(x) / (3 * math.log(2))
    assert result.bits_per_dim == pytest.approx(bits.mean().item())
    assert result.standard_error == pytest.approx((bits.std() / math.sqrt(40)).item())


def test_series_blocks_get_a_stated_bias_and_probe_error_and_keep_their_estimator():
    torch.manual_seed(1)
    flow = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, levels=17)
    block = flow.residual_blocks()[0]
    training_estimator = block.log_det_estimator
    x = torch.randint(0, 17, (64, 1, 4, 4))
    result = evaluate_log_prob(flow, x, bias_bits=1e-3, standard_error_bits=5e-3, max_passes=None)
    assert result.exact_blocks == 0 and result.n_terms > 0
    assert 0 < result.bias_bound_bits <= 1e-3 and result.lipschitz_bound < 1
    assert result.probe_passes >= 2 and result.probe_target_reached and result.probe_standard_error < 5e-3
    assert block.log_det_estimator is training_estimator and block.eval_log_det == "auto" and flow.training


def test_max_terms_caps_the_series_and_the_bias_bound_says_so():
    torch.manual_seed(2)
    flow = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, levels=17)
    x = torch.randint(0, 17, (16, 1, 4, 4))
    capped = evaluate_log_prob(flow, x, bias_bits=1e-9, max_terms=2, max_passes=2, warn=False)
    assert capped.n_terms == 2 and capped.bias_bound_bits > 1e-9


def test_a_pass_cap_that_stops_above_the_target_says_so():
    torch.manual_seed(2)
    flow = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, levels=17)
    x = torch.randint(0, 17, (16, 1, 4, 4))
    with pytest.warns(RuntimeWarning, match="above the target 1e-06"):
        capped = evaluate_log_prob(flow, x, standard_error_bits=1e-6, max_passes=3)
    assert capped.probe_passes == 3 and not capped.probe_target_reached


def test_exact_features_zero_uses_the_series_for_dense_blocks():
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8)
    x = torch.randn(32, 2)
    flow.log_prob(x)
    result = evaluate_log_prob(flow, x, exact_features=0, max_passes=3, warn=False)
    assert result.exact_blocks == 0 and result.n_terms > 0 and result.bias_bound_bits > 0
    assert isinstance(flow.residual_blocks()[0].log_det_estimator, PowerSeriesLogDet)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bias_bits": 0}, "bias_bits"),
        ({"standard_error_bits": math.nan}, "standard_error_bits"),
        ({"max_passes": 1}, "max_passes"),
    ],
)
def test_meaningless_settings_are_named(arguments, message):
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8)
    with pytest.raises(ValueError, match=message):
        evaluate_log_prob(flow, torch.randn(4, 2), **arguments)


def test_empty_data_and_non_flows_are_refused():
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8)
    with pytest.raises(ValueError, match="N >= 1"):
        evaluate_log_prob(flow, torch.zeros(0, 2))
    with pytest.raises(TypeError, match="FlowDistribution"):
        evaluate_log_prob(flow.transform, torch.zeros(2, 2))


def test_a_flow_says_whether_its_log_prob_is_exact_in_the_current_mode():
    torch.manual_seed(0)
    dense = dense_iresnet_flow(4, n_blocks=2, hidden_features=8)
    assert not dense.log_prob_is_exact  # training: the power series, one draw of probes
    dense.eval()
    x = torch.randn(3, 4)
    assert dense.log_prob_is_exact and torch.equal(dense.log_prob(x), dense.log_prob(x))
    image = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4).eval()
    assert not image.log_prob_is_exact  # convolutional blocks keep their estimator in eval mode
    image.residual_blocks()[0].use_log_det_estimator(ExactLogDet())
    assert image.log_prob_is_exact


def test_image_conditional_flows_are_evaluated_with_one_or_many_contexts():
    from invertnet.models import realnvp_flow

    torch.manual_seed(0)
    flow = realnvp_flow((1, 8, 8), n_steps=1, hidden=4, levels=17, context_shape=(1, 4, 4))
    x = torch.randint(0, 17, (6, 1, 8, 8))
    contexts = torch.randn(6, 1, 4, 4)
    many = evaluate_log_prob(flow, x, context=contexts)
    one = evaluate_log_prob(flow, x, context=contexts[0])
    assert many.log_prob.shape == one.log_prob.shape == (6,)
    torch.manual_seed(1)
    shared = evaluate_log_prob(flow, x, context=contexts[0].expand(6, 1, 4, 4))
    torch.manual_seed(1)
    assert torch.allclose(evaluate_log_prob(flow, x, context=contexts[0]).log_prob, shared.log_prob)
