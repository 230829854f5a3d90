r"""File-level recovery jobs behind ``invertnet recover`` and ``invertnet recover-study``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor  # noqa: E402

from invertnet.models.generators import TransposedConvGenerator, load_generator  # noqa: E402
from invertnet.recovery.masks import Mask, make_mask  # noqa: E402
from invertnet.recovery.recover import recover  # noqa: E402
from invertnet.recovery.studies import (  # noqa: E402
    loss_landscape,
    phase_transition,
    plot_landscapes,
    plot_phase_transition,
    write_phase_transition_csv,
)

__all__ = ["read_image", "read_mask", "recover_file", "study_landscapes", "study_phase_transition"]


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
        pixels = torch.from_numpy(matplotlib.image.imread(str(path))).double()
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
    plt.imsave(str(path), array, cmap="gray" if image.shape[0] == 1 else None)


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
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(output.with_suffix(".safetensors")))
    return {
        "output": str(output),
        "observed_rate": mask.rate,
        "converged": bool(result.converged.all()),
        "relative_residual": result.relative_residual.item(),
        "iterations": result.iterations,
        "non_unique": bool(result.non_unique.any()),
        "summary": result.summary(),
    }


def study_landscapes(output_dir: str | Path, seed: int = 0, resolution: int = 101) -> dict[str, Any]:
    """Fig. 4 a-d: J(z) around z* for 2-layer generators with a 2-D latent (16 channels, then 1; kernel 5,
    stride 3; 50% uniform samples) with ReLU, sigmoid, tanh and Gaussian weights, and ReLU with U[0, 1]
    weights (a code in the negative quadrant, where the minimum is flat). Saves ``landscapes.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = [("relu", "gaussian"), ("sigmoid", "gaussian"), ("tanh", "gaussian"), ("relu", "uniform")]
    landscapes = []
    for activation, law in settings:
        rng = torch.Generator().manual_seed(seed)
        generator = TransposedConvGenerator((2, 1, 1), (16, 1), 5, 3, activation, law, generator=rng).double()  # type: ignore[arg-type]
        z_true = torch.tensor([0.8, -0.6] if law == "gaussian" else [-0.8, -0.6], dtype=torch.float64)
        mask = make_mask("uniform", generator.output_shape[1:], 0.5, generator=rng)
        title = f"({'abcd'[len(landscapes)]}) {activation}, {law} weights"
        landscapes.append(loss_landscape(generator, z_true.view(1, 2, 1, 1), mask, resolution=resolution, title=title))
    figure = plot_landscapes(landscapes, output_dir / "landscapes.png")
    flat = {landscape.title: (landscape.loss <= 1e-12).double().mean().item() for landscape in landscapes}
    return {"figure": str(figure), "fraction_of_grid_with_zero_loss": flat}


def study_phase_transition(
    output_dir: str | Path,
    rates: Sequence[float],
    kinds: Sequence[str],
    n_networks: int = 10,
    n_codes: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The phase transition of exact recovery; saves ``phase_transition.csv`` and ``phase_transition.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = phase_transition(rates, kinds, n_networks, n_codes, seed=seed, progress=progress)
    csv_path = write_phase_transition_csv(rows, output_dir / "phase_transition.csv")
    figure = plot_phase_transition(rows, output_dir / "phase_transition.png")
    table = [
        {"mask": row.mask, "rate": row.rate, "observed_rate": row.observed_rate, "probability": row.probability}
        for row in rows
    ]
    (output_dir / "phase_transition.json").write_text(json.dumps(table, indent=2))
    return {"csv": str(csv_path), "figure": str(figure), "rows": table}
