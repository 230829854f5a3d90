"""Saving matplotlib figures (headless: the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["save_figure"]


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write and close ``figure``; returns the path written."""
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
