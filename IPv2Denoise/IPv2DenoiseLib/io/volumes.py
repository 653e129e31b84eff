"""Read and write CT volumes: DICOM series, NRRD, NIfTI, MHA/MHD — float32 HU ``[z, y, x]`` + geometry.

DICOM series are read by :mod:`IPv2DenoiseLib.io.dicom_series` (series choice, gaps, tilt);
NRRD, MetaImage and NIfTI headers are checked by :mod:`IPv2DenoiseLib.io.image_headers` (declared
size against memory and data, data file inside its folder) before SimpleITK allocates anything.

Geometry follows ITK/DICOM: spacing ``(x, y, z)`` mm, origin in LPS mm, direction cosines row-major.
Every reader validates that the data is a 3-D, single-channel CT in Hounsfield units (finite values,
some air below −500 HU) and raises :class:`~IPv2DenoiseLib.core.errors.UserError` with one line otherwise.
Writers go through a staging folder beside the destination and an atomic rename
(:func:`IPv2DenoiseLib.core.atomic.atomic_path`), so an interrupted write never leaves a half file
under the final name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import ProgressCallback
from IPv2DenoiseLib.core.simpleitk import sitk
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.dicom_series import quiet_readers, read_dicom, read_series, series_of_files
from IPv2DenoiseLib.io.image_headers import check_image_file

#: File name endings read and written through SimpleITK.
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: A CT in HU must have some voxels at least this dark (air) unless ``force`` is given.
AIR_HU = -500.0

#: Smallest in-plane size (pixels per side) of an image: a line or a point is not a CT slice. The
#: denoiser asks for more (:data:`IPv2DenoiseLib.denoiser.infer.MIN_SLICE_PX`).
MIN_SLICE_PX = 2


def image_suffix(path: str | os.PathLike) -> str:
    """The recognised image suffix of ``path`` ('' when none), ``.nii.gz`` treated as one suffix.

    Parameters
    ----------
    path : path-like
        A file name (need not exist).

    Returns
    -------
    str
        One of :data:`IMAGE_SUFFIXES` in lower case, or ``''``.
    """
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
    resample_gaps: bool = False,
    progress: ProgressCallback | None = None,
) -> Volume:
    """Read a CT volume in HU from a DICOM folder or file, NRRD, NIfTI or MHA/MHD.

    Parameters
    ----------
    path
        A folder holding a DICOM series (searched recursively, hidden folders skipped), one DICOM
        file, or an image file.
    series_uid
        With several series in a DICOM folder, the SeriesInstanceUID (or the number in the list
        the refusal prints) of the one to read; without it several series are refused.
    force
        Accept a non-CT DICOM modality, values that are not HU and volumes without air (skip the
        "is this a CT in HU" checks).
    resample_gaps
        Interpolate a DICOM series with missing slices or uneven spacing instead of refusing it.
    progress
        ``progress(done, total, message)`` while DICOM files are decoded.

    Returns
    -------
    Volume
        float32 HU ``[z, y, x]`` with spacing, origin, direction and ``meta`` (source, identifiers,
        kVp, mAs, CTDIvol when present; for DICOM also ``dicom_files`` in slice order when the
        slices are the files' own, and ``warnings`` about corrections made).

    Raises
    ------
    UserError
        Missing path, no DICOM in a folder, several series and none chosen, missing slices,
        unreadable or truncated file, not CT, not HU, 2-D, RGB, NaN/inf voxels, no air, slices
        smaller than :data:`MIN_SLICE_PX`.
    """
    p = Path(path)
    check_input_path(p)
    if image_suffix(p) and p.is_file():
        volume = _read_itk_image(p)
    else:
        volume = read_dicom(p, series=series_uid, force=force, resample_gaps=resample_gaps, progress=progress)
    validate_ct(volume, where=str(p), force=force)
    return volume


#: How the command line reads an image that fails the HU check anyway.
FORCE_HINT = "info and denoise read it anyway with --force"


def validate_ct(volume: Volume, *, where: str, force: bool, force_hint: str = FORCE_HINT) -> None:
    """Refuse, in one line, an image the denoiser cannot treat as a CT in Hounsfield units.

    Parameters
    ----------
    volume : Volume
        The image as read.
    where : str
        What to call it in the message (a path, or a Slicer node's name).
    force : bool
        Skip the Hounsfield-units check (``--force``).
    force_hint : str
        How this front end reads such an image anyway, or what to do instead.

    Raises
    ------
    UserError
        Empty, NaN/inf voxels, no voxel below air (not HU), or degenerate slices.
    """
    array = volume.array
    if array.size == 0:
        raise UserError(f"{where}: the image is empty")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise UserError(f"{where}: {bad} voxels are NaN or infinite; a CT volume must be finite HU values")
    if not force and float(array.min()) > AIR_HU:
        raise UserError(
            f"{where}: no voxel below {AIR_HU:g} HU (minimum {float(array.min()):.0f}); this does not look like "
            f"a CT in Hounsfield units ({force_hint})"
        )
    nz, ny, nx = array.shape
    if min(ny, nx) < MIN_SLICE_PX:
        raise UserError(
            f"{where}: slices of {nx} x {ny} pixels (x, y; {nz} slices) are degenerate; a CT slice has at "
            f"least {MIN_SLICE_PX} pixels per side"
        )


def check_input_path(path: Path) -> None:
    """Refuse, in one line, an input that does not exist, loops, or cannot be opened.

    Parameters
    ----------
    path : pathlib.Path
        The input file or folder a user gave.

    Raises
    ------
    UserError
        Missing path, a symbolic link loop, a broken link, or no permission to read it (or, for a
        folder, to enter it).
    """
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"{path}: a symbolic link loop (the link points back to itself); give the real file"
            ) from None
        if path.is_symlink():
            raise UserError(f"{path}: a broken symbolic link (to {os.readlink(path)})") from None
        if exc.errno == errno.EACCES:
            raise UserError(f"{path}: permission denied") from None
        raise UserError(f"input not found: {path}") from None
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise UserError(f"{path}: permission denied; the input must be readable")


#: ITK's message parts that name its own build tree or objects rather than the file.
_ITK_NOISE = re.compile(
    r"(\S*/(?:src|Code|Modules|ITK)/\S*|itk::ERROR:\s*|\w+ImageIO\(0x[0-9a-f]+\):\s*|\(0x[0-9a-f]+\))"
)


def itk_failure(exc: RuntimeError) -> str:
    """What ITK's exception says about the file, without its source paths and object addresses.

    Parameters
    ----------
    exc : RuntimeError
        The exception SimpleITK raised.

    Returns
    -------
    str
        At most 200 characters, for a one-line user error.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    wanted = [
        ln for ln in lines if "Exception thrown in SimpleITK" not in ln and not ln.startswith("sitk::ERROR")
    ]
    text = " ".join(_ITK_NOISE.sub("", ln) for ln in (wanted or lines)).strip(" :")
    return text[:200] or "not an image ITK can read"


def _read_itk_image(path: Path) -> Volume:
    check_image_file(path)  # declared size vs memory and data, data file inside its folder
    try:
        with quiet_readers():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable {image_suffix(path)} volume ({itk_failure(exc)})") from None
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
        raise UserError(f"{path}: cannot read its voxel data ({itk_failure(exc)})") from None
    meta: dict[str, Any] = {"source": image_suffix(path).lstrip("."), "path": str(path)}
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), meta)


#: File endings that are never DICOM (skipped without opening them).
NOT_DICOM_SUFFIXES = frozenset({".json", ".txt", ".png", ".jpg", ".csv", ".md", ".py", ".raw", ".zraw"})


def may_be_dicom(path: str | os.PathLike) -> bool:
    """True when ``path`` is worth opening as DICOM: not hidden, not an image volume, not a known other type.

    Parameters
    ----------
    path : path-like
        A file name (not opened).

    Returns
    -------
    bool
        False for hidden files, image volumes and :data:`NOT_DICOM_SUFFIXES`.
    """
    p = Path(path)
    return not p.name.startswith(".") and not image_suffix(p) and p.suffix.lower() not in NOT_DICOM_SUFFIXES


def group_dicom_series(files: Iterable[str | os.PathLike]) -> dict[str, list[Path]]:
    """DICOM image files grouped by SeriesInstanceUID (headers only; other files are left out).

    Used to find every series of an archive; read one with :func:`read_dicom_series`.

    Parameters
    ----------
    files : iterable of path-like
        Candidate files (non-DICOM ones are skipped).

    Returns
    -------
    dict of str to list of pathlib.Path
        The files of each series by SeriesInstanceUID.
    """
    return {info.uid: info.files for info in series_of_files(Path(f) for f in files)}


def read_dicom_series(
    files: Iterable[str | os.PathLike], *, force: bool = False, resample_gaps: bool = False
) -> Volume:
    """Read exactly these DICOM files as one CT series in HU (checked like :func:`read_volume`).

    Parameters
    ----------
    files : iterable of path-like
        The files of one series (e.g. a value of :func:`group_dicom_series`).
    force : bool
        Skip the "is this a CT in HU" checks, as ``--force``.
    resample_gaps : bool
        Interpolate missing slices or uneven spacing instead of refusing them.

    Returns
    -------
    Volume
        float32 HU ``[z, y, x]`` with geometry and metadata, as :func:`read_volume`.

    Raises
    ------
    UserError
        No files, no DICOM image among them, several series, not CT, missing slices, undecodable
        pixels, no air.
    """
    paths = sorted(Path(f) for f in files)
    if not paths:
        raise UserError("no DICOM files given")
    where = os.path.commonpath([str(p.parent) for p in paths])
    with quiet_readers():
        found = series_of_files(paths)
    if not found:
        raise UserError(f"{where}: no DICOM image found among {len(paths)} files")
    if len(found) > 1:
        raise UserError(f"{where}: the files hold {len(found)} series; expected one")
    volume = read_series(found[0], where=where, force=force, resample_gaps=resample_gaps)
    validate_ct(volume, where=where, force=force)
    return volume


# --------------------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: str | os.PathLike, *, dtype: np.dtype | type | None = None) -> Path:
    """Write ``volume`` to NRRD/NIfTI/MHA with its geometry, atomically (temp file + rename).

    ``dtype`` stores the voxels as another type (e.g. ``np.int16`` for compact HU, rounded and
    clipped to the type's range); the default keeps float32. Compressed where the format allows.

    Parameters
    ----------
    volume : Volume
        The volume (HU, geometry in mm, LPS).
    path : path-like
        Output file ending in ``.nrrd``, ``.nii``, ``.nii.gz`` or ``.mha``; its folder must exist.
    dtype : numpy dtype, optional
        Voxel type on disk; float32 when omitted.

    Returns
    -------
    pathlib.Path
        ``path``, complete.

    Raises
    ------
    UserError
        Unsupported suffix, missing output folder, a full disk or a failing writer.
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
        try:
            sitk.WriteImage(image, tmp, useCompression=suffix != ".nii")
        except RuntimeError:  # ITK's message is a build path and a stack of nrrd lines: say what failed
            free = shutil.disk_usage(Path(tmp).parent).free
            if free < array.nbytes:
                raise UserError(
                    f"cannot write {out}: No space left on device ({free / 1e6:.1f} MB free, "
                    f"up to {array.nbytes / 1e6:.1f} MB needed); free some space or choose another disk"
                ) from None
            raise UserError(f"cannot write {out}: the image writer failed (is the disk healthy?)") from None
    return out


def write_mask(mask: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write a boolean/label mask as uint8 with the geometry of ``like``.

    Parameters
    ----------
    mask : ndarray, [z, y, x]
        The mask or label map (values 0–255).
    like : Volume
        The volume whose geometry (spacing, origin, direction) the mask takes.
    path : path-like
        Output file, as :func:`write_volume`.

    Returns
    -------
    pathlib.Path
        ``path``, complete.

    Raises
    ------
    UserError
        ``mask`` and ``like`` differ in shape, or the write fails (see :func:`write_volume`).
    """
    mask = np.asarray(mask)
    if mask.shape != like.shape:
        raise UserError(f"mask shape {mask.shape} does not match the volume's {like.shape}")
    labels = Volume(mask.astype(np.float32), like.spacing, like.origin, like.direction)
    return write_volume(labels, path, dtype=np.uint8)
