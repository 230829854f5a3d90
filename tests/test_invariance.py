"""Fully invertible classifiers (thesis Definition 6.7) and metameric sampling (Definition 6.8)."""

import json

import pytest
import torch
from click.testing import CliRunner

from invertnet.analysis import metameric_sample
from invertnet.cli import main
from invertnet.layers import refine_spectral_norms
from invertnet.models import fully_invertible_classifier


def test_metameric_samples_keep_the_logits_of_one_input_and_the_nuisance_of_the_other():
    model = fully_invertible_classifier((1, 4, 4), n_classes=3, n_blocks=2, hidden_channels=8).double()
    model.train()
    model(torch.randn(16, 1, 4, 4, dtype=torch.float64))  # ActNorm initialisation
    refine_spectral_norms(model)
    model.eval()
    x, reference = torch.randn(2, 5, 1, 4, 4, dtype=torch.float64)
    x_met = metameric_sample(model, x, reference)
    semantic, nuisance = model.split(model.features(x_met))
    assert (semantic - model(x)).abs().max() < 1e-5
    assert (nuisance - model.split(model.features(reference))[1]).abs().max() < 1e-5
    assert model(x).shape == (5, 3) and nuisance.shape == (5, 13)
    with pytest.raises(ValueError, match="differ"):
        metameric_sample(model, x, reference[:2])


def test_metameric_command_on_a_trained_run(tmp_path):
    options = ["--set", "train.steps=3", "--set", "model.n_blocks=1", "--quiet", "--run-dir", str(tmp_path)]
    trained = CliRunner().invoke(main, ["train", "--config", "fully_invertible_classifier_digits", *options])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(main, ["metameric", str(tmp_path), "-n", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["max_logit_difference"] < 1e-5 and record["max_nuisance_difference"] < 1e-5
    assert (tmp_path / "metameric.png").is_file()
    other = CliRunner().invoke(main, ["metameric", str(tmp_path / "nothing")])
    assert other.exit_code != 0
