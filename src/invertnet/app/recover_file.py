r"""``invertnet recover``: recover a saved generator's latent code from the observed pixels of an image file
and write the completed image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from invertnet._files import save_tensors
from invertnet._optional import require
from invertnet.models.generators import load_generator
from invertnet.recovery.masks import Mask, make_mask
from invertnet.recovery.recover import recover

__all__ = ["read_image", "read_mask", "recover_file"]


def _named_tensor(path: Path, name: str, where: str) -> Tensor:
    """The tensor ``name`` of a safetensors file, or a ``ValueError`` naming the file and the problem."""
    if not path.is_file():
        raise ValueError(f"{where}: {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{where}: {path} is not a readable safetensors file ({error})") from error
    if name not in tensors:
        raise ValueError(f"{where}: {path} has no tensor named {name!r} (found {sorted(tensors)})")
    return tensors[name]


def read_image(path: str | Path, value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """An image as a (C, H, W) float64 tensor: from a ``.png`` (values in [0, 1] mapped linearly to
    ``value_range``) or from a ``.safetensors`` file holding a tensor named ``image`` (values as stored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_image: {path} does not exist")
    if path.suffix == ".safetensors":
        image = _named_tensor(path, "image", "read_image").double()
    elif path.suffix == ".png":
        image_io = require("matplotlib.image", "plots", "reading a .png image")
        pixels = torch.from_numpy(image_io.imread(str(path))).double()
        pixels = pixels[..., :3] if pixels.dim() == 3 else pixels  # drop alpha
        image = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels
        low, high = value_range
        image = low + (high - low) * image
    else:
        raise ValueError(f"read_image: {path} must be a .png or .safetensors file")
    return image[None] if image.dim() == 2 else image


def read_mask(path: str | Path) -> Mask:
    """A user's sampling pattern: a ``.png`` (non-zero pixels observed) or a ``.safetensors`` tensor ``mask``."""
    path = Path(path)
    keep = _named_tensor(path, "mask", "read_mask") if path.suffix == ".safetensors" else read_image(path)
    while keep.dim() > 2:
        keep = keep.amax(dim=0)
    return Mask(keep != 0)


def _save_png(image: Tensor, path: Path) -> None:
    """Save a (C, H, W) image scaled to its own range (grayscale for C = 1)."""
    image = image.detach().cpu().double()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    array = image[0].numpy() if image.shape[0] == 1 else image[:3].permute(1, 2, 0).numpy()
    image_io = require("matplotlib.image", "plots", "writing the completed image")
    image_io.imsave(str(path), array, cmap="gray" if image.shape[0] == 1 else None)


def recover_file(
    generator_path: str | Path,
    image_path: str | Path,
    output: str | Path,
    *,
    mask_kind: str = "uniform",
    rate: float = 0.5,
    mask_path: str | Path | None = None,
    label: int | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    method: str = "adam",
    restarts: int = 4,
    max_iter: int = 3000,
    rtol: float = 1e-7,
    seed: int = 0,
) -> dict[str, Any]:
    """Recover the latent code of one image observed through a mask; write the completed image.

    Writes ``output`` (a PNG of the completed image G(z)) and ``output`` with suffix ``.safetensors``
    (``z``, ``completed``, ``mask``). Returns the record as a JSON-ready dict.
    """
    generator = load_generator(generator_path).double()
    image = read_image(image_path, value_range)
    rng = torch.Generator().manual_seed(seed)
    mask = read_mask(mask_path) if mask_path else make_mask(mask_kind, image.shape[-2:], rate, generator=rng)  # type: ignore[arg-type]
    condition = None if label is None else torch.tensor([label])
    result = recover(
        generator,
        image[None],
        mask,
        condition=condition,
        method=method,  # type: ignore[arg-type]
        restarts=restarts,
        max_iter=max_iter,
        rtol=rtol,
        seed=seed,
    )
    output = Path(output)
    _save_png(result.completed[0], output)
    tensors = {"z": result.z.float(), "completed": result.completed.float(), "mask": mask.keep.to(torch.uint8)}
    save_tensors(tensors, output.with_suffix(".safetensors"))
    return {
        "output": str(output),
        "observed_rate": mask.rate,
        "converged": bool(result.converged.all()),
        "relative_residual": result.relative_residual.item(),
        "iterations": result.iterations,
        "non_unique": bool(result.non_unique.any()),
        "summary": result.summary(),
    }
