r"""Model sizes: parameter counts without allocating the model, and free parameters of masked layers.

Papers count a network's parameters as its free weights: the entries of a masked convolution that its mask
zeroes are stored but are no parameters (Song, Meng & Ermon 2019 compare MintNet's size with the i-ResNet's so).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from torch.distributions import Distribution

from invertnet.layers.masked import MaskedConv2d

__all__ = ["parameter_count", "without_allocation"]

M = TypeVar("M", bound=nn.Module)


@contextmanager
def without_allocation() -> Iterator[None]:
    """Build modules on PyTorch's ``meta`` device inside the block: shapes without storage, so that the size of a
    model too large for memory can be read (distributions' argument checks, which need values, are off)."""
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        with torch.device("meta"):
            yield
    finally:
        Distribution.set_default_validate_args(previous)


def parameter_count(model: nn.Module | Callable[[], nn.Module], *, free: bool = True) -> int:
    """The number of parameter entries of ``model`` (a module, or a function that builds one: then it is built
    :func:`without_allocation`), shared parameters once. ``free=True`` leaves out the weights masked
    convolutions hold at zero (:attr:`~invertnet.layers.MaskedConv2d.free_weights`); ``False`` counts every
    stored entry.

    Examples:
        >>> from invertnet.models import mintnet_flow
        >>> parameter_count(lambda: mintnet_flow((1, 28, 28), n_blocks=20, hidden_channels=45, levels=256))
        536904
    """
    if not isinstance(model, nn.Module):
        with without_allocation():
            model = model()
    total = sum(parameter.numel() for parameter in model.parameters())
    if free:
        masked = [layer for layer in model.modules() if isinstance(layer, MaskedConv2d)]
        total -= sum(layer.raw_weight.numel() - layer.free_weights for layer in masked)
    return total
