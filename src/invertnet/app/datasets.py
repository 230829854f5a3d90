r"""The data sets a run config names (``data`` section), loaded as tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from invertnet.data import (
    DIGITS_LEVELS,
    TOY_DENSITIES,
    centered_levels,
    load_cifar10,
    load_digits,
    load_image_folder,
    load_mnist,
    sample_toy,
)

if TYPE_CHECKING:
    from invertnet.app.config import DataConfig

__all__ = ["labelled_images", "labelled_levels", "standardized", "unlabelled_data"]

Labelled = tuple[Tensor, Tensor]


def _images(data: DataConfig) -> tuple[Labelled, Labelled, int]:
    """``((x, y) train, (x, y) test, K)`` for the image data sets, images as levels 0..K-1."""
    if data.name == "digits":
        return load_digits("train"), load_digits("test"), DIGITS_LEVELS
    if data.name not in ("mnist", "cifar10", "image_folder"):
        raise ValueError(f"data.name: {data.name!r} is not an image data set, which this model kind needs")
    if data.root is None:
        raise ValueError(f"data.root: the folder holding the {data.name} files is required")
    if data.name == "image_folder":
        return (
            load_image_folder(data.root, "train", data.image_size),
            load_image_folder(data.root, "test", data.image_size),
            256,
        )
    loader = load_mnist if data.name == "mnist" else load_cifar10
    return loader(data.root, "train"), loader(data.root, "test"), 256


def unlabelled_data(data: DataConfig) -> tuple[Tensor, Tensor, int | None]:
    """``(train, test, levels)`` for density models: levels is K for discrete image data (images as levels
    0..K-1), ``None`` for the continuous toy densities."""
    if data.name in TOY_DENSITIES:
        return sample_toy(data.name, data.n_train, seed=0), sample_toy(data.name, data.n_test, seed=1), None
    train, test, levels = _images(data)
    return train[0], test[0], levels


def labelled_images(data: DataConfig) -> tuple[Labelled, Labelled, int]:
    """``((x_train, y_train), (x_test, y_test), n_classes)``, images scaled to [-0.5, 0.5], or standardised per
    channel with the training set's mean and standard deviation (``data.normalization``)."""
    if data.name in TOY_DENSITIES:
        raise ValueError(f"data.name: this model needs labelled images, not the toy density {data.name!r}")
    (x_train, y_train), (x_test, y_test), levels = _images(data)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    x_train, x_test = centered_levels(x_train, levels), centered_levels(x_test, levels)
    if data.normalization == "standardized":
        x_train, x_test = standardized(x_train, x_test)
    return (x_train, y_train), (x_test, y_test), n_classes


def standardized(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both image sets (N, C, H, W) minus the training set's per-channel mean, divided by its per-channel standard
    deviation (Behrmann et al. 2019, appendix C.2, for CIFAR); a constant channel is only centred."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def labelled_levels(data: DataConfig) -> tuple[Labelled, Labelled, int, int]:
    """``((x_train, y_train), (x_test, y_test), levels, n_classes)`` for class-conditional density models: images
    as levels 0..K-1, as the flows take them."""
    if data.name in TOY_DENSITIES:
        raise ValueError(f"data.name: a class-conditional flow needs labelled images, not the toy {data.name!r}")
    train, test, levels = _images(data)
    n_classes = int(max(train[1].max(), test[1].max())) + 1
    return train, test, levels, n_classes
