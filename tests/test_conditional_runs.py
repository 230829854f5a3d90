"""The class-conditional digits kind (``conditional_dense``): a run reports bits/dim given the label, writes one
row of samples per class, samples, inverts; its samples are recognised as their class by a separate classifier."""

import json

import pytest
import torch
from click.testing import CliRunner

from invertnet.app.cli import main
from invertnet.app.config import load_config
from invertnet.app.runs import open_run, sample_run, train_run
from invertnet.data import load_digits

TINY = ["model.n_blocks=2", "model.hidden_features=32", "train.steps=20", "train.checkpoint_every=20"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("conditional")
    overrides = [item for setting in TINY for item in ("--set", setting)]
    result = CliRunner().invoke(
        main, ["train", "--config", "digits_conditional", "--quiet", *overrides, "--run-dir", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    return run_dir, json.loads(result.output)


def test_a_conditional_run_reports_bits_per_dim_given_the_label(conditional_run):
    run_dir, summary = conditional_run
    assert 1.5 < summary["test"]["bits_per_dim_given_label"] < 6
    assert summary["evaluation_estimator"]["exact_blocks"] == 2 and summary["reconstruction"]["status"] == "success"
    assert (run_dir / "samples.png").is_file() and (run_dir / "loss.png").is_file()


def test_a_conditional_run_samples_classes_in_turn_and_inverts(conditional_run):
    run_dir, _ = conditional_run
    samples = sample_run(run_dir, 12)
    assert samples.shape == (12, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16
    inverted = CliRunner().invoke(main, ["invert", str(run_dir)])
    assert inverted.exit_code == 0 and json.loads(inverted.output)["max_abs_error"] < 1e-3
    refused = CliRunner().invoke(main, ["certify", str(run_dir)])
    assert refused.exit_code != 0 and "conditional" in refused.output


def test_a_memory_saving_conditional_run_trains_the_same_flow(tmp_path):
    results = []
    for memory_saving in ("false", "true"):
        config = load_config("digits_conditional", [*TINY, "train.steps=3", f"model.memory_saving={memory_saving}"])
        run_dir = tmp_path / memory_saving
        train_run(config, run_dir, progress=False)
        results.append(open_run(run_dir).model.state_dict())
    plain, saving = results
    assert plain.keys() == saving.keys()
    for key in plain:
        assert torch.allclose(plain[key], saving[key], rtol=1e-3, atol=1e-4), key


def test_conditional_kind_needs_labelled_images():
    with pytest.raises(ValueError, match="labelled images"):
        config = load_config("digits_conditional", ["data.name=two_moons"])
        from invertnet.app.kinds import kind_of

        kind_of(config.model.kind).load_data(config)


def test_class_conditional_samples_are_recognised_as_their_class(tmp_path):
    """A separately trained classifier (logistic regression on the training digits) labels the samples of a
    briefly trained conditional flow as the class they were drawn for, far above chance (0.1)."""
    from sklearn.linear_model import LogisticRegression

    overrides = ["model.n_blocks=4", "model.hidden_features=64", "train.steps=300", "train.checkpoint_every=300"]
    train_run(load_config("digits_conditional", overrides), tmp_path, progress=False)
    images, labels = load_digits("train")
    classifier = LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    run = open_run(tmp_path)
    drawn_for = torch.arange(200) % 10
    with torch.no_grad():
        samples = run.kind.sample(run.model, 200)
    accuracy = (torch.as_tensor(classifier.predict(samples.flatten(1).numpy())) == drawn_for).double().mean()
    assert accuracy > 0.5, f"{accuracy:.2f} of the samples recognised as their class"
