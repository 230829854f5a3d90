"""Data: 2-D toy densities, scikit-learn's digits, MNIST and CIFAR-10 from local files. Nothing downloads."""

from invertnet.data.images import DIGITS_LEVELS as DIGITS_LEVELS
from invertnet.data.images import load_cifar10 as load_cifar10
from invertnet.data.images import load_digits as load_digits
from invertnet.data.images import load_mnist as load_mnist
from invertnet.data.images import read_idx as read_idx
from invertnet.data.toy import TOY_DENSITIES as TOY_DENSITIES
from invertnet.data.toy import sample_toy as sample_toy

__all__ = ["DIGITS_LEVELS", "TOY_DENSITIES", "load_cifar10", "load_digits", "load_mnist", "read_idx", "sample_toy"]
