"""VariationalDequantization: the log-det is that of the map from the noise, q is a normalised density on each
bin, the bound holds below the exact discrete log-likelihood and training q tightens it; builders and configs."""

import math

import pytest
import torch

from invertnet import InvertibleSequential
from invertnet.app.config import RunConfig
from invertnet.layers import ConvolutionalConditioner, Logit, VariationalDequantization
from invertnet.models import FlowDistribution, dense_iresnet_flow, glow_flow, multiscale_iresnet_flow, standard_normal

from .tolerances import assert_close


def _randomised(layer: VariationalDequantization, scale: float = 0.5, seed: int = 0) -> VariationalDequantization:
    """The layer with its conditioner's zero-initialised last layer drawn at random, weights of standard deviation
    scale / sqrt(fan-in): a non-uniform q whose locations and log-scales are of order ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = layer.conditioner[-1]
        weight = torch.randn(last.weight.shape, generator=generator, dtype=last.weight.dtype)
        last.weight.copy_(scale * weight / math.sqrt(last.weight.shape[1]))
        bias = torch.randn(last.bias.shape, generator=generator, dtype=last.bias.dtype)
        last.bias.copy_(scale * bias / math.sqrt(last.weight.shape[1]))
    return layer


def _levels(batch: int, shape: tuple[int, ...], levels: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (batch, *shape), generator=generator).double()


def test_starts_as_uniform_dequantisation():
    layer = VariationalDequantization(5, (2, 3)).double()
    x = _levels(4, (2, 3), 5)
    v = torch.rand(4, 2, 3, dtype=torch.float64)
    y, log_det = layer.dequantize(x, v)
    assert_close(y, (x + v) / 5)
    assert_close(log_det, torch.full((4,), -6 * math.log(5), dtype=torch.float64))


def test_log_det_is_that_of_the_map_from_the_noise():
    """log|det dy/dv| against the brute-force Jacobian of v -> y at fixed x (float64), sample by sample."""
    layer = _randomised(VariationalDequantization(5, 3, hidden_features=8).double())
    x = _levels(3, (3,), 5)
    v = torch.rand(3, 3, dtype=torch.float64)
    _, log_det = layer.dequantize(x, v)
    for sample in range(3):
        jacobian = torch.autograd.functional.jacobian(
            lambda noise, i=sample: layer.dequantize(x[i : i + 1], noise.unsqueeze(0))[0].squeeze(0), v[sample]
        )
        assert_close(log_det[sample], torch.linalg.slogdet(jacobian).logabsdet)
    assert log_det.std() > 1e-3, "the randomised q must differ from sample to sample"


@pytest.mark.parametrize("levels", [4, 256])
def test_samples_stay_in_their_bin_even_where_q_saturates(levels):
    """Locations and log-scales of order 10 push float32's sigmoid to 0 and 1; every sample still quantises
    back to its level."""
    layer = _randomised(VariationalDequantization(levels, (1, 2, 2)), scale=10.0)
    x = _levels(4096, (1, 2, 2), levels).float()
    y = layer(x)
    assert torch.equal(torch.floor(y * levels).clamp(0, levels - 1), x)
    assert torch.equal(layer.inverse(y), x)


def test_the_inverse_undoes_the_log_det():
    layer = _randomised(VariationalDequantization(4, (1, 2, 2)), scale=0.5).double()
    x = _levels(256, (1, 2, 2), 4)
    y, log_det = layer.forward_and_log_det(x)
    x_back, inverse_log_det = layer.inverse_and_log_det(y)
    assert torch.equal(x_back, x)
    assert_close(inverse_log_det, -log_det, atol=1e-8, rtol=1e-8)


def test_q_is_a_normalised_density_on_each_bin():
    """In 1-D, log q(u | x) = inverse log-det - log K; its integral over u in (0, 1) is 1 for every level
    (integrated in t = logit(u), where q's possible singularities at the ends of the bin are smooth tails)."""
    layer = _randomised(VariationalDequantization(3, 1, hidden_features=4).double(), scale=1.0)
    t = torch.linspace(-30, 30, 200_001, dtype=torch.float64)
    u = torch.sigmoid(t)
    for level in range(3):
        y = ((level + u) / 3).unsqueeze(1)
        _, inverse_log_det = layer.inverse_and_log_det(y)
        density = torch.exp(inverse_log_det - math.log(3)) * u * (1 - u)  # q(u) du/dt
        assert_close(torch.trapezoid(density, t), torch.tensor(1.0, dtype=torch.float64), atol=1e-4, rtol=0)


def _one_dimensional_flow() -> FlowDistribution:
    torch.manual_seed(0)
    transform = InvertibleSequential(VariationalDequantization(4, 1, hidden_features=16), Logit(0.05))
    return FlowDistribution(transform, standard_normal((1,))).double()


def _exact_log_likelihood(levels: torch.Tensor) -> torch.Tensor:
    """log P(x) = log of the integral over x's bin of the logit-normal density of y, by the trapezoid rule."""
    logit_normal = FlowDistribution(Logit(0.05), standard_normal((1,))).double()
    u = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    values = []
    for level in levels.flatten().tolist():
        y = ((level + u) / 4).clamp(1e-12, 1 - 1e-12).unsqueeze(1)
        values.append(torch.log(torch.trapezoid(logit_normal.log_prob(y).exp(), (level + u) / 4)))
    return torch.stack(values)


def _bound_and_standard_error(flow: FlowDistribution, levels: torch.Tensor, draws: int) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        values = flow.log_prob(levels.repeat_interleave(draws, 0)).view(len(levels), draws)
    return values.mean(1), values.std(1) / math.sqrt(draws)


def test_the_bound_lies_below_the_discrete_log_likelihood_and_training_q_tightens_it():
    """Ho et al. 2019, section 3.1, on a fixed logit-normal density of y: E_q[log p(x + u) - log q(u | x)] <= log P(x)
    at the uniform start and after training q alone; the gap shrinks to less than a fifth."""
    flow = _one_dimensional_flow()
    levels = torch.arange(4, dtype=torch.float64).unsqueeze(1)
    exact = _exact_log_likelihood(levels)
    start, start_error = _bound_and_standard_error(flow, levels, 20_000)
    assert (start <= exact + 4 * start_error).all()
    start_gap = (exact - start).sum()
    assert start_gap > 0.05, "the logit-normal density must vary within the bins for the test to mean anything"
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(300):
        loss = -flow.log_prob(levels.repeat_interleave(64, 0)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained, trained_error = _bound_and_standard_error(flow, levels, 20_000)
    assert (trained <= exact + 4 * trained_error).all()
    assert (exact - trained).sum() < start_gap / 5


@pytest.mark.parametrize("noise", ["uniform", "midpoint"])
def test_huge_log_scales_are_bounded_so_the_log_det_stays_finite(noise):
    layer = VariationalDequantization(17, 4, noise=noise)
    with torch.no_grad():
        layer.conditioner[-1].bias[4:] = 200.0  # e^200 overflows float32
    y, log_det = layer.forward_and_log_det(_levels(8, (4,), 17).float())
    assert torch.isfinite(y).all() and torch.isfinite(log_det).all()


def test_midpoint_noise_is_deterministic_and_uniform_noise_is_drawn():
    layer = _randomised(VariationalDequantization(5, 4, noise="midpoint"))
    x = _levels(3, (4,), 5).float()
    assert torch.equal(layer(x), layer(x))
    location, _ = layer.conditioner(2 * x / 4 - 1).chunk(2, dim=1)
    assert_close(layer(x), (x + torch.sigmoid(location)) / 5)
    drawn = VariationalDequantization(5, 4)
    assert not torch.equal(drawn(x), drawn(x))


def test_gradcheck_in_the_noise_and_the_parameters():
    layer = _randomised(VariationalDequantization(5, 2, hidden_features=3).double())
    x = _levels(2, (2,), 5)
    v = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    class Dequantize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, noise):
            return self.layer.dequantize(x, noise)

    def fused(noise, *parameters):
        state = {f"layer.{name}": value for name, value in zip(names, parameters, strict=True)}
        return torch.func.functional_call(Dequantize(), state, (noise,), strict=True)

    assert torch.autograd.gradcheck(fused, (v, *values), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: VariationalDequantization(1, 3), "levels must be at least 2"),
        (lambda: VariationalDequantization(4, 3, noise="gaussian"), "noise must be"),
        (lambda: VariationalDequantization(4, 3, hidden_features=0), "hidden_features"),
    ],
)
def test_invalid_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.tensor([[0.0, 1.0, 5.0]]), r"levels in \[0, 3\]"),
        (torch.tensor([[0.0, -1.0, 2.0]]), r"levels in \[0, 3\]"),
        (torch.tensor([[0.0, float("nan"), 2.0]]), "non-finite|NaN"),
        (torch.zeros(0, 3), "empty batch"),
        (torch.zeros(2, 4), r"shape \(B, 3\)"),
    ],
)
def test_bad_input_is_named(x, message):
    with pytest.raises(ValueError, match=message):
        VariationalDequantization(4, 3)(x)


def test_noise_outside_the_open_interval_is_named():
    layer = VariationalDequantization(4, 2)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        layer.dequantize(torch.zeros(1, 2), torch.tensor([[0.5, 1.0]]))


def test_a_conditioner_of_the_wrong_output_shape_is_named():
    layer = VariationalDequantization(4, 3, conditioner=torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"conditioner must return shape \(2, 6\)"):
        layer(torch.zeros(2, 3))


def test_integer_levels_and_float64_are_followed():
    layer = VariationalDequantization(4, 3).double()
    y, log_det = layer.forward_and_log_det(torch.tensor([[0, 1, 3]], dtype=torch.float64))
    assert y.dtype == log_det.dtype == torch.float64
    y, log_det = layer.forward_and_log_det(torch.tensor([[0, 1, 3]]))  # integer levels take the layer's dtype
    assert y.dtype == log_det.dtype == torch.float64
    y = VariationalDequantization(4, 3)(torch.tensor([[0, 1, 3]]))
    assert y.dtype == torch.get_default_dtype()


def test_the_dense_flow_trains_with_it_and_samples_levels():
    torch.manual_seed(0)
    flow = dense_iresnet_flow((1, 4, 4), n_blocks=1, hidden_features=8, levels=5, dequantization="variational")
    x = _levels(16, (1, 4, 4), 5).float()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    before = flow.bits_per_dim(x).mean().item()
    for _ in range(30):
        loss = flow.bits_per_dim(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert flow.bits_per_dim(x).mean().item() < before
    assert flow.transform.parts[0].conditioner[-1].weight.abs().max() > 0, "q must have trained"
    samples = flow.sample((8,))
    assert samples.shape == (8, 1, 4, 4) and torch.equal(samples, samples.round()) and samples.max() <= 4


def test_flow_configs_take_the_dequantization():
    section = {"name": "digits", "data": {"name": "digits"}}
    config = RunConfig.model_validate({**section, "model": {"kind": "dense", "dequantization": "variational"}})
    assert config.model.builder_arguments()["dequantization"] == "variational"
    config = RunConfig.model_validate({**section, "model": {"kind": "glow", "dequantization": "variational_conv"}})
    assert config.model.builder_arguments()["dequantization"] == "variational_conv"
    with pytest.raises(ValueError, match="dequantization"):
        RunConfig.model_validate({**section, "model": {"kind": "dense", "dequantization": "learned"}})


def test_the_convolutional_conditioner_starts_uniform_and_lays_out_locations_then_log_scales():
    conditioner = ConvolutionalConditioner(2, hidden_channels=5).double()
    assert sum(p.numel() for p in conditioner.parameters()) == 27 * 2 * 5 + 5 + 2 * 2
    layer = VariationalDequantization(4, (2, 3, 3), conditioner=conditioner).double()
    x = _levels(3, (2, 3, 3), 4)
    v = torch.rand(3, 2, 3, 3, dtype=torch.float64)
    assert_close(layer.dequantize(x, v)[0], (x + v) / 4)  # zero last convolution: q uniform
    with torch.no_grad():
        last = conditioner.net[-1]
        last.weight.normal_(0, 0.1)
        last.bias.normal_(0, 0.1)
    out = conditioner.net(2 * x / 3 - 1)
    location, log_scale = layer._location_and_log_scale(x)
    assert_close(location, out[:, :2].flatten(1))
    assert_close(log_scale, out[:, 2:].flatten(1))
    _, log_det = layer.dequantize(x, v)
    jacobian = torch.autograd.functional.jacobian(lambda noise: layer.dequantize(x[:1], noise)[0].flatten(), v[:1])
    assert_close(log_det[0], torch.linalg.slogdet(jacobian.reshape(18, 18)).logabsdet)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 2, H, W\)"):
        conditioner(torch.zeros(1, 3, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: multiscale_iresnet_flow(
            (1, 4, 4), n_scales=2, n_blocks=1, hidden_channels=4, levels=5, dequantization="variational_conv"
        ),
        lambda: glow_flow((1, 4, 4), n_scales=1, n_steps=1, hidden=4, levels=5, dequantization="variational_conv"),
    ],
    ids=["multiscale", "glow"],
)
def test_image_flows_train_with_the_convolutional_dequantiser(make):
    torch.manual_seed(0)
    flow = make()
    assert isinstance(flow.transform.parts[0].conditioner, ConvolutionalConditioner)
    x = _levels(16, (1, 4, 4), 5).float()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(5):
        loss = flow.bits_per_dim(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert flow.transform.parts[0].conditioner.net[-1].weight.abs().max() > 0, "q must have trained"
    assert flow.sample((4,)).shape == (4, 1, 4, 4)


def test_the_convolutional_dequantiser_needs_images():
    with pytest.raises(ValueError, match="variational_conv' needs images"):
        dense_iresnet_flow(4, levels=5, dequantization="variational_conv")
