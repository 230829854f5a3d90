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


def test_each_sphere_attack_succeeds_on_the_sphere_the_thesis_says_and_fails_on_the_other(tmp_path):
    from invertnet.analysis.experiments import spheres_study
    from invertnet.analysis.spheres import (
        MisalignedSphereClassifier,
        invariance_attack,
        perturbation_attack,
        sample_spheres,
    )

    radii = (1.0, 1.3)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = sample_spheres(1000, 100, radii, generator)
    classifier = MisalignedSphereClassifier(5).fit(x_train, y_train)
    x, y = sample_spheres(400, 100, radii, generator)
    assert (classifier(x) == y).all() and radii[0] < classifier.bias < radii[1]
    perturbed = perturbation_attack(classifier, x, radii)
    assert perturbed.success[y > 0].all() and not perturbed.success[y < 0].any()
    torch.testing.assert_close(perturbed.x.norm(dim=1), x.norm(dim=1))  # stays on its own sphere
    assert (classifier(perturbed.x[y > 0]) < 0).all()  # and the decision flipped
    invariant = invariance_attack(classifier, x, radii)
    assert invariant.success[y < 0].all() and not invariant.success[y > 0].any()
    assert torch.allclose(invariant.x[y < 0].norm(dim=1), torch.full((int((y < 0).sum()),), 1.3, dtype=torch.float64))
    assert (classifier(invariant.x) == classifier(x)).all()  # the classifier does not notice
    report = spheres_study(tmp_path, d=100, n_unused=5)
    assert report["perturbation_success_outer"] == 1.0 and report["invariance_success_inner"] == 1.0
    assert (tmp_path / "spheres.png").is_file()


def test_independence_cross_entropy_trains_both_players_with_their_own_gradients(tmp_path):
    from invertnet.analysis import IndependenceCrossEntropy
    from invertnet.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = fully_invertible_classifier((1, 4, 4), n_classes=2, n_blocks=1, hidden_channels=8).double()
    objective = IndependenceCrossEntropy(model, nuisance_features=14, hidden=16).double()
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    y = (x[:, 0, 0, 0] > 0).long()
    with torch.no_grad():
        objective((x, y))  # ActNorm initialisation
    objective.eval()  # frozen power iterations: the same map in every call below
    objective((x, y)).backward()
    combined = {name: p.grad.clone() for name, p in objective.named_parameters()}
    parts = objective.losses(x, y)
    for prefix, loss in (("nuisance_classifier", parts[1]), ("classifier", parts[0] - parts[2])):
        objective.zero_grad()
        loss.backward(retain_graph=True)
        for name, parameter in objective.named_parameters():
            if name.startswith(prefix + "."):
                torch.testing.assert_close(combined[name], parameter.grad, atol=1e-12, rtol=0)
    trainer = Trainer(
        objective, (x, y), TrainConfig(steps=60, batch_size=32, lr=1e-2), tmp_path, (x, y), False, objective
    )
    before = trainer.evaluate((x, y))
    metrics = trainer.fit()
    assert metrics["cross_entropy"] < before["cross_entropy"]  # the logits learn while the adversary plays
    assert set(metrics) == {"accuracy", "cross_entropy", "nuisance_accuracy", "nuisance_cross_entropy"}
    with pytest.raises(ValueError, match="exactly one"):
        IndependenceCrossEntropy(model)
    with pytest.raises(ValueError, match="nuisance_weight"):
        IndependenceCrossEntropy(model, nuisance_features=14, nuisance_weight=-1.0)


def test_independence_cross_entropy_through_invertnet_train(tmp_path):
    options = ["--set", "model.independence=true", "--set", "train.steps=3", "--set", "model.n_blocks=1", "--quiet"]
    runner = CliRunner()
    trained = runner.invoke(
        main, ["train", "--config", "fully_invertible_classifier_digits", *options, "--run-dir", str(tmp_path)]
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output)
    assert {"accuracy", "nuisance_accuracy"} <= set(summary["test"]) and summary["reconstruction"][
        "status"
    ] == "success"
    metameric = runner.invoke(main, ["metameric", str(tmp_path), "-n", "3"])
    assert metameric.exit_code == 0 and json.loads(metameric.output)["max_logit_difference"] < 1e-5
    wrong = runner.invoke(main, ["train", "--config", "iresnet_classifier_digits", "--set", "model.independence=true"])
    assert wrong.exit_code != 0 and "model.independence needs" in wrong.output
