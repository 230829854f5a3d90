"""Flows in torch.distributions: ModuleTransform in TransformedDistribution, FlowDistribution's Distribution
contract (shapes of sample / log_prob for any sample shape, expand, support), rsample_and_log_prob in one pass,
and the exact eval-mode log-det of dense residual blocks."""

import pytest
import torch
from torch.distributions import Distribution, Transform, TransformedDistribution
from torch.distributions.transforms import ComposeTransform, ExpTransform

from invertnet.layers import (
    ActNorm,
    AffineCoupling,
    Flatten,
    InjectivePad,
    InvertibleResidual,
    LipschitzConvNet,
    LipschitzMLP,
    Squeeze,
)
from invertnet.logdet import ExactLogDet, PowerSeriesLogDet
from invertnet.models import FlowDistribution, dense_iresnet_flow, multiscale_iresnet_flow, standard_normal
from invertnet.transforms import ModuleTransform

SHAPES = [(), 7, (7,), (3, 4), (2, 0)]


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    model = dense_iresnet_flow(2, n_blocks=2, hidden_features=16).double()
    model.log_prob(torch.randn(64, 2, dtype=torch.float64))  # ActNorm's data-dependent initialisation
    return model.eval()


def _size(shape):
    return torch.Size((shape,) if isinstance(shape, int) else shape)


def test_flow_is_a_distribution_with_shapes(flow):
    assert isinstance(flow, Distribution) and isinstance(flow, torch.nn.Module)
    assert flow.event_shape == (2,) and flow.batch_shape == ()
    assert flow.support.event_dim == 1 and flow.has_rsample


@pytest.mark.parametrize("shape", SHAPES)
def test_sample_and_log_prob_shapes_follow_torch(flow, shape):
    samples = flow.sample(shape)
    assert samples.shape == _size(shape) + flow.event_shape
    assert flow.log_prob(samples).shape == _size(shape)
    assert flow.rsample(shape).shape == samples.shape
    x, log_prob = flow.rsample_and_log_prob(shape)
    assert x.shape == samples.shape and log_prob.shape == _size(shape)


def test_sample_of_an_int_is_a_batch(flow):
    assert flow.sample(1000).shape == (1000, 2)


def test_rsample_and_log_prob_is_log_prob_of_the_sample(flow):
    x, log_prob = flow.rsample_and_log_prob((5, 3))
    torch.testing.assert_close(log_prob, flow.log_prob(x), atol=1e-8, rtol=0)


def test_rsample_and_log_prob_runs_no_forward_pass(flow):
    calls = []
    hooks = [block.register_forward_hook(lambda *_: calls.append(1)) for block in flow.residual_blocks()]
    try:
        flow.rsample_and_log_prob((4,))
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls  # the log-det is the inverse's, computed inside the inverse


def test_reverse_kl_gradient_reaches_the_parameters():
    torch.manual_seed(1)
    model = dense_iresnet_flow(2, n_blocks=1, hidden_features=8).double()
    model.log_prob(torch.randn(32, 2, dtype=torch.float64))
    x, log_prob = model.rsample_and_log_prob(16)
    (log_prob + x.pow(2).sum(-1)).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_flow_inside_transformed_distribution_matches_flow(flow):
    transform = flow.transform.as_transform(flow.event_shape)
    assert isinstance(transform, ModuleTransform) and isinstance(transform, Transform)
    assert transform.inv.inv is transform
    same = TransformedDistribution(flow.base, [transform.inv])
    x = flow.sample((6, 2))
    torch.testing.assert_close(same.log_prob(x), flow.log_prob(x))
    assert same.sample((4, 3)).shape == (4, 3, 2) and same.event_shape == (2,)


def test_transform_composes_with_torch_transforms(flow):
    exp_after = ComposeTransform([flow.transform.as_transform((2,)).inv, ExpTransform()])
    positive = TransformedDistribution(flow.base, [exp_after])
    y = positive.sample((5,))
    assert (y > 0).all()
    x = y.log()
    expected = flow.log_prob(x) - x.sum(-1)  # change of variables through exp, per coordinate
    torch.testing.assert_close(positive.log_prob(y), expected)


def test_transform_log_det_matches_module_and_caches_the_pair():
    layer = ActNorm(3).double()
    layer(torch.randn(16, 3, dtype=torch.float64))
    transform = layer.as_transform((3,))
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    y = transform(x)
    _, expected = layer.forward_and_log_det(x.reshape(20, 3))
    assert transform.log_abs_det_jacobian(x, y).shape == (4, 5)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), expected.reshape(4, 5))
    torch.testing.assert_close(transform.log_abs_det_jacobian(x.clone(), y), expected.reshape(4, 5))  # recomputed
    torch.testing.assert_close(transform.inv(y), x)
    torch.testing.assert_close(transform.inv.log_abs_det_jacobian(y, transform.inv(y)), -expected.reshape(4, 5))


def test_transform_names_a_wrong_event_shape():
    transform = ActNorm(3).double().as_transform((3,))
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        transform(torch.zeros(4, 2, dtype=torch.float64))


def test_as_transform_needs_a_shape_when_the_layer_has_none():
    with pytest.raises(ValueError, match="pass the shape of one sample"):
        ActNorm(3).as_transform()
    coupling = AffineCoupling((4,), hidden=8)
    assert coupling.as_transform().event_shape == (4,)


def test_shape_changing_layers_declare_their_event_shapes():
    assert Squeeze().event_shape_after((3, 8, 8)) == (12, 4, 4)
    assert Squeeze().event_shape_before((12, 4, 4)) == (3, 8, 8)
    assert Squeeze().inv.event_shape_after((12, 4, 4)) == (3, 8, 8)
    assert Flatten((1, 8, 8)).event_shape_after((1, 8, 8)) == (64,)
    assert InjectivePad(2).event_shape_after((3, 4, 4)) == (5, 4, 4)
    with pytest.raises(ValueError, match="even H and W"):
        Squeeze().event_shape_after((3, 7, 8))
    transform = Squeeze().as_transform((1, 4, 4))
    assert transform.forward_shape((5, 1, 4, 4)) == (5, 4, 2, 2)
    assert transform.inverse_shape((5, 4, 2, 2)) == (5, 1, 4, 4)


def test_image_flow_event_shape_is_the_data_shape():
    flow = dense_iresnet_flow((1, 4, 4), n_blocks=1, hidden_features=8, levels=17)
    assert flow.event_shape == (1, 4, 4) and flow.base.event_shape == (16,)
    images = multiscale_iresnet_flow((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, levels=17)
    assert images.event_shape == (1, 4, 4)
    levels = torch.randint(0, 17, (2, 3, 1, 4, 4))
    assert images.log_prob(levels).shape == (2, 3)


def test_expand_gives_a_batch_of_the_same_flow(flow):
    expanded = flow.expand((3,))
    assert expanded.batch_shape == (3,) and expanded.event_shape == (2,)
    x = flow.sample((4,))
    stacked = x.unsqueeze(1).expand(4, 3, 2)
    torch.testing.assert_close(expanded.log_prob(stacked), flow.log_prob(x).unsqueeze(1).expand(4, 3))
    assert expanded.sample((2,)).shape == (2, 3, 2)


def test_base_with_a_batch_shape_is_refused():
    base = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="Independent"):
        FlowDistribution(ActNorm(2), base)


def test_eval_log_prob_of_dense_blocks_is_exact_and_repeatable():
    torch.manual_seed(2)
    model = dense_iresnet_flow(3, n_blocks=2, hidden_features=16).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    model.log_prob(x)
    model.eval()
    assert all(block.exact_log_det for block in model.residual_blocks())
    first, second = model.log_prob(x), model.log_prob(x)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    for block in model.residual_blocks():
        block.use_log_det_estimator(ExactLogDet())  # brute force through autograd
    torch.testing.assert_close(model.log_prob(x), first)


def test_training_mode_keeps_the_training_estimator():
    model = dense_iresnet_flow(3, n_blocks=1, hidden_features=8)
    block = model.residual_blocks()[0]
    assert block.active_log_det_estimator is block.log_det_estimator and not block.exact_log_det
    model.eval()
    assert block.exact_log_det


def test_eval_log_det_can_keep_the_training_estimator():
    block = InvertibleResidual(LipschitzMLP(3, 8), PowerSeriesLogDet(2), eval_log_det="training").double().eval()
    assert not block.exact_log_det and block.active_log_det_estimator is block.log_det_estimator
    with pytest.raises(ValueError, match="eval_log_det"):
        InvertibleResidual(LipschitzMLP(3, 8), eval_log_det="exact")


def test_convolutional_blocks_keep_their_stochastic_estimator_in_eval():
    block = InvertibleResidual(LipschitzConvNet(2, 4)).eval()
    assert not block.exact_log_det  # stated: the series with random probes, as configured


def test_flow_distribution_names_a_base_that_is_no_distribution():
    with pytest.raises(TypeError, match="torch.distributions.Distribution"):
        FlowDistribution(ActNorm(2), standard_normal)  # the factory, not a distribution
