r"""Isotope patterns of peptides and their size in m/z bins (thesis 7.3.2, "Estimation of Isotope Size", Fig. 7.3).

A peptide of average mass M is modelled by Averagine (Senko et al. 1995), an average amino acid of composition
C 4.9384, H 7.7583, N 1.3577, O 1.4773, S 0.0417 and average mass 111.1254 Da. Its isotope distribution is computed
with IsoSpecPy, merged to nominal isotope peaks about 1 Da apart, and cut at ``threshold`` (the thesis' t_iso = 0.005)
times the most abundant peak. IsoSpecPy comes with the ``spectra`` extra (``pip install 'invertnet[spectra]'``).
``model="carbon"`` is the thesis' own model instead: only the n_C = 4.9384 M / 111.1254 carbon atoms vary, each
13C with probability 1.07%, so the k-th peak has the binomial probability C(n_C, k) p^k (1 - p)^(n_C - k) and lies
k * 1.00336 Da above the monoisotopic mass (no dependency). Ignoring the other elements' heavy isotopes (15N, 18O,
34S, 2H) narrows the patterns: at t_iso = 0.005 it keeps 4 peaks at 1000 Da where the full formula keeps 5, and 8
at 4000 Da where it keeps 10.

Width model. Each peak of an ion at m/z m is a Gaussian with full width at half maximum FWHM = m / R, where R is
the resolving power (default 10 000, a MALDI-TOF in reflectron mode measuring peptides; a linear TOF has R of a
few thousand). The pattern covers the m/z interval where its Gaussian-convolved profile reaches ``threshold`` times
its most abundant peak: for resolved peaks, peak k of probability p_k reaches that level within
sigma * sqrt(2 ln(p_k / (threshold * p_max))) of its centre, sigma = FWHM / (2 sqrt(2 ln 2)). Its size in bins is
the number of bins whose extent meets that interval.

Sizes (singly charged ions, R = 10 000, t_iso = 0.005) at m/z 1000, 2000, 3000 and 3900 on grids of mean bin width
0.163 Da over m/z 800-4000 (the thesis' average bin size): 27, 40, 48, 55 bins with equal bins; 38, 41, 40, 40 on
a time-of-flight grid (widths growing as sqrt(m/z), :func:`~invertnet.data.spectra.tof_bin_edges`); 52, 40, 32, 29
with widths growing as m/z (constant ppm), the falling curve of thesis Fig. 7.3. On equal bins, R = 5000 adds 1-4
bins and an ideal instrument (no peak width) removes 2-5.
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import ModuleType
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from invertnet._optional import require

__all__ = [
    "AVERAGINE",
    "CARBON_13_ABUNDANCE",
    "AVERAGINE_MASS",
    "DEFAULT_RESOLVING_POWER",
    "PROTON_MASS",
    "averagine_formula",
    "bin_edges_from_centres",
    "isotope_pattern",
    "isotope_pattern_bin_counts",
    "isotope_pattern_bins",
]

AVERAGINE = {"C": 4.9384, "H": 7.7583, "N": 1.3577, "O": 1.4773, "S": 0.0417}
"""Atoms per Averagine residue (Senko et al. 1995)."""
AVERAGINE_MASS = 111.1254
"""Average mass of one Averagine residue in Da (Senko et al. 1995)."""
PROTON_MASS = 1.007276466621
"""Proton mass in Da (CODATA 2018): an [M + zH]^z+ ion of neutral mass M has m/z (M + z * PROTON_MASS) / z."""
DEFAULT_RESOLVING_POWER = 10_000.0
"""R = m / FWHM of a MALDI-TOF in reflectron mode on peptides."""
CARBON_13_ABUNDANCE = 0.0107
"""Natural abundance of 13C (IUPAC), the Bernoulli probability of the thesis' carbon model."""
_CARBON_13_SHIFT = 1.0033548  # Da between 13C and 12C
_MONOISOTOPIC_PER_RESIDUE = 111.0543  # monoisotopic mass of one Averagine residue, Da (Senko et al. 1995)

IsotopeModel = Literal["isospec", "carbon"]
"""How isotope patterns are computed: the full Averagine formula with IsoSpecPy, or the thesis' binomial model of
its carbon atoms."""

_COVERED_PROBABILITY = 1 - 1e-6  # fine-structure probability IsoSpecPy computes before merging
_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def _periodic_table() -> ModuleType:
    """IsoSpecPy's element masses (``symbol_to_avg_mass``, ``symbol_to_monoisotopic_mass``), imported on first use."""
    return require("IsoSpecPy.PeriodicTbl", "spectra", "invertnet.data.isotopes")


def averagine_formula(mass: float) -> dict[str, int]:
    """Averagine composition of a peptide of average mass ``mass`` (Da): the residue composition scaled by
    mass / 111.1254 and rounded, then hydrogens added or removed until the formula's average mass is within half a
    hydrogen (0.504 Da) of ``mass`` (Senko et al. 1995).

    Raises:
        ImportError: IsoSpecPy is not installed (``pip install 'invertnet[spectra]'``).
        ValueError: ``mass`` is not a positive number of Da, or too small for the Averagine model.

    >>> averagine_formula(1000.0)
    {'C': 44, 'H': 95, 'N': 12, 'O': 13, 'S': 0}
    """
    if not math.isfinite(mass) or mass <= 0:
        raise ValueError(f"averagine_formula: mass must be a positive number of Da, got {mass}")
    residues = mass / AVERAGINE_MASS
    formula = {element: round(count * residues) for element, count in AVERAGINE.items()}
    formula["H"] += round((mass - _average_mass(formula)) / _periodic_table().symbol_to_avg_mass["H"])
    if formula["H"] < 0 or not any(formula.values()):
        raise ValueError(f"averagine_formula: {mass} Da is too small for the Averagine model (no or negative atoms)")
    return formula


def _average_mass(formula: dict[str, int]) -> float:
    masses = _periodic_table().symbol_to_avg_mass
    return sum(count * masses[element] for element, count in formula.items())


def isotope_pattern(
    mass: float, threshold: float = 0.005, model: IsotopeModel = "isospec"
) -> tuple[np.ndarray, np.ndarray]:
    """Nominal isotope peaks of the Averagine peptide of average mass ``mass`` (Da), neutral.

    ``model="isospec"``: the fine-structure distribution of the full formula (IsoSpecPy, covering all but 1e-6 of
    the probability) merged by the number of extra neutrons: each peak's mass is the probability-weighted mean of
    its isotopologues, its probability their sum. ``model="carbon"``: the thesis' binomial model of the carbon
    atoms alone (the module docstring). Peaks with probability below ``threshold`` times the largest are dropped
    (thesis t_iso = 0.005).

    Returns:
        ``(masses, probabilities)``, float64 arrays of shape (K,), sorted by mass; probabilities sum to at most 1.

    >>> masses, probabilities = isotope_pattern(1000.0)
    >>> len(masses), int(probabilities.argmax())
    (5, 0)
    >>> np.round(np.diff(masses), 2).tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> len(isotope_pattern(1000.0, model="carbon")[0]), len(isotope_pattern(4000.0, model="carbon")[0])
    (4, 8)
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"isotope_pattern: threshold must be in (0, 1], got {threshold}")
    if model == "carbon":
        return _carbon_pattern(mass, threshold)
    if model != "isospec":
        raise ValueError(f"isotope_pattern: model must be 'isospec' or 'carbon', got {model!r}")
    formula = averagine_formula(mass)
    masses, probabilities = _nominal_pattern(tuple(formula.items()), threshold)
    return masses.copy(), probabilities.copy()


def _carbon_pattern(mass: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The binomial carbon model: n_C = round(4.9384 M / 111.1254) carbons, k of them 13C."""
    if not mass > 0:
        raise ValueError(f"isotope_pattern: mass must be positive, got {mass}")
    residues = mass / AVERAGINE_MASS
    carbons = max(1, round(AVERAGINE["C"] * residues))
    k = np.arange(carbons + 1)
    log_binomial = (
        np.array([math.lgamma(carbons + 1) - math.lgamma(i + 1) - math.lgamma(carbons - i + 1) for i in k])
        + k * math.log(CARBON_13_ABUNDANCE)
        + (carbons - k) * math.log1p(-CARBON_13_ABUNDANCE)
    )
    probabilities = np.exp(log_binomial)
    masses = _MONOISOTOPIC_PER_RESIDUE * residues + k * _CARBON_13_SHIFT
    keep = probabilities >= threshold * probabilities.max()
    return masses[keep], probabilities[keep]


@lru_cache(maxsize=4096)
def _nominal_pattern(formula: tuple[tuple[str, int], ...], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    text = "".join(f"{element}{count}" for element, count in formula if count > 0)
    isospec = require("IsoSpecPy", "spectra", "invertnet.data.isotopes")
    distribution = isospec.IsoTotalProb(_COVERED_PROBABILITY, formula=text)
    fine_masses, fine_probabilities = distribution.np_masses(), distribution.np_probs()
    monoisotopic_masses = _periodic_table().symbol_to_monoisotopic_mass
    monoisotopic = sum(count * monoisotopic_masses[element] for element, count in formula)
    neutrons = np.rint(fine_masses - monoisotopic).astype(np.int64)
    probabilities = np.bincount(neutrons, weights=fine_probabilities)
    present = probabilities > 0
    masses = np.bincount(neutrons, weights=fine_probabilities * fine_masses)[present] / probabilities[present]
    probabilities = probabilities[present]
    keep = probabilities >= threshold * probabilities.max()
    return masses[keep], probabilities[keep]


def bin_edges_from_centres(centres: ArrayLike) -> np.ndarray:
    """Bin edges (L + 1,) of increasing bin centres (L,): midpoints between neighbours, the outer edges half a
    neighbouring bin beyond the first and last centre.

    >>> bin_edges_from_centres([1.0, 2.0, 4.0]).tolist()
    [0.5, 1.5, 3.0, 5.0]
    """
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 1 or len(centres) < 2:
        raise ValueError(f"bin_edges_from_centres: need at least 2 centres in a 1-D array, got shape {centres.shape}")
    if not np.all(np.diff(centres) > 0):
        raise ValueError("bin_edges_from_centres: bin centres must be strictly increasing")
    middle = (centres[1:] + centres[:-1]) / 2
    first = centres[0] - (middle[0] - centres[0])
    last = centres[-1] + (centres[-1] - middle[-1])
    return np.concatenate([[first], middle, [last]])


def _edges(grid: ArrayLike, edges: bool) -> np.ndarray:
    if not edges:
        return bin_edges_from_centres(grid)
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or not np.all(np.diff(grid) > 0):
        raise ValueError(
            f"isotope_pattern_bins: bin edges must be a strictly increasing 1-D array of length >= 2, "
            f"got shape {grid.shape}"
        )
    return grid


def _pattern_interval(
    mz: float, threshold: float, charge: int, resolving_power: float, model: IsotopeModel = "isospec"
) -> tuple[float, float]:
    """m/z interval where the Gaussian-convolved pattern of an ion at average m/z ``mz`` reaches ``threshold`` times
    its most abundant peak (see the module docstring)."""
    if int(charge) != charge or charge < 1:
        raise ValueError(f"isotope_pattern_bins: charge must be a positive integer, got {charge!r}")
    if not resolving_power > 0:
        raise ValueError(f"isotope_pattern_bins: resolving_power must be positive, got {resolving_power}")
    masses, probabilities = isotope_pattern(charge * (mz - PROTON_MASS), threshold, model)
    peaks = (masses + charge * PROTON_MASS) / charge
    sigma = peaks / resolving_power / _FWHM_PER_SIGMA
    reach = sigma * np.sqrt(2 * np.log(probabilities / (threshold * probabilities.max())))
    return float(np.min(peaks - reach)), float(np.max(peaks + reach))


def _count_bins(bin_edges: np.ndarray, low: float, high: float) -> int:
    """Number of bins [e_i, e_i+1] meeting the open interval (low, high): bins starting below ``high`` minus bins
    ending at or below ``low`` (both sets are prefixes of the sorted bins)."""
    starting_below = int(np.searchsorted(bin_edges[:-1], high, side="left"))
    ending_below = int(np.searchsorted(bin_edges[1:], low, side="right"))
    return max(0, starting_below - ending_below)


def isotope_pattern_bins(
    mz: float,
    grid: ArrayLike,
    threshold: float = 0.005,
    charge: int = 1,
    resolving_power: float = DEFAULT_RESOLVING_POWER,
    *,
    edges: bool = False,
    model: IsotopeModel = "isospec",
) -> int:
    """Number of m/z bins covered by the isotope pattern of an Averagine [M + zH]^z+ ion whose average m/z is
    ``mz`` (thesis Fig. 7.3), on a possibly non-equidistant grid.

    Arguments:
        mz: Average m/z of the ion; its neutral average mass is ``charge * (mz - PROTON_MASS)``.
        grid: Bin centres (L,), or bin edges (L + 1,) when ``edges`` is true; strictly increasing.
        threshold: t_iso, relative to the most abundant peak, for both the peaks kept and the Gaussian tails.
        charge: Charge state z (peaks are 1/z apart in m/z).
        resolving_power: R = m / FWHM of each peak's Gaussian.
        model: ``"isospec"`` (the full formula) or ``"carbon"`` (the thesis' binomial carbon model).

    >>> isotope_pattern_bins(1000.0, np.arange(800.0, 4000.0, 0.163), edges=True)
    27
    """
    return _count_bins(_edges(grid, edges), *_pattern_interval(mz, threshold, charge, resolving_power, model))


def isotope_pattern_bin_counts(
    mz: ArrayLike,
    grid: ArrayLike,
    threshold: float = 0.005,
    charge: int = 1,
    resolving_power: float = DEFAULT_RESOLVING_POWER,
    *,
    edges: bool = False,
    model: IsotopeModel = "isospec",
) -> np.ndarray:
    """:func:`isotope_pattern_bins` at each m/z of ``mz`` (any shape), an int64 array of the same shape: the curve of
    thesis Fig. 7.3 over a mass range. Patterns are cached per Averagine formula, so dense curves are cheap.

    >>> isotope_pattern_bin_counts([1000.0, 2000.0, 3000.0], np.arange(800.0, 4000.0, 0.163), edges=True).tolist()
    [27, 40, 48]
    """
    bin_edges = _edges(grid, edges)
    mz = np.asarray(mz, dtype=np.float64)
    counts = np.empty(mz.shape, dtype=np.int64)
    for index, value in np.ndenumerate(mz):
        interval = _pattern_interval(float(value), threshold, charge, resolving_power, model)
        counts[index] = _count_bins(bin_edges, *interval)
    return counts
