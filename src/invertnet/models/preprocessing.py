"""The preprocessing of discrete data that every flow builder prepends: dequantisation, then the logit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from invertnet.core import InvertibleModule
from invertnet.layers.preprocess import Logit, UniformDequantization
from invertnet.layers.variational_dequantization import ConvolutionalConditioner, VariationalDequantization

__all__ = ["DEQUANTIZATIONS", "Dequantization", "discrete_preprocessing"]

Dequantization = Literal["uniform", "variational", "variational_conv"]
DEQUANTIZATIONS: tuple[str, ...] = get_args(Dequantization)


def discrete_preprocessing(
    levels: int | None, shape: Sequence[int], logit_alpha: float, dequantization: str, where: str
) -> list[InvertibleModule]:
    """``[dequantisation, Logit(logit_alpha)]`` for data of ``levels`` discrete levels and sample shape ``shape``,
    or ``[]`` when ``levels`` is None; ``where`` names the builder in errors. The dequantisation:

    * ``"uniform"``: :class:`~invertnet.layers.UniformDequantization` (Behrmann et al. 2019; thesis Lemma 5.10);
    * ``"variational"``: :class:`~invertnet.layers.VariationalDequantization` (Ho et al. 2019, section 3.1), a
      learned q(u | x) and a tighter bound on the discrete bits/dim, with its default dense conditioner of
      (3d + 1) 64 + 2d parameters for d values per sample (12.5k on the 8 x 8 digits, 0.6M on CIFAR-10;
      docs/defaults.md);
    * ``"variational_conv"``, images (C, H, W) only: the same with a
      :class:`~invertnet.layers.ConvolutionalConditioner` (5.3k parameters on CIFAR-10)."""
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
