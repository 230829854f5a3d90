"""Choosing between the trained and the averaged (EMA) weights on validation data (invertnet.training.weights)."""

from __future__ import annotations

import torch
from torch import nn

from invertnet.training import TrainConfig, TrainState, choose_weights, compare_weights, kept_weights


class _SquaredDistance(nn.Module):
    """Criterion |w - target|^2 (lower is better), plus a random term that both evaluations must share."""

    name = "distance"

    def __init__(self, weight: nn.Parameter, target: float) -> None:
        super().__init__()
        self.weight, self.target = weight, target

    def evaluate(self, data, batch_size=256):
        noise = torch.rand(()).item()  # the same draw for raw and average, or the comparison is noise
        return {"distance": (self.weight - self.target).pow(2).sum().item() + noise}


def _state(raw: float, average: float, ema_decay: float = 0.9) -> tuple[TrainState, nn.Parameter]:
    weight = nn.Parameter(torch.tensor([raw]))
    state = TrainState(TrainConfig(steps=1, ema_decay=ema_decay), [weight])
    if state.ema is not None:
        state.ema[0].fill_(average)
    return state, weight


def test_the_average_is_kept_when_it_validates_better():
    state, weight = _state(raw=3.0, average=1.0)
    choice = choose_weights(state, _SquaredDistance(weight, target=1.0), validation=torch.zeros(1))
    assert choice.kept == "ema" and choice.criterion == "distance"
    assert choice.validation["ema"] < choice.validation["raw"]
    assert weight.item() == 3.0  # the raw weights are back in place after the comparison


def test_the_trained_weights_are_kept_when_the_average_validates_worse():
    state, weight = _state(raw=1.0, average=3.0)
    choice = choose_weights(state, _SquaredDistance(weight, target=1.0), validation=torch.zeros(1))
    assert choice.kept == "raw" and "validation distance" in choice.reason
    with kept_weights(state, choice):
        assert weight.item() == 1.0


def test_both_evaluations_share_their_random_draws_and_leave_the_callers_alone():
    state, weight = _state(raw=2.0, average=2.0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    figures = compare_weights(state, _SquaredDistance(weight, target=1.0), torch.zeros(1))
    assert figures["raw"] == figures["ema"]
    assert torch.equal(torch.rand(3), expected)


def test_without_an_average_or_validation_data_the_choice_says_so():
    state, weight = _state(raw=1.0, average=0.0, ema_decay=0.0)
    assert choose_weights(state, _SquaredDistance(weight, 1.0), torch.zeros(1)).kept == "raw"
    state, weight = _state(raw=1.0, average=0.0)
    unverified = choose_weights(state, _SquaredDistance(weight, 1.0), validation=None)
    assert unverified.kept == "ema" and "unverified" in unverified.reason and unverified.validation is None
