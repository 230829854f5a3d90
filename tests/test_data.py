"""Data loaders: toy densities, digits, MNIST IDX files and CIFAR-10 batches; clear errors, no downloads."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from invertnet.data import (
    DIGITS_LEVELS,
    TOY_DENSITIES,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    sample_toy,
)


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
