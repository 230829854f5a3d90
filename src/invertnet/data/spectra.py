r"""Mass spectra for IsotopeNet (thesis ch. 7): a labelled data set, synthetic peptide spectra and imzML files.

A spectrum is a row of intensities on a fixed grid of m/z bins (thesis 7.3.1: x in R^d, d bins). Spectra of one
patient or tissue core share a group id, so that cross-validation can hold out whole patients (thesis 7.4.1 folds
whole TMAs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from invertnet.data.isotopes import DEFAULT_RESOLVING_POWER, PROTON_MASS, isotope_pattern

__all__ = ["SpectraDataset", "synthetic_spectra", "tof_bin_edges"]

_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


@dataclass
class SpectraDataset:
    """Spectra with class labels and group (patient / tissue core) ids.

    Attributes:
        spectra: (N, L) float32 intensities.
        labels: (N,) int64 class indices >= 0.
        groups: (N,) int64 group ids, for grouped cross-validation (e.g. scikit-learn's ``GroupKFold``).
        mz: (L,) float64 bin centres, strictly increasing.
        coordinates: (N, 3) int64 pixel coordinates (x, y, z) of imzML spectra, else None.
        discriminative_mz: (K,) float64 monoisotopic m/z of the peptides that separate the classes (synthetic data).
        class_names: name of each class index, when labels were given as names.
        metadata: anything else (source file, storage mode, dropped pixels, generator settings).

    >>> data = SpectraDataset(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 0]),
    ...                       torch.tensor([100.0, 100.5, 101.0], dtype=torch.float64))
    >>> len(data), len(data.subset(torch.tensor([1])))
    (2, 1)
    """

    spectra: Tensor
    labels: Tensor
    groups: Tensor
    mz: Tensor
    coordinates: Tensor | None = None
    discriminative_mz: Tensor | None = None
    class_names: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tensor("spectra", self.spectra, torch.float32, 2)
        n, length = self.spectra.shape
        _check_tensor("mz", self.mz, torch.float64, 1, (length,))
        _check_tensor("labels", self.labels, torch.int64, 1, (n,))
        _check_tensor("groups", self.groups, torch.int64, 1, (n,))
        if self.coordinates is not None:
            _check_tensor("coordinates", self.coordinates, torch.int64, 2, (n, 3))
        if self.discriminative_mz is not None:
            _check_tensor("discriminative_mz", self.discriminative_mz, torch.float64, 1)
        if length > 1 and not bool((self.mz.diff() > 0).all()):
            raise ValueError("SpectraDataset: mz (bin centres) must be strictly increasing")
        if n and int(self.labels.min()) < 0:
            raise ValueError(f"SpectraDataset: labels must be >= 0, got {int(self.labels.min())}")
        if self.class_names is not None and n and int(self.labels.max()) >= len(self.class_names):
            raise ValueError(
                f"SpectraDataset: label {int(self.labels.max())} has no name among {len(self.class_names)} class_names"
            )

    def __len__(self) -> int:
        return len(self.spectra)

    def subset(self, index: Tensor) -> SpectraDataset:
        """The spectra selected by ``index`` (integer indices or a boolean mask over N), same grid and metadata."""
        coordinates = None if self.coordinates is None else self.coordinates[index]
        return dataclasses.replace(
            self,
            spectra=self.spectra[index],
            labels=self.labels[index],
            groups=self.groups[index],
            coordinates=coordinates,
            metadata=dict(self.metadata),
        )


def _check_tensor(
    name: str, value: object, dtype: torch.dtype, ndim: int, shape: tuple[int, ...] | None = None
) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"SpectraDataset: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise TypeError(f"SpectraDataset: {name} must be {dtype}, got {value.dtype}")
    if value.ndim != ndim or (shape is not None and tuple(value.shape) != shape):
        expected = f"shape {shape}" if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"SpectraDataset: {name} must have {expected}, got shape {tuple(value.shape)}")


def tof_bin_edges(mz_range: tuple[float, float], n_bins: int) -> Tensor:
    """(n_bins + 1,) float64 bin edges of a time-of-flight grid over ``mz_range``: m/z = a t^2 sampled at equal steps
    of the flight time t, so bin widths grow as sqrt(m/z) (thesis Fig. 7.4: non-equidistant TOF binning).

    >>> edges = tof_bin_edges((1000.0, 4000.0), 3)
    >>> [round(edge, 1) for edge in edges.tolist()], round((edges.diff()[-1] / edges.diff()[0]).item(), 3)
    ([1000.0, 1777.8, 2777.8, 4000.0], 1.571)
    """
    low, high = mz_range
    if not 0 < low < high:
        raise ValueError(f"tof_bin_edges: mz_range must satisfy 0 < low < high, got {mz_range}")
    if n_bins < 1:
        raise ValueError(f"tof_bin_edges: n_bins must be >= 1, got {n_bins}")
    flight_times = torch.linspace(math.sqrt(low), math.sqrt(high), n_bins + 1, dtype=torch.float64)
    edges = flight_times**2
    edges[0], edges[-1] = low, high  # exact ends despite rounding
    return edges


def _pattern_profile(edges: np.ndarray, mz: float, resolving_power: float) -> np.ndarray:
    """Binned profile (L,) of a singly charged Averagine ion at average m/z ``mz``: each isotope peak a Gaussian of
    FWHM m/z / R, integrated over every bin; the profile sums to the pattern's probability (about 1)."""
    from scipy.special import ndtr  # imported here: scipy is slow to import and few runs simulate spectra

    masses, probabilities = isotope_pattern(mz - PROTON_MASS)
    peaks = masses + PROTON_MASS
    sigma = peaks / resolving_power / _FWHM_PER_SIGMA
    cumulative = ndtr((edges[None, :] - peaks[:, None]) / sigma[:, None])
    return probabilities @ np.diff(cumulative, axis=1)


def synthetic_spectra(
    n_per_class: int = 200,
    length: int = 2000,
    mz_range: tuple[float, float] = (800.0, 2500.0),
    n_peptides: int = 40,
    n_discriminative: int = 3,
    n_groups: int = 8,
    noise: float = 0.01,
    fold_change: float = 3.0,
    resolving_power: float = DEFAULT_RESOLVING_POWER,
    seed: int = 0,
) -> SpectraDataset:
    """Two classes of peptide spectra that differ only in the abundance of ``n_discriminative`` peptides.

    The model, with all randomness from ``numpy.random.default_rng(seed)`` (the same seed gives the same data):

    - grid: ``length`` bins over ``mz_range`` from :func:`tof_bin_edges` (widths grow as sqrt(m/z));
    - peptides: ``n_peptides`` singly charged Averagine ions at uniform average m/z, each an isotope pattern
      (:func:`~invertnet.data.isotopes.isotope_pattern`, t_iso = 0.005) of Gaussian peaks with FWHM m/z / R,
      integrated over the bins;
    - abundance of peptide p in spectrum n of group g: exp(mu_p + delta_gp + eps_np) with mu_p ~ N(0, 0.5^2) (the
      peptide's level), delta_gp ~ N(0, 0.4^2) (a patient signature: each group scales every peptide by its own
      factor) and eps_np ~ N(0, 0.3^2); discriminative peptides are ``fold_change`` times more abundant in class 1;
    - each spectrum is scaled by exp(N(0, 0.2^2)) (total ion count), gets an exponentially decaying baseline of
      height exp(N(log 0.1, 0.3^2)) at the low end, additive N(0, ``noise``^2) noise, and is clipped at 0.

    Group g holds spectra of class g % 2 only (a patient has one tumour type), spectra are spread over their class'
    groups in turn, and the rows are shuffled. The patient signatures make a classifier that has seen a patient
    better on that patient than on new ones: only cross-validation over groups measures generalisation.

    Returns:
        ``2 * n_per_class`` spectra; ``discriminative_mz`` holds the monoisotopic m/z of the discriminative
        peptides, ``metadata["peptide_mz"]`` the average m/z of every peptide.

    >>> data = synthetic_spectra(n_per_class=10, length=500, n_peptides=8, n_groups=4)
    >>> tuple(data.spectra.shape), data.labels.bincount().tolist(), sorted(set(data.groups.tolist()))
    ((20, 500), [10, 10], [0, 1, 2, 3])
    """
    _check_synthetic_settings(n_per_class, length, mz_range, n_peptides, n_discriminative, n_groups, noise, fold_change)
    rng = np.random.default_rng(seed)
    edges = tof_bin_edges(mz_range, length).numpy()
    centres = (edges[1:] + edges[:-1]) / 2
    peptide_mz, profiles, discriminative = _draw_peptides(
        rng, edges, mz_range, n_peptides, n_discriminative, resolving_power
    )
    labels, groups = _class_groups(n_per_class, n_groups)
    abundance = _draw_abundances(rng, labels, groups, n_groups, n_peptides, discriminative, fold_change)
    spectra = _add_instrument_effects(rng, abundance @ profiles, centres, mz_range, noise)
    order = rng.permutation(len(labels))
    return SpectraDataset(
        spectra=torch.from_numpy(spectra[order].astype(np.float32)),
        labels=torch.from_numpy(labels[order]).long(),
        groups=torch.from_numpy(groups[order]).long(),
        mz=torch.from_numpy(centres),
        discriminative_mz=_monoisotopic_mz(peptide_mz[discriminative]),
        metadata={"source": "synthetic", "seed": seed, "peptide_mz": peptide_mz.tolist()},
    )


def _check_synthetic_settings(
    n_per_class: int,
    length: int,
    mz_range: tuple[float, float],
    n_peptides: int,
    n_discriminative: int,
    n_groups: int,
    noise: float,
    fold_change: float,
) -> None:
    """Refuse settings :func:`synthetic_spectra` cannot honour, with a ValueError naming them."""
    if n_per_class < 1 or length < 2:
        raise ValueError(f"synthetic_spectra: need n_per_class >= 1 and length >= 2, got {n_per_class}, {length}")
    if not 1 <= n_discriminative <= n_peptides:
        raise ValueError(
            f"synthetic_spectra: need 1 <= n_discriminative <= n_peptides, got {n_discriminative}, {n_peptides}"
        )
    if n_groups < 2:
        raise ValueError(f"synthetic_spectra: need n_groups >= 2 (each group holds one class), got {n_groups}")
    low, high = mz_range
    if not 0 < low < high - 20:
        raise ValueError(f"synthetic_spectra: mz_range must span more than 20 Da above 0, got {mz_range}")
    if noise < 0 or fold_change <= 0:
        raise ValueError(f"synthetic_spectra: need noise >= 0 and fold_change > 0, got {noise}, {fold_change}")


def _draw_peptides(
    rng: np.random.Generator,
    edges: np.ndarray,
    mz_range: tuple[float, float],
    n_peptides: int,
    n_discriminative: int,
    resolving_power: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(peptide_mz, profiles, discriminative)``: the sorted average m/z (P,) of the peptides, their binned profiles
    (P, L) on the grid ``edges`` (L + 1,), and the sorted indices (K,) of the discriminative peptides."""
    low, high = mz_range
    peptide_mz = np.sort(rng.uniform(low + 2, high - 8, n_peptides))  # whole patterns stay on the grid
    profiles = np.stack([_pattern_profile(edges, mz, resolving_power) for mz in peptide_mz])
    discriminative = np.sort(rng.choice(n_peptides, n_discriminative, replace=False))
    return peptide_mz, profiles, discriminative


def _class_groups(n_per_class: int, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, groups)``, each (N,) with N = 2 * n_per_class: class 0 then class 1, the spectra of a class spread
    over its groups in turn (group g holds class g % 2)."""
    labels = np.repeat([0, 1], n_per_class)
    position = np.tile(np.arange(n_per_class), 2)
    groups_of_class = [np.arange(label, n_groups, 2) for label in (0, 1)]
    groups = np.where(
        labels == 0,
        groups_of_class[0][position % len(groups_of_class[0])],
        groups_of_class[1][position % len(groups_of_class[1])],
    )
    return labels, groups


def _draw_abundances(
    rng: np.random.Generator,
    labels: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    n_peptides: int,
    discriminative: np.ndarray,
    fold_change: float,
) -> np.ndarray:
    """(N, P) abundances exp(mu_p + delta_gp + eps_np) of the P peptides in the spectra with ``labels`` and
    ``groups`` (N,); the discriminative peptides (K,) are ``fold_change`` times more abundant in class 1."""
    level = rng.normal(0.0, 0.5, n_peptides)
    signature = rng.normal(0.0, 0.4, (n_groups, n_peptides))
    log_abundance = level + signature[groups] + rng.normal(0.0, 0.3, (len(labels), n_peptides))
    log_abundance[:, discriminative] += np.log(fold_change) * labels[:, None]
    return np.exp(log_abundance)


def _add_instrument_effects(
    rng: np.random.Generator, spectra: np.ndarray, centres: np.ndarray, mz_range: tuple[float, float], noise: float
) -> np.ndarray:
    """The (N, L) ``spectra`` on bin centres ``centres`` (L,), in place, with a decaying baseline, a total-ion-count
    scale per spectrum and additive N(0, ``noise``^2) noise, clipped at 0."""
    low, high = mz_range
    n = len(spectra)
    baseline_height = np.exp(rng.normal(math.log(0.1), 0.3, (n, 1)))
    spectra += baseline_height * np.exp(-(centres - low) / (0.25 * (high - low)))
    spectra *= np.exp(rng.normal(0.0, 0.2, (n, 1)))
    spectra += rng.normal(0.0, noise, spectra.shape)
    np.clip(spectra, 0.0, None, out=spectra)
    return spectra


def _monoisotopic_mz(peptide_mz: np.ndarray) -> Tensor:
    """(K,) float64 monoisotopic m/z of singly charged Averagine ions at average m/z ``peptide_mz`` (K,)."""
    return torch.tensor(
        [isotope_pattern(mz - PROTON_MASS)[0][0] + PROTON_MASS for mz in peptide_mz], dtype=torch.float64
    )
