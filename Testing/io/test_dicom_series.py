"""DICOM series that are not the textbook case, made from pydicom's real CT_small.dcm pixels.

Missing slice, gantry tilt, several series, coronal orientation, enhanced multi-frame CT, a
JPEG-lossless CT pydicom cannot decode alone (GDCM does), hidden folders, named pipes beside the
slices.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from IPv2DenoiseLib import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.denoiser.models import UNet
from IPv2DenoiseLib.io.dicom_series import find_series
from IPv2DenoiseLib.io.volumes import read_volume

MARK = (40, 70)  # (row, column) of the centre of a bright 5x5 marker in every slice


def write_series(
    folder: Path,
    n: int,
    *,
    row=(1.0, 0.0, 0.0),
    col=(0.0, 1.0, 0.0),
    step=(0.0, 0.0, 2.5),
    skip=(),
    tilt_deg: float | None = None,
) -> list[Path]:
    """``n`` slices of CT_small's real pixels; slice k at IPP0 + k * step, raw pixels + 10 k, a marker."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    paths = []
    for k in range(n):
        if k in skip:
            continue
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [float(v) for v in origin + k * np.asarray(step)]
        if tilt_deg is not None:
            ds.GantryDetectorTilt = tilt_deg
        pixels = template.pixel_array.astype(np.int16) + np.int16(10 * k)
        pixels[MARK[0] - 2 : MARK[0] + 3, MARK[1] - 2 : MARK[1] + 3] = 30000  # far above the anatomy
        ds.PixelData = pixels.tobytes()
        path = folder / f"IM{(7 * k) % 101:04d}"  # names not in slice order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def physical(volume: Volume, index_xyz) -> np.ndarray:
    axes = np.asarray(volume.direction).reshape(3, 3)
    return np.asarray(volume.origin) + axes @ (
        np.asarray(index_xyz, dtype=float) * np.asarray(volume.spacing)
    )


def test_missing_slice_is_refused_naming_the_gap_or_resampled_on_request(tmp_path) -> None:
    folder = tmp_path / "gap"
    write_series(folder, 8, step=(0, 0, 1.25), skip={4})
    with pytest.raises(
        UserError, match=r"slice\(s\) missing: a step of 2.50 mm .*instance 4 and instance 6"
    ) as e:
        read_volume(folder)
    assert "--resample-gaps" in str(e.value)
    volume = read_volume(folder, resample_gaps=True)
    assert volume.shape[0] == 8 and volume.spacing[2] == pytest.approx(1.25)
    # slice k (raw + 10 k) lands at its own position: the missing one is the mean of its neighbours
    means = volume.array[:, 100:, :].reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(np.diff(means), 10.0, atol=1e-3)
    assert any("interpolated" in w for w in volume.meta["warnings"])
    assert "dicom_files" not in volume.meta  # slices no longer one-to-one with files


def test_gantry_tilt_is_resampled_so_every_slice_keeps_its_true_position(tmp_path) -> None:
    tilt = np.deg2rad(15.0)
    col = (0.0, np.cos(tilt), -np.sin(tilt))  # tilted slice planes, table steps along z
    paths = write_series(tmp_path / "tilt", 12, col=col, step=(0, 0, 2.5), tilt_deg=15.0)
    volume = read_volume(tmp_path / "tilt")
    assert any("tilted stack" in w and "15.0°" in w for w in volume.meta["warnings"])
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sy, sx = (float(v) for v in template.PixelSpacing)
    for k in (0, 5, 11):
        ds = pydicom.dcmread(paths[k])
        r, c = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        truth = np.array(ds.ImagePositionPatient, dtype=float) + MARK[1] * sx * r + MARK[0] * sy * c
        plane = volume.array[k]
        py, px = np.unravel_index(np.argmax(plane), plane.shape)  # the marker is the brightest
        window = np.s_[py - 5 : py + 6, px - 5 : px + 6]
        weights = np.clip(plane[window] - 1500.0, 0.0, None)  # partial pixels count, anatomy does not
        y, x = (np.indices(weights.shape) * weights).reshape(2, -1).sum(axis=1) / weights.sum()
        y, x = y + py - 5, x + px - 5
        error = np.linalg.norm(physical(volume, (x, y, k)) - truth)
        assert error < 0.1, (k, error)


def test_coronal_series_keeps_its_geometry_and_denoises_as_its_axial_version(tmp_path) -> None:
    # coronal: rows along L, columns down (−S), slices stepping posterior
    write_series(tmp_path / "cor", 20, row=(1, 0, 0), col=(0, 0, -1), step=(0, 2.0, 0))
    coronal = read_volume(tmp_path / "cor")
    assert coronal.meta["orientation"] == "coronal"
    np.testing.assert_allclose(np.asarray(coronal.direction).reshape(3, 3)[:, 2], (0, 1, 0), atol=1e-6)
    plan = coronal.axial_plan()
    assert plan is not None
    axial = coronal.reoriented(*plan)
    torch.manual_seed(0)  # before building the net: its weights must not depend on earlier tests
    denoiser = Denoiser(UNet(in_slices=3, base_channels=4, levels=2))
    torch.nn.init.normal_(denoiser.model.head.weight, std=0.3)  # far enough from the identity
    out = denoiser.denoise(coronal, device="cpu", remove_background=False)
    assert out.same_geometry(coronal, atol=1e-6)
    assert any("reoriented to axial" in w for w in out.meta["warnings"])
    reference = denoiser.denoise(axial, device="cpu", remove_background=False)
    np.testing.assert_allclose(out.reoriented(*plan).array, reference.array, atol=1e-4)
    # and the network really saw axial slices: denoising the coronal slices as they are differs
    as_is = denoiser.denoise_array(coronal.array, device="cpu", remove_background=False)
    assert np.abs(as_is - out.array).max() > 1.0


def test_two_series_with_the_same_size_are_listed_never_picked(tmp_path) -> None:
    write_series(tmp_path / "two" / "b", 3)
    write_series(tmp_path / "two" / "a", 3, step=(0, 0, 5.0))
    found = find_series(tmp_path / "two")
    assert len(found) == 2
    with pytest.raises(UserError, match="holds 2 image series; choose one with --series") as e:
        read_volume(tmp_path / "two")
    for info in found:
        assert info.uid in str(e.value) and "3 slices, axial" in str(e.value)
    chosen = read_volume(tmp_path / "two", series_uid=found[1].uid)
    assert chosen.meta["SeriesInstanceUID"] == found[1].uid


def test_enhanced_multiframe_ct_is_read_with_true_geometry_and_refused_when_not_hu() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")  # a perfusion map (RescaleType US), 2 frames
    with pytest.raises(UserError, match="not Hounsfield units .*PERFUSION"):
        read_volume(path)
    volume = read_volume(path, force=True)
    ds = pydicom.dcmread(path)
    assert volume.shape == (2, 512, 512)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        expected = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(physical(volume, (0, 0, k)), expected, atol=0.1)
    assert volume.spacing[2] == pytest.approx(10.0)


def test_real_jpeg_lossless_ct_from_pydicom_data_is_decoded_by_gdcm() -> None:
    path = get_testdata_file("bad_sequence.dcm")  # JPEG lossless: pydicom alone has no decoder
    volume = read_volume(path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)
    assert volume.shape == (1, 512, 512)
    np.testing.assert_array_equal(volume.array, expected)


def test_hidden_folders_are_not_searched(tmp_path, ct_series) -> None:
    hidden = tmp_path / "project" / ".venv" / "site-packages-data"
    hidden.mkdir(parents=True)
    (hidden / "CT_small.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    with pytest.raises(UserError, match=r"no DICOM image found \(hidden folders such as .venv"):
        read_volume(tmp_path / "project")
    ct_series(3, name="project/scans/chest")
    assert read_volume(tmp_path / "project").shape == (3, 128, 128)


def test_signed_padding_value_read_unsigned_still_marks_the_outside_of_the_field_of_view(tmp_path) -> None:
    """GE writes PixelPaddingValue -2000 for signed pixels; its VR ("US or SS") is often read as US,
    63536. Those pixels are air (-1024 HU) either way, and no other pixel changes."""
    paths = write_series(tmp_path / "series", 3)
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.copy()
        pixels[:6, :] = -2000  # outside the reconstruction circle
        ds.PixelData = pixels.tobytes()
        ds.add_new(0x00280120, "US", 63536)  # PixelPaddingValue as an unsigned reader sees -2000
        ds.save_as(path, enforce_file_format=True)
    plain = read_volume(write_series(tmp_path / "plain", 3)[0].parent).array
    hu = read_volume(tmp_path / "series").array
    assert np.all(hu[:, :6, :] == -1024.0)
    assert np.array_equal(hu[:, 6:, :], plain[:, 6:, :])


def without_blocking(read: Callable[[], object], pipes: list[Path], seconds: float = 60.0) -> object:
    """``read()``, in a thread: a reader that opens a named pipe blocks until something writes to it,
    so if ``read`` is not done within ``seconds`` each pipe is opened for writing (which frees it)
    and the test fails instead of hanging."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = read()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for pipe in pipes:
            with contextlib.suppress(OSError):  # no reader holds this one
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"reading blocked on a named pipe for {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_named_pipes_beside_the_slices_are_skipped_unopened(tmp_path) -> None:
    """Named pipes in a series folder (one named like a slice, one hidden): GDCM, which opens every
    entry of a folder, lost good slices beside them, and the series was refused with "GDCM cannot
    read it" for a good slice (until 2026-12-07). They are skipped without being opened, the series
    reads whole and equal to the same files without the pipes; a folder with nothing but such
    entries says what it skipped."""
    paths = write_series(tmp_path / "series", 6)
    plain = read_volume(tmp_path / "series")
    pipes = [tmp_path / "series" / "IM9999", tmp_path / "series" / ".transfer.pipe"]
    for pipe in pipes:
        os.mkfifo(pipe)
    volume = without_blocking(lambda: read_volume(tmp_path / "series"), pipes)
    assert volume.shape == (6, 128, 128) and np.array_equal(volume.array, plain.array)
    assert sorted(volume.meta["dicom_files"]) == sorted(str(p) for p in paths)

    only_pipes = tmp_path / "only-pipes"
    only_pipes.mkdir()
    os.mkfifo(only_pipes / "IM0001")
    with pytest.raises(
        UserError,
        match=r"only-pipes: no DICOM image found .*; skipped 1 entry that is not a regular file, unopened: "
        r"IM0001 \(a named pipe\); give a DICOM series folder",
    ):
        without_blocking(lambda: read_volume(only_pipes), [only_pipes / "IM0001"])
