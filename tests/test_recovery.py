"""Latent recovery from partial measurements (Ma, Ayaz & Karaman 2018): generators, masks, recover, landscapes,
phase transition."""

import json
import math

import pytest
import torch

from invertnet.models import DCGANGenerator, TransposedConvGenerator
from invertnet.recovery import (
    MASK_KINDS,
    Mask,
    loss_landscape,
    make_mask,
    negative_multiple,
    phase_transition,
    plot_landscapes,
    plot_phase_transition,
    recover,
    theorem_network,
    write_phase_transition_csv,
)


def _theorem_generator(seed: int, **options) -> TransposedConvGenerator:
    """The expansive 2-layer ReLU network of Theorem 1: latent 10 -> 16 x 4x4 -> 1 x 16x16."""
    rng = torch.Generator().manual_seed(seed)
    return TransposedConvGenerator((10, 1, 1), (16, 1), kernel_size=4, generator=rng, **options).double()


def test_generator_shapes_and_weight_laws():
    generator = TransposedConvGenerator((3, 2, 2), (64, 8), kernel_size=3, stride=2)
    assert generator.output_shape == (8, 11, 11)
    assert generator(torch.randn(5, 3, 2, 2)).shape == (5, 8, 11, 11)
    gaussian = TransposedConvGenerator((50, 1, 1), (400, 1), kernel_size=4)
    assert gaussian.weight0.std().item() == pytest.approx(1 / math.sqrt(400 * 16), rel=0.05)  # N(0, 1/(C_1 l))
    uniform = TransposedConvGenerator((4, 1, 1), (8,), kernel_size=2, weights="uniform")
    assert uniform.weight0.min() >= 0 and uniform.weight0.max() <= 1
    sign = TransposedConvGenerator((4, 1, 1), (8,), kernel_size=2, weights="sign")
    assert torch.allclose(sign.weight0.abs(), torch.full_like(sign.weight0, 1 / math.sqrt(8 * 4)))
    with pytest.raises(ValueError, match="latents of shape"):
        generator(torch.randn(5, 3))
    with pytest.raises(ValueError, match="activation"):
        TransposedConvGenerator((1, 1, 1), (2,), 2, activation="swish")


def test_masks_observe_the_requested_pixels():
    for kind in MASK_KINDS:
        mask = make_mask(kind, (16, 16), 0.5)
        assert mask.rate == pytest.approx(0.5, abs=0.07), kind
    assert make_mask("left", (4, 4), 0.5).keep[:, :2].all() and not make_mask("left", (4, 4), 0.5).keep[:, 2:].any()
    assert not make_mask("bottom", (4, 4), 0.25).keep[:3].any()
    border = make_mask("border", (8, 8), 0.4).keep
    assert border[0].all() and border[:, -1].all() and not border[3:5, 3:5].any()
    batch = make_mask("uniform", (8, 8), 0.5, batch=4, generator=torch.Generator().manual_seed(0))
    assert batch.keep.shape == (4, 8, 8) and not torch.equal(batch.keep[0], batch.keep[1])
    image = torch.ones(4, 2, 8, 8)
    assert torch.equal(batch(image)[:, 0], batch.keep.float()) and torch.equal(batch(image)[:, 1], batch.keep.float())
    with pytest.raises(ValueError, match="rate"):
        make_mask("uniform", (4, 4), 0.0)
    with pytest.raises(ValueError, match="kind"):
        make_mask("diagonal", (4, 4))
    with pytest.raises(ValueError, match="at least one pixel"):
        Mask(torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.integration
def test_theorem_generator_recovers_codes_from_half_the_pixels():
    """Seed 003, Theorems 1 and 4: 100 trials (10 networks x 10 codes), 50% uniform samples."""
    recovered = 0
    for network in range(10):
        generator = _theorem_generator(network)
        rng = torch.Generator().manual_seed(100 + network)
        z_true = torch.randn(10, 10, 1, 1, generator=rng, dtype=torch.float64)
        mask = make_mask("uniform", (16, 16), 0.5, batch=10, generator=rng)
        result = recover(generator, generator(z_true), mask, z_true=z_true)
        recovered += int((result.relative_error < 1e-4).sum())
        assert not result.non_unique.any()
    assert recovered >= 95


def test_gradient_descent_with_adaptive_step_recovers_too():
    generator = _theorem_generator(0)
    z_true = torch.randn(6, 10, 1, 1, dtype=torch.float64, requires_grad=True)
    mask = make_mask("top", (16, 16), 0.5)
    result = recover(generator, generator(z_true), mask, z_true=z_true.detach(), method="gd", max_iter=2000)
    assert not result.relative_residual.requires_grad  # measurements carrying a graph are detached
    assert result.converged.all() and result.relative_error.max() < 1e-4
    assert result.iterations < 2000 and result.loss_history.shape == (result.iterations, 1, 6)
    assert torch.allclose(result.completed, generator(z_true), atol=1e-5)  # the completed image, unobserved half too


def test_uniform_weights_give_a_flat_minimum_and_the_result_says_so():
    """Fig. 4d: with U[0, 1] weights every code in the negative quadrant maps to the same (zero) image."""
    rng = torch.Generator().manual_seed(3)
    generator = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, weights="uniform", generator=rng).double()
    z_true = -torch.rand(4, 2, 1, 1, generator=rng, dtype=torch.float64) - 0.1
    mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
    result = recover(generator, generator(z_true), mask, z_true=z_true, restarts=8, init_std=2.0)
    assert result.converged.all() and result.non_unique.all()
    assert torch.allclose(generator(result.z), generator(z_true))  # the same output from a distinct code
    assert (result.relative_error > 1e-3).any()
    assert "NOT unique" in result.summary()


def test_conditional_dcgan_generator_recovery_runs_with_labels():
    generator = DCGANGenerator(10, n_classes=10, channels=1, n_layers=2, width=16).double().eval()
    labels = torch.tensor([3, 7])
    z_true = torch.randn(2, 10, dtype=torch.float64)
    y = generator(z_true, labels)
    assert y.shape == (2, 1, 8, 8) and y.abs().max() <= 1
    result = recover(generator, y, make_mask("uniform", (8, 8), 0.8), latent_shape=(10,), condition=labels, max_iter=50)
    assert result.z.shape == (2, 10) and result.loss_history.shape[0] == result.iterations
    with pytest.raises(ValueError, match="labels"):
        generator(z_true)


def test_recover_rejects_bad_inputs():
    generator = _theorem_generator(0)
    y = generator(torch.randn(2, 10, 1, 1, dtype=torch.float64))
    mask = make_mask("uniform", (16, 16), 0.5)
    bad = y.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        recover(generator, bad, mask)
    with pytest.raises(ValueError, match="z_true must have shape"):
        recover(generator, y, mask, z_true=torch.zeros(3, 10, 1, 1))
    with pytest.raises(ValueError, match="method"):
        recover(generator, y, mask, method="lbfgs")
    with pytest.raises(ValueError, match="pattern of size"):
        recover(generator, y, make_mask("uniform", (8, 8), 0.5))


def test_landscape_has_its_minimum_at_the_truth(tmp_path):
    rng = torch.Generator().manual_seed(0)
    generator = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, generator=rng).double()
    z_true = torch.tensor([0.8, -0.6], dtype=torch.float64).view(1, 2, 1, 1)
    mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
    landscape = loss_landscape(generator, z_true, mask, extent=2.0, resolution=41)
    row, column = divmod(int(landscape.loss.argmin()), 41)
    assert landscape.loss.shape == (41, 41)
    assert abs(landscape.axis_x[column] - 0.8) <= 0.1 and abs(landscape.axis_y[row] + 0.6) <= 0.1
    assert plot_landscapes([landscape], tmp_path / "landscape.png").stat().st_size > 0


@pytest.mark.integration
def test_phase_transition_success_grows_with_the_rate(tmp_path):
    """The default network meets Theorem 4 at r >= 0.116 (36 x 36 x 4 images, 10 latents); recovery succeeds far
    below that rate (measured: 0.9 at r = 0.01, 0 at r = 0.004, about 20 observed pixels)."""
    rows = phase_transition([0.002, 0.5], kinds=("uniform", "top"), n_networks=2, n_codes=5, max_iter=1500)
    by_setting = {(row.mask, row.rate): row.probability for row in rows}
    assert by_setting[("uniform", 0.5)] == 1.0 and by_setting[("uniform", 0.002)] == 0.0
    assert by_setting[("top", 0.5)] == 1.0
    csv_path = write_phase_transition_csv(rows, tmp_path / "phase.csv")
    header = "mask,rate,observed_rate,successes,trials,probability,meets_theorem_4"
    assert csv_path.read_text().splitlines()[0] == header
    assert {(row.rate, row.meets_theorem_4) for row in rows if row.mask == "uniform"} == {(0.002, False), (0.5, True)}
    assert plot_phase_transition(rows, tmp_path / "phase.png").stat().st_size > 0


def test_recover_command_completes_a_saved_generators_image(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from invertnet.app.cli import main
    from invertnet.models import save_generator

    generator = _theorem_generator(4).float()
    save_generator(generator, tmp_path / "generator.safetensors")
    z_true = torch.randn(1, 10, 1, 1)
    save_file({"image": generator(z_true)[0].contiguous()}, str(tmp_path / "image.safetensors"))
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[:, ::2] = 1  # every other column: the user's own pattern
    save_file({"mask": mask}, str(tmp_path / "mask.safetensors"))
    runner = CliRunner()
    arguments = ["recover", str(tmp_path / "generator.safetensors"), str(tmp_path / "image.safetensors")]
    result = runner.invoke(
        main, [*arguments, "--mask-file", str(tmp_path / "mask.safetensors"), "--output", str(tmp_path / "done.png")]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["converged"] and record["observed_rate"] == 0.5 and (tmp_path / "done.png").stat().st_size > 0
    saved = load_file(str(tmp_path / "done.safetensors"))
    assert (saved["z"].double() - z_true.double()).abs().max() < 1e-3
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    broken = runner.invoke(main, ["recover", str(tmp_path / "broken.safetensors"), str(tmp_path / "image.safetensors")])
    assert broken.exit_code != 0 and "not a readable safetensors file" in broken.output
    missing = runner.invoke(main, [*arguments[:2], str(tmp_path / "nothing.png")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_recover_study_command_writes_figures_and_csv(tmp_path):
    from click.testing import CliRunner

    from invertnet.app.cli import main

    runner = CliRunner()
    landscape = runner.invoke(main, ["recover-study", "landscape", "--output-dir", str(tmp_path)])
    assert landscape.exit_code == 0, landscape.output
    study = json.loads(landscape.output)
    zero_loss = study["fraction_of_grid_with_zero_loss"]
    assert zero_loss["(f) relu, uniform weights"] > 0.1 and zero_loss["(a) relu, gaussian weights"] < 1e-3  # z* alone
    relu = study["negative_multiple"]["(a) relu, gaussian weights"]
    assert relu["rho"] is not None and relu["loss"] < relu["loss_at_zero"] and relu["descent_from_there_reaches_z_true"]
    options = ["--rates", "0.1,0.5", "--kinds", "uniform", "--networks", "1", "--codes", "3", "--quiet"]
    phase = runner.invoke(main, ["recover-study", "phase-transition", "--output-dir", str(tmp_path), *options])
    assert phase.exit_code == 0, phase.output
    assert (tmp_path / "phase_transition.csv").is_file() and (tmp_path / "phase_transition.png").is_file()
    bad = runner.invoke(
        main, ["recover-study", "phase-transition", "--kinds", "diagonal", "--output-dir", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "kind must be one of" in bad.output


def test_png_images_and_masks_are_read_with_their_value_range(tmp_path):
    import matplotlib.pyplot as plt

    from invertnet.app.recover_file import read_image, read_mask

    pixels = torch.linspace(0, 1, 16).view(4, 4)
    plt.imsave(str(tmp_path / "image.png"), pixels.numpy(), cmap="gray", vmin=0, vmax=1)
    image = read_image(tmp_path / "image.png", value_range=(-1.0, 1.0))
    assert image.shape == (3, 4, 4)  # RGB from the PNG, alpha dropped
    assert torch.allclose(image[0], 2 * pixels.double() - 1, atol=0.01)
    mask = read_mask(tmp_path / "image.png")
    assert mask.keep.shape == (4, 4) and mask.keep.sum() == 15  # every pixel but the black one
    (tmp_path / "image.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=".png or .safetensors"):
        read_image(tmp_path / "image.jpg")


def test_adversarial_loss_gives_each_player_only_its_own_gradient():
    from invertnet.models import ConditionalGAN, DCGANDiscriminator
    from invertnet.training import AdversarialLoss

    gan = ConditionalGAN(DCGANGenerator(4, 3, 1, 2, 8), DCGANDiscriminator(3, 1, 2, 8), latent_dim=4).double()
    images, labels = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    objective = AdversarialLoss(gan)
    torch.manual_seed(5)
    objective((images, labels)).backward()
    combined = {name: p.grad.clone() for name, p in gan.named_parameters()}
    for player, index in (("discriminator", 0), ("generator", 1)):
        gan.zero_grad()
        torch.manual_seed(5)  # the same fakes
        objective._losses(images, labels)[index].backward()
        for name, parameter in gan.named_parameters():
            if name.startswith(player):
                assert torch.allclose(combined[name], parameter.grad, atol=1e-12), name


def test_dcgan_config_trains_saves_its_generator_and_checks_recovery(tmp_path):
    from click.testing import CliRunner

    from invertnet.app.cli import main
    from invertnet.models import load_generator

    tiny = ["model.width=8", "model.recovery_problems=8", "train.steps=3", "train.checkpoint_every=3"]
    overrides = [item for setting in tiny for item in ("--set", setting)]
    runner = CliRunner()
    result = runner.invoke(
        main, ["train", "--config", "dcgan_digits", "--quiet", *overrides, "--run-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["recovery"]["problems"] == 8
    for kind in ("uniform", "top", "bottom", "left", "right"):  # the paper's five masks; fractions of 8 problems
        assert (summary["recovery"][kind]["exact_recovery"] * 8).is_integer()
    assert (tmp_path / "weights.png").is_file() and summary["weight_laws"]
    assert all(0 <= layer["ks_distance"] <= 1 for layer in summary["weight_laws"].values())
    generator = load_generator(summary["generator"])
    assert generator(torch.zeros(2, 10), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    assert (tmp_path / "samples.png").is_file()
    sampled = runner.invoke(main, ["sample", str(tmp_path), "-n", "5"])
    assert sampled.exit_code == 0 and "5 samples of shape (1, 8, 8)" in sampled.output


def test_generators_say_which_hypotheses_of_theorems_1_and_4_they_meet():
    old = TransposedConvGenerator((10, 1, 1), (16, 1), kernel_size=4)  # the study's network before
    conditions = old.conditions()
    assert not conditions.theorem_1 and conditions.unmet() == ["expansion of layer 2 (0.36 < 1)"]
    network = theorem_network(torch.Generator().manual_seed(0))
    assert network.conditions().theorem_1 and network.conditions(rate=0.2).theorem_4
    assert not network.conditions(rate=0.1).theorem_4
    assert network.conditions(rate=0.1).unmet() == ["last layer expansive by 1/r = 10 (8.66 < 10)"]
    landscape = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, "sigmoid", weight_std=1.0)
    assert set(landscape.conditions().unmet()) >= {"relu", "gaussian", "no_overlap"}
    with pytest.raises(ValueError, match="rate"):
        network.conditions(rate=0.0)


def test_zero_mean_weight_laws_of_conjecture_3_have_the_theorys_variance():
    for law in ("gaussian", "centered_uniform", "sign"):
        generator = TransposedConvGenerator(
            (10, 1, 1), (64, 8), 6, weights=law, generator=torch.Generator().manual_seed(1)
        )
        weights = generator.weight0
        assert abs(weights.mean().item()) < 0.01 and weights.std().item() == pytest.approx(
            1 / math.sqrt(64 * 36), rel=0.05
        )
    uniform = TransposedConvGenerator((10, 1, 1), (64, 8), 6, weights="uniform").weight0
    assert uniform.min() >= 0 and uniform.mean().item() == pytest.approx(0.5, abs=0.02)  # the counter-example
    unit = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, weight_std=1.0, generator=torch.Generator().manual_seed(1))
    assert unit.weight0.std().item() == pytest.approx(1.0, rel=0.3)


def test_the_negative_multiple_is_found_and_descent_escapes_it():
    rng = torch.Generator().manual_seed(0)
    generator = theorem_network(rng).double()
    z_true = torch.randn(1, 10, 1, 1, generator=rng, dtype=torch.float64)
    mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
    found = negative_multiple(generator, z_true, mask)
    assert found.interior and 0 < found.rho < 3 and found.loss < found.loss_at_zero
    assert found.escapes and found.relative_error < 1e-3
    with pytest.raises(ValueError, match="one problem"):
        negative_multiple(generator, z_true.repeat(2, 1, 1, 1), mask)


def test_trained_weights_are_compared_with_normal_laws(tmp_path):
    from invertnet.analysis import plot_weight_histograms, weight_normality

    model = torch.nn.Sequential(torch.nn.Linear(50, 80), torch.nn.ReLU(), torch.nn.Linear(80, 40))
    with torch.no_grad():
        model[0].weight.normal_(generator=torch.Generator().manual_seed(2))
        model[2].weight.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    gaussian, uniform = weight_normality(model)
    assert gaussian.name == "0.weight" and gaussian.looks_normal and abs(gaussian.excess_kurtosis) < 0.3
    assert not uniform.looks_normal and uniform.excess_kurtosis == pytest.approx(-1.2, abs=0.15)
    assert plot_weight_histograms([gaussian, uniform], tmp_path / "weights.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no layers"):
        plot_weight_histograms([], tmp_path / "none.png")
