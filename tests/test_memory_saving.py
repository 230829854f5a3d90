"""Memory-saving training: gradients equal ordinary backpropagation, saved memory independent of depth."""

import copy

import pytest
import torch
from torch import nn

from invertnet import InvertibleModule
from invertnet.layers import InvertibleBatchNorm, MemorySavingSequential, saved_activation_bytes
from invertnet.logdet import ExactLogDet, UnbiasedLogDet
from invertnet.models import dense_iresnet_flow, mintnet_flow, multiscale_iresnet_flow
from invertnet.training import TrainConfig, Trainer

from .tolerances import FLOAT64_INVERSE_ATOL, assert_close

# Stochastic log-dets in training mode: power series with a Rademacher probe (multi-scale, with uniform
# dequantisation noise and lazily sized power-iteration vectors), Russian roulette (dense); MintNet is exact (and
# draws its noise from a learned q in the variational twin, whose draws the recomputation must replay).
# The backward pass inverts the blocks, which needs certified contractions: three power-iteration steps make
# them so for every seed tried (with one, a random first vector leaves 1 seed in 10 with a bound >= 1).
FLOWS = {
    "multiscale_iresnet": lambda blocks=2: multiscale_iresnet_flow(
        (1, 4, 4), n_scales=2, n_blocks=blocks, hidden_channels=4, levels=4, n_power_iterations=3
    ),
    "dense_iresnet": lambda blocks=3: dense_iresnet_flow(
        2, n_blocks=blocks, hidden_features=8, log_det=UnbiasedLogDet()
    ),
    "mintnet": lambda blocks=2: mintnet_flow((1, 4, 4), n_blocks=blocks, hidden_factor=2, n_squeezes=1),
    "mintnet_variational": lambda blocks=2: mintnet_flow(
        (1, 4, 4), n_blocks=blocks, hidden_factor=2, n_squeezes=1, levels=4, dequantization="variational"
    ),
}


def _data(name, batch=3):
    if name in ("multiscale_iresnet", "mintnet_variational"):
        return torch.randint(0, 4, (batch, 1, 4, 4)).double()
    if name == "dense_iresnet":
        return torch.randn(batch, 2, dtype=torch.float64)
    return torch.randn(batch, 1, 4, 4, dtype=torch.float64)


def _twins(name, **options):
    torch.manual_seed(1)
    ordinary = FLOWS[name]().double()
    saving = copy.deepcopy(ordinary)
    saving.transform = MemorySavingSequential(*saving.transform, **options)
    return ordinary, saving


def _gradients(flow, x, seed, with_log_det=True):
    """Loss value, input gradient and parameter gradients of (y**2).sum() + log_det.sum() with fixed draws."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    flow.zero_grad(set_to_none=True)
    if with_log_det:
        y, log_det = flow.transform.forward_and_log_det(x)
        loss = (y**2).sum() + log_det.sum()
    else:
        loss = (flow.transform(x) ** 2).sum()
    loss.backward()
    return loss.detach(), x.grad, [parameter.grad for parameter in flow.parameters()]


def _assert_same_gradients(expected, actual):
    (loss, input_grad, grads), (loss_, input_grad_, grads_) = expected, actual
    assert_close(loss_, loss)
    assert_close(input_grad_, input_grad)
    assert len(grads) == len(grads_) and all(g is not None for g in grads_)
    for grad, grad_ in zip(grads, grads_, strict=True):
        assert_close(grad_, grad)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_gradients_equal_ordinary_backpropagation_in_training_mode(name):
    ordinary, saving = _twins(name)
    x = _data(name)
    for step in range(2):  # the first call also sizes the power-iteration vectors and initialises ActNorm
        _assert_same_gradients(_gradients(ordinary, x, seed=step), _gradients(saving, x, seed=step))
    # the recomputation took no power-iteration step of its own: the state is that of ordinary training
    for (key, expected), (key_, actual) in zip(ordinary.state_dict().items(), saving.state_dict().items(), strict=True):
        assert key == key_
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_plain_forward_gradients_equal_ordinary_backpropagation():
    ordinary, saving = _twins("multiscale_iresnet")
    x = _data("multiscale_iresnet")
    expected = _gradients(ordinary, x, seed=0, with_log_det=False)
    _assert_same_gradients(expected, _gradients(saving, x, seed=0, with_log_det=False))


def test_two_forward_passes_before_one_backward_pass():
    """Each recomputation uses the power-iteration vectors of its own forward pass, not the latest ones."""
    ordinary, saving = _twins("dense_iresnet")
    x1, x2 = _data("dense_iresnet"), _data("dense_iresnet")
    grads = []
    for flow in (ordinary, saving):
        torch.manual_seed(0)
        flow.zero_grad(set_to_none=True)
        (-flow.log_prob(x1).sum() - flow.log_prob(x2).mean()).backward()
        grads.append([parameter.grad for parameter in flow.parameters()])
    for expected, actual in zip(*grads, strict=True):
        assert_close(actual, expected)


def test_without_replayed_random_draws_the_gradient_is_another_sample():
    ordinary, saving = _twins("multiscale_iresnet", preserve_rng_state=False)
    x = _data("multiscale_iresnet")
    (_, _, expected), (_, _, actual) = _gradients(ordinary, x, seed=0), _gradients(saving, x, seed=0)
    assert max((a - e).abs().max().item() for a, e in zip(actual, expected, strict=True)) > 1e-4


@pytest.mark.parametrize("name", ["multiscale_iresnet", "mintnet"])
def test_bytes_saved_for_backward_do_not_grow_with_depth(name):
    sizes = {}
    for memory_saving in (False, True):
        for blocks in (2, 8):
            torch.manual_seed(0)
            flow = FLOWS[name](blocks).double()
            if memory_saving:
                flow.transform = MemorySavingSequential(*flow.transform)
            x = _data(name)
            loss, size = saved_activation_bytes(lambda flow=flow, x=x: flow.log_prob(x).sum(), flow)
            loss.backward()
            sizes[memory_saving, blocks] = size
    assert sizes[True, 2] == sizes[True, 8]
    assert sizes[False, 8] > 3 * sizes[False, 2]
    assert sizes[True, 2] < sizes[False, 2] / 10


def test_trainer_steps_match_ordinary_training(tmp_path):
    ordinary, saving = _twins("multiscale_iresnet")
    data = torch.randint(0, 4, (48, 1, 4, 4)).double()
    config = TrainConfig(steps=3, batch_size=16, lr=1e-2, optimizer="adamax", seed=3)
    for flow, run in ((ordinary, "ordinary"), (saving, "saving")):
        Trainer(flow, data, config, tmp_path / run, progress=False).fit()
    for (key, expected), (key_, actual) in zip(ordinary.state_dict().items(), saving.state_dict().items(), strict=True):
        assert key == key_
        assert_close(actual, expected)


def test_same_parts_state_dict_inverse_and_evaluation():
    ordinary, saving = _twins("mintnet")
    assert saving.state_dict().keys() == ordinary.state_dict().keys()
    saving.load_state_dict(ordinary.state_dict())
    x = _data("mintnet")
    with torch.no_grad():
        y, log_det = saving.transform.forward_and_log_det(x)
        expected_y, expected_log_det = ordinary.transform.forward_and_log_det(x)
    assert_close(y, expected_y, atol=0, rtol=0)
    assert_close(log_det, expected_log_det, atol=0, rtol=0)
    assert_close(saving.transform.inverse(y), x, atol=FLOAT64_INVERSE_ATOL)


def test_batch_statistics_are_refused_in_training_mode():
    transform = MemorySavingSequential(InvertibleBatchNorm(2)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="InvertibleBatchNorm in training mode"):
        transform.forward_and_log_det(x)
    transform.eval()
    y, log_det = transform.forward_and_log_det(x)
    (y.sum() + log_det.sum()).backward()
    assert transform[0].log_gamma.grad is not None


class _RestlessScale(InvertibleModule):
    """y = s x, drawing one more random number at every call (a part that cannot be replayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.calls = 0

    def forward_and_log_det(self, x):
        self.calls += 1
        torch.rand(self.calls)
        return x * self.log_scale.exp(), (x[0].numel() * self.log_scale).expand(x.shape[0])

    def inverse_and_log_det(self, y, **options):
        return y * (-self.log_scale).exp(), (-y[0].numel() * self.log_scale).expand(y.shape[0])


def test_recomputation_with_other_random_draws_warns():
    transform = MemorySavingSequential(_RestlessScale())
    y, log_det = transform.forward_and_log_det(torch.randn(3, 2, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="drew different random numbers"):
        (y.sum() + log_det.sum()).backward()


def test_memory_saving_through_invertnet_train(tmp_path):
    import json

    from click.testing import CliRunner

    from invertnet.app.cli import main

    options = ["--set", "model.memory_saving=true", "--set", "train.steps=4", "--set", "model.n_blocks=1", "--quiet"]
    runner = CliRunner()
    trained = runner.invoke(main, ["train", "--config", "digits", *options, "--run-dir", str(tmp_path)])
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output)
    assert summary["reconstruction"]["status"] == "success"
    evaluated = runner.invoke(main, ["evaluate", str(tmp_path)])  # the checkpoint loads into the same layout
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["test"]["bits_per_dim"] == pytest.approx(
        summary["test"]["bits_per_dim"], rel=0.05
    )


@pytest.mark.parametrize("flow_kind", ["dense", "mintnet"])
def test_conditional_flows_save_memory_with_the_same_gradients(flow_kind):
    torch.manual_seed(1)
    if flow_kind == "dense":
        flow = dense_iresnet_flow(3, n_blocks=2, hidden_features=8, context_features=2, log_det=ExactLogDet())
        x = torch.randn(5, 3, dtype=torch.float64)
    else:
        flow = mintnet_flow((1, 4, 4), n_blocks=2, hidden_factor=2, n_squeezes=1, context_features=2)
        x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    flow = flow.double()
    for module in flow.modules():
        if getattr(module, "context_features", 0):
            torch.nn.init.normal_(module.context_map.weight, std=0.5)
    context = torch.randn(5, 2, dtype=torch.float64)
    flow.log_prob(x, context=context)  # data-dependent initialisation
    saving = copy.deepcopy(flow)
    saving.transform = MemorySavingSequential(*saving.transform)
    plain = torch.autograd.grad(flow.log_prob(x, context=context).sum(), list(flow.parameters()))
    reconstructed = torch.autograd.grad(saving.log_prob(x, context=context).sum(), list(saving.parameters()))
    for a, b in zip(plain, reconstructed, strict=True):
        assert torch.allclose(a, b, atol=1e-8)
    with pytest.raises(ValueError, match="context of .* requires a gradient"):
        saving.log_prob(x, context=context.clone().requires_grad_(True))
