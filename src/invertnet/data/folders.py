r"""Images from a folder of files (e.g. CelebA's ``img_align_celeba``), as grey levels at a fixed size.

Files are read with pillow, from the ``data`` extra (``pip install 'invertnet[data]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from invertnet._optional import require

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

MAX_IMAGE_PIXELS = 89_478_485
"""Most pixels (width x height) of one image file, checked from its header before it is decoded: pillow's own
default limit against decompression bombs (a 400-megapixel PNG of a few kilobytes decodes to 400 MB)."""


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """Centre-crop to a square, resize to size x size with ``resample``, grey levels 0..255."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.convert("L").crop((left, top, left + side, top + side)).resize((size, size), resample)
    return np.asarray(image, dtype=np.float32)


def _read(pil: ModuleType, path: Path, image_size: int, max_pixels: int) -> np.ndarray:
    """One file as (S, S) grey levels; a ``ValueError`` naming it when pillow cannot read it, when it has more
    than ``max_pixels`` pixels (judged from the header, before decoding), or when it has 16-bit or floating-point
    values, which 8-bit grey levels would clip."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pil.DecompressionBombWarning)  # the size is checked below
            with pil.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"load_image_folder: {path} has {width} x {height} = {width * height:,} pixels, more than the "
                        f"limit of {max_pixels:,} (max_pixels; a guard against decompression bombs)"
                    )
                if image.mode in ("I", "F") or image.mode.startswith("I;"):
                    raise ValueError(
                        f"load_image_folder: {path} holds {image.mode!r} values (16-bit or floating point), which "
                        "8-bit grey levels would clip; convert it to an 8-bit image first"
                    )
                return _square(image, image_size, pil.Resampling.BILINEAR)
    except pil.DecompressionBombError as error:
        raise ValueError(
            f"load_image_folder: {path} is refused as a decompression bomb ({error}); the limit is {max_pixels:,} "
            "pixels (max_pixels)"
        ) from error
    except (pil.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"load_image_folder: cannot read {path} ({error})") from error


def load_image_folder(
    root: str | Path,
    split: str = "train",
    image_size: int = 64,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` from every image file in ``root``: images (N, 1, S, S) with levels 0..255
    (Ma, Ayaz & Karaman 2018 rescale CelebA to 64x64 grey images), labels all 0. The split is a seeded random
    ``test_fraction``.

    Arguments:
        root: Folder of ``.png``, ``.jpg``, ``.jpeg`` or ``.bmp`` files (searched recursively).
        split: ``"train"`` or ``"test"``.
        image_size: Side S of the square images.
        max_pixels: Most pixels of one file, checked before it is decoded (default :data:`MAX_IMAGE_PIXELS`;
            pillow itself refuses more than twice its ``Image.MAX_IMAGE_PIXELS``).

    Raises:
        ImportError: pillow is not installed (``pip install 'invertnet[data]'``).
        FileNotFoundError: ``root`` is not a folder or holds fewer than 2 image files.
        ValueError: a bad ``split``, or a file that pillow cannot read, that has more than ``max_pixels`` pixels,
            or 16-bit or floating-point values (the message names it).
    """
    pil = require("PIL.Image", "data", "load_image_folder")
    if split not in ("train", "test"):
        raise ValueError(f"load_image_folder: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"load_image_folder: {root} is not a folder; put the image files (e.g. CelebA's) there")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise FileNotFoundError(
            f"load_image_folder: {root} holds {len(files)} image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * len(files)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    arrays = [_read(pil, files[index], image_size, max_pixels) for index in chosen.tolist()]
    images = torch.from_numpy(np.stack(arrays))[:, None]
    return images, torch.zeros(len(images), dtype=torch.long)
