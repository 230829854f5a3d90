r"""imzML imaging mass spectrometry files (thesis 7.2: MALDI IMS, one spectrum per pixel) as a :class:`SpectraDataset`.

An imzML data set is an XML file ``NAME.imzML`` (metadata, pixel coordinates, offsets) and its binary companion
``NAME.ibd`` (the m/z and intensity arrays), read with pyimzML. In continuous mode every pixel shares one m/z
array; in processed mode each pixel has its own, and the spectra are binned onto a common grid. pyimzML comes with
the ``spectra`` extra (``pip install 'invertnet[spectra]'``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO
from xml.etree.ElementTree import ParseError, iterparse

import numpy as np
import torch
from torch import Tensor

from invertnet._optional import require
from invertnet.data.spectra import SpectraDataset
from invertnet.data.values import checked_labels

if TYPE_CHECKING:
    from pyimzml.ImzMLParser import ImzMLParser

__all__ = ["read_imzml"]

# What pyimzML raises on malformed XML or missing elements; reported as a ValueError naming the file.
_PARSER_ERRORS = (ParseError, AttributeError, TypeError, ValueError, KeyError, IndexError, RuntimeError)


def read_imzml(
    path: str | Path,
    mz_edges: Tensor | np.ndarray | None = None,
    mz_range: tuple[float, float] | None = None,
    n_bins: int | None = None,
    labels: str | Path | None = None,
) -> SpectraDataset:
    """Every pixel spectrum of an imzML file, on one m/z grid.

    Grid: a continuous-mode file keeps its m/z values as bin centres, restricted to ``mz_range`` if given. A
    processed-mode file must be binned, and any file is binned when ``mz_edges`` or ``n_bins`` is given: the
    intensities of each spectrum are summed into the bins [e_i, e_i+1) (the last bin closed) of ``mz_edges``
    (L + 1,), or of ``n_bins`` equal bins over ``mz_range`` (default: the smallest to largest m/z in the file).
    Storage is judged from the file: continuous when all pixels point at the same m/z array.

    Labels: by default every label and group is 0. ``labels`` names a CSV file with columns ``x``, ``y``,
    ``label`` and optionally ``group`` (patient or tissue core), one row per pixel, matched to the pixel
    coordinates (x, y) (every z of a 3-D file). Integer labels are class indices; otherwise the sorted names are
    numbered and kept in ``class_names`` (named groups likewise, names in ``metadata["group_names"]``). Pixels
    missing from the CSV are dropped; ``metadata["dropped_pixels"]`` counts them.

    Returns:
        A :class:`SpectraDataset` with ``coordinates`` (N, 3) (x, y, z; z = 1 in 2-D files) and ``metadata`` holding
        ``source``, ``storage`` ("continuous" or "processed") and ``binned``.

    Raises:
        ImportError: pyimzML is not installed (``pip install 'invertnet[spectra]'``).
        FileNotFoundError: ``path`` or its ``.ibd`` companion is missing.
        ValueError: malformed XML, a truncated ``.ibd``, an array offset inside the UUID or another array (a
            misaligned offset), inconsistent array lengths, compressed arrays (not supported), no spectra, a
            processed file without a grid, integer labels outside 0..MAX_CLASSES - 1, or a bad labels CSV; the
            message names the file.
    """
    parser_module = require("pyimzml.ImzMLParser", "spectra", "read_imzml")
    path = Path(path)
    binary_path = _companion(path)
    if mz_edges is not None and (n_bins is not None or mz_range is not None):
        raise ValueError("read_imzml: give either mz_edges or n_bins / mz_range, not both")
    with open(binary_path, "rb") as binary:
        parser = _parse(parser_module, path, binary, binary_path)
        mz, spectra, metadata = _read_spectra(parser, mz_edges, mz_range, n_bins, path)
    coordinates = np.asarray(parser.coordinates, dtype=np.int64)
    return _labelled_dataset(spectra, mz, coordinates, metadata, labels, path)


def _companion(path: Path) -> Path:
    """The .ibd file beside the imzML file ``path`` with the same stem (any case of the suffix); FileNotFoundError
    naming whichever of the two is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"read_imzml: {path} does not exist (an imzML data set is NAME.imzML with its binary NAME.ibd beside it)"
        )
    for candidate in sorted(path.parent.glob(f"{path.stem}.*")):
        if candidate.suffix.lower() == ".ibd" and candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"read_imzml: the binary companion {path.with_suffix('.ibd')} of {path} is missing "
        "(imzML keeps the spectra in NAME.ibd beside NAME.imzML)"
    )


def _parse(parser_module: ModuleType, path: Path, binary: BinaryIO, binary_path: Path) -> ImzMLParser:
    """The pyimzML parser of ``path`` reading the open ``binary`` file (at ``binary_path``); a ValueError naming the
    file if the XML is malformed or the arrays cannot be read as declared (:func:`_check_layout`)."""
    try:
        parser = parser_module.ImzMLParser(str(path), ibd_file=binary)
    except _PARSER_ERRORS as error:
        raise ValueError(f"read_imzml: {path} is not a valid imzML file: {_diagnose(path, error)}") from error
    _check_layout(parser, path, binary_path)
    return parser


def _diagnose(path: Path, error: Exception) -> str:
    """A reason for a failed parse: malformed XML, no spectra, or pyimzML's own message."""
    if isinstance(error, ParseError):
        return f"malformed XML ({error})"
    try:
        with open(path, "rb") as handle:
            has_spectra = any(element.tag.endswith("}spectrum") for _, element in iterparse(handle))
    except ParseError as xml_error:
        return f"malformed XML ({xml_error})"
    if not has_spectra:
        return "it holds no spectra"
    return f"{type(error).__name__}: {error}"


def _check_layout(parser: ImzMLParser, path: Path, binary_path: Path) -> None:
    """Refuse files whose arrays cannot be read as declared: unknown or compressed encodings, arrays of different
    lengths, or offsets and lengths that do not fit the binary file (:func:`_check_ranges`)."""
    if not parser.coordinates:
        raise ValueError(f"read_imzml: {path} holds no spectra")
    if parser.mzPrecision is None or parser.intensityPrecision is None:
        raise ValueError(f"read_imzml: {path} does not declare the number format of its m/z and intensity arrays")
    for group_id in (parser.mzGroupId, parser.intGroupId):
        group = parser.metadata.referenceable_param_groups[group_id]
        if "zlib compression" in group.param_by_name:
            raise ValueError(f"read_imzml: {path} stores zlib-compressed arrays, which pyimzML cannot read")
    for index, (mz_length, intensity_length) in enumerate(zip(parser.mzLengths, parser.intensityLengths, strict=True)):
        if mz_length != intensity_length:
            raise ValueError(
                f"read_imzml: {path}: spectrum {index} has {mz_length} m/z values but {intensity_length} intensities"
            )
    _check_ranges(parser, path, binary_path)


_UUID_BYTES = 16
"""An .ibd file starts with the 16-byte UUID of its data set (imzML 1.1); the arrays follow it."""


def _check_ranges(parser: ImzMLParser, path: Path, binary_path: Path) -> None:
    """Refuse offsets and lengths that do not describe disjoint arrays after the UUID inside the binary file: an
    array reaching past the end (a truncated file), or starting inside the UUID or inside another array (a wrong
    or misaligned offset, which would read the neighbour's bytes as values). Arrays shared by several spectra
    (the m/z array of continuous files) are one range."""
    sizes = {"m/z": parser.sizeDict[parser.mzPrecision], "intensity": parser.sizeDict[parser.intensityPrecision]}
    ranges: dict[tuple[int, int], str] = {}
    for what, offsets, lengths in (
        ("m/z", parser.mzOffsets, parser.mzLengths),
        ("intensity", parser.intensityOffsets, parser.intensityLengths),
    ):
        for index, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
            ranges.setdefault((offset, length * sizes[what]), f"the {what} array of spectrum {index}")
    actual = binary_path.stat().st_size
    end, previous = _UUID_BYTES, f"the {_UUID_BYTES}-byte UUID"
    for (offset, size), name in sorted(ranges.items()):
        if offset < end:
            raise ValueError(
                f"read_imzml: {path.name} places {name} at byte {offset}, inside {previous} (bytes up to {end}) of "
                f"{binary_path}: a wrong or misaligned offset"
            )
        if offset + size > actual:
            raise ValueError(
                f"read_imzml: {binary_path} is truncated: {actual} bytes, but {path.name} points to data up to "
                f"byte {offset + size} ({name})"
            )
        end, previous = offset + size, name


def _read_spectra(
    parser: ImzMLParser,
    mz_edges: Tensor | np.ndarray | None,
    mz_range: tuple[float, float] | None,
    n_bins: int | None,
    path: Path,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """``(mz, spectra, metadata)``: the grid (L,), the finite (N, L) float32 intensities on it, kept as stored
    (continuous mode, no grid asked for) or binned, and how they were read (``source``, ``storage``, ``binned``)."""
    continuous = len(set(zip(parser.mzOffsets, parser.mzLengths, strict=True))) == 1
    binned = not continuous or mz_edges is not None or n_bins is not None
    if binned:
        mz, spectra = _binned(parser, mz_edges, mz_range, n_bins, path)
    else:
        mz, spectra = _continuous(parser, mz_range, path)
    _check_finite(spectra, path)
    metadata: dict[str, object] = {
        "source": str(path),
        "storage": "continuous" if continuous else "processed",
        "binned": binned,
    }
    return mz, spectra, metadata


def _check_finite(spectra: np.ndarray, path: Path) -> None:
    """Refuse (N, L) ``spectra`` with NaN or infinite intensities, counting the spectra that hold them."""
    if not np.isfinite(spectra).all():
        bad = int((~np.isfinite(spectra)).any(axis=1).sum())
        raise ValueError(f"read_imzml: {path} holds non-finite intensities in {bad} spectra")


def _continuous(parser: ImzMLParser, mz_range: tuple[float, float] | None, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The shared m/z array (restricted to ``mz_range``) and the (N, L) float32 intensities on it."""
    mz = parser.getspectrum(0)[0].astype(np.float64)
    if len(mz) > 1 and not (np.diff(mz) > 0).all():
        raise ValueError(f"read_imzml: {path}: the shared m/z array is not strictly increasing")
    keep = np.ones(len(mz), dtype=bool)
    if mz_range is not None:
        keep = (mz >= mz_range[0]) & (mz <= mz_range[1])
        if not keep.any():
            raise ValueError(f"read_imzml: {path} has no m/z values in {mz_range} (its range is {mz[0]}..{mz[-1]})")
    spectra = np.empty((len(parser.coordinates), int(keep.sum())), dtype=np.float32)
    for index in range(len(spectra)):
        spectra[index] = parser.getspectrum(index)[1][keep]
    return mz[keep], spectra


def _binned(
    parser: ImzMLParser,
    mz_edges: Tensor | np.ndarray | None,
    mz_range: tuple[float, float] | None,
    n_bins: int | None,
    path: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """The bin centres (L,) of the grid from :func:`_grid` and the (N, L) float32 intensities of every spectrum
    summed into its bins; a file that must be binned (processed mode) without ``mz_edges`` or ``n_bins`` is refused."""
    if mz_edges is None and n_bins is None:
        raise ValueError(
            f"read_imzml: {path} is in processed mode (each pixel has its own m/z values); "
            "pass mz_edges or n_bins (and mz_range) to bin it onto one grid"
        )
    edges = _grid(parser, mz_edges, mz_range, n_bins, path)
    mz = (edges[1:] + edges[:-1]) / 2
    spectra = np.empty((len(parser.coordinates), len(mz)), dtype=np.float32)
    for index in range(len(spectra)):
        spectra[index] = _bin(*parser.getspectrum(index), edges)
    return mz, spectra


def _grid(
    parser: ImzMLParser,
    mz_edges: Tensor | np.ndarray | None,
    mz_range: tuple[float, float] | None,
    n_bins: int | None,
    path: Path,
) -> np.ndarray:
    """Bin edges: ``mz_edges``, or ``n_bins`` equal bins over ``mz_range`` (default: the file's m/z range)."""
    if mz_edges is not None:
        edges = np.asarray(mz_edges.cpu() if isinstance(mz_edges, Tensor) else mz_edges, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or not (np.diff(edges) > 0).all():
            raise ValueError(
                f"read_imzml: mz_edges must be a strictly increasing 1-D array of length >= 2, got shape {edges.shape}"
            )
        return edges
    if n_bins is None or n_bins < 1:
        raise ValueError(f"read_imzml: n_bins must be a positive integer, got {n_bins}")
    if mz_range is None:
        low, high = np.inf, -np.inf
        for index in range(len(parser.coordinates)):
            values = parser.getspectrum(index)[0]
            if len(values):
                low, high = min(low, float(values.min())), max(high, float(values.max()))
        if low > high:
            raise ValueError(f"read_imzml: {path} has no m/z values to bin")
        mz_range = (low, high)
    low, high = mz_range
    if not low < high:
        raise ValueError(f"read_imzml: mz_range must satisfy low < high, got {mz_range}")
    return np.linspace(low, high, n_bins + 1)


def _bin(mz_values: np.ndarray, intensities: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Sum of the intensities in each bin [e_i, e_i+1), the last bin closed; values outside the grid are dropped."""
    n_bins = len(edges) - 1
    index = np.searchsorted(edges, mz_values, side="right") - 1
    index[mz_values == edges[-1]] = n_bins - 1
    inside = (index >= 0) & (index < n_bins)
    return np.bincount(index[inside], weights=intensities[inside], minlength=n_bins)


def _labelled_dataset(
    spectra: np.ndarray,
    mz: np.ndarray,
    coordinates: np.ndarray,
    metadata: dict[str, object],
    labels: str | Path | None,
    path: Path,
) -> SpectraDataset:
    """The data set of the (N, L) ``spectra`` on the grid ``mz`` (L,) at the pixel ``coordinates`` (N, 3): all labels
    and groups 0, or only the pixels listed in the ``labels`` CSV, with its labels and groups (``metadata`` gains
    ``dropped_pixels`` and any ``group_names``)."""
    class_ids = group_ids = np.zeros(len(coordinates), dtype=np.int64)
    class_names = None
    if labels is not None:
        keep, class_ids, group_ids, class_names, group_names = _match_labels(Path(labels), coordinates, path)
        spectra, coordinates = spectra[keep], coordinates[keep]
        metadata["dropped_pixels"] = int((~keep).sum())
        if group_names is not None:
            metadata["group_names"] = group_names
    return SpectraDataset(
        spectra=torch.from_numpy(np.ascontiguousarray(spectra)),
        labels=torch.from_numpy(class_ids),
        groups=torch.from_numpy(group_ids),
        mz=torch.from_numpy(np.ascontiguousarray(mz, dtype=np.float64)),
        coordinates=torch.from_numpy(coordinates),
        class_names=class_names,
        metadata=metadata,
    )


def _ids(values: list[str]) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Integer ids of CSV values: the integers themselves if every value is one (>= 0), else indices of the sorted
    distinct names (returned as the names)."""
    try:
        numbers = [int(value) for value in values]
    except ValueError:
        names = tuple(sorted(set(values)))
        lookup = {name: index for index, name in enumerate(names)}
        return np.array([lookup[value] for value in values], dtype=np.int64), names
    return np.array(numbers, dtype=np.int64), None


def _match_labels(
    labels_path: Path, coordinates: np.ndarray, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...] | None, tuple[str, ...] | None]:
    """``(keep, labels, groups, class_names, group_names)`` of the pixels listed in the CSV."""
    if not labels_path.is_file():
        raise FileNotFoundError(f"read_imzml: labels file {labels_path} does not exist")
    with open(labels_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        missing = {"x", "y", "label"} - set(columns)
        if missing:
            raise ValueError(
                f"read_imzml: labels file {labels_path} lacks the columns {sorted(missing)} "
                f"(needs x, y, label and optionally group; found {columns})"
            )
        rows = [
            {key.strip().lower(): (value or "").strip() for key, value in row.items() if key is not None}
            for row in reader
        ]
    if not rows:
        raise ValueError(f"read_imzml: labels file {labels_path} has no rows")
    pixel_row: dict[tuple[int, int], int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            pixel = (int(row["x"]), int(row["y"]))
        except ValueError as error:
            raise ValueError(f"read_imzml: labels file {labels_path}, line {line}: x and y must be integers") from error
        if not row["label"]:
            raise ValueError(f"read_imzml: labels file {labels_path}, line {line}: empty label")
        if pixel in pixel_row:
            raise ValueError(f"read_imzml: labels file {labels_path}, line {line}: pixel {pixel} is listed twice")
        pixel_row[pixel] = len(pixel_row)
    class_ids, class_names = _ids([row["label"] for row in rows])
    if class_names is None:
        class_ids = checked_labels(class_ids, f"read_imzml: labels file {labels_path}")
    if "group" in columns:
        group_ids, group_names = _ids([row["group"] for row in rows])
    else:
        group_ids, group_names = np.zeros(len(rows), dtype=np.int64), None
    matched = np.array([pixel_row.get((int(x), int(y)), -1) for x, y, _ in coordinates], dtype=np.int64)
    keep = matched >= 0
    if not keep.any():
        raise ValueError(
            f"read_imzml: none of the {len(coordinates)} pixels of {path} is listed in {labels_path} "
            f"(pixels run over x {coordinates[:, 0].min()}..{coordinates[:, 0].max()}, "
            f"y {coordinates[:, 1].min()}..{coordinates[:, 1].max()})"
        )
    return keep, class_ids[matched[keep]], group_ids[matched[keep]], class_names, group_names
