"""fit: the one training loop (no files), its data kinds, callback, EMA, errors, and the Trainer built on it."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import invertnet.training.loop as loop
from invertnet.data import sample_toy
from invertnet.logdet import ExactLogDet
from invertnet.models import dense_iresnet_flow
from invertnet.training import BitsPerDim, CrossEntropy, TrainConfig, Trainer, batch_source, fit, load_checkpoint


def _flow(seed=0):
    torch.manual_seed(seed)
    return dense_iresnet_flow(2, n_blocks=2, hidden_features=16, log_det=ExactLogDet())


def _labelled(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, (x[:, 0] + x[:, 1] > 0).long()


class _Recorder(nn.Module):
    """The mean squared distance of a parameter to the batch mean; records every batch it sees."""

    def __init__(self):
        super().__init__()
        self.centre = nn.Parameter(torch.zeros(2))
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch)
        x = batch[0] if isinstance(batch, tuple) else batch
        return (x - self.centre).square().sum(1).mean()


class _Pairs(Dataset):
    """A map-style Dataset of (x, y) samples that is not a TensorDataset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


@pytest.mark.integration
def test_fit_reduces_a_flows_test_bits():
    """Measured: 2.82 -> 2.56 test bits/dim on two moons after 150 steps (6 s on one thread); a Gaussian fitted
    to the data gets 2.68 (test_training.py)."""
    train, test = sample_toy("two_moons", 1024, seed=0), sample_toy("two_moons", 512, seed=1)
    flow = _flow()
    objective = BitsPerDim(flow)
    with torch.no_grad():
        objective(train[:256])  # ActNorm's data-dependent initialisation, before the "before" value
    before = objective.evaluate(test)["bits_per_dim"]
    result = fit(objective, train, steps=150, batch_size=128, lr=1e-2, schedule="cosine")
    flow.eval()
    after = objective.evaluate(test)["bits_per_dim"]
    assert after < before - 0.15, (before, after)
    assert result.losses.shape == (150,) and result.losses[-20:].mean() < result.losses[:20].mean()


@pytest.mark.integration
def test_fit_trains_a_classifier():
    train, test = _labelled(512), _labelled(512, seed=1)
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, 2))
    objective = CrossEntropy(classifier)
    before = objective.evaluate(test)
    fit(objective, train, steps=100, batch_size=64, lr=1e-2)
    after = objective.evaluate(test)
    assert after["cross_entropy"] < 0.5 * before["cross_entropy"] and after["accuracy"] > 0.95, (before, after)


def test_a_dataset_is_batched_like_tensors_with_the_same_seed():
    x, y = _labelled(100)
    losses = {}
    for name, data in {
        "tensor": x[:, :2],
        "tensor dataset": TensorDataset(x[:, :2]),  # one-element samples unwrap to tensors
        "tuple": (x[:, :2], y),
        "dataset": _Pairs(x[:, :2], y),
    }.items():
        objective = _Recorder()
        losses[name] = fit(objective, data, steps=7, batch_size=32, lr=0.1, seed=3).losses
        first = objective.seen[0]
        assert isinstance(first, tuple) == (name in ("tuple", "dataset")), name
    for name in ("tensor dataset", "tuple", "dataset"):
        torch.testing.assert_close(losses[name], losses["tensor"], atol=0, rtol=0, msg=name)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))  # epoch 0 of seed 3
    expected = batch_source(x, 32, seed=3).batch(1)
    torch.testing.assert_close(expected, x[order[32:64]], atol=0, rtol=0)


def test_a_dataloader_is_taken_as_it_yields_batches_and_restarted_when_exhausted():
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    loader = DataLoader(TensorDataset(x), batch_size=8, shuffle=False)  # 3 batches: 8, 8 and 4 rows
    objective = _Recorder()
    fit(objective, loader, steps=5, batch_size=64, lr=0.1)  # the loader's batch size, not 64
    expected = [x[:8], x[8:16], x[16:], x[:8], x[8:16]]
    assert len(objective.seen) == 5
    for seen, batch in zip(objective.seen, expected, strict=True):
        torch.testing.assert_close(seen, batch, atol=0, rtol=0)
    source = batch_source(loader, batch_size=64, seed=0)
    torch.testing.assert_close(source.batch(4), x[8:16], atol=0, rtol=0)  # out of order: skips to its place
    assert source.batch(4) is source.batch(4)  # the same step twice is the same batch


def test_the_callback_sees_every_step_and_its_loss():
    calls = []
    result = fit(
        _Recorder(), torch.randn(64, 2), steps=6, batch_size=16, log_every=1, callback=lambda *call: calls.append(call)
    )
    assert [step for step, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in calls] == result.losses.tolist()


def test_ema_follows_its_recurrence_and_is_swapped_in_and_out():
    objective = _Recorder()
    iterates = []
    data = torch.randn(64, 2) + 3
    result = fit(
        objective,
        data,
        steps=5,
        batch_size=16,
        lr=0.5,
        ema_decay=0.8,
        log_every=1,
        callback=lambda step, loss: iterates.append(objective.centre.detach().clone()),
    )
    expected = torch.full((2,), float("nan"))  # the first update copies: the initial parameters never count
    for step, iterate in enumerate(iterates):
        decay = min(0.8, step / (step + 10))  # the warm-up: 0, 1/11, 2/12, ...
        expected = iterate if step == 0 else decay * expected + (1 - decay) * iterate
    torch.testing.assert_close(result.state.ema[0], expected)
    trained = objective.centre.detach().clone()
    assert not torch.allclose(trained, expected)
    with result.ema_weights():
        torch.testing.assert_close(objective.centre.detach(), expected)
    torch.testing.assert_close(objective.centre.detach(), trained, atol=0, rtol=0)


def test_gradient_clipping_bounds_the_update():
    """The gradient the optimiser stepped with (left in .grad until the next step) has norm grad_clip when the
    raw gradient is larger (here about 280)."""
    objective = _Recorder()
    norms = []

    def record(step, loss):
        norms.append(objective.centre.grad.norm().item())

    fit(objective, torch.full((32, 2), 100.0), steps=2, batch_size=32, grad_clip=0.5, log_every=1, callback=record)
    assert norms == pytest.approx([0.5, 0.5])


def test_losses_are_read_every_log_every_steps():
    """The callback sees the mean loss since its last call, every log_every steps and after the last; the
    returned losses are every step's."""
    calls = []
    data = torch.randn(64, 2)
    result = fit(_Recorder(), data, steps=5, batch_size=8, log_every=2, callback=lambda *call: calls.append(call))
    losses = result.losses.tolist()
    assert len(losses) == 5 and [step for step, _ in calls] == [2, 4, 5]
    expected = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]
    assert [loss for _, loss in calls] == pytest.approx(expected)


def test_a_nonfinite_loss_names_the_step():
    def loss(batch):
        calls.append(1)
        return (batch * weight).sum() * (float("nan") if len(calls) == 3 else 1.0)

    calls, weight = [], nn.Parameter(torch.ones(2))
    for log_every in (1, 4):  # read at step 3, or at step 4: the error names the step of the NaN either way
        calls.clear()
        with torch.no_grad():
            weight.fill_(1.0)  # the step of the NaN loss has made the weight NaN
        with pytest.raises(FloatingPointError, match="at step 3"):
            fit(loss, torch.randn(32, 2), parameters=[weight], steps=5, batch_size=8, log_every=log_every)
        assert len(calls) == max(3, log_every)  # stopped at the first read after the NaN
    with pytest.raises(TypeError, match="pass parameters="):
        fit(loss, torch.randn(32, 2), steps=5, batch_size=8)


@pytest.mark.parametrize(
    "data, error, match",
    [
        (torch.randn(10, 2), ValueError, "10 samples, fewer than batch_size=16"),
        (torch.randn(0, 2), ValueError, "no samples"),
        (TensorDataset(torch.randn(0, 2)), ValueError, "no samples"),
        (DataLoader(TensorDataset(torch.randn(0, 2)), batch_size=4), ValueError, "yields no batches"),
        ((torch.randn(20, 2), torch.zeros(19)), ValueError, "different rows"),
        ((torch.randn(20, 2), [0] * 20), TypeError, "tuple must hold tensors"),
        ([torch.randn(2)] * 20, TypeError, "got list"),
        (np.zeros((20, 2), dtype=np.float32), TypeError, "got ndarray"),
    ],
    ids=["too small", "empty tensor", "empty dataset", "empty loader", "rows differ", "not tensors", "list", "numpy"],
)
def test_bad_data_is_refused_with_a_named_error(data, error, match):
    with pytest.raises(error, match=match):
        fit(_Recorder(), data, steps=1, batch_size=16)


def test_settings_override_the_config_and_are_validated():
    config = TrainConfig(steps=50, batch_size=16, lr=0.1)
    assert len(fit(_Recorder(), torch.randn(32, 2), config, steps=3).losses) == 3
    assert config.steps == 50  # the config itself is left alone
    with pytest.raises(ValidationError, match="step"):
        fit(_Recorder(), torch.randn(32, 2), config, step=3)
    with pytest.raises(ValidationError, match="lr"):
        fit(_Recorder(), torch.randn(32, 2), lr=-1.0)
    with pytest.raises(ValidationError, match="steps"):
        config.steps = 0  # assignments are checked too


def test_the_trainer_runs_fits_step_and_matches_fit_bit_for_bit(tmp_path, monkeypatch):
    """The Trainer has no step loop of its own: every step goes through loop.train_step, and a Trainer run
    ends with exactly the parameters of fit with the same settings and seed."""
    data = sample_toy("two_moons", 256)
    config = TrainConfig(steps=6, batch_size=32, lr=3e-3, optimizer="adamax", ema_decay=0.9, grad_clip=5.0, seed=7)
    steps = []
    original = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *args: steps.append(1) or original(*args))
    by_trainer = _flow()
    trainer = Trainer(by_trainer, data, config, tmp_path, progress=False)  # seeds torch with config.seed
    trainer.fit()
    assert len(steps) == 6
    trainer.train_step()
    assert len(steps) == 7 and trainer.step == 7
    by_fit = _flow()
    torch.manual_seed(config.seed)
    result = fit(BitsPerDim(by_fit), data, config, steps=7)
    assert len(steps) == 14
    for (name, expected), actual in zip(by_fit.state_dict().items(), by_trainer.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(trainer.state.ema[0], result.state.ema[0], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_trainer_resumes_exactly_from_a_dataset_or_a_deterministic_loader(tmp_path, kind):
    x = sample_toy("two_moons", 96)
    data = TensorDataset(x) if kind == "dataset" else DataLoader(TensorDataset(x), batch_size=32)

    def trainer(run_dir):
        config = TrainConfig(steps=7, batch_size=32, lr=3e-3, ema_decay=0.9, seed=1)
        return Trainer(_flow(), data, config, run_dir, progress=False)

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.fit()
    trainer(tmp_path / "b").fit(until=4)  # 4 is not a multiple of the 3 batches per pass
    resumed = trainer(tmp_path / "b")
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    for name, expected in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], expected, atol=0, rtol=0, msg=name)


def test_trainer_takes_a_dataloader_and_stores_its_config_as_json(tmp_path):
    """The issue's case: a DataLoader of 8 batches used to be counted as 8 samples, fewer than batch_size=64."""
    loader = DataLoader(TensorDataset(sample_toy("two_moons", 256)), batch_size=32, shuffle=True)
    config = TrainConfig(steps=3, batch_size=64)
    trainer = Trainer(_flow(), loader, config, tmp_path, progress=False)
    trainer.fit()
    _, state = load_checkpoint(tmp_path / "step-00000003")
    assert state["config"] == config.model_dump() and TrainConfig.model_validate(state["config"]) == config
    with pytest.raises(ValueError, match="does not hold the model"):
        Trainer(_flow(), loader, config, tmp_path, objective=BitsPerDim(_flow()))
