"""Write a denoised volume as a *derived* DICOM CT series (pure pydicom, no Slicer).

With the source series' files the result stays in the same patient, study and frame of
reference (new Series and SOP Instance UIDs, ``ImageType = DERIVED\\SECONDARY\\AXIAL``,
``DerivationDescription``, ``DerivationCodeSequence`` and one ``SourceImageSequence`` item per
slice), so PACS viewers and Slicer's DICOM browser file it next to the original scan. Without
sources a self-contained new CT series is written (patient and study from
:class:`DerivedSeriesOptions`, else from the volume's meta, else generated). Every instance names the
software in ``ContributingEquipmentSequence`` (DCM 109103 "Modifying Equipment") and the model, its
version and its weights' sha256 in ``DerivationDescription`` (:class:`ModelProvenance`). Geometry (ImagePositionPatient per slice, ImageOrientationPatient,
PixelSpacing, SliceThickness) comes from the :class:`~IPv2DenoiseLib.core.volume.Volume`, and the
pixel data are int16 HU with RescaleSlope 1 / RescaleIntercept 0.

References
----------
DICOM PS3.3 A.3 (CT Image IOD), C.7.6.1 (General Image: derivation), PS3.16 CID 7203 (Image
Derivation: DCM 113087 "Smoothing") and CID 7202 (DCM 121322 "Source image for image processing
operation"), C.12.1.1.5 (Contributing Equipment; PS3.16 CID 7005, DCM 109103). Slicer uses
SeriesNumber >= 300 for derived series (Slicer PR #6877).
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.charset
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from IPv2DenoiseLib import __version__
from IPv2DenoiseLib.core.atomic import atomic_dir
from IPv2DenoiseLib.core.display import DISPLAY_PRESETS
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import ProgressCallback
from IPv2DenoiseLib.core.provenance import SOFTWARE_NAME, ModelProvenance
from IPv2DenoiseLib.core.volume import Volume

__all__ = [
    "DERIVATION_CODE",
    "MODIFYING_EQUIPMENT_CODE",
    "PURPOSE_CODE",
    "DerivedSeriesOptions",
    "ModelProvenance",
    "check_replaceable_series",
    "default_series_number",
    "export_derived_series",
    "slice_positions",
]

#: CID 7203 "Image Derivation": a denoiser smooths noise (there is no closer standard code).
DERIVATION_CODE = ("113087", "DCM", "Smoothing")
#: CID 7202 "Source Image Purpose of Reference".
PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")
#: CID 7005 "Contributing Equipment Purposes of Reference".
MODIFYING_EQUIPMENT_CODE = ("109103", "DCM", "Modifying Equipment")
MANUFACTURER = "IPv2 Denoise"


@dataclass(frozen=True)
class DerivedSeriesOptions:
    """What the caller decides about a derived series (everything else comes from the sources).

    ``series_number`` must be >= 300 (default: :func:`default_series_number`, which starts with 300 +
    the source's number modulo 100 and differs between runs).
    ``series_description`` always says "denoised" (appended when the given text does not).
    The patient and study fields apply only to a new series (no source files); unset ones come
    from the volume's meta or are generated.

    Attributes
    ----------
    model : ModelProvenance
        Which network made the pixels (written to DerivationDescription).
    series_number : int or None
        SeriesNumber, >= 300; None: :func:`default_series_number`.
    series_description : str or None
        SeriesDescription (at most 64 characters); None: the source's plus "IPv2 denoised (<model>)"
        (with ", strength S" after the model for a strength other than 1).
    patient_name, patient_id : str or None
        Patient of a new series.
    study_instance_uid, study_description, accession_number : str or None
        Study of a new series (a given StudyInstanceUID makes it a study of its own).
    warnings : tuple of str
        Warning lines about this scan, appended to DerivationDescription so that a reader of the
        derived series in the PACS sees them too.
    """

    model: ModelProvenance = ModelProvenance()
    series_number: int | None = None
    series_description: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    study_description: str | None = None
    accession_number: str | None = None
    #: Warning lines about this scan (``denoiser.applicability``, truncated field of view), appended
    #: to DerivationDescription so that a reader of the derived series in the PACS sees them too.
    warnings: tuple[str, ...] = ()


# Copied from the first source header: Patient, General Study, Patient Study, Frame of Reference.
_PATIENT_STUDY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
# Copied per slice: acquisition facts that still describe the derived image (CT Image module etc.).
_ACQUISITION = (
    "PatientPosition",
    "BodyPartExamined",
    "InstitutionName",
    "AcquisitionNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "Exposure",
    "ConvolutionKernel",
    "CTDIvol",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "FilterType",
    "FocalSpots",
    "ScanOptions",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "SliceThickness",
    # General Image: once a source was lossy compressed, every image made from it says so
    # (PS3.3 C.7.6.1.1.5: "once this value has been set to 01 it shall not be reset")
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    # the pixels are the source's, smoothed: any burned-in text is still there
    "BurnedInAnnotation",
)
#: The only source modality and rescale type a derived CT series in HU may be made from.
_CT_MODALITY, _HU_RESCALE = "CT", "HU"
_HU_MIN, _HU_MAX = -32768, 32767


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _axes(volume: Volume) -> np.ndarray:
    """3x3 matrix whose columns are the LPS unit vectors of the x, y, z array axes."""
    return np.asarray(volume.direction, dtype=float).reshape(3, 3)


def slice_positions(volume: Volume) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of every z slice, shape (nz, 3).

    Parameters
    ----------
    volume : Volume
        The volume (origin, spacing and direction used).

    Returns
    -------
    numpy.ndarray
        (nz, 3) positions, float, LPS mm.
    """
    axes = _axes(volume)
    k = np.arange(volume.shape[0], dtype=float)
    return np.asarray(volume.origin, dtype=float)[None, :] + np.outer(k * volume.spacing[2], axes[:, 2])


def _fmt(values: Sequence[float]) -> list[str]:
    """DS strings (at most 16 characters) with as many significant digits as fit."""
    out = []
    for v in values:
        v = 0.0 if abs(float(v)) < 1e-12 else float(v)
        for digits in range(12, 4, -1):
            s = f"{v:.{digits}g}"
            if len(s) <= 16:
                break
        out.append(s)
    return out


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _read_sources(source_files: Sequence[str | os.PathLike], nz: int) -> list[Dataset]:
    """One source header per slice: the files' own, or, for one enhanced (multi-frame) file of
    ``nz`` frames, that header once per frame (each slice then references its frame)."""
    headers = []
    for path in source_files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise UserError(f"source_files: cannot read {path!s} as DICOM ({exc})") from None
    for path, header in zip(source_files, headers):
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not str(header.get(keyword, "") or "").strip():
                raise UserError(
                    f"source_files: {path!s} has no {keyword}; a derived slice could not reference it"
                )
    if len(headers) == 1 and nz > 1 and int(headers[0].get("NumberOfFrames", 1) or 1) == nz:
        return headers * nz
    if len(headers) != nz:
        raise UserError(
            f"source_files: got {len(source_files)} files for a volume of {nz} slices; "
            "pass exactly one source DICOM file per slice, sorted like the volume's z axis"
        )
    return headers


def _check_source_geometry(headers: list[Dataset], positions: np.ndarray, spacing_z: float) -> None:
    """Refuse sources whose slice positions disagree with the volume (wrong order or series)."""
    for k, (hdr, pos) in enumerate(zip(headers, positions)):
        ipp = getattr(hdr, "ImagePositionPatient", None)
        if ipp is None:
            continue
        if np.linalg.norm(np.asarray(ipp, dtype=float) - pos) > max(0.5 * spacing_z, 0.1):
            raise UserError(
                f"source_files: slice {k} is at {list(map(float, ipp))} mm but the volume puts it at "
                f"{pos.round(3).tolist()} mm; pass the volume's own source series, z-sorted"
            )


def _new_patient_study(ds: Dataset, volume: Volume, options: DerivedSeriesOptions) -> None:
    """Patient and study of a new series: options, else the volume's meta (same study), else generated."""
    meta = volume.meta
    study_uid = options.study_instance_uid or meta.get("StudyInstanceUID")
    same_study = bool(study_uid) and not options.study_instance_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = options.patient_name or (same_study and meta.get("PatientName")) or "Anonymous^IPv2"
    ds.PatientID = (
        options.patient_id or (same_study and meta.get("PatientID")) or "IPV2-" + generate_uid()[-8:]
    )
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.FrameOfReferenceUID = (same_study and meta.get("FrameOfReferenceUID")) or generate_uid()
    ds.StudyDate, ds.StudyTime = _now()
    ds.StudyID = "1"
    description = options.study_description or (same_study and meta.get("StudyDescription"))
    if description:
        ds.StudyDescription = str(description)[:64]
    if options.accession_number:
        ds.AccessionNumber = options.accession_number[:16]


def _contributing_equipment(description: str) -> DicomSequence:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(MODIFYING_EQUIPMENT_CODE)])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = SOFTWARE_NAME
    item.SoftwareVersions = __version__
    item.ContributionDateTime = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = description[:1024]
    return DicomSequence([item])


def _base_dataset(
    volume: Volume,
    template: Dataset | None,
    *,
    options: DerivedSeriesOptions,
    series_uid: str,
    series_number: int,
    series_description: str,
) -> Dataset:
    """The attributes every slice of the derived series shares: patient, study, series, equipment,
    derivation, geometry and pixel description."""
    ds = Dataset()
    date, time = _now()
    derivation = options.model.describe()
    if options.warnings:
        derivation += ". Warning: " + "; ".join(options.warnings)
    _set_patient_study(ds, volume, template, options)

    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:_LO_MAX]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = SOFTWARE_NAME
    ds.SoftwareVersions = __version__
    ds.ContributingEquipmentSequence = _contributing_equipment(derivation)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = derivation[:1024]
    ds.DerivationCodeSequence = DicomSequence([_code_item(DERIVATION_CODE)])
    if "KVP" not in ds:
        ds.KVP = ""
    if "AcquisitionNumber" not in ds:
        ds.AcquisitionNumber = ""
    if "PatientPosition" not in ds:
        ds.PatientPosition = ""
    if template is None:
        # A new series of a lung CT denoiser is a chest scan; naming the (unpaired) body part is what
        # lets Laterality (Type 2C, paired body parts only) be absent rather than empty.
        ds.BodyPartExamined = "CHEST"
        ds.BurnedInAnnotation = "NO"  # made from a volume file: no text in its pixels
    else:
        # a source series whose slices are not ours one to one (gaps resampled, a tilted stack
        # de-sheared) still gives its acquisition facts; the per-slice copy overwrites them
        _set_acquisition(ds, template)
    _set_image_geometry_and_pixels(ds, volume)
    if template is not None:
        _open_in_the_sources_window(ds, template)
    _declare_text_encoding(ds)
    return ds


def _declare_text_encoding(ds: Dataset) -> None:
    """Switch the derived series to UTF-8 (``ISO_IR 192``) when its own text (the warnings in
    DerivationDescription, the series description) has characters the source's character set lacks.

    Without it pydicom writes ``?`` for them (an en dash in a range, say). Every value copied from
    the source is held decoded, so re-encoding it as UTF-8 loses nothing.
    """
    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    if charset == "ISO_IR 192":
        return
    text = ds.DerivationDescription + ds.SeriesDescription
    codec = pydicom.charset.python_encoding.get(charset) if isinstance(charset, str) else None
    try:
        # the default repertoire and code extensions (ISO 2022): ASCII is what is safe to assume
        text.encode(codec if codec and charset != "ISO_IR 6" else "ascii")
    except (UnicodeEncodeError, LookupError):
        ds.SpecificCharacterSet = "ISO_IR 192"


def _set_patient_study(
    ds: Dataset, volume: Volume, template: Dataset | None, options: DerivedSeriesOptions
) -> None:
    """Patient, study and frame of reference: the source's (``template``), else new ones; the
    Type 2 attributes are present even when empty."""
    if template is not None:
        for kw in _PATIENT_STUDY:
            if kw in template:
                setattr(ds, kw, template.data_element(kw).value)
    else:
        _new_patient_study(ds, volume, options)
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "PositionReferenceIndicator",
    ):
        if kw not in ds:
            setattr(ds, kw, "")  # Type 2: present, may be empty
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = generate_uid()


def _set_image_geometry_and_pixels(ds: Dataset, volume: Volume) -> None:
    """Orientation, spacing, the 16-bit signed HU pixel description and the window presets."""
    axes = _axes(volume)
    ds.ImageOrientationPatient = _fmt(np.concatenate([axes[:, 0], axes[:, 1]]))
    sx, sy, sz = volume.spacing
    ds.PixelSpacing = _fmt([sy, sx])  # row spacing (between rows = y), then column spacing
    ds.SliceThickness = _fmt([sz])[0]
    if volume.shape[0] > 1:  # one slice has no spacing between slices: never invent one
        ds.SpacingBetweenSlices = _fmt([sz])[0]
    nz, ny, nx = volume.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter = [f"{w.level:g}" for w in DISPLAY_PRESETS.values()]
    ds.WindowWidth = [f"{w.width:g}" for w in DISPLAY_PRESETS.values()]
    ds.WindowCenterWidthExplanation = [name.upper() for name in DISPLAY_PRESETS]


def _open_in_the_sources_window(ds: Dataset, template: Dataset) -> None:
    """Put the source's first window (HU, as ours: the VOI LUT applies after the rescale) before the
    lung and mediastinal presets, so a head or abdomen opens as its source did, not in a lung window."""
    center, width = template.get("WindowCenter"), template.get("WindowWidth")
    first = [v[0] if isinstance(v, pydicom.multival.MultiValue) else v for v in (center, width)]
    try:
        level, span = (float(v) for v in first)
    except (TypeError, ValueError):  # absent, empty or not a number: our presets alone
        return
    if span <= 0 or any(
        float(c) == level and float(w) == span for c, w in zip(ds.WindowCenter, ds.WindowWidth)
    ):
        return
    explanation = template.get("WindowCenterWidthExplanation")
    if isinstance(explanation, pydicom.multival.MultiValue):
        explanation = explanation[0] if explanation else None
    ds.WindowCenter = _fmt([level]) + list(ds.WindowCenter)
    ds.WindowWidth = _fmt([span]) + list(ds.WindowWidth)
    ds.WindowCenterWidthExplanation = [str(explanation or "SOURCE")[:64]] + list(
        ds.WindowCenterWidthExplanation
    )


def default_series_number(template: Dataset | None, *, now: float | None = None) -> int:
    """A SeriesNumber for a new derived series that differs from those made earlier from the same source.

    ``(300 + source number mod 100) * 10**6 + (seconds since the epoch mod 10**6)``: it starts with
    the 3xx of a derived series of that source (Slicer's convention) and a PACS shows each run as its
    own series; two derivations of one source collide only when made in the same second (or exactly
    11.6 days apart to the second). The largest value, 399 999 999, fits DICOM's IS range.

    Parameters
    ----------
    template : pydicom.Dataset or None
        The first source header (its SeriesNumber); None for a new series.
    now : float, optional
        Seconds since the epoch; the current time when omitted.

    Returns
    -------
    int
        The SeriesNumber, 301 000 000 … 399 999 999.
    """
    base = int(getattr(template, "SeriesNumber", 0) or 0) if template is not None else 0
    prefix = 300 + (base % 100 if base > 0 else 1)
    seconds = int(time.time() if now is None else now)
    return prefix * 1_000_000 + seconds % 1_000_000


def check_replaceable_series(out_dir: str | os.PathLike) -> None:
    """Refuse to replace ``out_dir`` unless it holds a derived series this software wrote: ``*.dcm``
    files only, each a DERIVED image naming IPv2 Denoise as its modifying equipment, all of one series.

    ``--overwrite`` must never delete a folder of other things a user pointed at by mistake, least
    of all an original series (until 2026-12-07 any folder of ``*.dcm`` files was replaced: the
    scanner's own series named as OUT was deleted).

    Parameters
    ----------
    out_dir : path-like
        The existing output that ``--overwrite`` would replace.

    Raises
    ------
    UserError
        ``out_dir`` is not a folder, or holds anything but the ``*.dcm`` files of one series we
        derived.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(
            f"{out_dir} exists and is not a folder; --overwrite replaces only a DICOM series folder"
        )
    strangers = [p.name for p in out_dir.iterdir() if not (p.is_file() and p.suffix.lower() == ".dcm")]
    if strangers:
        raise UserError(
            f"{out_dir} holds {strangers[0]!r}, which is not a DICOM file of a series; --overwrite replaces "
            "only a folder of *.dcm files, choose another output"
        )
    series: set[str] = set()
    for path in sorted(out_dir.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file: not ours to delete
            raise UserError(
                f"{out_dir} holds {path.name!r}, which cannot be read as DICOM; --overwrite replaces only a "
                "series this software derived, choose another output"
            ) from None
        if not _derived_by_us(ds):
            raise UserError(
                f"{out_dir} holds {path.name!r}, which is not a series derived by {MANUFACTURER} (an original "
                "or another program's series is never deleted); --overwrite replaces only our own, choose "
                "another output"
            )
        series.add(str(ds.get("SeriesInstanceUID", "")))
    if len(series) > 1:
        raise UserError(
            f"{out_dir} holds {len(series)} series; --overwrite replaces only a folder of one derived series"
        )


def _derived_by_us(ds: Dataset) -> bool:
    """Whether ``ds`` is a DERIVED image whose Contributing Equipment names :data:`MANUFACTURER`."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    equipment = ds.get("ContributingEquipmentSequence") or []
    return (
        bool(image_type)
        and image_type[0] == "DERIVED"
        and any(str(item.get("Manufacturer", "")) == MANUFACTURER for item in equipment)
    )


def _check_series_folder(out_dir: Path, *, replace: bool) -> None:
    """``out_dir`` must be new or an empty folder; with ``replace``, an earlier series of ours."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not replace:
            raise UserError(
                f"out_dir: {out_dir} already exists and is not an empty folder; choose a new folder "
                "(or pass --overwrite to replace an earlier series)"
            )
        check_replaceable_series(out_dir)


def _checked_series_number(options: DerivedSeriesOptions, template: Dataset | None) -> int:
    """The asked SeriesNumber, else :func:`default_series_number`; refused below 300 or above IS's range."""
    series_number = options.series_number
    if series_number is None:
        series_number = default_series_number(template)
    if not 300 <= int(series_number) <= 2**31 - 1:
        raise UserError(f"series_number: got {series_number}; derived series use numbers >= 300")
    return int(series_number)


def _series_description(options: DerivedSeriesOptions, template: Dataset | None, volume: Volume) -> str:
    """The asked description (marked "(denoised)" if it does not say so), else the source's plus
    "IPv2 denoised (<model>)", or "IPv2 denoised (<model>, strength S)" for a strength other than 1
    (two series of one scan at two strengths must not look alike in a PACS list)."""
    series_description = options.series_description
    if not series_description:
        src = str(getattr(template, "SeriesDescription", "") or volume.meta.get("SeriesDescription") or "CT")
        strength = f", strength {options.model.strength:g}" if options.model.strength != 1.0 else ""
        return _with_suffix(src, f" IPv2 denoised ({options.model.name}{strength})")
    if "denoised" not in series_description.lower()[:_LO_MAX]:
        return _with_suffix(series_description, " (denoised)")
    return series_description[:_LO_MAX]


#: Longest LO value (SeriesDescription): 64 characters.
_LO_MAX = 64


def _with_suffix(text: str, suffix: str) -> str:
    """``text`` + ``suffix`` within :data:`_LO_MAX` characters, shortening ``text``, never the suffix:
    a long source description cut at 64 characters must not lose the mark that tells the derived
    series from the original in a PACS list."""
    suffix = suffix[:_LO_MAX]
    return text[: _LO_MAX - len(suffix)].rstrip() + suffix


def _set_from_source_slice(ds: Dataset, src: Dataset, frame: int | None = None) -> None:
    """Per slice of a DICOM source: its acquisition attributes, its laterality (Type 2C), its
    SliceLocation and a reference to the source image (to its ``frame``, 1-based, in a multi-frame
    source)."""
    _set_acquisition(ds, src)
    if frame is None and "SliceLocation" in src:
        # the same position as the source's slice, in the source's own convention (its sign and
        # origin are the scanner's: C.7.6.2.1.2), so viewers that link by it line the two up
        ds.SliceLocation = src.SliceLocation
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if frame is not None:
        ref.ReferencedFrameNumber = frame
    ref.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(PURPOSE_CODE)])
    ds.SourceImageSequence = DicomSequence([ref])


def _set_acquisition(ds: Dataset, src: Dataset) -> None:
    """The source's acquisition attributes that still describe the derived image, and its
    laterality (Type 2C)."""
    for kw in _ACQUISITION:
        if kw in src:
            setattr(ds, kw, src.data_element(kw).value)
    if str(src.get("Laterality", "") or "").strip():
        ds.Laterality = src.Laterality  # as the source says
    elif not str(src.get("BodyPartExamined", "") or "").strip():
        # Type 2C: required unless the body part is named and unpaired; with no body
        # part named it must be present, and empty is the only truthful value
        ds.Laterality = ""
    # else absent: a named body part and no laterality (an empty copy says nothing)


def slices_are_sources(volume: Volume, source_files: Sequence[str | os.PathLike]) -> bool:
    """Whether ``source_files`` are ``volume``'s slices one to one (count and positions), or one
    multi-frame file of as many frames; False for the files of a series the volume was resampled
    from (a viewer that regularised a tilted stack or filled a gap), which then give patient, study
    and acquisition but no per-slice reference (``series_files`` of :func:`export_derived_series`).

    Parameters
    ----------
    volume : Volume
        The volume to export.
    source_files : sequence of path-like
        The source series' files, in the volume's z order when they are its slices.

    Returns
    -------
    bool
        True when ``export_derived_series(volume, …, source_files=source_files)`` would reference them.

    Raises
    ------
    UserError
        A file that is not DICOM or has no SOP UIDs.
    """
    nz = volume.shape[0]
    if len(source_files) == 1 and nz > 1:
        header = _read_sources(source_files, 1)[0]
        return int(header.get("NumberOfFrames", 1) or 1) == nz
    if len(source_files) != nz:
        return False
    try:
        _check_source_geometry(_read_sources(source_files, nz), slice_positions(volume), volume.spacing[2])
    except UserError:
        return False
    return True


def _check_ct_in_hu(template: Dataset) -> None:
    """A derived series is written as a CT in HU: refuse a source that is not one (an MR, or a
    perfusion map read with ``--force``), which the PACS would otherwise show as a CT in HU."""
    modality = str(template.get("Modality", "") or "").strip().upper()
    rescale = str(template.get("RescaleType", "") or "").strip().upper()
    if modality != _CT_MODALITY or (rescale and rescale != _HU_RESCALE):
        what = f"modality {modality or 'none'}" + (f", rescale type {rescale}" if rescale else "")
        raise UserError(
            f"the source series is not a CT in Hounsfield units ({what}): a derived CT series in HU "
            "would misrepresent it in the PACS; write a volume file (.nrrd) instead of --dicom"
        )


def export_derived_series(
    volume: Volume,
    out_dir: str | os.PathLike,
    *,
    source_files: Sequence[str | os.PathLike] | None = None,
    series_files: Sequence[str | os.PathLike] | None = None,
    options: DerivedSeriesOptions | None = None,
    progress: ProgressCallback | None = None,
    replace: bool = False,
) -> list[Path]:
    """Write ``volume`` as a derived CT series, one file per z slice, atomically.

    Parameters
    ----------
    volume : Volume
        The denoised volume in HU (its geometry is written as is).
    out_dir : path
        Folder to create; must not exist yet or be empty. Files are first written to a hidden
        staging folder beside it that is renamed at the end, so no half-written series is left.
    source_files : list of paths, optional
        The source DICOM file of every slice, in the volume's z order (``read_volume`` puts them in
        ``meta["dicom_files"]``). When given, patient, study and frame of reference are copied from
        them and every slice references its source image; without them a new CT series is written.
    series_files : list of paths, optional
        Without ``source_files``: the files of the source series when its slices are not the
        volume's one to one (gaps resampled, a tilted stack put on a regular grid; ``read_volume``
        puts them in ``meta["dicom_series_files"]``). Patient, study, frame of reference and the
        acquisition facts come from the first; no slice references a source image.
    options : DerivedSeriesOptions, optional
        Model provenance, series number and description, and patient/study of a new series.
        Default description: the source's (or "CT") plus "IPv2 denoised (<model>)".
    progress : callable(done, total, message), optional
    replace : bool
        Replace an ``out_dir`` that holds an earlier series (``*.dcm`` files only, no folders);
        the old one stays in place until the new one is complete.

    Returns
    -------
    list of Path
        The written files, in slice order.

    Raises
    ------
    UserError
        Wrong number of source files, sources that do not match the geometry, a source that is
        not a CT in HU (read with ``--force``), a series number below 300, or an ``out_dir`` that
        already holds files.
    """
    out_dir = Path(out_dir)
    options = options or DerivedSeriesOptions()
    nz, ny, nx = volume.shape
    _check_series_folder(out_dir, replace=replace)
    if not np.all(np.isfinite(volume.array)):
        raise UserError("volume: contains NaN or infinite values; cannot write DICOM pixel data")
    positions = slice_positions(volume)
    headers = _read_sources(source_files, nz) if source_files is not None else None
    multiframe = source_files is not None and len(source_files) == 1 and nz > 1  # one enhanced file
    if headers is not None and not multiframe:  # a multi-frame file's positions are per frame, as read
        _check_source_geometry(headers, positions, volume.spacing[2])
    template = headers[0] if headers else None
    if template is None and series_files:
        template = _read_sources(series_files[:1], 1)[0]
    if template is not None:
        _check_ct_in_hu(template)

    series_number = _checked_series_number(options, template)
    base_ds = _base_dataset(
        volume,
        template,
        options=options,
        series_uid=generate_uid(),
        series_number=series_number,
        series_description=_series_description(options, template, volume),
    )

    names = [f"IM{k + 1:06d}.dcm" for k in range(nz)]
    hu = np.clip(np.rint(volume.array), _HU_MIN, _HU_MAX).astype(np.int16)
    normal = _axes(volume)[:, 2]
    with atomic_dir(
        out_dir, replace=replace
    ) as tmp:  # hidden staging folder with our pid; stale ones are cleaned
        for k in range(nz):
            ds = copy.deepcopy(base_ds)  # Dataset.copy() shares elements
            if headers is not None:
                _set_from_source_slice(ds, headers[k], frame=k + 1 if multiframe else None)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _fmt(positions[k])
            if "SliceLocation" not in ds:
                ds.SliceLocation = _fmt([float(positions[k] @ normal)])[0]
            ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
            ds["PixelData"].VR = "OW"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.save_as(tmp / names[k], enforce_file_format=True)
            if progress is not None:
                progress(k + 1, nz, "writing DICOM")
    return [out_dir / n for n in names]
