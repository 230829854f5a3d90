"""Fully invertible classifiers (thesis Definition 6.7) and metameric sampling (Definition 6.8)."""

import json

import pytest
import torch
from click.testing import CliRunner

from invertnet.analysis import metameric_sample
from invertnet.app.cli import main
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
    halfway = metameric_sample(model, x, reference, fraction=0.5)  # thesis Fig. 6.5: interpolated nuisances
    semantic, nuisance = model.split(model.features(halfway))
    own, target = model.split(model.features(x))[1], model.split(model.features(reference))[1]
    assert (semantic - model(x)).abs().max() < 1e-5 and (nuisance - (own + target) / 2).abs().max() < 1e-5
    assert (metameric_sample(model, x, reference, fraction=0.0) - x).abs().max() < 1e-5
    with pytest.raises(ValueError, match="fraction"):
        metameric_sample(model, x, reference, fraction=1.5)


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
    from invertnet.analysis.spheres import (
        MisalignedSphereClassifier,
        invariance_attack,
        perturbation_attack,
        sample_spheres,
    )
    from invertnet.experiments.stability import spheres_study

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
    from invertnet.training import IndependenceCrossEntropy, TrainConfig, Trainer

    torch.manual_seed(0)
    model = fully_invertible_classifier((1, 4, 4), n_classes=2, n_blocks=1, hidden_channels=8, dense_blocks=1)
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    y = (x[:, 0, 0, 0] > 0).long()
    for kind in ("confusion", "cross_entropy"):
        objective = IndependenceCrossEntropy(
            model, 14, hidden=16, nuisance_weight=0.7, likelihood_weight=0.3, nuisance_objective=kind
        ).double()
        with torch.no_grad():
            objective((x, y))  # ActNorm initialisation
        objective.eval()  # frozen power iterations: the same map in every call below
        torch.manual_seed(1)  # the same Hutchinson probes in every call below
        objective.zero_grad()
        objective((x, y)).backward()
        combined = {name: p.grad.clone() for name, p in objective.named_parameters()}
        torch.manual_seed(1)
        parts = objective.losses(x, y)
        bijection = parts.semantic + 0.7 * parts.nuisance + 0.3 * parts.nuisance_nll
        for players, loss in ((("nuisance_classifier.",), parts.adversary), (("classifier.", "prior_"), bijection)):
            objective.zero_grad()
            loss.backward(retain_graph=True)
            for name, parameter in objective.named_parameters():
                if name.startswith(players):
                    torch.testing.assert_close(combined[name], parameter.grad, atol=1e-12, rtol=0, msg=f"{kind} {name}")
        if kind == "confusion":  # bounded below by log C, reached when D(z_n) is uniform
            assert parts.nuisance.item() >= torch.log(torch.tensor(2.0)).item() - 1e-12
        else:
            torch.testing.assert_close(parts.nuisance, -parts.adversary)
    trainer = Trainer(
        objective, (x, y), TrainConfig(steps=60, batch_size=32, lr=1e-2), tmp_path, (x, y), False, objective
    )
    before = trainer.evaluate((x, y))
    metrics = trainer.fit()
    assert metrics["cross_entropy"] < before["cross_entropy"]  # the logits learn while the adversary plays
    assert set(metrics) == {"accuracy", "cross_entropy", "nuisance_accuracy", "nuisance_cross_entropy"}
    for bad, message in (
        ({"nuisance_weight": -1.0}, "nuisance_weight"),
        ({"likelihood_weight": -1.0}, "likelihood_weight"),
        ({"nuisance_objective": "hinge"}, "nuisance_objective"),
    ):
        with pytest.raises(ValueError, match=message):
            IndependenceCrossEntropy(model, 14, **bad)
    with pytest.raises(ValueError, match="13 nuisance variables, built for 14"):
        IndependenceCrossEntropy(fully_invertible_classifier((1, 4, 4), 3, n_blocks=1), 14).losses(x.float(), y)


def test_independence_cross_entropy_augments_training_batches_only(monkeypatch):
    from invertnet.training import IndependenceCrossEntropy
    from invertnet.training.objectives import augment

    torch.manual_seed(0)
    model = fully_invertible_classifier((1, 4, 4), n_classes=2, n_blocks=1, hidden_channels=8, dense_blocks=1)
    objective = IndependenceCrossEntropy(model, 14, hidden=8, max_shift=1, flip=True).double()
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    y = (x[:, 0, 0, 0] > 0).long()
    seen = []
    losses = objective.losses
    monkeypatch.setattr(objective, "losses", lambda inputs, labels: seen.append(inputs) or losses(inputs, labels))
    torch.manual_seed(3)
    objective((x, y))
    torch.manual_seed(3)
    expected = augment(x, 1, True)
    assert not torch.equal(expected, x)
    torch.testing.assert_close(seen[-1], expected, atol=0, rtol=0)
    objective.eval()
    objective((x, y))
    assert seen[-1] is x
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        IndependenceCrossEntropy(model, 14, max_shift=-1)


def _threshold_problem(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian 4x4 inputs labelled by the sign of the sum of three pixels."""
    x = torch.randn(n, 1, 4, 4, generator=generator, dtype=torch.float64)
    return x, (x.flatten(1)[:, [3, 7, 12]].sum(1) > 0).long()


@pytest.mark.integration
def test_independence_cross_entropy_hides_the_label_from_a_fresh_probe():
    """Thesis 6.4.2: trained with cross-entropy, z_n still holds the label (a fresh probe reads it); trained with
    the independence cross-entropy the logits keep it and the probe's Lemma 6.15 bound on I(Y; Z_n) drops."""
    from invertnet.analysis import nuisance_probe
    from invertnet.training import CrossEntropy, IndependenceCrossEntropy, fit

    generator = torch.Generator().manual_seed(0)
    train, test = _threshold_problem(2000, generator), _threshold_problem(1000, generator)
    report = {}
    for name in ("cross_entropy", "independence"):
        torch.manual_seed(0)
        model = fully_invertible_classifier(
            (1, 4, 4), 2, n_blocks=1, hidden_channels=8, n_stages=1, dense_blocks=2, dense_hidden=32
        ).double()
        independent = IndependenceCrossEntropy(model, 14, hidden=32).double()
        objective = independent if name == "independence" else CrossEntropy(model)
        fit(objective, train, steps=300, batch_size=128, lr=1e-2)
        refine_spectral_norms(model)
        model.eval()
        accuracy = (model(test[0]).argmax(1) == test[1]).double().mean().item()
        report[name] = {"accuracy": accuracy, **nuisance_probe(model, train, test, steps=300)}
    assert report["cross_entropy"]["accuracy"] > 0.95 and report["independence"]["accuracy"] > 0.9
    assert report["cross_entropy"]["probe_accuracy"] > 0.9  # plain training leaves the label in z_n
    bound = report["independence"]["mutual_information_lower_bound"]
    assert bound < 0.25 * report["cross_entropy"]["mutual_information_lower_bound"], report
    assert report["independence"]["probe_accuracy"] < 0.75, report


@pytest.mark.integration
def test_nuisance_probe_reads_a_label_stored_in_z_n_and_not_an_independent_one():
    from invertnet.analysis import nuisance_probe

    torch.manual_seed(0)
    model = fully_invertible_classifier((1, 4, 4), 2, n_blocks=1, hidden_channels=4, n_stages=1).double().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 1, 4, 4, generator=generator, dtype=torch.float64)
    stored = (model.split(model.features(x))[1][:, -1] > 0).long().detach()
    independent = torch.randint(0, 2, (1500,), generator=generator)
    read = nuisance_probe(model, (x[:1000], stored[:1000]), (x[1000:], stored[1000:]), steps=300)
    assert read["probe_accuracy"] > 0.95 and read["mutual_information_lower_bound"] > 0.5
    noise = nuisance_probe(model, (x[:1000], independent[:1000]), (x[1000:], independent[1000:]), steps=300)
    assert noise["probe_accuracy"] < 0.6 and noise["mutual_information_lower_bound"] < 0.02


def test_independence_study_writes_the_comparison(tmp_path):
    from invertnet.experiments.independence import independence_study, partners_of_other_classes

    labels = torch.tensor([0, 0, 1, 2, 1])
    partners = partners_of_other_classes(labels, torch.Generator().manual_seed(0))
    assert (labels[partners] != labels).all()
    with pytest.raises(ValueError, match="every label is the same"):
        partners_of_other_classes(torch.zeros(3, dtype=torch.long), torch.Generator())
    report = independence_study(tmp_path, steps=20, n_pairs=6, dense_blocks=1)
    assert (tmp_path / "independence.png").is_file() and report["pairs"] == 6
    assert (tmp_path / "interpolation.png").is_file()
    along = report["independence"]["interpolation_judged_as_logits_class"]
    assert list(along) == ["0.00", "0.20", "0.40", "0.60", "0.80", "1.00"]
    for name in ("cross_entropy", "independence"):
        judged = report[name]
        for share in ("metameric_judged_as_logits_class", "metameric_judged_as_reference_class"):
            assert abs(judged[share] * 6 - round(judged[share] * 6)) < 1e-9  # a fraction of the 6 pairs judged


def test_independence_cross_entropy_through_invertnet_train(tmp_path):
    options = ["--set", "model.independence={}", "--set", "train.steps=3", "--set", "model.n_blocks=1", "--quiet"]
    runner = CliRunner()
    trained = runner.invoke(
        main, ["train", "--config", "fully_invertible_classifier_digits", *options, "--run-dir", str(tmp_path)]
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output)
    assert summary["nuisance_probe"]["chance"] > 0
    assert {"accuracy", "nuisance_accuracy"} <= set(summary["test"]) and summary["reconstruction"][
        "status"
    ] == "success"
    metameric = runner.invoke(main, ["metameric", str(tmp_path), "-n", "3"])
    assert metameric.exit_code == 0 and json.loads(metameric.output)["max_logit_difference"] < 1e-5
    wrong = runner.invoke(main, ["train", "--config", "iresnet_classifier_digits", "--set", "model.independence={}"])
    assert wrong.exit_code != 0
    assert "model.independence: not a setting of model kind 'iresnet_classifier'" in wrong.output


def test_the_independence_likelihood_term_is_per_input_dimension():
    """The likelihood term is L_MLEn of the thesis' Eq. 6.13 divided by d: Eq. 6.13 as written is mu = d."""
    from invertnet.training import IndependenceCrossEntropy

    torch.manual_seed(0)
    model = fully_invertible_classifier((1, 4, 4), n_classes=2, n_blocks=1, hidden_channels=4, dense_blocks=1).double()
    objective = IndependenceCrossEntropy(model, 14, hidden=8).double()
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(8) % 2
    with torch.no_grad():
        objective((x, y))  # ActNorm initialisation
    objective.eval()
    torch.manual_seed(1)
    terms = objective.losses(x, y)
    torch.manual_seed(1)
    z, log_det = model.body.forward_and_log_det(x)
    nuisance = model.split(z)[1]
    log_prior = torch.distributions.Normal(objective.prior_mean, objective.prior_log_scale.exp()).log_prob(nuisance)
    l_mle = -(log_prior.sum(1) + log_det).mean()  # Eq. 6.13's L_MLEn, per sample
    torch.testing.assert_close(terms.nuisance_nll * 16, l_mle)
