"""Conditional flows: g(x, c) contractive in x for every context, blocks at fixed contexts through the generic
contract, flow.log_prob(x, context=c), flow(c) as the conditional distribution, normalised densities per context."""

import pytest
import torch

from invertnet.layers import AffineCoupling, ConditionalLipschitzMLP, InvertibleResidual, refine_spectral_norms
from invertnet.logdet import ExactLogDet
from invertnet.models import FlowDistribution, dense_iresnet_flow, realnvp_flow


def _block(context_features=3, coeff=0.9):
    torch.manual_seed(0)
    g = ConditionalLipschitzMLP(2, context_features, 16, coeff=coeff).double()
    with torch.no_grad():
        g.context_map.weight.normal_()  # a context that matters
        for layer in g.normalized_layers():
            layer.weight.mul_(4.0)
    return InvertibleResidual(g, log_det=ExactLogDet()).double()


def test_lipschitz_bound_holds_for_every_context():
    block = _block()
    refine_spectral_norms(block)
    bound = block.lipschitz_bound()
    assert bound <= 0.9**3 + 1e-9
    x = torch.randn(256, 2, dtype=torch.float64)
    dx = 1e-3 * torch.randn_like(x)
    for scale in (0.0, 1.0, 30.0):
        view = block.at(scale * torch.randn(3, dtype=torch.float64))
        ratio = (view.g(x + dx) - view.g(x)).norm(dim=1) / dx.norm(dim=1)
        assert ratio.max() <= bound + 1e-6


def test_block_at_a_context_round_trips_and_has_the_exact_log_det():
    block = _block()
    refine_spectral_norms(block)
    context = torch.randn(5, 3, dtype=torch.float64)
    view = block.eval().at(context)
    x = torch.randn(5, 2, dtype=torch.float64)
    y, log_det = view.forward_and_log_det(x)
    torch.testing.assert_close(view.inverse(y), x, atol=1e-9, rtol=0)
    brute = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, c=context[i]: block.at(c)(v[None])[0], x[i])
            .slogdet()
            .logabsdet
            for i in range(5)
        ]
    )
    torch.testing.assert_close(log_det, brute)
    other = block.at(torch.zeros(3, dtype=torch.float64))
    assert not torch.allclose(other(x), y)  # the context changes the map


def test_gradcheck_through_the_context():
    block = _block()
    refine_spectral_norms(block)
    block.eval()
    x = torch.randn(3, 2, dtype=torch.float64)
    context = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: block.at(c).forward_and_log_det(x)[1], (context,))
    y = block.at(context.detach())(x).detach()
    assert torch.autograd.gradcheck(lambda c: block.at(c).inverse(y), (context,), atol=1e-5)


def test_conditional_block_without_context_says_so():
    block = _block()
    with pytest.raises(TypeError, match="context"):
        block(torch.randn(2, 2, dtype=torch.float64))


def _conditional_flow():
    torch.manual_seed(1)
    flow = dense_iresnet_flow(2, n_blocks=2, hidden_features=16, context_features=2).double()
    for block in flow.residual_blocks():
        with torch.no_grad():
            block.g.context_map.weight.normal_(std=0.3)
    x = torch.randn(64, 2, dtype=torch.float64)
    flow.log_prob(x, context=torch.randn(64, 2, dtype=torch.float64))  # ActNorm initialisation
    refine_spectral_norms(flow)
    return flow.eval()


def test_conditional_flow_api_shapes():
    flow = _conditional_flow()
    context = torch.randn(4, 2, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert flow.log_prob(x, context=context).shape == (4,)
    conditional = flow(context)
    assert isinstance(conditional, FlowDistribution) and conditional.batch_shape == (4,)
    torch.testing.assert_close(conditional.log_prob(x), flow.log_prob(x, context=context))
    assert flow.sample((7,), context=context).shape == (7, 4, 2)
    assert flow.sample(5, context=context[0]).shape == (5, 2)
    samples, log_prob = flow.rsample_and_log_prob((3,), context=context)
    assert samples.shape == (3, 4, 2) and log_prob.shape == (3, 4)
    torch.testing.assert_close(log_prob, conditional.log_prob(samples), atol=1e-8, rtol=0)
    with pytest.raises(TypeError, match="context"):
        flow.log_prob(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conditional_density_integrates_to_one_for_each_context(seed):
    flow = _conditional_flow()
    torch.manual_seed(seed)
    context = torch.randn(2, dtype=torch.float64)
    side = torch.linspace(-10, 10, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        density = torch.cat([flow.log_prob(chunk, context=context).exp() for chunk in grid.split(8192)])
    mass = density.sum().item() * (side[1] - side[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=0.02)


def test_contexts_give_different_distributions():
    flow = _conditional_flow()
    x = torch.randn(16, 2, dtype=torch.float64)
    a = flow.log_prob(x, context=torch.zeros(2, dtype=torch.float64))
    b = flow.log_prob(x, context=torch.full((2,), 3.0, dtype=torch.float64))
    assert (a - b).abs().max() > 1e-2


def test_conditional_coupling_flow():
    torch.manual_seed(2)
    flow = realnvp_flow(2, n_steps=2, hidden=8, context_features=3).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.normal_(std=0.3)  # the conditioners' zero last layers would ignore the context
    context = torch.randn(6, 3, dtype=torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    log_prob = flow.log_prob(x, context=context)
    assert log_prob.shape == (6,)
    z = flow.transform.at(context)(x)
    torch.testing.assert_close(flow.transform.at(context).inverse(z), x)
    assert isinstance(next(m for m in flow.transform.modules() if isinstance(m, AffineCoupling)), AffineCoupling)
    assert torch.isfinite(log_prob).all()
    assert not torch.allclose(log_prob, flow.log_prob(x, context=torch.zeros(6, 3, dtype=torch.float64)))


def test_gradcheck_of_a_coupling_through_the_context():
    torch.manual_seed(3)
    layer = AffineCoupling((3,), "half", hidden=6, context_features=2).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(std=0.4)
    x = torch.randn(4, 3, dtype=torch.float64)
    context = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: layer.at(c).forward_and_log_det(x), (context,))
    y = layer.at(context.detach())(x).detach()
    assert torch.autograd.gradcheck(lambda c: layer.at(c).inverse(y), (context,))
    with pytest.raises(TypeError, match="context"):
        layer(x)


def test_conditional_two_moons_example_runs():
    from tests.scripts import load_script

    report = load_script("examples/conditional_two_moons.py").main(["--steps", "100", "--blocks", "3", "--output", ""])
    assert report["test_log_likelihood_given_its_moon"] > report["test_log_likelihood_given_the_other_moon"] + 1
    for key in ("mass_moon_0", "mass_moon_1", "mass_halfway"):
        assert report[key] == pytest.approx(1.0, abs=0.03), key


def test_a_flow_given_a_context_follows_its_parent_and_does_not_change_it():
    flow = _conditional_flow().train()
    context = torch.randn(3, 2, dtype=torch.float64)
    given = flow(context)
    flow.eval()  # after binding: the bound flow must see eval mode (exact log-dets, deterministic)
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(given.log_prob(x), given.log_prob(x), atol=0, rtol=0)
    torch.testing.assert_close(given.log_prob(x), flow.log_prob(x, context=context))
    flow.train()
    given.eval()  # must not reach the parent's layers
    assert all(module.training for module in flow.modules())


def test_integer_contexts_are_cast_and_bound_flows_are_named():
    flow = _conditional_flow()
    codes = torch.nn.functional.one_hot(torch.tensor([0, 1]), 2)  # int64
    assert flow(codes).log_prob(torch.zeros(2, 2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="already given a context"):
        flow(codes)(codes)
    from invertnet.models import evaluate_log_prob

    with pytest.raises(TypeError, match="with context="):
        evaluate_log_prob(flow(codes), torch.zeros(2, 2, dtype=torch.float64))


def test_a_custom_conditional_branch_works_at_a_context():
    class Branch(torch.nn.Module):  # a plain module: no linearize, no declarations
        context_features = 2

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2).double()

        def forward(self, x, context):
            return 0.3 * torch.tanh(self.linear(x) + context)

    block = InvertibleResidual(Branch(), log_det=ExactLogDet()).eval()
    view = block.at(torch.ones(2, dtype=torch.float64))
    x = torch.randn(4, 2, dtype=torch.float64)
    y, log_det = view.forward_and_log_det(x)
    torch.testing.assert_close(view.inverse(y, strict=False), x, atol=1e-8, rtol=0)
    assert not hasattr(view.g, "linearize") and view.lipschitz_bound() is None


def test_a_memory_saving_sequence_stays_one_at_a_context():
    from invertnet.layers import MemorySavingSequential

    flow = dense_iresnet_flow(2, n_blocks=2, hidden_features=8, context_features=2)
    saving = MemorySavingSequential(*flow.transform)
    view = saving.at(torch.zeros(2))
    assert type(view) is MemorySavingSequential and len(view) == len(saving)
    view(torch.randn(3, 2))


def test_log_prob_of_a_given_flow_broadcasts_like_torch():
    flow = _conditional_flow()
    context = torch.randn(4, 2, dtype=torch.float64)
    given = flow(context)
    x = torch.randn(5, 1, 2, dtype=torch.float64)
    assert given.log_prob(x).shape == (5, 4)
    torch.testing.assert_close(given.log_prob(x)[:, 2], flow.log_prob(x[:, 0], context=context[2].expand(5, 2)))
    assert given.log_prob(torch.zeros(2, dtype=torch.float64)).shape == (4,)
    mixture = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.ones(4)), given)
    assert mixture.log_prob(torch.randn(7, 2, dtype=torch.float64)).shape == (7,)
    with pytest.raises(ValueError, match="broadcast"):
        given.log_prob(torch.zeros(3, 2, dtype=torch.float64))


def test_conditional_image_flow_and_gradcheck_through_the_context():
    from invertnet.layers import ConditionalLipschitzConvNet
    from invertnet.models import multiscale_iresnet_flow

    torch.manual_seed(4)
    flow = multiscale_iresnet_flow((1, 4, 4), n_scales=2, n_blocks=1, hidden_channels=4, levels=17, context_features=3)
    for block in flow.residual_blocks():
        assert isinstance(block.g, ConditionalLipschitzConvNet)
        with torch.no_grad():
            block.g.context_map.weight.normal_(std=0.5)
    levels = torch.randint(0, 17, (4, 1, 4, 4))
    context = torch.randn(4, 3)
    flow.log_prob(levels, context=context)
    refine_spectral_norms(flow)
    assert flow(context).sample().shape == (4, 1, 4, 4)
    block = flow.residual_blocks()[0].double().eval()
    block.use_log_det_estimator(ExactLogDet())
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda given: block.at(given).forward_and_log_det(x), (c,))


def test_conditional_mint_layer_is_triangular_for_every_context_and_differentiable_in_it():
    from invertnet.layers import MintLayer

    torch.manual_seed(5)
    layer = MintLayer(2, 2, context_features=3).double()
    with torch.no_grad():
        layer.context_map.weight.normal_(std=0.5)
        for conv in (layer.conv1, layer.conv2, layer.conv3):
            conv.raw_weight.normal_(std=0.4)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    outputs = []
    for scale in (0.0, 1.0, 30.0):
        view = layer.at(scale * torch.ones(3, dtype=torch.float64))
        flat = lambda z, view=view: view(z.view(1, 2, 3, 3)).flatten()  # noqa: E731
        jacobian = torch.autograd.functional.jacobian(flat, x[0].flatten())
        assert torch.allclose(jacobian, jacobian.tril()), "lower triangular at every context"
        assert bool((jacobian.diagonal() >= layer.t.detach().flatten().repeat_interleave(9) - 1e-12).all())
        outputs.append(view(x))
    assert not torch.allclose(outputs[0], outputs[1]), "the context changes the map"
    c = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda given: layer.at(given).forward_and_log_det(x), (c,))
    y = layer.at(c.detach())(x).detach()
    assert torch.autograd.gradcheck(lambda given: layer.at(given).inverse(y), (c,), atol=1e-6)
    with pytest.raises(TypeError, match="MintLayer: this layer is conditional"):
        layer(x)


def test_conditional_mintnet_flow_gives_each_context_its_density():
    from invertnet.models import mintnet_flow

    torch.manual_seed(6)
    flow = mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=2, n_squeezes=1, levels=17, context_features=10)
    for layer in flow.transform.modules():
        if getattr(layer, "context_features", 0):
            with torch.no_grad():
                layer.context_map.weight.normal_(std=0.5)
    levels = torch.randint(0, 17, (4, 1, 4, 4))
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    flow.eval()
    given = flow.log_prob(levels, context=labels)
    other = flow.log_prob(levels, context=labels.roll(1, dims=0))
    assert given.shape == (4,) and not torch.allclose(given, other)
    samples = flow(labels).sample()
    assert samples.shape == (4, 1, 4, 4)
    with pytest.raises(TypeError, match="conditional"):
        flow.log_prob(levels)


def test_image_contexts_reach_every_layer_at_its_resolution():
    from invertnet.layers import context_shape_at
    from invertnet.layers.conditional import check_context

    assert context_shape_at((1, 8, 8), 4, 4) == (4, 4, 4)  # finer: space to depth
    assert context_shape_at((3, 2, 2), 8, 8) == (3, 8, 8)  # coarser: repeated
    with pytest.raises(ValueError, match="integer multiple"):
        context_shape_at((1, 6, 6), 4, 4)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    squeezed = check_context(image, (4, 2, 2), "layer")
    assert squeezed.shape == (1, 4, 2, 2) and sorted(squeezed.flatten().tolist()) == list(range(16))
    repeated = check_context(image[0], (1, 8, 8), "layer")  # one context without its batch dimension
    assert repeated.shape == (1, 1, 8, 8) and torch.equal(repeated[0, 0, ::2, ::2], image[0, 0])
    with pytest.raises(ValueError, match=r"layer: expected an image context that becomes \(4, 2, 2\)"):
        check_context(torch.zeros(1, 2, 4, 4), (4, 2, 2), "layer")


@pytest.mark.parametrize("builder", ["multiscale_iresnet_flow", "realnvp_flow", "glow_flow", "mintnet_flow"])
def test_image_conditional_flows_give_each_image_context_its_density(builder):
    import invertnet.models as models

    small = {
        "multiscale_iresnet_flow": {"n_scales": 2, "n_blocks": 1, "hidden_channels": 4},
        "realnvp_flow": {"n_steps": 1, "hidden": 4},
        "glow_flow": {"n_steps": 1, "hidden": 4},
        "mintnet_flow": {"n_blocks": 2, "hidden_factor": 2, "n_squeezes": 1},
    }[builder]
    torch.manual_seed(7)
    flow = getattr(models, builder)((1, 8, 8), levels=17, context_shape=(1, 4, 4), **small)
    for module in flow.modules():
        if getattr(module, "context_features", 0):
            for parameter in module.parameters():
                torch.nn.init.normal_(parameter, std=0.2)
    flow.eval()
    levels = torch.randint(0, 17, (4, 1, 8, 8))
    low_resolution = torch.randn(4, 1, 4, 4)
    given = flow.log_prob(levels, context=low_resolution)
    assert given.shape == (4,) and not torch.allclose(given, flow.log_prob(levels, context=low_resolution.flip(0)))
    conditional = flow(low_resolution[:2])
    assert conditional.batch_shape == (2,) and conditional.sample((3,)).shape == (3, 2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expected contexts of shape \(\.\.\., 1, 4, 4\)"):
        flow.log_prob(levels, context=torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="context_features .* or context_shape"):
        getattr(models, builder)((1, 8, 8), context_features=2, context_shape=(1, 4, 4), **small)


def test_an_image_context_keeps_the_certified_bound_and_is_differentiable():
    from invertnet.layers import ConditionalLipschitzConvNet, context_shape_at

    torch.manual_seed(8)
    g = ConditionalLipschitzConvNet(2, context_shape_at((1, 8, 8), 4, 4), 4, coeff=0.9).double()
    with torch.no_grad():
        g.context_map.weight.normal_(std=0.5)
    block = InvertibleResidual(g, log_det=ExactLogDet()).double()
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    block.at(torch.zeros(1, 8, 8, dtype=torch.float64))(x)  # the convolutions learn their input size
    refine_spectral_norms(block)
    bound = block.lipschitz_bound()
    assert bound is not None and bound < 1
    dx = 1e-3 * torch.randn_like(x)
    for scale in (0.0, 1.0, 30.0):
        view = block.at(scale * torch.randn(1, 8, 8, dtype=torch.float64))
        ratio = (view.g(x + dx) - view.g(x)).flatten(1).norm(dim=1) / dx.flatten(1).norm(dim=1)
        assert bool((ratio <= bound + 1e-9).all())
    block.eval()
    c = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    x = x[:2]
    assert torch.autograd.gradcheck(lambda given: block.at(given).forward_and_log_det(x), (c,))
    y = block.at(c.detach())(x).detach()
    assert torch.autograd.gradcheck(lambda given: block.at(given).inverse(y, atol=1e-12, rtol=0.0), (c,), atol=1e-6)
