"""Data loaders: toy densities, digits, MNIST IDX files and CIFAR-10 batches; clear errors, no downloads."""

import gzip
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from invertnet.data import (
    DIGITS_LEVELS,
    TOY_DENSITIES,
    TOY_LOG_DENSITIES,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    sample_toy,
    toy_log_prob,
)
from invertnet.data import toy as toy_module


@pytest.mark.parametrize("name", sorted(TOY_DENSITIES))
def test_toy_densities_are_reproducible_finite_and_two_dimensional(name):
    points = sample_toy(name, 500, seed=3)
    assert points.shape == (500, 2) and torch.isfinite(points).all()
    assert points.abs().max() < 8 and points.std(0).min() > 0.3
    torch.testing.assert_close(points, sample_toy(name, 500, seed=3), atol=0, rtol=0)
    assert not torch.equal(points, sample_toy(name, 500, seed=4))


def test_unknown_toy_density_lists_the_names():
    with pytest.raises(ValueError, match="two_moons"):
        sample_toy("banana", 10)


BIN, SUBGRID, EDGE = 0.5, 8, 4.5


def _bin_probabilities(name):
    """P(bin) of 0.5 x 0.5 bins on [-4.5, 4.5]^2 from the log-density (midpoint rule on an 8 x 8 subgrid per bin)."""
    step = BIN / SUBGRID
    centres = torch.arange(-EDGE + step / 2, EDGE, step, dtype=torch.float64)
    grid = torch.cartesian_prod(centres, centres)  # x-major: row i is x index i // n, y index i % n
    density = toy_log_prob(name, grid).exp().view(len(centres), len(centres)) * step**2
    bins = int(2 * EDGE / BIN)
    return density.view(bins, SUBGRID, bins, SUBGRID).sum(dim=(1, 3))


@pytest.mark.parametrize("name", sorted(TOY_LOG_DENSITIES))
def test_true_toy_log_density_matches_a_histogram_of_its_samples(name):
    probabilities = _bin_probabilities(name)
    assert probabilities.sum().item() == pytest.approx(1.0, abs=2e-3)  # normalised, no mass outside [-4.5, 4.5]^2
    n = 200_000
    points = sample_toy(name, n, seed=5).double()
    index = torch.floor((points + EDGE) / BIN).long()
    assert ((index >= 0) & (index < len(probabilities))).all()
    counts = torch.zeros_like(probabilities)
    counts.index_put_((index[:, 0], index[:, 1]), torch.ones(n, dtype=torch.float64), accumulate=True)
    expected = n * probabilities
    populated = expected > 20
    chi_square = ((counts - expected)[populated].square() / expected[populated]).sum().item()
    dof = int(populated.sum())
    assert chi_square < dof + 5 * (2 * dof) ** 0.5, f"chi^2 {chi_square:.0f} on {dof} bins"
    sparse_counts, sparse_expected = counts[~populated].sum().item(), expected[~populated].sum().item()
    assert abs(sparse_counts - sparse_expected) < 5 * sparse_expected**0.5 + 5  # the sparse bins together


def test_two_moons_quadrature_agrees_with_monte_carlo_over_the_arc():
    points = torch.tensor([[-1.25, 1.875], [1.25, -1.875], [0.0, 0.3], [-3.7, -0.6], [2.0, 0.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    m = 400_000
    angle = torch.pi * torch.rand(m, generator=generator, dtype=torch.float64)
    upper = torch.rand(m, generator=generator) < 0.5
    arc = torch.where(upper[:, None], toy_module._moon_arc(angle, True), toy_module._moon_arc(angle, False))
    noise = 0.1
    kernel = torch.exp(-(points[:, None] - arc[None]).square().sum(-1) / (2 * noise**2)) / (2 * torch.pi * noise**2)
    estimate, error = kernel.mean(dim=1), kernel.std(dim=1) / m**0.5
    quadrature = toy_log_prob("two_moons", points).exp()
    assert (estimate > 10 * error).all()  # the points are near the arcs, where the check has power
    assert ((quadrature - estimate).abs() < 4 * error).all(), (quadrature, estimate, error)


def test_two_moons_quadrature_has_converged(monkeypatch):
    points = sample_toy("two_moons", 200, seed=2).double() * 1.3  # also points off the moons
    panels, nodes = toy_module.MOONS_QUADRATURE
    value = toy_log_prob("two_moons", points)
    monkeypatch.setattr(toy_module, "MOONS_QUADRATURE", (2 * panels, nodes))
    torch.testing.assert_close(toy_log_prob("two_moons", points), value, atol=1e-6, rtol=0)


def test_checkerboard_log_density_is_uniform_on_its_closed_squares():
    inside = torch.tensor([[-3.0, -3.0], [0.1, 0.1], [-0.1, -0.1], [1.75, 0.5], [3.5, 3.5]])  # grid lines included
    outside = torch.tensor([[0.1, -0.1], [-3.0, -1.0], [3.6, 3.0], [0.0, 4.0]])
    torch.testing.assert_close(toy_log_prob("checkerboard", inside), torch.full((5,), -torch.log(torch.tensor(24.5))))
    assert torch.isneginf(toy_log_prob("checkerboard", outside)).all()


def test_eight_gaussians_log_density_at_a_centre():
    # at c_0 = (2.5, 0): the own component's peak (the others are >= 1.9 away, 7.6 standard deviations)
    value = toy_log_prob("eight_gaussians", torch.tensor([[2.5, 0.0]], dtype=torch.float64)).item()
    assert value == pytest.approx(-math.log(8 * 2 * math.pi * 0.25**2), abs=1e-12)


def test_toy_log_prob_names_what_is_available_and_checks_the_shape():
    with pytest.raises(ValueError, match=r"'rings' has no true log-density.*two_moons"):
        toy_log_prob("rings", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'banana' is not a toy density"):
        toy_log_prob("banana", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"shape \(n, 2\), got \(3, 3\)"):
        toy_log_prob("two_moons", torch.zeros(3, 3))


def test_digits_split_is_disjoint_and_has_17_levels():
    train_images, train_labels = load_digits("train")
    test_images, test_labels = load_digits("test")
    assert train_images.shape[1:] == (1, 8, 8) and len(train_images) + len(test_images) == 1797
    assert len(train_labels) == len(train_images) and len(test_labels) == len(test_images)
    everything = torch.cat([train_images, test_images])
    assert torch.equal(everything, everything.round())
    assert everything.min() == 0 and everything.max() == DIGITS_LEVELS - 1
    assert torch.unique(everything.flatten(1), dim=0).shape[0] > 1700  # no duplicated split


def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(root, n=5, compress=False):
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        payload = _idx_bytes(array)
        if compress:
            (root / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (root / name).write_bytes(payload)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_round_trip(tmp_path, compress):
    images, labels = _write_mnist(tmp_path, compress=compress)
    loaded_images, loaded_labels = load_mnist(tmp_path, "train")
    assert loaded_images.shape == (5, 1, 28, 28)
    assert torch.equal(loaded_images[:, 0], torch.from_numpy(images).float())
    assert torch.equal(loaded_labels, torch.from_numpy(labels).long())


def test_missing_mnist_names_the_files_and_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*never downloads"):
        load_mnist(tmp_path, "test")


def test_corrupt_idx_files_are_refused(tmp_path):
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))[:-10])
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(truncated)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="magic"):
        read_idx(garbage)


def _write_cifar_batch(path, n=4):
    data = np.random.default_rng(1).integers(0, 256, (n, 3072), dtype=np.uint8)
    with open(path, "wb") as handle:
        pickle.dump({b"data": data, b"labels": list(range(n))}, handle, protocol=2)
    return data


def test_cifar_batches_load(tmp_path):
    data = _write_cifar_batch(tmp_path / "test_batch")
    images, labels = load_cifar10(tmp_path, "test")
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images.flatten(1), torch.from_numpy(data).float())
    assert labels.tolist() == [0, 1, 2, 3]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo exploited",))


def test_cifar_loader_refuses_pickles_that_would_run_code(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path, "test")


def test_missing_cifar_names_the_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        load_cifar10(tmp_path, "train")
