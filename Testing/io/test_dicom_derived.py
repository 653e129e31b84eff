"""Derived series provenance: Contributing Equipment, model/version/sha256, series options, dciodvfy."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from conftest import require_dciodvfy, write_ct_series

import IPv2DenoiseLib
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.dicom_export import (
    MODIFYING_EQUIPMENT_CODE,
    DerivedSeriesOptions,
    ModelProvenance,
    default_series_number,
    export_derived_series,
)
from IPv2DenoiseLib.io.volumes import read_volume

SHA = "ab" * 32
MODEL = ModelProvenance("unet-ipv2", version="0.1.0", sha256=SHA, strategy="ipv2")


@pytest.fixture()
def source(tmp_path):
    """A real 3-slice CT series (CT_small.dcm) read back as a Volume with its files."""
    write_ct_series(tmp_path / "src", 3, series_number=4)
    return read_volume(tmp_path / "src")


def test_provenance_in_every_instance(source, tmp_path) -> None:
    options = DerivedSeriesOptions(model=MODEL, series_number=412, series_description="Lung 1mm")
    files = export_derived_series(
        source, tmp_path / "out", source_files=source.meta["dicom_files"], options=options
    )
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SeriesNumber == 412
        assert ds.SeriesDescription == "Lung 1mm (denoised)"
        for text in ("unet-ipv2", "version 0.1.0", SHA, "ipv2"):
            assert text in ds.DerivationDescription
        (equipment,) = ds.ContributingEquipmentSequence
        code = equipment.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == MODIFYING_EQUIPMENT_CODE
        assert equipment.Manufacturer == "IPv2 Denoise"
        assert equipment.ManufacturerModelName == "ipv2-denoise"
        assert equipment.SoftwareVersions == IPv2DenoiseLib.__version__
        assert ds.Laterality == ""  # the source names no body part: Type 2C needs it, and empty is true


def test_default_description_says_denoised_and_names_the_model(source, tmp_path) -> None:
    files = export_derived_series(
        source,
        tmp_path / "out",
        source_files=source.meta["dicom_files"],
        options=DerivedSeriesOptions(model=MODEL),
    )
    ds = pydicom.dcmread(files[0])
    assert "denoised" in ds.SeriesDescription and "unet-ipv2" in ds.SeriesDescription
    assert str(ds.SeriesNumber).startswith("304") and len(str(ds.SeriesNumber)) == 9  # 300 + the source's 4


def test_default_series_numbers_differ_between_runs_from_one_source(source) -> None:
    template = pydicom.dcmread(source.meta["dicom_files"][0])
    first, later = default_series_number(template, now=1_000), default_series_number(template, now=1_001)
    assert first != later and str(first).startswith("304") and str(later).startswith("304")
    assert default_series_number(template, now=2**40) <= 2**31 - 1  # DICOM IS range


def test_laterality_is_copied_never_empty_when_the_body_part_is_named(tmp_path) -> None:
    paths = write_ct_series(tmp_path / "chest", 2, series_number=5)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined, ds.Laterality = "CHEST", ""  # an empty Laterality in the source
        ds.save_as(path)
    chest = read_volume(tmp_path / "chest")
    (first, _) = export_derived_series(chest, tmp_path / "out", source_files=chest.meta["dicom_files"])
    assert "Laterality" not in pydicom.dcmread(first)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined, ds.Laterality = "BREAST", "L"
        ds.save_as(path)
    breast = read_volume(tmp_path / "chest")
    (first, _) = export_derived_series(breast, tmp_path / "out2", source_files=breast.meta["dicom_files"])
    assert pydicom.dcmread(first).Laterality == "L"


def test_one_slice_has_no_invented_spacing_between_slices(tmp_path) -> None:
    hu = np.full((1, 16, 16), -1000.0, dtype=np.float32)
    (path,) = export_derived_series(Volume(hu, spacing=(0.7, 0.7, 1.0)), tmp_path / "one")
    ds = pydicom.dcmread(path)
    assert "SpacingBetweenSlices" not in ds and float(ds.SliceThickness) == 1.0
    two = export_derived_series(Volume(np.repeat(hu, 2, axis=0), spacing=(0.7, 0.7, 1.0)), tmp_path / "two")
    assert float(pydicom.dcmread(two[0]).SpacingBetweenSlices) == 1.0


def test_new_series_takes_patient_and_study_from_options(tmp_path) -> None:
    hu = np.full((2, 16, 16), -1000.0, dtype=np.float32)
    options = DerivedSeriesOptions(
        model=MODEL,
        patient_name="Doe^Jane",
        patient_id="P123",
        study_instance_uid="1.2.3.4.5",
        study_description="Low-dose chest",
    )
    files = export_derived_series(Volume(hu, spacing=(0.7, 0.7, 2.0)), tmp_path / "new", options=options)
    out = [pydicom.dcmread(f) for f in files]
    assert {(str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID) for ds in out} == {
        ("Doe^Jane", "P123", "1.2.3.4.5")
    }
    assert out[0].StudyDescription == "Low-dose chest" and out[0].StudyID
    generated = pydicom.dcmread(export_derived_series(Volume(hu), tmp_path / "gen")[0])
    assert generated.PatientID.startswith("IPV2-") and generated.StudyInstanceUID != "1.2.3.4.5"


def _dciodvfy_warnings(path) -> set[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)
    return {line for line in lines if line.startswith("Warning")}


def test_dciodvfy_no_error_and_no_warning_of_our_own(source, tmp_path) -> None:
    """Derived: only the source's own warnings (e.g. its zero PatientWeight); new series: none."""
    require_dciodvfy()
    derived = export_derived_series(
        source,
        tmp_path / "derived",
        source_files=source.meta["dicom_files"],
        options=DerivedSeriesOptions(model=MODEL),
    )
    own = _dciodvfy_warnings(derived[0]) - _dciodvfy_warnings(source.meta["dicom_files"][0])
    assert not own, own
    new = export_derived_series(source.with_array(source.array), tmp_path / "new")
    assert not _dciodvfy_warnings(new[0])
    assert "Laterality" not in pydicom.dcmread(new[0])  # BodyPartExamined CHEST is unpaired


def test_an_enhanced_multiframe_source_gives_one_slice_per_frame_referencing_it(tmp_path) -> None:
    """``--dicom`` of an enhanced (multi-frame) CT: one classic CT slice per frame, at the frame's
    position, each referencing its frame of the source. (Before, the export failed after the work:
    "got 1 files for a volume of 2 slices".)"""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")  # 2 frames; a perfusion map, hence force
    volume = read_volume(path, force=True)
    files = export_derived_series(volume, tmp_path / "derived", source_files=volume.meta["dicom_files"])
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert len(files) == 2
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID and ref.ReferencedFrameNumber == k + 1
        frame = source.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0]
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], frame.ImagePositionPatient, atol=0.1
        )
        assert (
            ds.StudyInstanceUID == source.StudyInstanceUID
            and ds.SeriesInstanceUID != source.SeriesInstanceUID
        )


def test_a_source_slice_without_its_uid_is_one_line(tmp_path) -> None:
    """A source slice that lost its SOPInstanceUID cannot be referenced: one line naming it, not an
    AttributeError."""
    files = write_ct_series(tmp_path / "src", 3)
    volume = read_volume(tmp_path / "src")
    ds = pydicom.dcmread(volume.meta["dicom_files"][1])
    del ds.SOPInstanceUID
    ds.save_as(volume.meta["dicom_files"][1])
    with pytest.raises(UserError, match=r"has no SOPInstanceUID; a derived slice could not reference it"):
        export_derived_series(volume, tmp_path / "derived", source_files=volume.meta["dicom_files"])
    assert not (tmp_path / "derived").exists() and len(files) == 3


def _edit_series(files, **values) -> None:
    """Set the same attributes on every file of a series (and SliceLocation in the scanner's own
    sign: the negated z, as a feet-first GE series has it)."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.SliceLocation = -float(ds.ImagePositionPatient[2])
        ds.save_as(path)


def _along_normal(ds) -> float:
    """The slice's position along its normal (row x column direction of ImageOrientationPatient)."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return float(np.array([float(v) for v in ds.ImagePositionPatient]) @ np.cross(iop[:3], iop[3:]))


@pytest.mark.parametrize("orientation", ["head-first", "feet-first"])
def test_instance_numbers_follow_the_slice_normal_and_a_new_series_locates_its_slices(
    tmp_path, orientation
) -> None:
    """A viewer stacks a series by InstanceNumber: 1..nz in order along the slice normal, also from
    a feet-first source (rows flipped, normal -z, numbered the other way); a new series (no source
    files) gives each slice SliceLocation = position . normal."""
    files = write_ct_series(tmp_path / "src", 4, shuffle=False)
    if orientation == "feet-first":
        for path in files:
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            ds.InstanceNumber = len(files) + 1 - ds.InstanceNumber
            ds.save_as(path)
    volume = read_volume(tmp_path / "src")
    derived = export_derived_series(volume, tmp_path / "out", source_files=volume.meta["dicom_files"])
    new = export_derived_series(volume, tmp_path / "new")
    for written in (derived, new):
        series = sorted(map(pydicom.dcmread, written), key=_along_normal)
        assert [int(ds.InstanceNumber) for ds in series] == [1, 2, 3, 4]
        assert np.all(np.diff([_along_normal(ds) for ds in series]) > 1.0)  # 2.5 mm apart, none repeated
    for ds in map(pydicom.dcmread, new):
        assert float(ds.SliceLocation) == pytest.approx(_along_normal(ds), abs=1e-3)


def test_a_resampled_source_keeps_its_patient_study_and_acquisition(tmp_path) -> None:
    """With --resample-gaps the slices are no longer the files' own, but the series is still the
    source's: the old export made a new study date, an empty accession, no issuer, no birth date
    and a CHEST body part inside the source's StudyInstanceUID (a PACS reconciles on them)."""
    from IPv2DenoiseLib.app.cli import main

    files = sorted(write_ct_series(tmp_path / "src", 6, shuffle=False))
    files[2].unlink()  # a gap
    kept = [f for f in files if f.exists()]
    _edit_series(
        kept,
        AccessionNumber="ACC123",
        IssuerOfPatientID="HOSP-A",
        PatientBirthDate="19500101",
        PatientSex="O",
        BodyPartExamined="HEAD",
        StudyDate="20040119",
        KVP="120",
    )
    out = tmp_path / "out"
    assert (
        main(["denoise", str(tmp_path / "src"), str(out), "--dicom", "--model", "fast", "--resample-gaps"])
        == 0
    )
    source = pydicom.dcmread(kept[0])
    for path in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in (
            "StudyInstanceUID",
            "StudyDate",
            "StudyID",
            "AccessionNumber",
            "IssuerOfPatientID",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "BodyPartExamined",
            "KVP",
            "FrameOfReferenceUID",
        ):
            assert ds.get(keyword) == source.get(keyword), keyword
        assert "SourceImageSequence" not in ds  # no slice is one source image


def test_source_flags_and_positions_that_must_survive_derivation(tmp_path) -> None:
    """Lossy compression once set is never reset (PS3.3 C.7.6.1.1.5); burned-in text stays in
    smoothed pixels; SliceLocation is the source's at the same position; a 64-character source
    description keeps the derived mark (the old export cut it off, and lost or reset the rest)."""
    files = write_ct_series(tmp_path / "src", 3, shuffle=False)
    _edit_series(
        files,
        LossyImageCompression="01",
        LossyImageCompressionRatio="338.7",
        LossyImageCompressionMethod="ISO_15444_1",
        BurnedInAnnotation="YES",
        SeriesDescription="X" * 64,
    )
    volume = read_volume(tmp_path / "src")
    derived = export_derived_series(
        volume,
        tmp_path / "out",
        source_files=volume.meta["dicom_files"],
        options=DerivedSeriesOptions(model=MODEL),
    )
    for path, source_path in zip(derived, volume.meta["dicom_files"]):
        ds, src = pydicom.dcmread(path), pydicom.dcmread(source_path)
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_15444_1"
        assert float(ds.LossyImageCompressionRatio) == pytest.approx(338.7)
        assert ds.BurnedInAnnotation == "YES"
        assert float(ds.SliceLocation) == pytest.approx(float(src.SliceLocation))
        assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.endswith("IPv2 denoised (unet-ipv2)")
    long_asked = DerivedSeriesOptions(model=MODEL, series_description="Y" * 70)
    (first, *_) = export_derived_series(volume, tmp_path / "out2", options=long_asked)
    assert pydicom.dcmread(first).SeriesDescription.endswith("(denoised)")
    assert pydicom.dcmread(first).BurnedInAnnotation == "NO"  # a new series from a volume file


def test_a_source_that_is_not_ct_in_hu_is_not_exported_as_one(tmp_path, capsys) -> None:
    """Read with --force, an MR series (or a perfusion map, rescale type US) would have been written
    as a CT series in HU into the source's study."""
    from IPv2DenoiseLib.app.cli import main

    for name, modality, rescale in (("mr", "MR", None), ("perfusion", "CT", "US")):
        files = write_ct_series(tmp_path / name, 3, modality=modality)
        if rescale:
            _edit_series(files, RescaleType=rescale)
        out = tmp_path / f"{name}-out"
        args = ["denoise", str(tmp_path / name), str(out), "--dicom", "--model", "fast", "--force"]
        assert main(args) == 2
        assert "not a CT in Hounsfield units" in capsys.readouterr().err
        assert not out.exists()


def test_a_derived_series_opens_in_its_sources_window(tmp_path) -> None:
    """A head CT's derived series opened in the lung window (ours came first and the source's was
    dropped); now the source's first window leads, then the lung and mediastinal presets."""
    files = write_ct_series(tmp_path / "src", 2, shuffle=False)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = (
            ["40", "600"],
            ["80", "2800"],
            ["BRAIN", "BONE"],
        )
        ds.save_as(path)
    volume = read_volume(tmp_path / "src")
    (first, *_) = export_derived_series(
        volume,
        tmp_path / "out",
        source_files=volume.meta["dicom_files"],
        options=DerivedSeriesOptions(model=MODEL),
    )
    ds = pydicom.dcmread(first)
    assert [float(v) for v in ds.WindowCenter][:1] == [40.0] and [float(v) for v in ds.WindowWidth][:1] == [
        80.0
    ]
    assert list(ds.WindowCenterWidthExplanation) == ["BRAIN", "LUNG", "MEDIASTINAL"]
    assert len(ds.WindowCenter) == len(ds.WindowWidth) == 3
