"""Spectrum classifiers through the command line: training on a grouped fold, balanced accuracy, sensitivity maps
against the peptides that differ, cross-validation, and the receptive field against isotope patterns."""

import json

import pytest
from click.testing import CliRunner

from invertnet.app.cli import main

SMALL = ["--set", "data.n_per_class=60", "--set", "data.spectrum_length=600", "--set", "train.steps=150", "--quiet"]
SMALL += ["--set", "train.batch_size=32", "--set", "train.lr=0.001"]  # the configs' Table A.2 batches need more data


@pytest.mark.integration
def test_isotopenet_learns_the_differing_peptides(tmp_path):
    """On synthetic two-class spectra that differ in three peptides, IsotopeNet reaches a high balanced accuracy
    on a held-out group fold and its averaged sensitivity map peaks at those peptides."""
    runner = CliRunner()
    trained = runner.invoke(main, ["train", "--config", "isotopenet_synthetic", *SMALL, "--run-dir", str(tmp_path)])
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output)
    assert summary["test"]["balanced_accuracy"] > 0.9, summary
    assert summary["test"]["core_balanced_accuracy"] >= 0.5  # the majority vote of each core's spots
    baseline = summary["roc_lda"]  # thesis 7.4.1 on the same fold
    assert baseline["features"] == [5, 10, 20, 50, 100] and baseline["worst"] <= baseline["best"] <= 1.0
    assert any(summary["sensitivity"]["discriminative_found"]), summary["sensitivity"]
    assert (tmp_path / "sensitivity.png").is_file()
    evaluated = runner.invoke(main, ["evaluate", str(tmp_path)])
    assert evaluated.exit_code == 0 and json.loads(evaluated.output)["test"]["balanced_accuracy"] > 0.9
    inverted = runner.invoke(main, ["invert", str(tmp_path)])
    assert inverted.exit_code != 0 and "not invertible" in inverted.output


def test_crossvalidation_and_bad_settings(tmp_path):
    runner = CliRunner()
    options = [*SMALL, "--set", "train.steps=20", "--set", "train.batch_size=32", "--set", "data.n_folds=2"]
    options += ["--run-dir", str(tmp_path)]
    result = runner.invoke(main, ["crossvalidate", "--config", "residualnet_synthetic", *options])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["balanced_accuracy_per_fold"]) == 2 and (tmp_path / "sensitivity.png").is_file()
    assert len(report["core_balanced_accuracy_per_fold"]) == 2
    assert len(report["roc_lda"]["median_balanced_accuracy"]) == 5
    assert report["roc_lda"]["worst"] <= report["roc_lda"]["best"]
    assert (tmp_path / "fold-1" / "summary.json").is_file()
    wrong = runner.invoke(main, ["crossvalidate", "--config", "digits", "--run-dir", str(tmp_path / "x")])
    assert wrong.exit_code != 0 and "is not a spectrum classifier (isotopenet, residualnet)" in wrong.output
    fold = runner.invoke(main, ["train", "--config", "isotopenet_synthetic", "--set", "data.fold=4"])
    assert fold.exit_code != 0 and "data.fold" in fold.output
    imzml = ["--set", "data.name=imzml", "--set", "data.root=/no/such.imzML"]
    missing = runner.invoke(main, ["train", "--config", "isotopenet_synthetic", *imzml])
    assert missing.exit_code != 0 and "no/such" in missing.output


def test_receptive_field_covers_the_isotope_patterns(tmp_path):
    result = CliRunner().invoke(main, ["receptive-field", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["receptive_field_bins"] == 49 and report["receptive_field_with_locally_connected_bins"] == 79
    # on the TOF-like grid the widest Averagine patterns (near 850 Da) outgrow the convolutions' 49 bins
    assert not report["covered_by_convolutions"] and 49 < report["largest_pattern_bins"] < 79
    assert report["covered_with_locally_connected"]
    assert (tmp_path / "receptive_field.png").is_file()


def test_training_on_an_imzml_file_with_a_labels_csv(tmp_path):
    import numpy as np
    from pyimzml.ImzMLWriter import ImzMLWriter

    rng = np.random.default_rng(0)
    mz = np.linspace(800.0, 900.0, 90)
    rows = ["x,y,label,group"]
    with ImzMLWriter(str(tmp_path / "tissue.imzML"), mode="continuous") as writer:
        for x in range(1, 5):
            for y in range(1, 5):
                label = int(x > 2)
                writer.addSpectrum(mz, rng.uniform(0, 1, 90) + 5 * label * (np.abs(mz - 850) < 1), (x, y))
                rows.append(f"{x},{y},{'tumour' if label else 'stroma'},core{x}")
    (tmp_path / "pixels.csv").write_text("\n".join(rows) + "\n")
    settings = {
        "data.name": "imzml",
        "data.root": str(tmp_path / "tissue.imzML"),
        "data.labels": str(tmp_path / "pixels.csv"),
        "data.n_folds": "2",
        "train.steps": "3",
        "train.batch_size": "4",
    }
    options = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(
        main, ["train", "--config", "isotopenet_synthetic", *options, "--quiet", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert "discriminative_found" not in summary["sensitivity"]  # real data: the differing peptides are unknown
    assert all(800.0 <= mz <= 900.0 for mz in summary["sensitivity"]["top_mz"])  # the file's m/z axis
    broken = tmp_path / "broken.imzML"
    broken.write_text("<?xml version='1.0'?><mzML")
    (tmp_path / "broken.ibd").write_bytes(b"")
    bad = CliRunner().invoke(
        main,
        ["train", "--config", "isotopenet_synthetic", "--set", "data.name=imzml"] + ["--set", f"data.root={broken}"],
    )
    assert bad.exit_code != 0 and "broken.imzML" in bad.output


def test_synthetic_patients_are_configurable():
    import torch

    from invertnet.app.config import load_config
    from invertnet.app.kinds.spectra import load_spectra

    settings = ["data.n_groups=12", "data.n_per_class=30", "data.spectrum_length=300"]
    config = load_config("isotopenet_synthetic", settings)
    (x_train, y_train), (x_test, y_test), split = load_spectra(config)
    dataset = split.dataset
    assert len(torch.unique(dataset.groups)) == 12 and x_train.shape[1:] == (1, 300)
    assert len(split.test_groups) == len(y_test) and len(torch.unique(split.test_groups)) == 3  # 3 of 12 cores
    assert set(y_test.tolist()) == {0, 1}  # stratified: both classes in the test fold
    torch.testing.assert_close(dataset.spectra.sum(1), torch.full((60,), 300.0))  # TIC-normalised
