"""The registry of model kinds: every kind's embedded config trains, and every run step either works or says the
kind does not have it."""

from __future__ import annotations

import json

import pytest
import torch

from invertnet.app.config import embedded_configs, load_config
from invertnet.app.kinds import KINDS, KindConfig, ModelKind, UnsupportedOperation, kind_of
from invertnet.app.runs import certify_run, evaluate_run, invert_run, metameric_run, sample_run, train_run

# The embedded configs that train on shipped data (the others read MNIST, CIFAR-10 or CelebA from disk).
SHIPPED = {
    "digits": [],
    "digits_dense": ["model.n_blocks=1"],
    "two_moons": ["model.n_blocks=1", "data.n_train=256", "data.n_test=128"],
    "mintnet_digits": ["model.n_blocks=2", "model.hidden_factor=1"],
    "mintnet_classifier_digits": ["model.n_blocks=2", "model.hidden_factor=1"],
    "iresnet_classifier_digits": ["model.n_blocks=1"],
    "fully_invertible_classifier_digits": ["model.n_blocks=1", "model.dense_blocks=1"],
    "independence_digits": ["model.n_blocks=1", "model.dense_blocks=1"],
    "dcgan_digits": ["model.width=8"],
    "isotopenet_synthetic": ["data.n_per_class=24", "data.spectrum_length=200", "data.n_folds=2"],
    "residualnet_synthetic": ["data.n_per_class=24", "data.spectrum_length=200", "data.n_folds=2"],
}
TINY = ["train.steps=2", "train.batch_size=16", "train.checkpoint_every=2", "evaluation.max_passes=2"]


def _overridden(kind: ModelKind, step: str) -> bool:
    return getattr(type(kind), step) is not getattr(ModelKind, step)


def test_every_kind_has_a_config_on_shipped_data_and_every_config_validates():
    assert {load_config(name).model.kind for name in SHIPPED} == set(KINDS)
    assert set(SHIPPED) <= set(embedded_configs())
    for name in embedded_configs():
        config = load_config(name)
        assert isinstance(config.model, KINDS[config.model.kind].config)


def test_the_registry_is_keyed_by_each_config_class_kind():
    for name, kind in KINDS.items():
        assert kind.name == name and issubclass(kind.config, KindConfig)
        assert set(kind.config.application_fields) <= set(kind.config.model_fields)
        assert callable(kind.config.builder)
    with pytest.raises(ValueError, match="model kind 'glow' is unknown; registered kinds"):
        kind_of("glow")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_kind_trains_and_runs_every_step_it_has(name, tmp_path):
    torch.set_num_threads(1)
    config = load_config(name, TINY + SHIPPED[name])
    kind = KINDS[config.model.kind]
    summary = train_run(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "test" in summary and (tmp_path / "latest").is_file()
    assert evaluate_run(tmp_path).keys() == summary.keys()
    steps = {
        "invert": lambda: invert_run(tmp_path),
        "sample": lambda: sample_run(tmp_path, 3),
        "invertible_part": lambda: certify_run(tmp_path),
        "metameric_classifier": lambda: metameric_run(tmp_path, 2),
    }
    for step, call in steps.items():
        supported = _overridden(kind, step)
        if step == "metameric_classifier":  # the classifier kinds share it; only a bijection has a nuisance part
            supported = config.model.kind == "fully_invertible_classifier"
        if supported:
            result = call()
            if step == "sample":
                assert len(result) == 3 and torch.isfinite(result).all()
        else:
            with pytest.raises(UnsupportedOperation, match=f"model kind '{config.model.kind}'"):
                call()


def test_a_kind_without_a_step_names_the_kind_and_the_step():
    classifier = KINDS["iresnet_classifier"]
    with pytest.raises(UnsupportedOperation, match=r"'iresnet_classifier' \(classifier\) cannot sample"):
        classifier.sample(torch.nn.Identity(), 3)
    with pytest.raises(UnsupportedOperation, match=r"'residualnet' \(spectrum classifier\) cannot invert"):
        KINDS["residualnet"].invert(torch.nn.Identity(), None, None)  # type: ignore[arg-type]
