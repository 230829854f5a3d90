"""The registry of model kinds: every kind's embedded config trains, and every run step either works or says the
kind does not have it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from invertnet.app.config import embedded_configs, load_config
from invertnet.app.kinds import KINDS, KindConfig, UnsupportedOperation, kind_of
from invertnet.app.runs import certify_run, evaluate_run, invert_run, metameric_run, sample_run, train_run

# The embedded configs that train on shipped data (the others read MNIST, CIFAR-10 or CelebA from disk), with
# overrides that keep them small, and the run steps each kind has: invert, sample, certify, metameric.
SHIPPED = {
    "digits": ([], "IS C"),
    "digits_dense": (["model.n_blocks=1"], "IS C"),
    "digits_conditional": (["model.n_blocks=1"], "IS"),
    "two_moons": (["model.n_blocks=1", "data.n_train=256", "data.n_test=128"], "IS C"),
    "mintnet_digits": (["model.n_blocks=2", "model.hidden_factor=1"], "IS"),
    "mintnet_classifier_digits": (["model.n_blocks=2", "model.hidden_factor=1"], "I"),
    "digits_glow": (["model.n_steps=1", "model.hidden=4"], "IS"),
    "two_moons_realnvp": (["model.n_steps=2", "model.hidden=8", "data.n_train=256", "data.n_test=128"], "IS"),
    "two_moons_spline": (["model.n_steps=2", "model.hidden=8", "data.n_train=256", "data.n_test=128"], "IS"),
    "iresnet_classifier_digits": (["model.n_blocks=1"], "I C"),
    "fully_invertible_classifier_digits": (["model.n_blocks=1", "model.dense_blocks=1"], "I CM"),
    "independence_digits": (["model.n_blocks=1", "model.dense_blocks=1"], "I CM"),
    "dcgan_digits": (["model.width=8", "model.recovery_problems=4"], "IS"),
    "isotopenet_synthetic": (["data.n_per_class=24", "data.spectrum_length=200", "data.n_folds=2"], ""),
    "residualnet_synthetic": (["data.n_per_class=24", "data.spectrum_length=200", "data.n_folds=2"], ""),
}
#: Kinds whose inverse is closed-form: their reconstruction's status is ``analytic``, not ``success``.
ANALYTIC_KINDS = {"glow", "realnvp", "spline"}
TINY = ["train.steps=2", "train.batch_size=16", "train.checkpoint_every=2", "evaluation.max_passes=2"]


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
    with pytest.raises(ValueError, match="model kind 'nice' is unknown; registered kinds"):
        kind_of("nice")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_kind_trains_and_runs_every_step_it_has(name, tmp_path):
    torch.set_num_threads(1)
    overrides, steps = SHIPPED[name]
    config = load_config(name, TINY + overrides)
    summary = train_run(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "test" in summary and (tmp_path / "latest").is_file()
    assert evaluate_run(tmp_path).keys() == summary.keys()
    calls = {
        "I": lambda: invert_run(tmp_path),
        "S": lambda: sample_run(tmp_path, 3),
        "C": lambda: certify_run(tmp_path),
        "M": lambda: metameric_run(tmp_path, 2),
    }
    for step, call in calls.items():
        if step not in steps:
            with pytest.raises(UnsupportedOperation, match=f"model kind '{config.model.kind}'"):
                call()
            continue
        result = call()
        if step == "I" and config.model.kind != "dcgan":
            status = "analytic" if config.model.kind in ANALYTIC_KINDS else "success"
            assert result["status"] == status and result["max_abs_error"] < 1e-3, result
        if step == "I" and config.model.kind == "dcgan":
            assert {"uniform", "top"} <= set(result) and result["problems"] == 4
        if step == "S":
            assert len(result) == 3 and torch.isfinite(result).all()
        if step == "C":
            certificate, figure = result
            assert certificate.blocks and figure.is_file()
        if step == "M":
            assert result["max_logit_difference"] < 1e-6


def test_a_kind_without_a_step_names_the_kind_and_the_step():
    classifier = KINDS["iresnet_classifier"]
    with pytest.raises(UnsupportedOperation, match=r"'iresnet_classifier' \(classifier\) cannot sample"):
        classifier.sample(torch.nn.Identity(), 3)
    with pytest.raises(UnsupportedOperation, match=r"'residualnet' \(spectrum classifier\) cannot invert"):
        KINDS["residualnet"].invert(torch.nn.Identity(), None, None)  # type: ignore[arg-type]


# The flat model section of invertnet 0.1 with its defaults; each kind's conversion must keep what that kind read.
_FLAT_DEFAULTS = {
    "n_blocks": 4, "hidden": 32, "n_layers": 3, "n_scales": 2, "hidden_factor": 8, "kernel_size": 3, "dropout": 0.3,
    "actnorm": True, "pad_channels": 16, "memory_saving": False, "dense_blocks": 0, "dense_hidden": 128,
    "independence": False, "independence_weight": 1.0, "nuisance_objective": "confusion", "likelihood_weight": 1.0,
    "variant": "iresnet", "latent_dim": 10, "width": 64, "logit_alpha": 0.05, "kernel_sizes": [3, 1, 3],
    "coeff": 0.97, "activation": "elu", "log_det": "power_series", "n_terms": 5,
}  # fmt: skip
_CONVERTED = {
    "mintnet": ({"n_scales": 3, "hidden": 99}, {"n_squeezes": 2, "hidden_factor": 8, "actnorm": True}),
    "mintnet_classifier": ({"n_scales": 1}, {"n_squeezes": 0, "pad_channels": 16}),
    "iresnet_classifier": ({"n_scales": 3, "hidden": 12}, {"n_stages": 3, "hidden_channels": 12, "coeff": 0.97}),
    "fully_invertible_classifier": (
        {"independence": True, "independence_weight": 2.0, "n_scales": 1},
        {"n_stages": 1, "independence": {"nuisance_weight": 2.0, "likelihood_weight": 1.0,
                                         "nuisance_objective": "confusion"}},
    ),
    "isotopenet": ({"kernel_size": 5, "dropout": 0.1}, {"locally_connected_kernel": 5, "dropout": 0.1}),
    "dense": ({"hidden": 7}, {"hidden_features": 7, "n_layers": 3, "n_terms": 5}),
    "conditional_dense": ({"hidden": 7}, {"hidden_features": 7, "n_layers": 3}),  # no 0.1 runs; same fields
    "multiscale": ({"hidden": 7, "n_scales": 3}, {"hidden_channels": 7, "n_scales": 3}),
    "dcgan": ({"width": 16, "n_layers": 2}, {"width": 16, "n_layers": 2, "latent_dim": 10}),
    "residualnet": ({"hidden": 7}, {}),
    "realnvp": ({"hidden": 7, "n_scales": 3}, {"hidden": 7, "n_scales": 3, "scale": "exp", "clamp": 3.0}),
    "glow": ({"hidden": 7}, {"hidden": 7, "n_scales": 2, "scale": "sigmoid", "clamp": None}),
    "spline": ({"hidden": 7}, {"hidden": 7, "n_steps": 8, "bins": 16}),  # no 0.1 runs; the shared fields
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_flat_invertnet_0_1_model_section_converts_to_what_the_kind_read(kind):
    changed, expected = _CONVERTED[kind]
    section = KINDS[kind].config.from_legacy({**_FLAT_DEFAULTS, **changed, "kind": kind})
    model = KINDS[kind].config.model_validate(section)
    assert {name: getattr(model, name) for name in expected} == {
        name: value if not isinstance(value, dict) else getattr(model, name).__class__(**value)
        for name, value in expected.items()
    }
    assert set(section) <= set(KINDS[kind].config.model_fields)


def test_a_run_needing_a_missing_extra_says_so_before_training(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the plots extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'invertnet\[plots\]'"):
        train_run(load_config("two_moons", TINY), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("digits", ["data.name=two_moons"], "model kind 'multiscale' needs images"),
        ("digits_dense", ["data.name=synthetic_spectra"], "'synthetic_spectra' is not an image data set"),
        ("two_moons", ["model.n_terms=3"], "log_det 'exact' does not read it"),
        ("digits", ["data.augment_shift=2"], "a flow does not read it"),
        ("dcgan_digits", ["data.augment_shift=2"], "a GAN does not read it"),
        ("digits_dense", ["data.augment_flip=true"], "data.augment_flip: augments or normalises classifier inputs"),
        ("dcgan_digits", ["data.normalization=standardized"], "a GAN does not read it"),
        ("isotopenet_synthetic", ["data.augment_flip=true"], "a spectrum classifier does not read it"),
        ("independence_digits", ["model.independence.bogus=1"], "not a setting of model.independence (its settings"),
        ("residualnet_synthetic", ["model.width=3"], "(its settings: layout)"),
        ("digits_glow", ["model.clamp=2"], "clamp bounds the 'exp' scale; the 'sigmoid' scale lies in (0, 1)"),
        ("digits_glow", ["model.n_scales=4"], "glow_flow: 4 squeezes need H and W divisible by 16, got 8x8"),
        ("two_moons_realnvp", ["model.n_scales=2"], "realnvp_flow: vectors (2,) have one scale"),
    ],
)
def test_settings_a_kind_does_not_read_are_refused_by_name(name, overrides, message):
    from invertnet.app.runs import build

    with pytest.raises(ValueError, match=re.escape(message)):
        build(load_config(name, overrides))


def test_the_independence_objective_augments_as_the_config_says():
    from invertnet.app.runs import build

    overrides = ["model.n_blocks=1", "model.dense_blocks=1", "data.augment_shift=1", "data.augment_flip=true"]
    kind, model, _ = build(load_config("independence_digits", overrides))
    objective = kind.objective(model, load_config("independence_digits", overrides))
    assert (objective.max_shift, objective.flip) == (1, True)


def test_a_run_folder_recorded_before_a_field_existed_keeps_the_value_it_was_trained_with(tmp_path):
    """Runs recorded before n_power_iterations existed trained with one step; a new config takes the default."""
    from invertnet.app.config import read_run_config
    from invertnet.layers.lipschitz_nets import POWER_ITERATIONS

    config = load_config("digits_dense")
    assert config.model.n_power_iterations == POWER_ITERATIONS != 1
    recorded = config.model_dump(mode="json")
    del recorded["model"]["n_power_iterations"]
    (tmp_path / "run_config.json").write_text(json.dumps(recorded))
    assert read_run_config(tmp_path / "run_config.json").model.n_power_iterations == 1
    recorded["model"]["n_power_iterations"] = 3
    (tmp_path / "run_config.json").write_text(json.dumps(recorded))
    assert read_run_config(tmp_path / "run_config.json").model.n_power_iterations == 3
