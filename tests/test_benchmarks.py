"""Smoke tests of the density benchmarks' main paths (tiny budgets, data and model subsets), so they cannot rot.

They check the report's structure and its arithmetic, not the figures: the timed runs are the lead's.
"""

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytest.importorskip("sklearn", reason="the digits benchmark needs scikit-learn (pip install 'invertnet[data]')")
import digits_density  # noqa: E402
import flowbench  # noqa: E402
import spline_flow_defaults  # noqa: E402
import toy2d  # noqa: E402
from flowbench import parameter_count  # noqa: E402

from invertnet.layers import CLipSwish  # noqa: E402


def _require_peers(*modules):
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"peer libraries {missing} are not installed (pip install -e '.[bench]')")


@pytest.fixture
def small_digits(monkeypatch):
    """The real split, cut to 64 training, 16 validation and 32 test images."""
    split = digits_density.digits_split()
    small = flowbench.Split(split.train[:64], split.validation[:16], split.test[:32])
    monkeypatch.setattr(digits_density, "digits_split", lambda: small)
    return small


def _finite_rows(rows):
    tested = [row for row in rows if "test" in row]
    for row in tested:
        assert math.isfinite(row["test"]) and row["standard_error"] > 0 and row["steps"] >= 1
        assert row["best_validation"] == min(record["validation"] for record in row["validations"])
    return {row["model"]: row for row in tested}


def _check_comparison(entry, rows):
    """The difference is a's mean minus b's, and the paired standard error is not above the unpaired one by much."""
    a, b = rows[entry["a"]], rows[entry["b"]]
    assert entry["difference"] == pytest.approx(a["test"] - b["test"], abs=1e-6)
    assert 0 < entry["paired_standard_error"] and entry["standard_errors"] >= 0
    assert entry["better"] == (entry["a"] if entry["difference"] < 0 else entry["b"])


def test_digits_grid_runs_invertnet_models_and_skips_what_this_version_lacks(small_digits, capsys):
    output = digits_density.main(
        ["--settings", "--lr", "1e-3", "--batch", "32", "--budget", "0.3", "--checks", "2",
         "--models", "invertnet-dense", "invertnet-glow"]
    )  # fmt: skip
    assert output["mode"] == "settings" and not output["standard_settings"]
    assert output["data"]["train"] == 64 and output["data"]["test"] == 32
    (setting,) = output["settings"]
    assert (setting["lr"], setting["batch_size"], setting["budget_seconds"]) == (1e-3, 32, 0.3)
    rows = {row["model"]: row for row in setting["models"]}
    dense = rows["invertnet-dense"]
    assert dense["parameters"] == output["target_parameters"] and "width 128" in dense["architecture"]
    assert 1 <= len(dense["validations"]) <= 2 and dense["seconds"] >= 0.3  # a slow step may cross both checks
    assert dense["validations"][-1]["steps"] == dense["steps"]  # the last check is at the end
    assert setting["winner"]["model"] == "invertnet-dense"
    glow = rows["invertnet-glow"]
    if "test" not in glow:  # before the coupling flows land
        assert "not available in this version of invertnet" in glow["skipped"]
    assert capsys.readouterr().out.lstrip().startswith("{")  # the JSON object on stdout


def test_digits_grid_compares_invertnet_with_the_peers(small_digits):
    _require_peers("zuko", "normflows")
    output = digits_density.main(
        ["--settings", "--lr", "3e-3", "--batch", "16", "--budget", "0.2", "--checks", "1",
         "--models", "invertnet-dense", "normflows-residual", "zuko-nsf"]
    )  # fmt: skip
    (setting,) = output["settings"]
    rows = _finite_rows(setting["models"])
    assert set(rows) == {"invertnet-dense", "normflows-residual", "zuko-nsf"}
    for name in ("normflows-residual", "zuko-nsf"):  # equal architecture, and matched width
        assert abs(rows[name]["parameters"] - output["target_parameters"]) < 0.02 * output["target_parameters"]
    labels = [entry["comparison"] for entry in setting["comparisons"]]
    assert labels == [
        "best invertnet vs best peer (chosen on validation)",
        "equal architecture",
        "best invertnet (chosen on validation) vs zuko NSF",
    ]
    for entry in setting["comparisons"]:
        _check_comparison(entry, rows)
    assert "unbiased" in rows["normflows-residual"]["estimator"]


def test_digits_grid_checks_the_variational_dense_flow_like_for_like(small_digits):
    _require_peers("zuko")
    output = digits_density.main(
        ["--settings", "--lr", "3e-3", "--batch", "16", "--budget", "0.2", "--checks", "1",
         "--models", "invertnet-dense-variational", "zuko-nsf-variational"]
    )  # fmt: skip
    (setting,) = output["settings"]
    rows = _finite_rows(setting["models"])
    for name in ("invertnet-dense-variational", "zuko-nsf-variational"):
        assert abs(rows[name]["parameters"] - output["target_parameters"]) < 0.02 * output["target_parameters"]
    assert rows["zuko-nsf-variational"]["family"] == "check"  # never the best peer
    labels = [entry["comparison"] for entry in setting["comparisons"]]
    assert labels == ["like for like, both variationally dequantised"]
    _check_comparison(setting["comparisons"][0], rows)


def test_dequantization_gap_reports_a_nonnegative_gap(small_digits):
    import dequantization_gap

    result = dequantization_gap.main(["--steps", "2", "--batch", "16", "--draws", "3"])
    assert result["importance_weighted_bits_per_dim"] <= result["uniform_bound_bits_per_dim"]
    assert result["gap_bits_per_dim"] == pytest.approx(
        result["uniform_bound_bits_per_dim"] - result["importance_weighted_bits_per_dim"], abs=1e-9
    )


def test_every_model_runs_at_every_margin_and_is_compared_at_its_validation_choice(small_digits):
    output = digits_density.main(
        ["--settings", "--lr", "1e-3", "--batch", "32", "--budget", "0.2", "--checks", "1",
         "--models", "invertnet-dense", "invertnet-spline", "--logit-alpha", "0.003", "0.05"]
    )  # fmt: skip
    assert output["logit_alphas"] == [0.003, 0.05]
    (setting,) = output["settings"]
    rows = _finite_rows(setting["models"])
    assert set(rows) == {
        f"{name} @{alpha}" for name in ("invertnet-dense", "invertnet-spline") for alpha in (0.003, 0.05)
    }
    assert {row["logit_alpha"] for row in setting["models"]} == {0.003, 0.05}
    for name, alpha in setting["chosen_margins"].items():
        runs = {a: rows[f"{name} @{a:g}"]["best_validation"] for a in (0.003, 0.05)}
        assert alpha == min(runs, key=runs.get)  # the validation chooses, never the test
    assert setting["comparisons"] == []  # no peer ran
    winner = setting["winner"]["model"]  # among the chosen runs, under the model's own name
    assert winner in setting["chosen_margins"]
    assert setting["winner"]["test"] == rows[f"{winner} @{setting['chosen_margins'][winner]:g}"]["test"]
    with pytest.raises(SystemExit):
        digits_density.parse(["--settings", "--logit-alpha", "0.05", "0.05"])
    with pytest.raises(SystemExit):
        digits_density.parse(["--settings", "--logit-alpha", "0.6"])


def test_digits_default_mode_trains_an_embedded_config_on_its_recipe(small_digits):
    output = digits_density.main(["--budget", "0.2", "--models", "mintnet_digits"])
    assert output["mode"] == "configs" and output["budget_seconds"] == 0.2
    rows = _finite_rows(output["models"])
    assert len(rows["mintnet_digits"]["validations"]) == 1  # the final (averaged) weights are tested


def test_digits_options_are_checked():
    with pytest.raises(SystemExit):
        digits_density.parse(["--lr", "1e-3"])  # a grid axis without --settings
    with pytest.raises(SystemExit):
        digits_density.parse(["--settings", "--models", "invertnet-banana"])
    args = digits_density.parse(["--settings", "--budget", "60"])
    assert args.models == [spec.name for spec in digits_density.INVERTNET + digits_density.PEERS]


class _StandardNormal(torch.nn.Module):
    def log_prob(self, y):
        return torch.distributions.Normal(0.0, 1.0).log_prob(y).flatten(1).sum(dim=1)


def test_peers_see_the_same_maps_and_dequantisation_noise_as_invertnet_flows():
    from invertnet import InvertibleSequential
    from invertnet.layers import Flatten, Logit, UniformDequantization
    from invertnet.models import FlowDistribution, standard_normal

    levels = torch.randint(0, 17, (40, 1, 8, 8)).float()
    preprocessing = InvertibleSequential(UniformDequantization(17), Logit(0.01), Flatten((1, 8, 8)))
    invertnet_side = FlowDistribution(preprocessing, standard_normal((64,)))
    peer_side = digits_density.LogitSpaceDensity(_StandardNormal(), alpha=0.01)
    expected = flowbench.per_sample(digits_density.bits_per_dim, invertnet_side, levels, draws=2)
    torch.testing.assert_close(flowbench.per_sample(digits_density.bits_per_dim, peer_side, levels, draws=2), expected)
    one_draw = flowbench.per_sample(digits_density.bits_per_dim, peer_side, levels, draws=1)
    assert not torch.allclose(one_draw, expected)  # the draws differ, and both sides average the same ones


def test_paired_comparison_uses_the_per_sample_differences():
    spec = flowbench.Spec("a", "invertnet", lambda _: torch.nn.Identity(), "")
    base = torch.linspace(0, 10, 101, dtype=torch.float64)
    a = flowbench.Result(spec, {"standard_error": flowbench.standard_error(base)}, base)
    b = flowbench.Result(flowbench.Spec("b", "peer", spec.build, ""), {"standard_error": 0.3}, base + 0.1)
    entry = flowbench.compare("x", a, b)
    assert entry["difference"] == pytest.approx(-0.1) and entry["better"] == "a"
    assert entry["paired_standard_error"] == pytest.approx(0.0, abs=1e-12) and entry["standard_errors"] > 1e6


def test_matched_width_is_closest_in_parameters():
    def build(width):
        return torch.nn.Linear(10, width)  # 11 width parameters

    assert flowbench.matched_width(build, 110) == 10
    assert flowbench.matched_width(build, 116) == 11 and flowbench.matched_width(build, 115) == 10
    assert flowbench.matched_width(build, 3) == 1


def test_toy2d_runs_beside_the_true_density(monkeypatch):
    monkeypatch.setattr(toy2d, "N_TRAIN", 128)
    monkeypatch.setattr(toy2d, "N_VALIDATION", 64)
    monkeypatch.setattr(toy2d, "N_TEST", 64)
    models = ["invertnet-dense", "zuko-nsf"] if importlib.util.find_spec("zuko") else ["invertnet-dense"]
    output = toy2d.main(
        ["--steps", "4", "--batch", "32", "--checks", "2", "--datasets", "checkerboard", "--models", *models]
    )
    (report,) = output["datasets"]
    assert report["true_test_log_likelihood"] == pytest.approx(-math.log(24.5))  # uniform on 8 squares of 1.75^2
    rows = {row["model"]: row for row in report["models"]}
    assert set(rows) == set(models)
    for row in rows.values():
        assert row["test"] < report["true_test_log_likelihood"] + 1.0 and row["steps"] == 4
        assert row["best_validation"] == max(record["validation"] for record in row["validations"])
    truth = [entry for entry in report["comparisons"] if entry["comparison"] == "against the true density"]
    assert len(truth) == len(models)
    for entry in truth:  # log-likelihood differences: the model's minus the truth's
        assert entry["difference"] == pytest.approx(rows[entry["a"]]["test"] - report["true_test_log_likelihood"])


def test_the_defaults_study_runs_its_variants_through_the_grid(small_digits, capsys):
    import residual_flow_defaults

    output = residual_flow_defaults.main(
        ["--batch", "32", "--steps", "3", "--checks", "2",
         "--variants", "defaults", "actnorm_after", "near_identity"]
    )  # fmt: skip
    rows = _finite_rows(output["models"])
    assert set(rows) == {"defaults", "actnorm_after", "near_identity"}
    flow = residual_flow_defaults.actnorm_after(8)
    kinds = [type(part).__name__ for part in flow.transform][3:7]
    assert kinds == ["InvertibleResidual", "ActNorm", "InvertibleResidual", "ActNorm"]
    defaults, clipswish = residual_flow_defaults.VARIANTS["defaults"](32), residual_flow_defaults.clipswish(32)
    assert abs(parameter_count(clipswish) - parameter_count(defaults)) < 0.05 * parameter_count(defaults)
    assert any(isinstance(module, CLipSwish) for module in clipswish.modules())


def test_the_spline_study_runs_its_variants_on_the_toy_sets(capsys):
    rows = spline_flow_defaults.main(
        ["--variants", "defaults", "steps_4_bins_8_lu", "--datasets", "checkerboard", "--steps", "3"]
    )
    assert [row["variant"] for row in rows] == ["defaults", "steps_4_bins_8_lu"]
    assert all(math.isfinite(row["test_log_likelihood"]) and row["standard_error"] > 0 for row in rows)
    assert rows[1]["options"] == {"n_steps": 4, "bins": 8, "linear": True}
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one JSON line per run


def test_the_dense_step_timing_runs_both_variants(capsys):
    import dense_flow_step

    output = dense_flow_step.main(["--batch", "4", "--rounds", "1", "--steps", "1", "--warmup", "0"])
    result = output["batches"]["4"]
    assert set(result) == {"grouped", "per_layer", "per_layer_over_grouped"}
    assert result["grouped"]["min_ms"] > 0 and result["per_layer"]["min_ms"] > 0


@pytest.mark.parametrize("refined", [True, False])
def test_invertnet_validation_scores_the_copy_as_it_would_be_tested(refined):
    from invertnet.models import dense_iresnet_flow

    torch.manual_seed(0)
    flow = dense_iresnet_flow(2, n_blocks=1, hidden_features=8, n_layers=2)
    with torch.no_grad():  # weights that moved after the last power step: the stored norms lag behind
        for name, parameter in flow.named_parameters():
            if "weight" in name:
                parameter.mul_(1.5)
    validation = torch.randn(32, 2)
    spec = flowbench.invertnet_candidate("dense", lambda _: flow, "dense", width=0, refined_validation=refined)
    checkpoint = flowbench.BestCheckpoint(spec, toy2d.negative_log_likelihood, validation)
    checkpoint.consider(flow, steps=1, seconds=0.0)

    def scored(prepare):
        prepared = copy.deepcopy(flow).eval()
        prepare(prepared)
        return flowbench.per_sample(toy2d.negative_log_likelihood, prepared, validation, 1).mean().item()

    tested, unrefined = scored(flowbench.exact_evaluation), scored(flowbench.exact_log_dets)
    assert abs(tested - unrefined) > 1e-3  # the refinement changes the map
    assert checkpoint.best_loss == pytest.approx(tested if refined else unrefined, abs=1e-9)
