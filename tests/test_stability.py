"""Inverse stability (thesis 3.4): prefix Jacobian spectra against numpy, and Lemma 3.5."""

import numpy as np
import pytest
import torch
from torch import nn

from invertnet.analysis import layer_spectra, lemma_3_5_bounds, plot_layer_spectra


def test_spectra_match_numpy_svd_of_the_autograd_jacobian(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(4, dtype=torch.float64)
    spectra = layer_spectra(net, x)
    assert [spectrum.name for spectrum in spectra] == ["0", "1", "2"]
    for depth, spectrum in enumerate(spectra, start=1):
        prefix = net[:depth]
        jacobian = torch.autograd.functional.jacobian(lambda v, prefix=prefix: prefix(v[None])[0], x).numpy()
        expected = np.linalg.svd(jacobian, compute_uv=False)
        np.testing.assert_allclose(spectrum.singular_values.numpy(), expected, rtol=1e-10, atol=1e-12)
    active = int((net[0](x) > 0).sum())
    assert spectra[1].rank == min(active, 4)  # ReLU removes the rows of inactive units
    assert spectra[0].condition_number == pytest.approx(expected_condition(net[0].weight))
    assert plot_layer_spectra(spectra, tmp_path / "spectra.png").stat().st_size > 0


def expected_condition(weight: torch.Tensor) -> float:
    values = torch.linalg.svdvals(weight.detach())
    return (values[0] / values[-1]).item()


def test_window_restricts_the_jacobian_to_the_chosen_pixels():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ELU()).double()
    x = torch.randn(1, 6, 6, dtype=torch.float64)
    window = (slice(1, 3), slice(2, 5))
    spectrum = layer_spectra(net, x, window=window)[-1]  # the whole network
    full = torch.autograd.functional.jacobian(lambda v: net(v[None])[0].flatten(), x)  # (72, 1, 6, 6)
    columns = full[:, 0, 1:3, 2:5].reshape(72, -1)
    torch.testing.assert_close(spectrum.singular_values, torch.linalg.svdvals(columns))
    assert len(spectrum.singular_values) == 6


def test_lemma_3_5_upper_bounds_hold_on_random_matrices_and_index_sets():
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        m, n = int(torch.randint(2, 9, (1,), generator=generator)), int(torch.randint(2, 6, (1,), generator=generator))
        A = torch.randn(m, n, generator=generator, dtype=torch.float64)
        removed = sorted(
            set(
                torch.randint(
                    0, m, (int(torch.randint(0, m, (1,), generator=generator)),), generator=generator
                ).tolist()
            )
        )
        D = torch.ones(m, dtype=torch.float64)
        D[removed] = 0
        values = torch.linalg.svdvals(D[:, None] * A)
        nonzero = values[values > 1e-10]
        largest_bound, smallest_bound = lemma_3_5_bounds(A, removed)
        if nonzero.numel():
            assert nonzero[0] <= largest_bound * (1 + 1e-12)
            if smallest_bound is not None:
                assert nonzero[-1] <= smallest_bound * (1 + 1e-12)
                checked += 1
    assert checked > 100


def test_two_circles_study_links_preimages_and_conditioning(tmp_path):
    from invertnet.experiments.stability import two_circles_study

    record = two_circles_study(tmp_path, resolution=12, steps=300)
    assert (tmp_path / "two_circles.png").stat().st_size > 0
    assert sum(record["preimage_fractions"].values()) == pytest.approx(1.0)
    assert record["preimage_fractions"]["point"] > 0  # where 2 units are active the 2-D input is determined


@pytest.mark.integration
def test_vanilla_blocks_fail_the_certificate_and_i_resnet_blocks_invert():
    from invertnet.experiments.stability import vanilla_vs_iresnet

    report = vanilla_vs_iresnet(steps=150, n_blocks=2, width=64)
    assert report["i-resnet"]["certified"] and report["i-resnet"]["inverse_status"] == "success"
    assert report["i-resnet"]["reconstruction_max_abs_error"] < 1e-3
    assert max(report["i-resnet"]["lipschitz_bounds"]) <= 0.81 * (1 + 1e-4)  # two layers, coeff 0.9 each
    assert not report["vanilla"]["certified"] and max(report["vanilla"]["lipschitz_bounds"]) > 1


def test_stability_command_writes_the_two_circles_figure(tmp_path):
    import json

    from click.testing import CliRunner

    from invertnet.app.cli import main

    result = CliRunner().invoke(main, ["stability", "two-circles", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["train_accuracy"] > 0.9 and (tmp_path / "two_circles.png").is_file()


def test_cnn_spectra_study_shows_relu_removing_directions(tmp_path):
    from invertnet.experiments.stability import cnn_spectra_study

    record = cnn_spectra_study(tmp_path, steps=50)
    ranks = [layer["rank"] for layer in record["layers"]]
    assert ranks[0] == 64 and ranks[-1] == 10 and (tmp_path / "layer_spectra.png").is_file()
    assert all(later <= earlier for earlier, later in zip(ranks, ranks[1:], strict=False))  # rank never grows


def test_spectra_leave_the_callers_model_alone_and_edge_cases():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.ReLU()).train()
    layer_spectra(net, torch.randn(3))
    assert net[0].weight.dtype == torch.float32 and net.training  # a float64 eval copy was analysed
    assert lemma_3_5_bounds(torch.zeros(3, 2), [0]) == (0.0, None)


@pytest.mark.integration
def test_reconstruction_error_falls_with_iterations_and_faster_for_smaller_c(tmp_path):
    from invertnet.experiments.stability import reconstruction_study

    record = reconstruction_study(tmp_path, coefficients=(0.5, 0.9), budgets=(1, 4, 40), steps=20)
    for curve in record["errors"].values():
        assert curve[0] > curve[1] > curve[2] and curve[2] < 1e-6
    assert record["errors"]["c=0.5"][1] < record["errors"]["c=0.9"][1]
    assert (tmp_path / "reconstruction.png").is_file()


def test_lemma_3_6_bounds_the_smallest_singular_value_when_its_hypothesis_holds():
    from invertnet.analysis import lemma_3_6_bound

    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        A = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        removed = sorted(torch.randperm(8, generator=generator)[:3].tolist())
        kept = [j for j in range(8) if j not in removed]
        c, holds = lemma_3_6_bound(A, removed, removed[0])
        values = torch.linalg.svdvals(A[kept])
        smallest = values[values > 1e-12 * values.max()].min()
        if holds:
            checked += 1
            assert smallest <= c + 1e-12
    assert checked > 100  # 5 kept rows of R^5 span it: the hypothesis holds almost surely
    # the hypothesis fails when a_k has a component in the null space of D_I A
    A = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    c, holds = lemma_3_6_bound(A, removed=[0], k=0)
    assert not holds
    with pytest.raises(ValueError, match="removed rows"):
        lemma_3_6_bound(A, removed=[0], k=1)


def test_the_table_3_1_networks_and_their_median_spectra(tmp_path):
    from invertnet.experiments.stability import TABLE_3_1, cifar_spectra_study, table_3_1_cnn

    for variant, column in (("wide", 0), ("thin", 1)):
        net = table_3_1_cnn(variant)
        convolutions = [layer for layer in net if isinstance(layer, torch.nn.Conv2d)]
        assert [conv.out_channels for conv in convolutions] == [row[column] for row in TABLE_3_1]
        assert [conv.stride[0] for conv in convolutions] == [1, 2, 1, 1, 1, 2]
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and net[-3].out_features == 512
    with pytest.raises(ValueError, match="wide"):
        table_3_1_cnn("medium")
    report = cifar_spectra_study(tmp_path, n_samples=3, window=2, cifar_root=tmp_path / "absent")
    assert report["inputs"].startswith("standard normal") and report["samples"] == 3
    wide, thin = report["networks"]["wide"], report["networks"]["thin"]
    assert len(wide) == len(thin) == 12 and wide[0]["output_units"] == 32 * 32 * 32
    assert thin[2]["output_units"] == 32 * 16 * 16 and wide[2]["output_units"] == 64 * 16 * 16
    assert all(row["median_rank"] <= 12 for row in wide)  # a 2 x 2 window of 3 channels: 12 input directions
    assert (tmp_path / "cifar_spectra.png").stat().st_size > 0
