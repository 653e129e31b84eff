"""Read and write CT volumes: DICOM series, NRRD, NIfTI, MHA/MHD — float32 HU ``[z, y, x]`` + geometry.

Geometry follows ITK/DICOM: spacing ``(x, y, z)`` mm, origin in LPS mm, direction cosines row-major.
Every reader validates that the data is a 3-D, single-channel CT in Hounsfield units (finite values,
some air below −500 HU) and raises :class:`~IPv2DenoiseLib.core.errors.UserError` with one line otherwise.
Writers go through a temporary file in the destination folder and an atomic rename, so an
interrupted write never leaves a half file under the final name.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume

#: File name endings read and written through SimpleITK.
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: A CT in HU must have some voxels at least this dark (air) unless ``force`` is given.
AIR_HU = -500.0

_DICOM_META = {
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


def _number_or_text(value: Any) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def image_suffix(path: str | os.PathLike) -> str:
    """The recognised image suffix of ``path`` ('' when none), ``.nii.gz`` treated as one suffix."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


# --------------------------------------------------------------------------------------- reading


def read_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    force: bool = False,
) -> Volume:
    """Read a CT volume in HU from a DICOM folder or file, NRRD, NIfTI or MHA/MHD.

    Parameters
    ----------
    path
        A folder holding a DICOM series (searched recursively), one DICOM file, or an image file.
    series_uid
        With several series in a DICOM folder, the SeriesInstanceUID to read. Without it the CT
        series with the most slices is read and ``meta["series_choice"]`` says which and why.
    force
        Accept a non-CT DICOM modality and volumes without air (skip the "is this a CT in HU" checks).

    Returns
    -------
    Volume
        float32 HU ``[z, y, x]`` with spacing, origin, direction and ``meta`` (source, identifiers,
        kVp, mAs, CTDIvol when present; for DICOM also ``dicom_files`` in slice order).

    Raises
    ------
    UserError
        Missing path, no DICOM in a folder, unreadable or truncated file, not CT, 2-D, RGB, NaN/inf
        voxels, no air.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"input not found: {p}")
    if p.is_dir():
        volume = _read_dicom_folder(p, series_uid=series_uid, force=force)
    elif image_suffix(p):
        volume = _read_itk_image(p)
    else:
        volume = _read_dicom_files([p], series_uid=series_uid, force=force, where=str(p))
    _validate_ct(volume, where=str(p), force=force)
    return volume


def _validate_ct(volume: Volume, *, where: str, force: bool) -> None:
    array = volume.array
    if array.size == 0:
        raise UserError(f"{where}: the image is empty")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise UserError(f"{where}: {bad} voxels are NaN or infinite; a CT volume must be finite HU values")
    if not force and float(array.min()) > AIR_HU:
        raise UserError(
            f"{where}: no voxel below {AIR_HU:g} HU (minimum {float(array.min()):.0f}); this does not look like "
            "a CT in Hounsfield units (use --force (force=True) to read it anyway)"
        )


def _read_itk_image(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise UserError(f"{path}: cannot read image ({first.strip()[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(
            f"{path}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); "
            "a CT volume has one"
        )
    if image.GetDimension() != 3:
        raise UserError(f"{path}: image is {image.GetDimension()}-D; a CT volume must be 3-D")
    try:
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    except RuntimeError as exc:  # truncated data is sometimes only noticed here
        raise UserError(f"{path}: cannot read voxel data ({str(exc).splitlines()[0][:160]})") from None
    meta: dict[str, Any] = {"source": image_suffix(path).lstrip("."), "path": str(path)}
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), meta)


#: File endings that are never DICOM (skipped without opening them).
NOT_DICOM_SUFFIXES = frozenset({".json", ".txt", ".png", ".jpg", ".csv", ".md", ".py", ".raw", ".zraw"})


def may_be_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` is worth opening as DICOM: not hidden, not an image volume, not a known other type."""
    p = Path(path)
    return not p.name.startswith(".") and not image_suffix(p) and p.suffix.lower() not in NOT_DICOM_SUFFIXES


def _dicom_candidates(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and may_be_dicom(f)]


def _read_dicom_folder(folder: Path, *, series_uid: str | None, force: bool) -> Volume:
    files = _dicom_candidates(folder)
    if not files:
        raise UserError(f"{folder}: folder holds no DICOM files")
    return _read_dicom_files(files, series_uid=series_uid, force=force, where=str(folder))


def group_dicom_series(files: Iterable[str | os.PathLike]) -> dict[str, list[Path]]:
    """DICOM image files grouped by SeriesInstanceUID (headers only; other files are left out).

    Used to find every series of an archive; read one with :func:`read_dicom_series`.
    """
    series: dict[str, list[Path]] = defaultdict(list)
    for f, ds in _read_headers(Path(f) for f in files):
        if "Rows" in ds:
            series[str(ds.get("SeriesInstanceUID", "unknown"))].append(f)
    return dict(series)


def read_dicom_series(files: Iterable[str | os.PathLike], *, force: bool = False) -> Volume:
    """Read exactly these DICOM files as one CT series in HU (checked like :func:`read_volume`).

    Raises
    ------
    UserError
        No files, no DICOM image among them, several series, not CT, undecodable pixels, no air.
    """
    paths = sorted(Path(f) for f in files)
    if not paths:
        raise UserError("no DICOM files given")
    where = os.path.commonpath([str(p.parent) for p in paths])
    volume = _read_dicom_files(paths, series_uid=None, force=force, where=where)
    if volume.meta.get("series_in_input", 1) > 1:
        raise UserError(f"{where}: the files hold {volume.meta['series_in_input']} series; expected one")
    _validate_ct(volume, where=where, force=force)
    return volume


def _read_headers(files: Iterable[Path]):
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
            continue
        if "SOPClassUID" in ds or "ImagePositionPatient" in ds or "Rows" in ds:
            yield f, ds


def _read_dicom_files(files: list[Path], *, series_uid: str | None, force: bool, where: str) -> Volume:
    series: dict[str, list] = defaultdict(list)
    for f, ds in _read_headers(files):
        if "Rows" not in ds:
            continue
        series[str(ds.get("SeriesInstanceUID", "unknown"))].append((f, ds))
    if not series:
        raise UserError(f"{where}: no DICOM image found (not a DICOM file or folder)")

    if series_uid is not None:
        if series_uid not in series:
            raise UserError(
                f"{where}: no series with SeriesInstanceUID {series_uid}; found {', '.join(series)}"
            )
        chosen, choice = series_uid, f"series {series_uid} as requested"
    else:
        modalities = {uid: str(members[0][1].get("Modality", "")) for uid, members in series.items()}
        ct = [uid for uid, m in modalities.items() if m == "CT"]
        pool = ct or (list(series) if force else [])
        if not pool:
            found = ", ".join(sorted(set(modalities.values()))) or "unknown"
            raise UserError(
                f"{where}: no CT series (modality {found}); use --force (force=True) to read a non-CT image anyway"
            )
        chosen = max(pool, key=lambda uid: len(series[uid]))
        choice = (
            f"series {chosen} ({len(series[chosen])} slices), the largest of {len(pool)} CT series"
            if len(pool) > 1
            else f"series {chosen} ({len(series[chosen])} slices)"
        )
    members = series[chosen]
    modality = str(members[0][1].get("Modality", ""))
    if modality != "CT" and not force:
        raise UserError(
            f"{where}: modality is {modality or 'missing'}, not CT; use --force (force=True) to read it anyway"
        )
    return _assemble_series(members, where=where, choice=choice, n_series=len(series))


def _assemble_series(members: list, *, where: str, choice: str, n_series: int) -> Volume:
    first = members[0][1]
    if int(first.get("SamplesPerPixel", 1)) != 1:
        raise UserError(
            f"{where}: DICOM image has {first.SamplesPerPixel} samples per pixel (RGB); CT has one"
        )
    orientation = np.array([float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)

    def position(ds) -> np.ndarray:
        return np.array([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])

    members = sorted(
        members, key=lambda m: (float(position(m[1]) @ normal), int(m[1].get("InstanceNumber", 0) or 0))
    )
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in members}
    if len(shapes) != 1:
        raise UserError(f"{where}: slices of the series have different sizes {sorted(shapes)}")

    slices = []
    for f, _ in members:
        ds = pydicom.dcmread(f)
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # compressed without a decoder, truncated pixel data, ...
            raise UserError(
                f"{f}: cannot decode pixel data ({type(exc).__name__}: {str(exc)[:120]})"
            ) from None
        if pixels.ndim != 2:
            raise UserError(f"{f}: pixel data has shape {pixels.shape}; expected one 2-D grey slice per file")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = pixels.astype(np.float32) * slope + intercept
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            hu[pixels == padding] = -1024.0  # padding outside the scan field of view is air
        slices.append(hu)
    array = np.stack(slices)

    positions = np.array([position(ds) for _, ds in members])
    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1, 1])]
    if len(members) > 1:
        steps = np.diff(positions @ normal)
        z_spacing = float(np.median(steps))
        if z_spacing <= 0:
            raise UserError(f"{where}: slices share the same position; cannot build a volume")
    else:
        z_spacing = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    # ITK direction: columns are the x (along a row), y (down a column) and z axes.
    direction = np.column_stack([row, col, normal]).ravel()
    meta: dict[str, Any] = {"source": "dicom", "series_choice": choice, "series_in_input": n_series}
    for key, keyword in _DICOM_META.items():
        if keyword in first and first.get(keyword) not in (None, ""):
            value = first.get(keyword)
            meta[key] = _number_or_text(value) if key in _NUMERIC_META else str(value)
    meta["Modality"] = str(first.get("Modality", ""))
    meta["dicom_files"] = [str(f) for f, _ in members]
    meta["SOPInstanceUIDs"] = [str(ds.get("SOPInstanceUID", "")) for _, ds in members]
    return Volume(
        array, (pixel_spacing[1], pixel_spacing[0], z_spacing), tuple(positions[0]), direction, meta
    )


# --------------------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: str | os.PathLike, *, dtype: np.dtype | type | None = None) -> Path:
    """Write ``volume`` to NRRD/NIfTI/MHA with its geometry, atomically (temp file + rename).

    ``dtype`` stores the voxels as another type (e.g. ``np.int16`` for compact HU, rounded and
    clipped to the type's range); the default keeps float32. Compressed where the format allows.
    """
    out = Path(path)
    suffix = image_suffix(out)
    if suffix not in {".nrrd", ".nii", ".nii.gz", ".mha"}:
        raise UserError(f"{out}: unsupported output format; use .nrrd, .nii, .nii.gz or .mha")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: output folder does not exist")
    array = volume.array
    if dtype is not None and np.dtype(dtype) != array.dtype:
        target = np.dtype(dtype)
        if np.issubdtype(target, np.integer):
            info = np.iinfo(target)
            array = np.clip(np.rint(array), info.min, info.max)
        array = array.astype(target)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    with atomic_path(out, suffix=suffix) as tmp:
        sitk.WriteImage(image, tmp, useCompression=suffix != ".nii")
    return out


def write_mask(mask: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write a boolean/label mask as uint8 with the geometry of ``like``."""
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise UserError(f"mask shape {mask.shape} does not match the volume's {like.shape}")
    labels = Volume(mask.astype(np.float32), like.spacing, like.origin, like.direction)
    return write_volume(labels, path, dtype=np.uint8)
