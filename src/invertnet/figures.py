"""Creating and saving matplotlib figures without pyplot: no global backend, no display, nothing to close.

Figures made by :func:`subplots` are plain :class:`matplotlib.figure.Figure` objects: they are not registered with
pyplot, so they never change a notebook's backend, are safe to build in several threads, and are freed when
dropped. Writing one renders it with Agg (or the writer of the file's format). matplotlib comes with the ``plots``
extra and is imported when a figure is made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invertnet._optional import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = ["plot_samples", "save_figure", "subplots"]


def subplots(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] | None = None,
    squeeze: bool = True,
    feature: str = "plotting",
    **subplot_kw: Any,
) -> tuple[Figure, Any]:
    """A new figure with an ``nrows`` x ``ncols`` grid of axes, as ``pyplot.subplots`` but outside pyplot.

    Arguments:
        nrows: Rows of axes.
        ncols: Columns of axes.
        figsize: (width, height) in inches; matplotlib's default when ``None``.
        squeeze: As in ``pyplot.subplots``: one axes object for a 1 x 1 grid, a 1-D array for a single row or
            column; ``False`` always gives a 2-D array of shape (nrows, ncols).
        feature: What draws the figure, named in the error when matplotlib is missing.
        **subplot_kw: Passed to ``Figure.add_subplot`` for each axes (e.g. ``projection="polar"``).

    Returns:
        ``(figure, axes)``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'invertnet[plots]'``).

    Examples:
        >>> figure, axes = subplots(1, 2, figsize=(4, 2))
        >>> axes.shape, type(figure).__name__
        ((2,), 'Figure')
    """
    figure_module = require("matplotlib.figure", "plots", feature)
    figure = figure_module.Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, squeeze=squeeze, subplot_kw=subplot_kw or None)


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Lay out ``figure`` and write it to ``path`` (format from the suffix); returns the path written.

    A figure made through pyplot (``plt.subplots``) is also closed, so pyplot's registry does not keep it alive;
    a figure from :func:`subplots` is not registered anywhere and needs no closing.

    Arguments:
        figure: The figure to write.
        path: Destination file, e.g. ``"spectra.png"``; its folder must exist.
        dpi: Resolution in dots per inch.
    """
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    if figure.canvas.manager is not None:  # registered with pyplot, which is therefore already imported
        import matplotlib.pyplot as plt

        plt.close(figure)
    return path


def plot_samples(samples: Tensor, path: str | Path, max_images: int = 64) -> Path | None:
    """Draw samples for a look: images (N, C, H, W) as a grid of at most ``max_images`` (grey for one channel,
    colour for three; values scaled to the grid's own range), points (N, 2) as a scatter plot. Other shapes draw
    nothing and return ``None``.

    Examples:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     plot_samples(torch.rand(10, 1, 8, 8), Path(folder) / "grid.png").name
        'grid.png'
    """
    samples = samples.detach().float().cpu()
    if samples.dim() == 2 and samples.shape[1] == 2:
        figure, axes = subplots(figsize=(4, 4), feature="plot_samples")
        axes.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2)
        axes.set_aspect("equal")
        return save_figure(figure, path)
    if samples.dim() != 4 or samples.shape[1] not in (1, 3) or len(samples) == 0:
        return None
    images = samples[:max_images]
    low, high = images.min(), images.max()
    images = (images - low) / (high - low).clamp_min(1e-12)
    side = math.ceil(math.sqrt(len(images)))
    figure, axes = subplots(side, side, figsize=(side * 0.75, side * 0.75), squeeze=False, feature="plot_samples")
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            image = images[index]
            axis.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(), cmap="gray")
    return save_figure(figure, path)
