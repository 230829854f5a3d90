r"""Checks of the values a data file holds: image levels and class labels, refused by name rather than cast.

Casting would hide a damaged or wrong file: ``np.asarray([1000.0, nan], dtype=np.uint8)`` gives 232 and 0
without a word, and a label of 10^6 would make a classifier of a million classes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_CLASSES", "checked_labels", "checked_levels"]

MAX_CLASSES = 10_000
"""Most classes a labelled data set may have: labels are class indices 0 .. MAX_CLASSES - 1."""


def _integers(values: np.ndarray, where: str, what: str) -> np.ndarray:
    """``values`` as int64 when every one is a finite integer (of any numeric dtype); else a ``ValueError``
    naming ``where``, ``what`` they are, how many are bad and the first of them."""
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where}: {what} must be numbers, got an array of dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} {what} are NaN or infinite")
    fractional = values != np.round(values)
    if fractional.any():
        raise ValueError(
            f"{where}: {what} must be integers, but {int(fractional.sum())} are not "
            f"(the first is {values[fractional].flat[0].item()!r})"
        )
    return values.astype(np.int64)


def checked_levels(values: np.ndarray, levels: int, where: str) -> np.ndarray:
    """Image values as float32 levels, after checking that each is an integer in 0 .. ``levels`` - 1.

    Arguments:
        values: Array of any shape and numeric dtype.
        levels: K, the number of levels (256 for 8-bit images).
        where: The file (and what is read), named in the message.

    Raises:
        ValueError: A value is NaN, infinite, fractional or outside 0 .. K-1; the message gives the range found.
    """
    integers = _integers(np.asarray(values), where, "pixel values")
    if integers.size and (integers.min() < 0 or integers.max() >= levels):
        raise ValueError(
            f"{where}: pixel values must be integer levels 0..{levels - 1}, got values from {integers.min()} to "
            f"{integers.max()}"
        )
    return integers.astype(np.float32)


def checked_labels(values: np.ndarray, where: str) -> np.ndarray:
    """Class labels as int64, after checking that each is an integer in 0 .. :data:`MAX_CLASSES` - 1.

    Raises:
        ValueError: A label is NaN, fractional, negative or at least ``MAX_CLASSES`` (the number of classes is
            the largest label + 1); the message names ``where`` and the labels found.
    """
    labels = _integers(np.asarray(values), where, "labels")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0, got {labels.min()}")
    if labels.size and labels.max() >= MAX_CLASSES:
        raise ValueError(
            f"{where}: the largest label is {labels.max()}, which would make a classifier of {labels.max() + 1:,} "
            f"classes; labels are class indices 0..{MAX_CLASSES - 1} (invertnet.data.MAX_CLASSES)"
        )
    return labels
