"""I/O: real DICOM (pydicom's GE chest slice and series made from it), NRRD/NIfTI/MHA round trips."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from IPv2DenoiseLib import UserError, Volume
from IPv2DenoiseLib.io.volumes import read_volume, write_mask, write_volume


def oblique_volume() -> Volume:
    """A volume with anisotropic spacing, a rotated direction and a non-zero origin."""
    rng = np.random.default_rng(0)
    array = rng.normal(-300, 400, size=(5, 7, 9)).astype(np.float32)
    array[0, 0, 0] = -1000
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Volume(array, (0.7, 0.8, 2.5), (-120.5, 33.25, 410.0), rot.ravel(), {})


def test_ct_small_reads_as_one_slice_in_hu() -> None:
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.spacing[:2] == pytest.approx((0.661468, 0.661468))
    assert volume.origin == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient))
    assert volume.meta["kVp"] == 120.0 and volume.meta["Modality"] == "CT"
    assert volume.meta["StudyInstanceUID"] == ds.StudyInstanceUID


def test_dicom_series_sorted_by_position_not_file_name(ct_series) -> None:
    folder = ct_series(6, slice_spacing=1.25)
    volume = read_volume(folder)
    assert volume.shape == (6, 128, 128)
    assert volume.spacing[2] == pytest.approx(1.25)
    # slice k was offset by 10*k raw units: the sorted volume increases by 10 HU per slice
    diffs = np.diff(volume.array.reshape(6, -1).mean(axis=1))
    np.testing.assert_allclose(diffs, 10.0, atol=1e-3)
    assert len(volume.meta["dicom_files"]) == 6


def test_several_ct_series_are_listed_and_one_is_chosen_by_uid_or_number(ct_series, tmp_path) -> None:
    ct_series(3, name="mixed/a", series_number=1)
    ct_series(5, name="mixed/b", series_number=2)
    ct_series(7, name="mixed/c", series_number=3, modality="MR")
    with pytest.raises(UserError, match=r"holds 2 image series; choose one with --series") as refused:
        read_volume(tmp_path / "mixed")  # never a silent pick, whatever the sizes or file names
    assert "3 slices" in str(refused.value) and "5 slices" in str(refused.value)
    uid_small = pydicom.dcmread(next((tmp_path / "mixed/a").iterdir())).SeriesInstanceUID
    assert read_volume(tmp_path / "mixed", series_uid=uid_small).shape[0] == 3
    assert read_volume(tmp_path / "mixed", series_uid="2").shape[0] == 5  # number in the list
    with pytest.raises(UserError, match="no series '1.2.3'"):
        read_volume(tmp_path / "mixed", series_uid="1.2.3")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_round_trip_keeps_geometry_and_values(tmp_path, suffix) -> None:
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.same_geometry(volume, atol=1e-4)
    np.testing.assert_array_equal(back.array, volume.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"v{suffix}"]  # no temp file left


def test_int16_and_mask_writing(tmp_path) -> None:
    volume = oblique_volume()
    back = read_volume(write_volume(volume, tmp_path / "v.nrrd", dtype=np.int16))
    np.testing.assert_array_equal(back.array, np.rint(volume.array))
    mask = volume.array > 0
    import SimpleITK as sitk

    image = sitk.ReadImage(str(write_mask(mask, volume, tmp_path / "m.nrrd")))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask.astype(np.uint8))


def test_dicom_series_geometry_matches_itk(ct_series) -> None:
    import SimpleITK as sitk

    folder = ct_series(4, slice_spacing=2.0)
    ours = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    np.testing.assert_allclose(ours.spacing, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ours.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.direction, image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(ours.array, sitk.GetArrayFromImage(image).astype(np.float32))


def test_input_volume_not_modified_by_write(tmp_path) -> None:
    volume = oblique_volume()
    before = volume.array.copy()
    write_volume(volume, tmp_path / "v.nrrd", dtype=np.int16)
    np.testing.assert_array_equal(volume.array, before)


def test_unsupported_output_format(tmp_path) -> None:
    with pytest.raises(UserError, match="unsupported output format"):
        write_volume(oblique_volume(), tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []
