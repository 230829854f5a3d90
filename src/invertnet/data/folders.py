r"""Images from a folder of files (e.g. CelebA's ``img_align_celeba``), as grey levels at a fixed size.

Files are read with pillow, from the ``data`` extra (``pip install 'invertnet[data]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from invertnet._optional import require

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _square(image: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """Centre-crop to a square, resize to size x size with ``resample``, grey levels 0..255."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.convert("L").crop((left, top, left + side, top + side)).resize((size, size), resample)
    return np.asarray(image, dtype=np.float32)


def load_image_folder(
    root: str | Path, split: str = "train", image_size: int = 64, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` from every image file in ``root``: images (N, 1, S, S) with levels 0..255
    (Ma, Ayaz & Karaman 2018 rescale CelebA to 64x64 grey images), labels all 0. The split is a seeded random
    ``test_fraction``.

    Arguments:
        root: Folder of ``.png``, ``.jpg``, ``.jpeg`` or ``.bmp`` files (searched recursively).
        split: ``"train"`` or ``"test"``.
        image_size: Side S of the square images.

    Raises:
        ImportError: pillow is not installed (``pip install 'invertnet[data]'``).
        FileNotFoundError: ``root`` is not a folder or holds fewer than 2 image files.
        ValueError: a bad ``split``, or a file that pillow cannot read (the message names it).
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
    arrays = []
    for index in chosen.tolist():
        try:
            with pil.open(files[index]) as image:
                arrays.append(_square(image, image_size, pil.Resampling.BILINEAR))
        except (pil.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"load_image_folder: cannot read {files[index]} ({error})") from error
    images = torch.from_numpy(np.stack(arrays))[:, None]
    return images, torch.zeros(len(images), dtype=torch.long)
