"""Data: 2-D toy densities, scikit-learn's digits, MNIST, CIFAR-10, image folders and mass spectra (synthetic
peptide spectra, imzML files) from local files, and cross-validation folds by groups. Nothing downloads."""

from invertnet.data.folders import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from invertnet.data.folders import load_image_folder as load_image_folder
from invertnet.data.folds import grouped_folds as grouped_folds
from invertnet.data.images import DIGITS_LEVELS as DIGITS_LEVELS
from invertnet.data.images import MAX_IDX_BYTES as MAX_IDX_BYTES
from invertnet.data.images import load_cifar10 as load_cifar10
from invertnet.data.images import load_digits as load_digits
from invertnet.data.images import load_mnist as load_mnist
from invertnet.data.images import read_idx as read_idx
from invertnet.data.imzml import read_imzml as read_imzml
from invertnet.data.isotopes import averagine_formula as averagine_formula
from invertnet.data.isotopes import isotope_pattern as isotope_pattern
from invertnet.data.isotopes import isotope_pattern_bin_counts as isotope_pattern_bin_counts
from invertnet.data.isotopes import isotope_pattern_bins as isotope_pattern_bins
from invertnet.data.levels import centered_levels as centered_levels
from invertnet.data.spectra import SpectraDataset as SpectraDataset
from invertnet.data.spectra import synthetic_spectra as synthetic_spectra
from invertnet.data.spectra import tof_bin_edges as tof_bin_edges
from invertnet.data.toy import MOONS_QUADRATURE as MOONS_QUADRATURE
from invertnet.data.toy import TOY_DENSITIES as TOY_DENSITIES
from invertnet.data.toy import TOY_LOG_DENSITIES as TOY_LOG_DENSITIES
from invertnet.data.toy import sample_toy as sample_toy
from invertnet.data.toy import toy_log_prob as toy_log_prob
from invertnet.data.values import MAX_CLASSES as MAX_CLASSES
from invertnet.data.values import checked_labels as checked_labels
from invertnet.data.values import checked_levels as checked_levels

__all__ = [
    "DIGITS_LEVELS",
    "MAX_CLASSES",
    "MAX_IDX_BYTES",
    "MAX_IMAGE_PIXELS",
    "MOONS_QUADRATURE",
    "TOY_DENSITIES",
    "TOY_LOG_DENSITIES",
    "SpectraDataset",
    "averagine_formula",
    "centered_levels",
    "checked_labels",
    "checked_levels",
    "grouped_folds",
    "isotope_pattern",
    "isotope_pattern_bin_counts",
    "isotope_pattern_bins",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "load_mnist",
    "read_idx",
    "read_imzml",
    "sample_toy",
    "synthetic_spectra",
    "tof_bin_edges",
    "toy_log_prob",
]
