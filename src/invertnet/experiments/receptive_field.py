r"""Thesis Fig. 7.3: the receptive field of IsotopeNet against the width of isotope patterns over the mass
range (``invertnet receptive-field``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from invertnet.data import isotope_pattern_bin_counts
from invertnet.figures import save_figure, subplots
from invertnet.models.spectra import IsotopeNet

__all__ = ["receptive_field_study"]


def receptive_field_study(
    output_dir: Path, mz_range: tuple[float, float] = (800.0, 3500.0), mean_bin_width: float = 0.163
) -> dict[str, Any]:
    """Thesis Fig. 7.3: bins covered by an Averagine isotope pattern (t_iso = 0.005) over the mass range on a
    TOF-like grid whose bin width grows with m/z (mean ``mean_bin_width`` Da), for the full formula (IsoSpecPy)
    and for the thesis' binomial model of the carbon atoms, against IsotopeNet's receptive field (49 bins by
    Luo et al.'s formula for Table 7.2 as written; the thesis draws 43). Saves ``receptive_field.png``."""
    low, high = mz_range
    centre = (low + high) / 2
    n_bins = int((high - low) / mean_bin_width)
    widths = mean_bin_width * np.linspace(low, high, n_bins) / centre  # bin width proportional to m/z
    edges = low + np.concatenate([[0.0], np.cumsum(widths)]) * (high - low) / widths.sum()
    masses = np.linspace(low + 50, high - 50, 60)
    bins = isotope_pattern_bin_counts(masses, edges, edges=True).tolist()
    carbon = isotope_pattern_bin_counts(masses, edges, edges=True, model="carbon").tolist()
    network = IsotopeNet(n_bins)
    field, with_local = network.receptive_field(), network.receptive_field(include_locally_connected=True)
    figure, axis = subplots(figsize=(7, 3.5), feature="receptive_field_study")
    axis.plot(masses, bins, label="isotope pattern (Averagine formula, IsoSpecPy, t_iso = 0.005)")
    axis.plot(masses, carbon, label="isotope pattern (binomial carbon model, the thesis')", linestyle=":")
    axis.axhline(field, color="tab:red", label=f"IsotopeNet convolutions ({field} bins)")
    axis.axhline(with_local, color="tab:red", linestyle="--", label=f"with the locally connected layer ({with_local})")
    axis.set(xlabel="m/z", ylabel="bins", title="receptive field against isotope-pattern width")
    axis.legend(fontsize=8)
    output_dir.mkdir(parents=True, exist_ok=True)
    return {
        "figure": str(save_figure(figure, output_dir / "receptive_field.png")),
        "receptive_field_bins": field,
        "receptive_field_with_locally_connected_bins": with_local,
        "largest_pattern_bins": int(max(bins)),
        "largest_pattern_bins_carbon_model": int(max(carbon)),
        "covered_by_convolutions": bool(max(bins) <= field),
        "covered_with_locally_connected": bool(max(bins) <= with_local),
        "pattern_bins": dict(zip([round(float(m), 1) for m in masses[::10]], bins[::10], strict=True)),
        "pattern_bins_carbon_model": dict(zip([round(float(m), 1) for m in masses[::10]], carbon[::10], strict=True)),
    }
