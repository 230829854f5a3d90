r"""Image data sets as integer levels: scikit-learn's digits (shipped), MNIST and CIFAR-10 from local files.

Nothing is downloaded. Every loader returns ``(images, labels)``: images a float tensor of shape (N, C, H, W)
holding integer levels 0..K-1 (the input of :class:`~invertnet.layers.UniformDequantization`), labels a long
tensor of shape (N,).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from invertnet._optional import require

__all__ = ["DIGITS_LEVELS", "load_cifar10", "load_digits", "load_mnist", "read_idx"]

#: scikit-learn's digits hold 17 grey levels, 0..16.
DIGITS_LEVELS = 17

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


def _open_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed, into a numpy array.

    Raises:
        ValueError: If the header's magic number, dtype or size does not match the file.
    """
    path = Path(path)
    data = _open_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() if data else 'empty'})")
    dtype, n_dims = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * n_dims
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{n_dims}I", data[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, name: str, dataset: str, expected: list[str]) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{dataset}: {root / name}[.gz] not found. Put the files {', '.join(expected)} in {root} (invertnet never "
        "downloads data)"
    )


def load_mnist(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from the four IDX files (optionally .gz) in ``root``; images (N, 1, 28, 28), levels 0..255."""
    _check_split(split, _MNIST_FILES)
    root = Path(root)
    expected = [name for pair in _MNIST_FILES.values() for name in pair]
    image_name, label_name = _MNIST_FILES[split]
    images = read_idx(_find(root, image_name, "MNIST", expected))
    labels = read_idx(_find(root, label_name, "MNIST", expected))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST in {root}: images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


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
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    return data, labels


def load_cifar10(root: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from its python batches in ``root`` (the folder ``cifar-10-batches-py``); images (N, 3, 32, 32).

    The batches are pickles; they are read with an unpickler that admits only numpy arrays and plain
    containers, so a tampered file cannot run code.
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
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32))
    return images, torch.from_numpy(labels)
