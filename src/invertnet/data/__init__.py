"""Data: 2-D toy densities, scikit-learn's digits, MNIST, CIFAR-10 and image folders from local files. Nothing
downloads."""

from invertnet.data.folders import load_image_folder as load_image_folder
from invertnet.data.images import DIGITS_LEVELS as DIGITS_LEVELS
from invertnet.data.images import load_cifar10 as load_cifar10
from invertnet.data.images import load_digits as load_digits
from invertnet.data.images import load_mnist as load_mnist
from invertnet.data.images import read_idx as read_idx
from invertnet.data.toy import TOY_DENSITIES as TOY_DENSITIES
from invertnet.data.toy import sample_toy as sample_toy

__all__ = [
    "DIGITS_LEVELS",
    "TOY_DENSITIES",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "read_idx",
    "sample_toy",
]
