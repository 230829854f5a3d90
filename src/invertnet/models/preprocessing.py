"""The preprocessing of discrete data that every flow builder prepends: dequantisation, then the logit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from invertnet.core import InvertibleModule
from invertnet.layers.preprocess import Logit, UniformDequantization
from invertnet.layers.variational_dequantization import ConvolutionalConditioner, VariationalDequantization

__all__ = ["DEQUANTIZATIONS", "Dequantization", "discrete_preprocessing"]

Dequantization = Literal["uniform", "variational", "variational_conv"]
DEQUANTIZATIONS: tuple[str, ...] = ("uniform", "variational", "variational_conv")


def discrete_preprocessing(
    levels: int | None, shape: Sequence[int], logit_alpha: float, dequantization: str, where: str
) -> list[InvertibleModule]:
    """``[dequantisation, Logit(logit_alpha)]`` for data of ``levels`` discrete levels and sample shape ``shape``,
    or ``[]`` when ``levels`` is None: :class:`~invertnet.layers.UniformDequantization` (``"uniform"``), or
    :class:`~invertnet.layers.VariationalDequantization` with its default dense conditioner (``"variational"``)
    or with a :class:`~invertnet.layers.ConvolutionalConditioner` (``"variational_conv"``, images (C, H, W))."""
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"{where}: dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}")
    if levels is None:
        if dequantization != "uniform":
            raise ValueError(f"{where}: dequantization={dequantization!r} needs the data's number of levels")
        return []
    if dequantization == "variational":
        return [VariationalDequantization(levels, shape), Logit(logit_alpha)]
    if dequantization == "variational_conv":
        if len(shape) != 3:
            raise ValueError(f"{where}: dequantization='variational_conv' needs images (C, H, W), got shape {shape}")
        conditioner = ConvolutionalConditioner(shape[0])
        return [VariationalDequantization(levels, shape, conditioner=conditioner), Logit(logit_alpha)]
    return [UniformDequantization(levels), Logit(logit_alpha)]
