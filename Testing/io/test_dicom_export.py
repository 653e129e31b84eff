"""Derived DICOM series export: UIDs, derivation, references, geometry and HU round trip, dciodvfy."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from conftest import require_dciodvfy, write_ct_series
from pydicom.data import get_testdata_file

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.dicom_export import (
    DerivedSeriesOptions,
    ModelProvenance,
    export_derived_series,
    slice_positions,
)

NZ = 4
DZ = 2.5


@pytest.fixture()
def source_series(tmp_path):
    """A 4-slice CT series built from pydicom's CT_small.dcm (new UIDs, stepped positions)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = write_ct_series(tmp_path / "src", NZ, slice_spacing=DZ, shuffle=False)
    hu = [
        ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for ds in map(pydicom.dcmread, paths)
    ]
    return template, paths, np.stack(hu).astype(np.float32)


def _volume_from(template, hu):
    sy, sx = (float(v) for v in template.PixelSpacing)
    ipp = [float(v) for v in template.ImagePositionPatient]
    return Volume(hu, spacing=(sx, sy, DZ), origin=ipp, meta={"source": "dicom"})


def _read_series(paths):
    return [pydicom.dcmread(p) for p in paths]


def test_derived_series_keeps_study_and_references_sources(source_series, tmp_path):
    template, paths, hu = source_series
    denoised = _volume_from(template, hu - 0.4)  # non-integer HU to exercise rounding
    files = export_derived_series(
        denoised,
        tmp_path / "out",
        source_files=paths,
        options=DerivedSeriesOptions(model=ModelProvenance("unet-ipv2", strategy="ipv2")),
    )
    assert [f.name for f in files] == sorted(f.name for f in (tmp_path / "out").iterdir())
    out = _read_series(files)
    sources = _read_series(paths)
    series_uids = {ds.SeriesInstanceUID for ds in out}
    assert len(series_uids) == 1 and sources[0].SeriesInstanceUID not in series_uids
    for ds, src in zip(out, sources):
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        assert ds.SOPInstanceUID != src.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert "unet-ipv2" in ds.DerivationDescription and "ipv2" in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodeValue == "113087"
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        assert ds.SeriesNumber >= 300
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert float(ds.KVP) == float(src.KVP)
    assert len({ds.SOPInstanceUID for ds in out}) == NZ


def test_geometry_and_hu_round_trip(source_series, tmp_path):
    template, paths, hu = source_series
    vol = _volume_from(template, hu + 0.3)
    out = _read_series(export_derived_series(vol, tmp_path / "out", source_files=paths))
    expected = slice_positions(vol)
    for k, ds in enumerate(out):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected[k], atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], vol.spacing[1::-1], atol=1e-6)
        back = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.max(np.abs(back - vol.array[k])) <= 1.0
    # positions step by the slice spacing along the normal
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in out])
    np.testing.assert_allclose(np.diff(ipp[:, 2]), DZ, atol=1e-4)


def test_oblique_geometry_without_sources(tmp_path):
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    hu = np.linspace(-1000, 400, 3 * 16 * 20, dtype=np.float32).reshape(3, 16, 20)
    vol = Volume(hu, spacing=(0.7, 0.8, 2.0), origin=(-10.0, 5.0, 30.0), direction=rot.ravel())
    out = _read_series(export_derived_series(vol, tmp_path / "new"))
    assert out[0].PatientName == "Anonymous^IPv2"
    assert len({ds.StudyInstanceUID for ds in out}) == 1
    assert "SourceImageSequence" not in out[0]
    iop = np.array([float(v) for v in out[0].ImageOrientationPatient])
    np.testing.assert_allclose(iop, np.concatenate([rot[:, 0], rot[:, 1]]), atol=1e-9)
    for k, ds in enumerate(out):
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], slice_positions(vol)[k], atol=1e-6
        )
        assert np.max(np.abs(ds.pixel_array.astype(float) - hu[k])) <= 0.5


def test_refuses_bad_arguments(source_series, tmp_path):
    template, paths, hu = source_series
    vol = _volume_from(template, hu)
    with pytest.raises(UserError, match="source_files"):
        export_derived_series(vol, tmp_path / "a", source_files=paths[:-1])
    with pytest.raises(UserError, match="source_files"):
        export_derived_series(vol, tmp_path / "b", source_files=paths[::-1])  # wrong z order
    with pytest.raises(UserError, match="series_number"):
        export_derived_series(
            vol, tmp_path / "c", source_files=paths, options=DerivedSeriesOptions(series_number=5)
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    with pytest.raises(UserError, match="out_dir"):
        export_derived_series(vol, tmp_path / "full")
    # nothing half-written is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "src"]


@pytest.mark.parametrize("with_sources", [True, False])
def test_dciodvfy_reports_no_errors(source_series, tmp_path, with_sources):
    require_dciodvfy()
    template, paths, hu = source_series
    vol = _volume_from(template, hu)
    files = export_derived_series(vol, tmp_path / "out", source_files=paths if with_sources else None)
    for f in files[:2]:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, report


def test_warnings_outside_the_sources_character_set_switch_the_series_to_utf8(source_series, tmp_path):
    """A warning with an en dash ("1.25–2.00 mm") reaches DerivationDescription word for word, and
    the source's Latin-1 patient name survives the switch to UTF-8; plain ASCII text keeps the
    source's own character set."""
    template, paths, hu = source_series
    latin = tmp_path / "latin"
    latin.mkdir()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
        ds.save_as(latin / path.name)
    latin_paths = sorted(latin.iterdir())
    warning = "its slice thickness (2.50 mm) is outside the trained 1.25–2.00 mm"
    provenance = ModelProvenance("unet-nm-ipv2", strategy="ipv2")
    files = export_derived_series(
        _volume_from(template, hu),
        tmp_path / "out",
        source_files=latin_paths,
        options=DerivedSeriesOptions(model=provenance, warnings=(warning,)),
    )
    for ds in _read_series(files):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert warning in ds.DerivationDescription
        assert ds.PatientName == "Müller^Jörg"
    plain = export_derived_series(
        _volume_from(template, hu),
        tmp_path / "plain",
        source_files=latin_paths,
        options=DerivedSeriesOptions(model=provenance, warnings=("noise is low",)),
    )
    ds = pydicom.dcmread(plain[0])
    assert ds.SpecificCharacterSet == "ISO_IR 100" and ds.PatientName == "Müller^Jörg"
