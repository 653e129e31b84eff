"""Read a DICOM CT series as a float32 HU volume with correct geometry, or refuse in one line.

GDCM (through SimpleITK's ``ImageSeriesReader``) finds the series in each folder, sorts their
files along the slice normal and decodes the pixels (also the JPEG/JPEG 2000 syntaxes pydicom
cannot decode without plugins). pydicom reads the headers, from which the geometry is checked,
because ITK builds a volume from the first slice's orientation and the mean slice step and so
silently misplaces slices when the series is not a regular stack:

* several CT series in the input: listed (UID, description, slices, orientation) and refused
  unless one is chosen by UID or by its number in that list; never a silent pick (series of
  other modalities are left out unless ``force``);
* missing slices or uneven spacing: refused with the position of the gap, unless
  ``resample_gaps`` asks for linear interpolation onto the median step;
* gantry tilt (slices stepping sideways, i.e. a sheared stack): every slice is moved in its own
  plane onto a regular grid (the standard correction, as dcm2niix does), so every pixel keeps its
  true position; the grid grows to hold the shifted slices (new pixels are air, −1024 HU);
* two slices at one position, slices of different orientation or size: refused;
* enhanced (multi-frame) CT: read through GDCM, the geometry checked against the per-frame
  positions, and refused when its values are not HU (e.g. a perfusion map);
* slices of two patients or two studies under one SeriesInstanceUID: refused, naming both files;
* a damaged slice (PixelData shorter or longer than Rows x Columns x BitsAllocated/8 x frames, a
  file cut short) or a file beside the series that looks like one of its slices but cannot be
  read: a missing slice, refused naming the file unless ``resample_gaps`` (then left out);
* RescaleSlope <= 0 or a non-finite slope/intercept: refused;
* a named pipe, socket, device or broken link in a folder: skipped, never opened (opening a named
  pipe blocks until something writes to it, and GDCM, which opens every entry of a folder, lost
  good slices beside one); that folder's files are grouped by pydicom, regular files only. When no
  image remains, the refusal says what was skipped.

Which neighbouring files count as "looks like a slice" (:func:`unreadable_neighbours`): a file in
a folder of the series, not hidden, not read as an image of any series, and either starting with
the DICOM preamble (``DICM`` at byte 128), named ``*.dcm``/``*.dicom``/``*.ima``, or named like the
series' own files up to the digits (``IM0007`` beside ``IM0001``). A README, a ``DICOMDIR`` or a
readable non-image object (SR, RT structures) is left alone.

Coronal and sagittal series are read in their own geometry; the denoiser reorients them to
axial for the network and back (see :meth:`IPv2DenoiseLib.core.volume.Volume.to_axial`).
"""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.config import disable_value_validation
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import ProgressCallback
from IPv2DenoiseLib.core.simpleitk import sitk
from IPv2DenoiseLib.core.text import printable_line
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.image_headers import MEMORY_LIMIT_ENV, memory_budget_bytes

#: Folders never searched for DICOM files (besides hidden ones such as .venv or .git).
SKIPPED_FOLDERS = {"__pycache__", "node_modules", "site-packages"}
#: HU of pixels outside the measured field of view (padding, shifted-in margins).
PADDING_HU = -1024.0
#: Relative deviation from the median slice step that counts as a gap or uneven spacing.
GAP_TOLERANCE = 0.1
#: In-plane drift (mm) over the whole stack above which slices are shifted onto a regular grid.
SHEAR_TOLERANCE_MM = 0.05
#: File endings that mark a file as DICOM even when it cannot be parsed.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
#: Values larger than this (bytes) are not loaded with a header, only located (PixelData).
_DEFER_BYTES = 256
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF

_META_KEYWORDS = {
    "PatientID": "PatientID",
    "PatientName": "PatientName",
    "StudyInstanceUID": "StudyInstanceUID",
    "SeriesInstanceUID": "SeriesInstanceUID",
    "FrameOfReferenceUID": "FrameOfReferenceUID",
    "StudyDescription": "StudyDescription",
    "SeriesDescription": "SeriesDescription",
    "SeriesNumber": "SeriesNumber",
    "Manufacturer": "Manufacturer",
    "ConvolutionKernel": "ConvolutionKernel",
    "kVp": "KVP",
    "mAs": "Exposure",
    "tube_current_mA": "XRayTubeCurrent",
    "CTDIvol": "CTDIvol",
    "SliceThickness": "SliceThickness",
}
_NUMERIC_META = {"SeriesNumber", "kVp", "mAs", "tube_current_mA", "CTDIvol", "SliceThickness"}


# --------------------------------------------------------------------------------------- finding


def orientation_name(iop: Any) -> str:
    """'axial', 'coronal' or 'sagittal' for the axis the slice normal is closest to ('oblique' past 30°).

    Parameters
    ----------
    iop : sequence of float
        ImageOrientationPatient: row and column direction cosines, 6 values (LPS).

    Returns
    -------
    str
        The orientation, or ``"oblique (near axial)"`` etc. when the normal is more than 30° off.
    """
    v = np.asarray([float(x) for x in iop], dtype=float)
    normal = np.cross(v[:3], v[3:])
    axis = int(np.argmax(np.abs(normal)))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if abs(normal[axis]) >= np.cos(np.deg2rad(30)) else f"oblique (near {name})"


@dataclass
class SeriesInfo:
    """One image series found in the input: its files (GDCM order) and their headers.

    Attributes
    ----------
    uid : str
        SeriesInstanceUID.
    files : list of pathlib.Path
        Its image files, in GDCM's order.
    headers : list of pydicom.Dataset
        Their headers (pixel data not loaded), same order.
    """

    uid: str
    files: list[Path]
    headers: list[Dataset] = field(repr=False)

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def n_slices(self) -> int:
        return sum(int(h.get("NumberOfFrames", 1) or 1) for h in self.headers)

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "")

    @property
    def orientation(self) -> str:
        iop = _iop(self.first)
        return "unknown orientation" if iop is None else orientation_name(iop)

    def summary(self) -> str:
        desc = str(self.first.get("SeriesDescription", "") or "").strip() or "no description"
        return f"{self.uid} '{desc}' {self.modality or '?'}, {self.n_slices} slices, {self.orientation}"


def _search_folders(root: Path) -> list[Path]:
    """``root`` and its subfolders, skipping hidden ones (.venv, .git) and caches."""
    folders = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        if any(not f.startswith(".") for f in files):
            folders.append(Path(current))
    return folders


def _not_regular(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are neither folders nor regular files, hidden ones too (named
    pipes, sockets, devices, broken links), found by ``stat`` alone: none of them is ever opened."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if not e.is_dir() and not e.is_file())
    except OSError:
        return []


def _entry_kind(path: Path) -> str:
    """What a non-regular entry is, for a message (``stat`` only: nothing is opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken link"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def skipped_entries(path: str | os.PathLike) -> list[Path]:
    """What :func:`find_series` skips unopened in ``path``: ``path`` itself when it is neither a
    folder nor a regular file, else the non-regular entries of the folders it searches.

    Parameters
    ----------
    path : path-like
        A DICOM file or a folder.

    Returns
    -------
    list of pathlib.Path
        The skipped entries (named pipes, sockets, devices, broken links), folder by folder.
    """
    p = Path(path)
    if p.is_dir():
        return [entry for folder in _search_folders(p) for entry in _not_regular(folder)]
    return [] if p.is_file() or not os.path.lexists(p) else [p]


def _skipped_phrase(path: str | os.PathLike, skipped: list[Path]) -> str:
    """``; skipped 2 entries that are not regular files, unopened: a.pipe (a named pipe), …`` or empty."""
    if not skipped:
        return ""
    root = Path(path)
    names = [
        f"{printable_line(str(e.relative_to(root) if e != root and e.is_relative_to(root) else e))}"
        f" ({_entry_kind(e)})"
        for e in skipped[:3]
    ]
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    what = (
        "1 entry that is not a regular file"
        if len(skipped) == 1
        else f"{len(skipped)} entries that are not regular files"
    )
    return f"; skipped {what}, unopened: {', '.join(names)}{more}"


@contextmanager
def quiet_readers() -> Iterator[None]:
    """Keep pydicom's value-validation warnings and ITK's warning blocks off the terminal.

    Odd VRs in a scanner's header are not the user's problem (the values we need are checked
    ourselves), and GDCM's "No Series were found" block says what our own refusal says better.

    Yields
    ------
    None
        Inside the ``with`` block the warnings are off; they are restored after it.
    """
    itk_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with disable_value_validation():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(itk_warnings)


# pydicom checks each value against its VR when it is first used (lazily, anywhere), and warns on
# stderr; a scanner's odd VRs are not the user's problem, and the values we need are checked here.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.valuerep")

_HEADER_ERRORS = (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError, KeyError)


def read_header(path: Path) -> Dataset:
    """The DICOM header of ``path``; PixelData is located (offset, length) but not loaded.

    Parameters
    ----------
    path : pathlib.Path
        A DICOM file.

    Returns
    -------
    pydicom.Dataset
        The header, large values deferred.
    """
    with disable_value_validation():
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES)


def _header(path: Path) -> Dataset | None:
    """The header of an image file (one with Rows), or None for anything else."""
    try:
        ds = read_header(path)
    except _HEADER_ERRORS:
        return None
    return ds if "Rows" in ds else None


def _slice_order(pair: tuple[Path, Dataset]) -> tuple[float, int]:
    ds = pair[1]
    iop, ipp = _iop(ds), _ipp(ds)
    height = float(ipp @ np.cross(iop[:3], iop[3:])) if iop is not None and ipp is not None else 0.0
    return height, _integer(ds, "InstanceNumber")


def series_of_files(files: Iterable[Path]) -> list[SeriesInfo]:
    """The image series among exactly these files, grouped by SeriesInstanceUID and sorted.

    Parameters
    ----------
    files : iterable of pathlib.Path
        Candidate files; those that are not DICOM images are left out.

    Returns
    -------
    list of SeriesInfo
        By SeriesNumber, then UID.
    """
    grouped: dict[str, list[tuple[Path, Dataset]]] = {}
    for f in files:
        ds = _header(f)
        if ds is not None:
            grouped.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((f, ds))
    found = []
    for uid, pairs in grouped.items():
        pairs.sort(key=_slice_order)
        found.append(SeriesInfo(uid, [f for f, _ in pairs], [h for _, h in pairs]))
    return sorted(found, key=lambda s: (_integer(s.first, "SeriesNumber"), s.uid))


def find_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """Every image series in a DICOM file or folder (searched recursively, hidden folders skipped).

    GDCM groups the files of each folder by SeriesInstanceUID and sorts them; files of one series
    spread over several folders are merged. Non-image objects (SR, RT structures) are left out. A
    folder that holds a named pipe, socket, device or broken link is grouped by pydicom instead,
    regular files only (GDCM opens every entry, and a named pipe blocks whoever opens it; see
    :func:`skipped_entries`).

    Parameters
    ----------
    path : path-like
        A DICOM file or a folder.

    Returns
    -------
    list of SeriesInfo
        By SeriesNumber, then UID; empty when there is no DICOM image.
    """
    p = Path(path)
    grouped: dict[str, list[Path]] = {}
    if p.is_file():
        ds = _header(p)
        if ds is not None:
            grouped[str(ds.get("SeriesInstanceUID", "unknown"))] = [p]
    else:
        with quiet_readers():
            for folder in _search_folders(p):
                for uid, names in _series_in_folder(folder):
                    grouped.setdefault(uid, []).extend(names)
    found = []
    for uid, files in grouped.items():
        pairs = [(f, h) for f in files if (h := _header(f)) is not None]
        if pairs:
            pairs.sort(key=_slice_order)  # GDCM sorts each folder; folders are merged here
            found.append(SeriesInfo(uid, [f for f, _ in pairs], [h for _, h in pairs]))
    return sorted(found, key=lambda s: (_integer(s.first, "SeriesNumber"), s.uid))


def _series_in_folder(folder: Path) -> list[tuple[str, list[Path]]]:
    """(SeriesInstanceUID, files) of each image series in ``folder`` alone: found by GDCM, or by
    pydicom among the regular files when GDCM must not read the folder (an entry that is not a
    regular file) or cannot (it stops at a malformed tag, e.g. a position as text)."""
    if not _not_regular(folder):
        try:
            return [
                (uid, [Path(n) for n in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)])
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            ]
        except RuntimeError:
            pass
    # Path.is_file is a stat (following links): true for regular files only, nothing is opened
    return [
        (info.uid, info.files) for info in series_of_files(f for f in sorted(folder.iterdir()) if f.is_file())
    ]


def choose_series(series: list[SeriesInfo], selector: str | None, *, where: str) -> SeriesInfo:
    """The series named by ``selector`` (a SeriesInstanceUID or its 1-based number in the list).

    With one series and no selector, that one. With several and no selector: refused, listing
    them, so the user picks; the tool never guesses.

    Parameters
    ----------
    series : list of SeriesInfo
        The series found, in the listed order.
    selector : str or None
        ``--series``: a SeriesInstanceUID or a 1-based number.
    where : str
        The input, for the messages.

    Returns
    -------
    SeriesInfo
        The chosen series.

    Raises
    ------
    UserError
        Several series and no selector, or a selector that names none of them.
    """
    listing = "; ".join(f"{i}) {s.summary()}" for i, s in enumerate(series, start=1))
    if selector is not None:
        for s in series:
            if s.uid == selector:
                return s
        if selector.isdigit() and 1 <= int(selector) <= len(series):
            return series[int(selector) - 1]
        raise UserError(f"{where}: no series {selector!r}; found: {listing}")
    if len(series) == 1:
        return series[0]
    raise UserError(
        f"{where} holds {len(series)} image series; choose one with --series UID or --series N: {listing}"
    )


# --------------------------------------------------------------------------------------- geometry


def _numbers(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    """``count`` finite numbers from a multi-valued tag; None when it is absent or malformed (two
    values, text, NaN): a hostile header is a slice that cannot be placed, never a crash."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        items = str(value).split("\\") if isinstance(value, (str, bytes)) else list(value)
        numbers = [float(v) for v in items]
    except (TypeError, ValueError, OverflowError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else None


def _iop(ds: Dataset) -> list[float] | None:
    iop = _numbers(ds, "ImageOrientationPatient", 6)
    if iop is None or min(np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])) < 1e-6:
        return None
    return iop


def _ipp(ds: Dataset) -> np.ndarray | None:
    ipp = _numbers(ds, "ImagePositionPatient", 3)
    return None if ipp is None else np.array(ipp)


def _integer(ds: Dataset, keyword: str) -> int:
    """An IS tag as a sort key (0 when absent or not a number)."""
    try:
        return int(float(ds.get(keyword, 0) or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _label(ds: Dataset) -> str:
    number = ds.get("InstanceNumber")
    return f"instance {number}" if number not in (None, "") else "no instance number"


@dataclass
class StackGeometry:
    """Where the slices of a sorted series lie: the regular grid they form, and how they deviate.

    Attributes
    ----------
    row, col, normal : numpy.ndarray
        Unit row, column and slice-normal directions (LPS), shape (3,).
    positions : numpy.ndarray
        (n, 3) ImagePositionPatient, mm, sorted along the normal.
    heights : numpy.ndarray
        (n,) position of each slice along the normal, mm.
    step : float
        Median step along the normal, mm.
    in_plane : numpy.ndarray
        (n, 2) in-plane offset of each slice from the first, along row/col, mm (gantry tilt).
    """

    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    positions: np.ndarray  # (n, 3) ImagePositionPatient, sorted along the normal
    heights: np.ndarray  # (n,) position along the normal
    step: float  # median step along the normal (mm)
    in_plane: np.ndarray  # (n, 2) in-plane offset of each slice from the first, along row/col (mm)

    @property
    def irregular(self) -> np.ndarray:
        """Indices k where the step from slice k to k+1 deviates from the median step."""
        steps = np.diff(self.heights)
        return np.flatnonzero(np.abs(steps - self.step) > GAP_TOLERANCE * self.step)

    @property
    def sheared(self) -> bool:
        return bool(np.abs(self.in_plane).max(initial=0.0) > SHEAR_TOLERANCE_MM)

    @property
    def tilt_degrees(self) -> float:
        span = self.heights[-1] - self.heights[0]
        drift = float(np.linalg.norm(self.in_plane[-1])) if len(self.in_plane) else 0.0
        return float(np.degrees(np.arctan2(drift, span))) if span > 0 else 0.0


def stack_geometry(headers: list[Dataset], *, where: str, default_step: float) -> StackGeometry:
    """Check orientations and positions of sorted slice headers; refuse stacks that are not one volume.

    Parameters
    ----------
    headers : list of pydicom.Dataset
        The slice headers, sorted.
    where : str
        The input, for the messages.
    default_step : float
        Step along the normal for a single slice, mm.

    Returns
    -------
    StackGeometry
        The slice grid and its deviations (gaps, tilt).

    Raises
    ------
    UserError
        Missing position or orientation, slices of different orientations, or two slices at the
        same position.
    """
    iops = [_iop(h) for h in headers]
    if any(i is None for i in iops) or any(_ipp(h) is None for h in headers):
        if len(headers) > 1:
            bad = next(h for h, i in zip(headers, iops) if i is None or _ipp(h) is None)
            raise UserError(
                f"{where}: slices lack a valid ImagePositionPatient/ImageOrientationPatient (e.g. {_label(bad)}: "
                f"{str(bad.get('ImagePositionPatient', 'none'))[:40]} / {str(bad.get('ImageOrientationPatient', 'none'))[:60]}); "
                "cannot place them"
            )
        iops = [[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
    ref = np.array(iops[0])
    for h, iop in zip(headers, iops):
        if np.abs(np.array(iop) - ref).max() > 1e-3:
            raise UserError(
                f"{where}: slices have different orientations ({_label(headers[0])}: {ref.round(4).tolist()}, "
                f"{_label(h)}: {np.round(iop, 4).tolist()}); a volume needs parallel slices"
            )
    row, col = ref[:3] / np.linalg.norm(ref[:3]), ref[3:] / np.linalg.norm(ref[3:])
    normal = np.cross(row, col)
    positions = np.array([_ipp(h) if _ipp(h) is not None else np.zeros(3) for h in headers])
    heights = positions @ normal  # sorted by find_series
    steps = np.diff(heights)
    if len(headers) > 1:
        step = float(np.median(steps))
        same = np.flatnonzero(steps < 1e-3 * max(step, 1e-3) + 1e-4)
        if step <= 0 or same.size:
            k = int(same[0]) if same.size else 0
            raise UserError(
                f"{where}: two slices at the same position {heights[k]:.2f} mm ({_label(headers[k])}, "
                f"{_label(headers[k + 1])}); the folder mixes acquisitions; choose one series"
            )
    else:
        step = default_step
    offsets = positions - positions[:1] - np.outer(heights - heights[0], normal)
    in_plane = np.column_stack([offsets @ row, offsets @ col])
    return StackGeometry(row, col, normal, positions, heights, step, in_plane)


def gap_message(geometry: StackGeometry, headers: list[Dataset], *, where: str) -> str:
    """One line naming the worst deviation from the regular step."""
    steps = np.diff(geometry.heights)
    bad = geometry.irregular
    k = int(bad[np.argmax(np.abs(steps[bad] - geometry.step))])
    missing = steps[k] / geometry.step - 1
    what = f"about {round(missing)} slice(s) missing" if missing > 0.5 else "uneven slice spacing"
    more = f" ({len(bad)} irregular steps in all)" if len(bad) > 1 else ""
    return (
        f"{where}: {what}: a step of {steps[k]:.2f} mm between the slices at {geometry.heights[k]:.2f} and "
        f"{geometry.heights[k + 1]:.2f} mm along the slice normal ({_label(headers[k])} and "
        f"{_label(headers[k + 1])}) where the series steps {geometry.step:.2f} mm{more}; "
        "pass --resample-gaps to interpolate onto an even grid"
    )


# --------------------------------------------------------------------------------------- integrity


def check_one_patient(info: SeriesInfo, *, where: str) -> None:
    """Refuse a series whose slices belong to two patients or two studies (one UID, two people).

    A derived series is filed under the first slice's patient and study; a mixed one would put
    another patient's images there.

    Parameters
    ----------
    info : SeriesInfo
        The series.
    where : str
        The input, for the message.

    Raises
    ------
    UserError
        Two PatientIDs or two StudyInstanceUIDs among the slices.
    """
    for keyword, what in (("PatientID", "patients"), ("StudyInstanceUID", "studies")):
        first = str(info.first.get(keyword, "") or "")
        for path, header in zip(info.files, info.headers):
            value = str(header.get(keyword, "") or "")
            if value != first:
                raise UserError(
                    f"{where}: series {info.uid} mixes two {what}: {keyword} {first or '(empty)'} "
                    f"(file {info.files[0]}) and {value or '(empty)'} (file {path}); one series is one "
                    f"patient's scan: remove the files that do not belong"
                )


def _rescale_pairs(ds: Dataset) -> Iterator[tuple[Any, Any]]:
    yield ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups, []) or []:
            for item in group.get("PixelValueTransformationSequence", []) or []:
                yield item.get("RescaleSlope"), item.get("RescaleIntercept")


def check_rescale(ds: Dataset, path: Path) -> None:
    """Refuse RescaleSlope <= 0 and non-finite slope or intercept: HU = slope x stored + intercept.

    Parameters
    ----------
    ds : pydicom.Dataset
        A slice header (per-frame values of a multi-frame header included).
    path : pathlib.Path
        Its file, for the message.

    Raises
    ------
    UserError
        A slope that is not a positive finite number, or a non-finite intercept.
    """
    for slope, intercept in _rescale_pairs(ds):
        for name, value, positive in (("RescaleSlope", slope, True), ("RescaleIntercept", intercept, False)):
            if value in (None, ""):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or (positive and number <= 0):
                need = "a positive finite number" if positive else "a finite number"
                raise UserError(
                    f"{path}: {name} {value!s} is not {need}; HU = RescaleSlope x stored value + "
                    "RescaleIntercept would be nonsense"
                )


def _declared_values(ds: Dataset) -> int:
    """Pixel values the header declares: rows x columns x samples x frames (0 without Rows or Columns)."""
    return (
        int(ds.get("Rows", 0) or 0)
        * int(ds.get("Columns", 0) or 0)
        * int(ds.get("SamplesPerPixel", 1) or 1)
        * int(ds.get("NumberOfFrames", 1) or 1)
    )


def declared_pixel_bytes(ds: Dataset) -> int:
    """Bytes of the pixel data as decoded, as the header declares them: what a decoder allocates,
    however few bytes of compressed data there are.

    Parameters
    ----------
    ds : pydicom.Dataset
        A header (pixels not needed).

    Returns
    -------
    int
        Values x BitsAllocated / 8, rounded up.
    """
    return (_declared_values(ds) * int(ds.get("BitsAllocated", 16) or 16) + 7) // 8


def check_series_memory(info: SeriesInfo, *, where: str) -> None:
    """Refuse, in one line, a series whose declared pixels do not fit memory, before anything decodes
    them (a few kB of RLE or JPEG may declare gigabytes; volume files get the same check from
    :func:`~IPv2DenoiseLib.io.image_headers.check_image_file`).

    Parameters
    ----------
    info : SeriesInfo
        The series, its headers read.
    where : str
        What the message names (the folder or file given).

    Raises
    ------
    UserError
        Reading would need more than :func:`~IPv2DenoiseLib.io.image_headers.memory_budget_bytes`.
    """
    declared = sum(declared_pixel_bytes(h) for h in info.headers)
    needed = sum(
        2 * declared_pixel_bytes(h) + 4 * _declared_values(h) for h in info.headers
    )  # decoded, ITK, HU
    budget = memory_budget_bytes()
    if needed > budget:
        raise UserError(
            f"{where}: its {len(info.headers)} file(s) declare {declared / 1e9:.1f} GB of pixel data; reading "
            f"it needs about {needed / 1e9:.1f} GB of memory and {budget / 1e9:.1f} GB is available "
            f"(set {MEMORY_LIMIT_ENV} to change the limit)"
        )


def pixel_data_problem(path: Path, ds: Dataset) -> str | None:
    """What is wrong with the stored PixelData of ``path`` (None when its size is right).

    GDCM reads a short PixelData into an uninitialised buffer (different values on every run), so
    the sizes are checked here: the element's length against Rows x Columns x samples x frames x
    BitsAllocated/8, and the file's size against where the element ends. Compressed
    (encapsulated) pixel data has no fixed size; GDCM's decoder checks it.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    ds : pydicom.Dataset
        Its header, as :func:`read_header` gives it.

    Returns
    -------
    str or None
        The problem in words, or None.
    """
    element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if element is None:
        return "no pixel data"
    if isinstance(element, RawDataElement):
        length, ends_at = element.length, element.value_tell + element.length
    else:
        length, ends_at = len(element.value or b""), None
    if length == _UNDEFINED_LENGTH:
        return None
    expected = declared_pixel_bytes(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if length < expected:
        return (
            f"PixelData holds {length} bytes where Rows x Columns x BitsAllocated/8 x {frames} frame(s) "
            f"needs {expected}"
        )
    if length > expected + 1:  # one byte of padding to an even length is allowed
        if frames > 1 or "NumberOfFrames" in ds:
            return (
                f"NumberOfFrames {frames} declares fewer frames than PixelData holds ({length} bytes, "
                f"{length / max(expected // frames, 1):.1f} frames)"
            )
        return f"PixelData holds {length} bytes where the header's image size needs {expected}"
    size = path.stat().st_size
    if ends_at is not None and ends_at > size:
        return f"the file is cut short: it ends {ends_at - size} bytes before its pixel data does"
    return None


def _name_shape(name: str) -> str:
    """A file name with its digits blanked: IM0007 and IM0001 have one shape."""
    return re.sub(r"\d+", "#", name)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _why_unreadable(path: Path) -> str:
    """One phrase: why ``path`` does not read as a DICOM image (permission, cut short, not DICOM)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return exc.strerror or "unreadable"
    try:
        ds = read_header(path)
    except InvalidDicomError:
        return "not a DICOM file (garbage or another format)"
    except _HEADER_ERRORS as exc:
        return f"its DICOM header is damaged or cut short ({type(exc).__name__})"
    if "Rows" not in ds or _PIXEL_DATA_TAG not in ds:
        return "its DICOM header is cut short (no image in it)"
    return "GDCM cannot read it"


def _is_image_sop_class(ds: Dataset) -> bool:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return uid is None or "Image" in getattr(uid, "name", "")


def unreadable_neighbours(info: SeriesInfo) -> list[tuple[Path, str]]:
    """Files beside the series' slices that look like slices of it but cannot be read (see the module doc).

    Readable images of other series, readable non-image DICOM (SR, RT, DICOMDIR) and files that look
    like nothing DICOM (README.txt, notes) are left alone.

    Parameters
    ----------
    info : SeriesInfo
        The series whose folders are looked at.

    Returns
    -------
    list of (pathlib.Path, str)
        Each suspect file and why it cannot be read.
    """
    members = {f.resolve() for f in info.files}
    shapes = {_name_shape(f.name) for f in info.files}
    found = []
    for folder in sorted({f.parent for f in info.files}):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for path in entries:
            if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
                continue
            if path.resolve() in members:
                continue
            try:
                ds = read_header(path)
            except _HEADER_ERRORS:
                ds = None
            if ds is not None and "Rows" in ds and _PIXEL_DATA_TAG in ds:
                if str(ds.get("SeriesInstanceUID", "")) == info.uid:  # ours, but GDCM left it out
                    found.append((path, pixel_data_problem(path, ds) or "GDCM cannot read it"))
                continue  # an image of another series
            if ds is not None and not _is_image_sop_class(ds):
                continue  # a readable non-image object (SR, RT structure set, DICOMDIR)
            looks_dicom = (
                ds is not None
                or _has_dicom_preamble(path)
                or path.suffix.lower() in DICOM_SUFFIXES
                or _name_shape(path.name) in shapes
            )
            if looks_dicom:
                found.append((path, _why_unreadable(path)))
    return found


def damaged_files(info: SeriesInfo, *, check_folders: bool) -> list[tuple[Path, str]]:
    """Slices of the series whose pixel data is the wrong size, then unreadable neighbours.

    Parameters
    ----------
    info : SeriesInfo
        The series.
    check_folders : bool
        Also look for unreadable files beside the slices (:func:`unreadable_neighbours`).

    Returns
    -------
    list of (pathlib.Path, str)
        Each damaged file and what is wrong with it; empty when all is well.
    """
    damaged = [(f, why) for f, h in zip(info.files, info.headers) if (why := pixel_data_problem(f, h))]
    return damaged + (unreadable_neighbours(info) if check_folders else [])


# --------------------------------------------------------------------------------------- pixels


def _read_pixels(files: list[Path], *, where: str, progress: ProgressCallback | None) -> np.ndarray:
    """HU of every file (slope/intercept applied by GDCM), in the given order, in chunks for progress."""
    chunks, done, chunk = [], 0, 32
    warnings_were = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns about spacing we check ourselves
    try:
        for start in range(0, len(files), chunk):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in files[start : start + chunk]])
            try:
                image = reader.Execute()
            except RuntimeError as exc:
                first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "unreadable")
                raise UserError(f"{where}: cannot decode the pixel data ({first[:160]})") from None
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise UserError(
                    f"{where}: images have {image.GetNumberOfComponentsPerPixel()} samples per pixel (RGB); CT has one"
                )
            chunks.append(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))
            done += len(files[start : start + chunk])
            if progress is not None:
                progress(done, len(files), f"reading DICOM {done}/{len(files)} files")
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were)
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def _apply_padding(hu: np.ndarray, headers: list[Dataset]) -> None:
    """Pixels equal to PixelPaddingValue (outside the scan's field of view) become air, in place."""
    for k, h in enumerate(headers):
        padding = h.get("PixelPaddingValue")
        if padding is None:
            continue
        padding = int(padding)
        if int(h.get("PixelRepresentation", 0) or 0) == 1 and padding >= 1 << 15:
            # the tag's VR is "US or SS": a signed series' padding (GE's -2000) is often read unsigned
            padding -= 1 << 16
        slope = float(h.get("RescaleSlope", 1) or 1)
        intercept = float(h.get("RescaleIntercept", 0) or 0)
        hu[k][np.isclose(hu[k], padding * slope + intercept)] = PADDING_HU


def _check_hu_units(ds: Dataset, *, where: str, force: bool) -> None:
    """Refuse values that are not HU (RescaleType other than HU, e.g. a perfusion map)."""
    rescale_type = ds.get("RescaleType")
    for group in ds.get("SharedFunctionalGroupsSequence", []) or []:
        for item in group.get("PixelValueTransformationSequence", []) or []:
            rescale_type = item.get("RescaleType", rescale_type)
    if force or rescale_type in (None, "", "HU"):
        return
    kind = "\\".join(
        str(v)
        for g in ds.get("SharedFunctionalGroupsSequence", []) or []
        for f in g.get("CTImageFrameTypeSequence", []) or []
        for v in f.get("FrameType", [])
    ) or "\\".join(str(v) for v in ds.get("ImageType", []))
    raise UserError(
        f"{where}: pixel values are not Hounsfield units (RescaleType {rescale_type}; image type {kind or '?'}); "
        "the denoiser needs a CT in HU (info and denoise read it anyway with --force)"
    )


# --------------------------------------------------------------------------------------- volumes


def _meta(ds: Dataset, info: SeriesInfo, n_series: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": "dicom", "series_choice": info.summary(), "series_in_input": n_series}
    for key, keyword in _META_KEYWORDS.items():
        value = ds.get(keyword)
        if value not in (None, ""):
            try:
                meta[key] = float(value) if key in _NUMERIC_META else str(value)
            except (TypeError, ValueError):
                meta[key] = str(value)
    meta["Modality"] = str(ds.get("Modality", ""))
    meta["orientation"] = info.orientation
    meta["warnings"] = []
    return meta


def _read_multiframe(info: SeriesInfo, *, where: str, force: bool, n_series: int) -> Volume:
    """An enhanced (multi-frame) CT object, read by GDCM; geometry checked against its frames."""
    if len(info.files) != 1:
        raise UserError(
            f"{where}: series {info.uid} mixes {len(info.files)} multi-frame files; read one at a time"
        )
    path = info.files[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    _check_hu_units(ds, where=where, force=force)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UserError(
            f"{path}: cannot read the multi-frame image ({str(exc).splitlines()[0][:160]})"
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: multi-frame image is not one grey 3-D volume")
    frames = ds.get("PerFrameFunctionalGroupsSequence", []) or []
    positions = [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for f in frames
        if "PlanePositionSequence" in f
    ]
    volume = Volume(
        sitk.GetArrayFromImage(image).astype(np.float32),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
        _meta(ds, info, n_series),
    )
    if len(positions) == volume.shape[0]:
        expected = np.array(positions)
        got = np.array([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(volume.shape[0])])
        if np.abs(expected - got).max() > 0.1:
            raise UserError(
                f"{path}: the frames are not a regular stack (frame positions differ from the grid by up to "
                f"{np.abs(expected - got).max():.1f} mm); export it as a classic CT series"
            )
    volume.meta["dicom_files"] = [str(path)]
    return volume


def _shift_in_plane(hu: np.ndarray, geometry: StackGeometry, spacing_xy: tuple[float, float]):
    """Move every slice in its own plane so the stack becomes a regular grid; returns (array, origin shift in px)."""
    sx, sy = spacing_xy
    shift_px = np.column_stack([geometry.in_plane[:, 0] / sx, geometry.in_plane[:, 1] / sy])  # (x, y)
    lo = np.floor(shift_px.min(axis=0)).astype(int)  # <= 0
    hi = np.ceil(shift_px.max(axis=0)).astype(int)  # >= 0
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    nz, ny, nx = hu.shape
    out = np.full((nz, ny + hi[1] - lo[1], nx + hi[0] - lo[0]), PADDING_HU, dtype=np.float32)
    for k in range(nz):
        canvas = np.full(out.shape[1:], PADDING_HU, dtype=np.float32)
        canvas[:ny, :nx] = hu[k]
        # slice k pixel (i, j) lies at grid pixel (i + shift_x - lo_x, j + shift_y - lo_y)
        dy, dx = shift_px[k, 1] - lo[1], shift_px[k, 0] - lo[0]
        out[k] = ndi.shift(canvas, (dy, dx), order=1, mode="constant", cval=PADDING_HU)
    return out, lo


def _resample_heights(hu: np.ndarray, heights: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of the slices (at ``heights``) onto an even grid of ``step`` mm."""
    n = int(round((heights[-1] - heights[0]) / step)) + 1
    grid = heights[0] + step * np.arange(n)
    upper = np.clip(np.searchsorted(heights, grid, side="right"), 1, len(heights) - 1)
    lower = upper - 1
    weight = np.clip((grid - heights[lower]) / (heights[upper] - heights[lower]), 0.0, 1.0)
    out = (1 - weight)[:, None, None] * hu[lower] + weight[:, None, None] * hu[upper]
    return out.astype(np.float32), grid


def read_series(
    info: SeriesInfo,
    *,
    where: str,
    force: bool = False,
    resample_gaps: bool = False,
    n_series: int = 1,
    progress: ProgressCallback | None = None,
    check_folders: bool = True,
) -> Volume:
    """The series as a volume on a regular grid (see the module docstring for what is refused).

    ``check_folders`` also looks at the other files in the series' folders for unreadable slices
    (off when the user named one file).

    Parameters
    ----------
    info : SeriesInfo
        The series to read.
    where : str
        The input, for the messages.
    force : bool
        Accept non-CT modalities and values that are not HU.
    resample_gaps : bool
        Interpolate missing slices or uneven spacing instead of refusing them.
    n_series : int
        How many series the input held (recorded in ``meta["series_in_input"]``).
    progress : ProgressCallback, optional
        ``progress(done, total, message)`` while files are decoded.
    check_folders : bool
        Look for unreadable slices beside the series' files.

    Returns
    -------
    Volume
        float32 HU ``[z, y, x]`` with LPS geometry and ``meta``.
    """
    with quiet_readers():
        return _read_series(
            info,
            where=where,
            force=force,
            resample_gaps=resample_gaps,
            n_series=n_series,
            progress=progress,
            check_folders=check_folders,
        )


def _left_out_damaged(info: SeriesInfo, *, where: str, resample_gaps: bool, check_folders: bool):
    """The series without its damaged slices (only with ``resample_gaps``), and a warning or None."""
    damaged = damaged_files(info, check_folders=check_folders)
    if not damaged:
        return info, None
    path, why = damaged[0]
    more = f" ({len(damaged)} such files in all)" if len(damaged) > 1 else ""
    named = str(path) if str(path) == where else f"{where}: {path}"
    if len(info.files) == 1 or int(info.first.get("NumberOfFrames", 1) or 1) > 1:  # nothing to leave out
        raise UserError(f"{named}: {why}; the image cannot be read as it is")
    if not resample_gaps:
        raise UserError(
            f"{named}: {why}{more}; a slice that cannot be read is a missing slice; pass --resample-gaps "
            "to leave it out (and interpolate over it)"
        )
    bad = {f for f, _ in damaged}
    kept = [(f, h) for f, h in zip(info.files, info.headers) if f not in bad]
    if not kept:
        raise UserError(f"{where}: no readable slice in series {info.uid} ({path}: {why})")
    warning = f"left out {len(damaged)} unreadable file(s) of series {info.uid} (first: {path}: {why}) (--resample-gaps)"
    return SeriesInfo(info.uid, [f for f, _ in kept], [h for _, h in kept]), warning


def _read_series(
    info: SeriesInfo,
    *,
    where: str,
    force: bool,
    resample_gaps: bool,
    n_series: int,
    progress: ProgressCallback | None,
    check_folders: bool,
) -> Volume:
    first = info.first
    if info.modality != "CT" and not force:
        raise UserError(
            f"{where}: modality is {info.modality or 'missing'}, not CT "
            "(info and denoise read it anyway with --force)"
        )
    check_one_patient(info, where=where)
    check_series_memory(info, where=where)
    for path, header in zip(info.files, info.headers):
        check_rescale(header, path)
    info, left_out = _left_out_damaged(
        info, where=where, resample_gaps=resample_gaps, check_folders=check_folders
    )
    first = info.first
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(info, where=where, force=force, n_series=n_series)
    _check_hu_units(first, where=where, force=force)
    shapes = {(int(h.Rows), int(h.Columns)) for h in info.headers}
    if len(shapes) != 1:
        raise UserError(f"{where}: slices of the series have different sizes {sorted(shapes)}")
    default_step = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    geometry = stack_geometry(info.headers, where=where, default_step=default_step)
    resample = geometry.irregular.size > 0
    if resample and not resample_gaps:
        raise UserError(gap_message(geometry, info.headers, where=where))

    hu = _read_pixels(info.files, where=where, progress=progress)
    _apply_padding(hu, info.headers)
    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1, 1])]
    sx, sy = pixel_spacing[1], pixel_spacing[0]
    meta = _meta(first, info, n_series)
    if left_out:
        meta["warnings"].append(left_out)
    origin = geometry.positions[0].copy()
    if geometry.sheared:
        hu, lo = _shift_in_plane(hu, geometry, (sx, sy))
        origin = origin + lo[0] * sx * geometry.row + lo[1] * sy * geometry.col
        tilt = first.get("GantryDetectorTilt")
        told = f" (GantryDetectorTilt {float(tilt):g}°)" if tilt not in (None, "") else ""
        meta["warnings"].append(
            f"tilted stack: the slices step {geometry.tilt_degrees:.1f}° off their normal{told}; every slice was "
            f"shifted in its own plane onto a regular grid (up to {np.abs(geometry.in_plane).max():.1f} mm), "
            "so positions are true; the output covers the enlarged grid"
        )
    if resample:
        message = gap_message(geometry, info.headers, where=where).split(": ", 1)[1].split("; pass")[0]
        hu, _ = _resample_heights(hu, geometry.heights, geometry.step)
        meta["warnings"].append(f"{message}; interpolated onto an even grid (--resample-gaps)")
    direction = np.column_stack([geometry.row, geometry.col, geometry.normal]).ravel()
    if not (resample or geometry.sheared):  # slices are the files' own, one to one
        meta["dicom_files"] = [str(f) for f in info.files]
        meta["SOPInstanceUIDs"] = [str(h.get("SOPInstanceUID", "")) for h in info.headers]
    else:
        meta["dicom_series_files"] = [str(f) for f in info.files]
    return Volume(hu, (sx, sy, geometry.step), tuple(origin), direction, meta)


def read_dicom(
    path: str | os.PathLike,
    *,
    series: str | None = None,
    force: bool = False,
    resample_gaps: bool = False,
    progress: ProgressCallback | None = None,
) -> Volume:
    """Read the DICOM CT series in a file or folder; see the module docstring.

    Parameters
    ----------
    path : path-like
        A DICOM file or a folder (searched recursively).
    series : str, optional
        SeriesInstanceUID, or the 1-based number of the series in the list a refusal prints.
    force : bool
        Accept non-CT modalities and values that are not HU.
    resample_gaps : bool
        Interpolate missing slices / uneven spacing instead of refusing.
    progress : ProgressCallback, optional
        ``progress(done, total, message)`` while files are decoded.

    Returns
    -------
    Volume
        float32 HU ``[z, y, x]`` with LPS geometry and ``meta``.

    Raises
    ------
    UserError
        No DICOM image, no CT series (without ``force``), and every refusal of
        :func:`choose_series` and :func:`read_series`.
    """
    where = str(path)
    with quiet_readers():
        found = find_series(path)
    if not found:
        hint = " (hidden folders such as .venv are not searched)" if Path(path).is_dir() else ""
        skipped = _skipped_phrase(path, skipped_entries(path))
        raise UserError(
            f"{where}: no DICOM image found{hint}{skipped}; give a DICOM series folder, a DICOM file or an "
            "NRRD/NIfTI/MHA image"
        )
    candidates = found if force else [s for s in found if s.modality == "CT"]
    if not candidates:
        modalities = ", ".join(sorted({s.modality or "missing" for s in found}))
        raise UserError(
            f"{where}: no CT series (modality {modalities}); info and denoise read it anyway with --force"
        )
    info = choose_series(candidates, series, where=where)
    volume = read_series(
        info,
        where=where,
        force=force,
        resample_gaps=resample_gaps,
        n_series=len(found),
        progress=progress,
        check_folders=not Path(path).is_file(),
    )
    if len(found) > len(candidates):
        volume.meta["series_choice"] += (
            f" (the only CT series; {len(found) - len(candidates)} non-CT left out)"
        )
    return volume


__all__ = [
    "GAP_TOLERANCE",
    "PADDING_HU",
    "SeriesInfo",
    "StackGeometry",
    "check_one_patient",
    "check_rescale",
    "check_series_memory",
    "choose_series",
    "damaged_files",
    "declared_pixel_bytes",
    "find_series",
    "orientation_name",
    "pixel_data_problem",
    "quiet_readers",
    "read_dicom",
    "read_header",
    "read_series",
    "series_of_files",
    "skipped_entries",
    "stack_geometry",
    "unreadable_neighbours",
]
