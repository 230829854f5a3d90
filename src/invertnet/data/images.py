r"""Image data sets as integer levels: scikit-learn's digits (shipped), MNIST and CIFAR-10 from local files.

Nothing is downloaded. Every loader returns ``(images, labels)``: images a float tensor of shape (N, C, H, W)
holding integer levels 0..K-1 (the input of :class:`~invertnet.layers.UniformDequantization`), labels a long
tensor of shape (N,).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from invertnet._optional import require
from invertnet.data.values import checked_labels, checked_levels

__all__ = ["DIGITS_LEVELS", "MAX_IDX_BYTES", "load_cifar10", "load_digits", "load_mnist", "read_idx"]

DIGITS_LEVELS = 17
"""Grey levels of scikit-learn's digits: 17, the values 0..16."""

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def _check_split(split: str, allowed: dict) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {sorted(allowed)}, got {split!r}")


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 17 levels) with a fixed, seeded train/test split.

    Returns images of shape (N, 1, 8, 8) with levels 0..16 and labels of shape (N,).

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'invertnet[data]'``).
    """
    datasets = require("sklearn.datasets", "data", "load_digits")
    _check_split(split, {"train": None, "test": None})
    digits = datasets.load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(order)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    images = torch.as_tensor(digits.images, dtype=torch.float32)[chosen].unsqueeze(1)
    return images, torch.as_tensor(digits.target, dtype=torch.long)[chosen]


MAX_IDX_BYTES = 2**31
"""Most data bytes :func:`read_idx` accepts from an IDX header (MNIST's largest file holds 47 million)."""

_CHUNK = 1 << 20


def read_idx(path: str | Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed, into a numpy array.

    The magic number and the header are read from the first bytes, before any data; the data are then read
    (decompressed) in chunks of 1 MiB up to the size the header announces, so a corrupt or malicious file
    (a gzip bomb) costs at most that size, itself at most ``max_bytes``.

    Arguments:
        path: The file; gzip-compressed when it starts with the gzip magic bytes 1f 8b.
        max_bytes: Most data bytes accepted (default :data:`MAX_IDX_BYTES`, 2 GiB).

    Raises:
        ValueError: Naming the file: a bad magic number or a truncated header, a header announcing more than
            ``max_bytes``, data shorter or longer than announced, or a corrupt or truncated gzip stream.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw) as stream:
                return _read_idx_stream(stream, path, max_bytes)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({error})") from error


def _read_idx_stream(stream: BinaryIO, path: Path, max_bytes: int) -> np.ndarray:
    """The array of an IDX byte stream: header first, then at most the announced number of data bytes."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {magic.hex() if magic else 'empty'})")
    dtype, n_dims = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
    dims = stream.read(4 * n_dims)
    if len(dims) < 4 * n_dims:
        raise ValueError(f"{path}: truncated IDX header ({n_dims} dimensions announced, {len(dims)} bytes of sizes)")
    shape = struct.unpack(f">{n_dims}I", dims)
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes), more than the limit of {max_bytes} "
            "bytes (read_idx's max_bytes)"
        )
    data = bytearray(expected)
    view, filled = memoryview(data), 0
    while filled < expected:
        count = stream.readinto(view[filled : filled + _CHUNK])
        if not count:
            break
        filled += count
    if filled < expected or stream.read(1):
        actual = f"{filled}" if filled < expected else "more"
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} data bytes) but the file holds {actual}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find(root: Path, name: str, dataset: str, expected: list[str]) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{dataset}: {root / name}[.gz] not found. Put the files {', '.join(expected)} in {root} (invertnet never "
        "downloads data)"
    )


def load_mnist(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from the four IDX files (optionally .gz) in ``root``; images (N, 1, 28, 28), levels 0..255.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file is not a readable IDX file (:func:`read_idx`), its pixel values are not integers
            0..255, or its labels are not class indices 0..MAX_CLASSES - 1; the message names the file.
    """
    _check_split(split, _MNIST_FILES)
    root = Path(root)
    expected = [name for pair in _MNIST_FILES.values() for name in pair]
    image_name, label_name = _MNIST_FILES[split]
    images = read_idx(_find(root, image_name, "MNIST", expected))
    labels = read_idx(_find(root, label_name, "MNIST", expected))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST in {root}: images {images.shape} and labels {labels.shape} do not match")
    images = checked_levels(images, 256, f"MNIST {root / image_name}")
    labels = checked_labels(labels, f"MNIST {root / label_name}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's python batches contain: dicts, lists, bytes and numpy arrays."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes pickled at protocol 2 by Python 3
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch must be a dict with b'data' and b'labels'")
    data = checked_levels(np.asarray(batch[b"data"]), 256, f"CIFAR-10 batch {path}")
    labels = checked_labels(np.asarray(batch[b"labels"]), f"CIFAR-10 batch {path}")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    return data, labels


def load_cifar10(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from its python batches in ``root`` (the folder ``cifar-10-batches-py``); images (N, 3, 32, 32).

    The batches are pickles; they are read with an unpickler that admits only numpy arrays and plain
    containers, so a tampered file cannot run code. Pixel values must be integers 0..255 and labels class indices
    0..MAX_CLASSES - 1 (of any numeric type); anything else is refused by a ``ValueError`` naming the batch,
    never cast.
    """
    _check_split(split, _CIFAR_FILES)
    root = Path(root)
    expected = [name for names in _CIFAR_FILES.values() for name in names]
    parts = []
    for name in _CIFAR_FILES[split]:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10: {path} not found. Put the python batches {', '.join(expected)} (the folder "
                f"cifar-10-batches-py) in {root} (invertnet never downloads data)"
            )
        parts.append(_read_cifar_batch(path))
    data = np.concatenate([data for data, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)
