"""Mass-spectra data: Averagine isotope patterns and their size in bins, synthetic spectra, imzML files."""

import re

import numpy as np
import pytest
import torch
from IsoSpecPy.PeriodicTbl import symbol_to_avg_mass
from pyimzml.compression import ZlibCompression
from pyimzml.ImzMLWriter import ImzMLWriter

from invertnet.data import (
    SpectraDataset,
    averagine_formula,
    isotope_pattern,
    isotope_pattern_bin_counts,
    isotope_pattern_bins,
    read_imzml,
    synthetic_spectra,
    tof_bin_edges,
)
from invertnet.data.isotopes import PROTON_MASS

# --- isotope patterns ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mass", [500.0, 1000.0, 2345.6, 5000.0, 10000.0])
def test_averagine_formula_matches_the_mass_within_one_dalton(mass):
    formula = averagine_formula(mass)
    average = sum(count * symbol_to_avg_mass[element] for element, count in formula.items())
    assert abs(average - mass) < 1.0
    assert formula["C"] / formula["N"] == pytest.approx(4.9384 / 1.3577, rel=0.1)


def test_averagine_formula_refuses_masses_it_cannot_model():
    with pytest.raises(ValueError, match="positive"):
        averagine_formula(-5.0)
    with pytest.raises(ValueError, match="too small"):
        averagine_formula(50.0)  # C2 H3 N1 O1 is 7 Da too heavy: -4 hydrogens


def test_isotope_pattern_peaks_are_one_dalton_apart_and_thresholded():
    for mass in (1000.0, 3000.0):
        masses, probabilities = isotope_pattern(mass)
        assert 0.99 < probabilities.sum() <= 1.0
        assert probabilities.min() >= 0.005 * probabilities.max()
        assert np.allclose(np.diff(masses), 1.0, atol=0.01)
        assert abs(masses[0] - mass) < 2.0  # monoisotopic peak just below the average mass
    assert len(isotope_pattern(3000.0, threshold=0.1)[0]) < len(isotope_pattern(3000.0)[0])


def test_most_abundant_isotope_moves_up_with_mass():
    # carbon-13 makes heavier isotopologues likelier as the peptide grows
    assert isotope_pattern(1000.0)[1].argmax() == 0
    assert isotope_pattern(3000.0)[1].argmax() > 0
    assert isotope_pattern(5000.0)[1].argmax() > isotope_pattern(3000.0)[1].argmax()


def test_pattern_bins_match_a_hand_count_on_a_tiny_grid():
    masses, _ = isotope_pattern(1000.0 - PROTON_MASS)
    peaks = masses + PROTON_MASS
    # premise of the count: five peaks, each about 0.72 Da past an integer, far from the half-integer bin edges
    assert len(peaks) == 5 and np.allclose(peaks % 1, 0.72, atol=0.05)
    # 1 Da bins [k, k + 1): one bin per peak
    assert isotope_pattern_bins(1000.0, np.arange(990.0, 1011.0), edges=True) == 5
    # the same bins given by their centres
    assert isotope_pattern_bins(1000.0, np.arange(990.5, 1010.0)) == 5
    # 0.5 Da bins: peaks in the upper half-bins, 4 Da from first to last peak -> 8 + 1 bins
    assert isotope_pattern_bins(1000.0, np.arange(990.0, 1011.0, 0.5), edges=True) == 9
    # a broad peak (R = 1000: FWHM 1 Da) spills over the edges into the neighbouring bins
    assert isotope_pattern_bins(1000.0, np.arange(990.0, 1011.0), edges=True, resolving_power=1000.0) == 7
    # doubly charged: the pattern of the same neutral mass on half the m/z range, about half the bins
    grid = np.arange(990.0, 2011.0, 0.25)
    singly = isotope_pattern_bins(2 * (1000.0 - PROTON_MASS) + PROTON_MASS, grid, edges=True)
    assert abs(isotope_pattern_bins(1000.0, grid, edges=True, charge=2) - singly / 2) <= 1


def test_pattern_bins_grow_with_mass_on_an_equidistant_grid():
    grid = np.arange(800.0, 4000.0, 0.163)
    counts = isotope_pattern_bin_counts(np.array([1000.0, 2000.0, 3000.0, 3900.0]), grid)
    assert (np.diff(counts) > 0).all()
    assert counts.tolist() == [isotope_pattern_bins(mz, grid) for mz in (1000.0, 2000.0, 3000.0, 3900.0)]
    # on a constant-ppm grid (bin width proportional to m/z) the count falls with mass (thesis Fig. 7.3)
    falling = isotope_pattern_bin_counts([1000.0, 3900.0], np.geomspace(800.0, 4000.0, 19634), edges=True)
    assert falling[0] > falling[1]


def test_pattern_bins_refuse_bad_grids():
    with pytest.raises(ValueError, match="increasing"):
        isotope_pattern_bins(1000.0, np.array([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="charge"):
        isotope_pattern_bins(1000.0, np.arange(900.0, 1100.0), charge=0)


# --- synthetic spectra ---------------------------------------------------------------------------------------------


def test_tof_bin_edges_grow_as_the_square_root_of_mz():
    edges = tof_bin_edges((800.0, 3200.0), 1000)
    widths = edges.diff()
    assert edges[0] == 800.0 and edges[-1] == 3200.0 and (widths > 0).all()
    assert (widths[-1] / widths[0]).item() == pytest.approx(2.0, rel=1e-2)  # sqrt(3200 / 800)


def test_synthetic_spectra_shapes_and_determinism():
    data = synthetic_spectra(n_per_class=30, length=600, n_peptides=10, n_groups=6, seed=3)
    assert data.spectra.shape == (60, 600) and data.spectra.dtype == torch.float32
    assert data.mz.shape == (600,) and data.mz.dtype == torch.float64 and (data.mz.diff() > 0).all()
    assert data.labels.bincount().tolist() == [30, 30] and (data.spectra >= 0).all()
    assert data.discriminative_mz.shape == (3,)
    again = synthetic_spectra(n_per_class=30, length=600, n_peptides=10, n_groups=6, seed=3)
    assert torch.equal(data.spectra, again.spectra) and torch.equal(data.groups, again.groups)
    other = synthetic_spectra(n_per_class=30, length=600, n_peptides=10, n_groups=6, seed=4)
    assert not torch.equal(data.spectra, other.spectra)


def test_synthetic_groups_are_patients_of_one_class():
    data = synthetic_spectra(n_per_class=40, length=400, n_peptides=8, n_groups=8)
    assert sorted(set(data.groups.tolist())) == list(range(8))
    for group in range(8):
        assert set(data.labels[data.groups == group].tolist()) == {group % 2}


def test_synthetic_classes_differ_at_the_discriminative_peptides():
    data = synthetic_spectra()
    class_mean = [data.spectra[data.labels == label].mean(0) for label in (0, 1)]
    difference = class_mean[1] - class_mean[0]
    strongest = data.mz[difference.abs().argmax()]
    assert (data.discriminative_mz - strongest).abs().min() < 6.0  # inside one of their isotope patterns
    for mz in data.discriminative_mz:
        peak = (data.mz - mz).abs().argmin()  # the monoisotopic bin
        assert class_mean[1][peak] > 2 * class_mean[0][peak]  # fold change 3, blurred by patients and baseline
    # elsewhere the classes differ little: the ratio at the largest other peak is near 1
    far = torch.ones_like(data.mz, dtype=torch.bool)
    for mz in data.discriminative_mz:
        far &= (data.mz < mz - 2) | (data.mz > mz + 8)
    other_peak = torch.where(far, class_mean[0] + class_mean[1], torch.zeros_like(difference)).argmax()
    assert 0.5 < (class_mean[1][other_peak] / class_mean[0][other_peak]).item() < 2.0


def test_spectra_dataset_validates_its_fields():
    spectra, labels, mz = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.arange(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels must have shape"):
        SpectraDataset(spectra, torch.zeros(2, dtype=torch.long), labels, mz)
    with pytest.raises(TypeError, match="spectra must be torch.float32"):
        SpectraDataset(spectra.double(), labels, labels, mz)
    with pytest.raises(ValueError, match="strictly increasing"):
        SpectraDataset(spectra, labels, labels, mz.flip(0))
    with pytest.raises(ValueError, match="coordinates must have shape"):
        SpectraDataset(spectra, labels, labels, mz, coordinates=torch.zeros(3, 2, dtype=torch.long))


# --- imzML ---------------------------------------------------------------------------------------------------------

PIXELS = [(x, y) for y in (1, 2) for x in (1, 2, 3)]


def _write(path, mz_arrays, intensities, mode):
    with ImzMLWriter(str(path), mode=mode) as writer:
        for mz, values, pixel in zip(mz_arrays, intensities, PIXELS, strict=True):
            writer.addSpectrum(mz, values, pixel)
    return path


@pytest.fixture
def continuous(tmp_path):
    rng = np.random.default_rng(0)
    mz = np.linspace(800.0, 900.0, 50)
    intensities = rng.uniform(0, 10, (len(PIXELS), 50)).astype(np.float32)
    return _write(tmp_path / "cont.imzML", [mz] * len(PIXELS), intensities, "continuous"), mz, intensities


@pytest.fixture
def processed(tmp_path):
    rng = np.random.default_rng(1)
    mz = [np.sort(rng.uniform(800.0, 900.0, 20 + index)) for index in range(len(PIXELS))]
    intensities = [rng.uniform(0, 10, len(values)).astype(np.float32) for values in mz]
    return _write(tmp_path / "proc.imzML", mz, intensities, "processed"), mz, intensities


def test_continuous_imzml_round_trip(continuous):
    path, mz, intensities = continuous
    data = read_imzml(path)
    assert torch.equal(data.spectra, torch.from_numpy(intensities))
    assert torch.equal(data.mz, torch.from_numpy(mz))
    assert data.coordinates[:, :2].tolist() == [list(pixel) for pixel in PIXELS]
    assert (data.labels == 0).all() and (data.groups == 0).all()
    assert data.metadata["storage"] == "continuous" and not data.metadata["binned"]
    cropped = read_imzml(path, mz_range=(850.0, 900.0))
    assert (cropped.mz >= 850.0).all() and torch.equal(cropped.spectra, data.spectra[:, data.mz >= 850.0])
    binned = read_imzml(path, n_bins=7)  # equal bins over the file's m/z range keep every intensity
    assert binned.spectra.shape == (6, 7) and binned.metadata["binned"]
    assert torch.allclose(binned.spectra.sum(1), data.spectra.sum(1))


def test_processed_imzml_is_binned(processed):
    path, mz, intensities = processed
    with pytest.raises(ValueError, match="processed mode"):
        read_imzml(path)
    edges = np.linspace(820.0, 880.0, 13)
    data = read_imzml(path, mz_edges=torch.from_numpy(edges))
    expected = np.stack([np.histogram(m, edges, weights=i)[0] for m, i in zip(mz, intensities, strict=True)])
    assert np.allclose(data.spectra.numpy(), expected, rtol=1e-6)
    assert np.allclose(data.mz.numpy(), (edges[1:] + edges[:-1]) / 2)
    assert data.metadata["storage"] == "processed"
    ranged = read_imzml(path, mz_range=(800.0, 900.0), n_bins=5)
    totals = np.array([i.sum() for i in intensities])
    assert np.allclose(ranged.spectra.sum(1).numpy(), totals, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        read_imzml(path, mz_edges=edges, n_bins=5)


def test_labels_csv_matches_pixels_and_drops_the_rest(continuous, tmp_path):
    path, _, intensities = continuous
    table = tmp_path / "labels.csv"
    table.write_text("x,y,label,group\n1,1,squamous,P2\n2,1,adeno,P1\n3,2,adeno,P1\n9,9,adeno,P3\n")
    data = read_imzml(path, labels=table)
    assert len(data) == 3 and data.metadata["dropped_pixels"] == 3
    assert data.class_names == ("adeno", "squamous") and data.metadata["group_names"] == ("P1", "P2", "P3")
    assert data.labels.tolist() == [1, 0, 0] and data.groups.tolist() == [1, 0, 0]
    assert data.coordinates[:, :2].tolist() == [[1, 1], [2, 1], [3, 2]]
    assert torch.equal(data.spectra, torch.from_numpy(intensities[[0, 1, 5]]))
    table.write_text("X, Y ,Label\n1,1,1\n2,2,0\n")  # integer labels, headers in any case and spacing
    data = read_imzml(path, labels=table)
    assert data.labels.tolist() == [1, 0] and data.class_names is None and (data.groups == 0).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,y,class\n1,1,0\n", r"lacks the columns \['label'\]"),
        ("x,y,label\n1,1,0\n1,1,1\n", "listed twice"),
        ("x,y,label\none,1,0\n", "line 2: x and y must be integers"),
        ("x,y,label\n7,7,0\n", "none of the 6 pixels"),
    ],
)
def test_bad_labels_csv_is_refused(continuous, tmp_path, text, message):
    table = tmp_path / "labels.csv"
    table.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_imzml(continuous[0], labels=table)


def test_missing_files_are_named(continuous, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.imzML does not exist"):
        read_imzml(tmp_path / "nothing.imzML")
    path = continuous[0]
    path.with_suffix(".ibd").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path.with_suffix(".ibd")))):
        read_imzml(path)


def _corrupt(path, text):
    path.write_text(text)
    return path


def test_malformed_files_give_a_value_error_naming_the_file(continuous):
    path = continuous[0]
    text = path.read_text()
    name = re.escape(path.name)
    _corrupt(path, text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{name} is not a valid imzML file: malformed XML"):
        read_imzml(path)
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{name} is not a valid imzML file: malformed XML"):
        read_imzml(path)
    _corrupt(path, re.sub(r"<spectrum .*?</spectrum>", "", text, flags=re.S))
    with pytest.raises(ValueError, match=f"{name} is not a valid imzML file: it holds no spectra"):
        read_imzml(path)
    _corrupt(path, re.sub(r'(ref="intensityArray"/>\s*<cvParam[^>]*value=")50"', r'\g<1>49"', text, count=1))
    with pytest.raises(ValueError, match=f"{name}: spectrum 0 has 50 m/z values but 49 intensities"):
        read_imzml(path)


def test_truncated_binary_file_is_refused(continuous):
    path = continuous[0]
    binary = path.with_suffix(".ibd")
    binary.write_bytes(binary.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{re.escape(str(binary))} is truncated"):
        read_imzml(path)


def test_compressed_arrays_are_refused(tmp_path):
    path = tmp_path / "zlib.imzML"
    with ImzMLWriter(str(path), mode="continuous", intensity_compression=ZlibCompression()) as writer:
        writer.addSpectrum(np.linspace(800.0, 900.0, 10), np.ones(10), (1, 1))
    with pytest.raises(ValueError, match="zlib.imzML stores zlib-compressed arrays"):
        read_imzml(path)
