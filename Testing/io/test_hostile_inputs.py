"""Hostile and damaged inputs (issue #21): read with every slice, or refused in one line naming the file.

Real DICOM from pydicom's CT_small.dcm (conftest's ``write_ct_series``) and pydicom's enhanced CT,
damaged the ways an archive damages them: two patients under one series UID, a first or last
file cut short or overwritten, PixelData shorter than the image, nonsense rescale values.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import write_ct_series
from pydicom.config import disable_value_validation
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement

from IPv2DenoiseLib import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.image_headers import MEMORY_LIMIT_ENV
from IPv2DenoiseLib.io.volumes import read_dicom_series, read_volume, write_volume

N_SLICES = 8


def series(folder: Path) -> list[Path]:
    """Eight real CT slices in slice order (IM0000 is the first, IM0007 the last)."""
    return write_ct_series(folder, N_SLICES, shuffle=False)


def edit(path: Path, **values) -> None:
    """Rewrite header values of one file (validation off, so nonsense can be written)."""
    with disable_value_validation():
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            tag = pydicom.datadict.tag_for_keyword(keyword)
            ds[keyword] = DataElement(tag, pydicom.datadict.dictionary_VR(tag), value)
        ds.save_as(path)


# --------------------------------------------------------------------------------------- patients


@pytest.mark.parametrize(("keyword", "what"), [("PatientID", "patients"), ("StudyInstanceUID", "studies")])
def test_series_mixing_two_patients_or_studies_is_refused_naming_both(tmp_path, keyword, what) -> None:
    paths = series(tmp_path / "s")
    first = str(pydicom.dcmread(paths[0]).get(keyword))
    edit(paths[5], **{keyword: "OTHER.1"})
    for read in (lambda: read_volume(tmp_path / "s"), lambda: read_dicom_series(paths)):
        with pytest.raises(UserError, match=f"mixes two {what}: {keyword} ") as e:
            read()
        message = str(e.value)
        assert first in message and "OTHER.1" in message, message
        assert str(paths[0]) in message and str(paths[5]) in message, message


# --------------------------------------------------------------------------------------- slices


def cut_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def cut_pixels(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5000])


def short_pixel_data(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


@pytest.mark.parametrize("index", [0, N_SLICES - 1])
@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (cut_header, "its DICOM header is cut short"),
        (garbage, "not a DICOM file"),
        (cut_pixels, "the file is cut short"),
        (short_pixel_data, "PixelData holds 16384 bytes where .* needs 32768"),
    ],
)
def test_unreadable_first_or_last_slice_is_a_missing_slice(tmp_path, index, damage, why) -> None:
    paths = series(tmp_path / "s")
    damage(paths[index])
    with pytest.raises(UserError, match=f"{paths[index]}: {why}.*pass --resample-gaps to leave it out"):
        read_volume(tmp_path / "s")
    with pytest.raises(UserError, match=f"{paths[index]}: {why}"):
        read_dicom_series(paths)  # batch reads exactly the files it grouped: same rule
    volume = read_volume(tmp_path / "s", resample_gaps=True)
    assert volume.shape[0] == N_SLICES - 1
    assert any(
        "left out 1 unreadable file(s)" in w and str(paths[index]) in w for w in volume.meta["warnings"]
    )


def test_unreadable_middle_slice_is_interpolated_only_on_request(tmp_path) -> None:
    paths = series(tmp_path / "s")
    cut_pixels(paths[3])
    with pytest.raises(UserError, match=f"{paths[3]}: the file is cut short"):
        read_volume(tmp_path / "s")
    volume = read_volume(tmp_path / "s", resample_gaps=True)
    assert volume.shape[0] == N_SLICES  # the gap is interpolated like any missing slice
    assert "dicom_files" not in volume.meta


def test_short_pixel_data_never_reaches_the_image(tmp_path) -> None:
    """GDCM reads a short PixelData into uninitialised memory: a different image on every run."""
    paths = series(tmp_path / "s")
    short_pixel_data(paths[4])
    for _ in range(2):
        with pytest.raises(UserError, match=f"{paths[4]}: PixelData holds 16384 bytes"):
            read_volume(tmp_path / "s")


def test_non_dicom_neighbours_are_still_ignored(tmp_path) -> None:
    """README.txt, notes, a DICOMDIR and a readable non-image object beside the slices change nothing."""
    folder = tmp_path / "s"
    series(folder)
    (folder / "README.txt").write_text("scanned 2026-01-01\n")
    (folder / "notes").write_text("nothing here\n")
    shutil.copy(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    sr.save_as(folder / "report.dcm")
    volume = read_volume(folder)
    assert volume.shape[0] == N_SLICES and not any("left out" in w for w in volume.meta["warnings"])
    assert len(volume.meta["dicom_files"]) == N_SLICES


def test_a_file_named_like_the_slices_that_is_not_dicom_is_refused(tmp_path) -> None:
    folder = tmp_path / "s"
    series(folder)
    (folder / "IM0008").write_bytes(b"\x00" * 1000)  # a slice name, zero bytes of image
    with pytest.raises(UserError, match="IM0008: not a DICOM file"):
        read_volume(folder)


def test_one_named_file_is_read_without_looking_at_its_neighbours(tmp_path) -> None:
    paths = series(tmp_path / "s")
    garbage(paths[0])
    assert read_volume(paths[3]).shape[0] == 1


# --------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("RescaleSlope", "-1"), ("RescaleSlope", "0"), ("RescaleSlope", "nan"), ("RescaleIntercept", "inf")],
)
def test_nonsense_rescale_is_refused_naming_the_file(tmp_path, keyword, value) -> None:
    paths = series(tmp_path / "s")
    edit(paths[2], **{keyword: value})
    with pytest.raises(UserError, match=f"{paths[2]}: {keyword} {value} is not a"):
        read_volume(tmp_path / "s")


@pytest.mark.parametrize(
    ("frames", "fault"), [(1, "declares fewer frames than PixelData holds"), (3, "needs")]
)
def test_multiframe_frame_count_must_match_its_pixel_data(tmp_path, frames, fault) -> None:
    path = tmp_path / "enhanced.dcm"
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), path)  # 2 frames of 512 x 512
    edit(path, NumberOfFrames=str(frames))
    with pytest.raises(UserError, match=f"{path}: .*{fault}"):
        read_volume(path, force=True)


# --------------------------------------------------------------------------------------- volumes

SHAPE = (6, 20, 24)  # z, y, x


@pytest.fixture
def small_ct() -> Volume:
    array = np.full(SHAPE, -1000.0, np.float32)
    array[:, 5:15, 5:19] = 40.0
    return Volume(array, (0.8, 0.8, 2.0))


def replace_in(path: Path, old: bytes, new: bytes, out: Path | None = None) -> Path:
    data = path.read_bytes()
    assert old in data
    out = out or path
    out.write_bytes(data.replace(old, new))
    return out


def test_a_tiny_gzip_nrrd_declaring_gigabytes_is_refused_before_allocation(tmp_path, monkeypatch) -> None:
    """131 bytes declaring 2000 x 2000 x 100 floats: refused against the memory budget, then against its data."""
    path = tmp_path / "bomb.nrrd"
    header = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2000 2000 100\nencoding: gzip\n\n"
    path.write_bytes(header + gzip.compress(b"\0" * 4096))
    assert path.stat().st_size < 200
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(
        UserError, match=r"declares 2000 x 2000 x 100 values of 4 bytes \(1.6 GB\); .* needs about "
    ):
        read_volume(path)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")  # memory is no excuse: the data are 4 kB, not 1.6 GB
    with pytest.raises(
        UserError, match="gzip data decompress to only 4096 bytes of image; the file is cut short"
    ):
        read_volume(path)


@pytest.mark.parametrize(
    "keyword, value, vr",
    [
        ("ImagePositionPatient", ["1", "2"], "DS"),  # two values
        ("ImagePositionPatient", "a\\b\\c", "LO"),  # text, which also stops GDCM's grouping
        ("ImageOrientationPatient", [1, 0, 0, 0, 1], "DS"),  # five values
        ("ImageOrientationPatient", [0, 0, 0, 0, 0, 0], "DS"),  # no direction
    ],
    ids=["position-2-values", "position-text", "orientation-5-values", "orientation-zero"],
)
def test_a_malformed_slice_position_is_one_line_not_a_crash(tmp_path, keyword, value, vr) -> None:
    """One slice of a real series with a hostile position or orientation: reading refuses the
    series in one line naming the slice, and a batch's discovery still lists it as a case."""
    from IPv2DenoiseLib.app.batch.cases import discover_tree

    files = write_ct_series(tmp_path / "archive" / "series", 4)
    ds = pydicom.dcmread(files[1])
    ds[keyword] = DataElement(pydicom.datadict.tag_for_keyword(keyword), vr, value)
    ds.save_as(files[1])
    with pytest.raises(
        UserError, match=r"lack a valid ImagePositionPatient/ImageOrientationPatient \(e.g. instance"
    ):
        read_volume(tmp_path / "archive" / "series")
    (case,) = discover_tree(tmp_path / "archive")
    assert case.case_id == "series" and len(case.files) == 4


def test_a_metaimage_naming_its_data_file_twice_cannot_read_a_file_outside(tmp_path) -> None:
    """ITK matches MetaIO's field names exactly: it skips ``elementdatafile = LOCAL`` and reads the
    ``ElementDataFile`` after it. The check read the first, found the "local" data the right size
    (the rest of the header) and let ITK read a file outside the header's folder. Now refused."""
    secret = tmp_path / "elsewhere" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(b"PATIENT LIST: " * 20)
    tail = f"ElementDataFile = {secret}\n"
    header = f"ObjectType = Image\nNDims = 3\nDimSize = {len(tail)} 1 1\nElementType = MET_UCHAR\n"
    (tmp_path / "scan").mkdir()
    path = tmp_path / "scan" / "evil.mha"
    path.write_text(header + "elementdatafile = LOCAL\n" + tail)
    with pytest.raises(
        UserError, match="its header field 'elementdatafile' is not spelled 'ElementDataFile'"
    ):
        read_volume(path, force=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            "DimSize = 2 2 2\ndimsize = 4000 4000 4000\nElementDataFile = LOCAL\n",
            "gives the field 'dimsize' twice",
        ),
        (
            "DimSize = 37 1 1\nHeaderSize = ten\nElementDataFile = data.raw\n",
            "its HeaderSize 'ten' is not a whole number",
        ),
    ],
    ids=["second-size", "non-numeric"],
)
def test_a_metaimage_header_read_two_ways_is_one_line(tmp_path, fields, message) -> None:
    """A field given twice (ITK takes one, the memory check another) or not a number: one line."""
    (tmp_path / "data.raw").write_bytes(bytes(37))
    path = tmp_path / "odd.mha"
    path.write_bytes(
        ("ObjectType = Image\nNDims = 3\nElementType = MET_UCHAR\n" + fields).encode() + bytes(8)
    )
    with pytest.raises(UserError, match=message):
        read_volume(path)


def test_a_compressed_dicom_series_declaring_gigabytes_is_refused_before_decoding(
    tmp_path, monkeypatch
) -> None:
    """Three RLE slices of pydicom's CT (30 kB each) whose headers declare 8192 x 8192 pixels: the
    decoder would allocate what the header says, so the series is refused against the memory budget
    first, in one line, as a volume file is."""
    files = write_ct_series(tmp_path / "bomb", 3)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless)
        ds.Rows = ds.Columns = 8192
        ds.save_as(path)
    assert all(path.stat().st_size < 40_000 for path in files)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")
    with pytest.raises(
        UserError,
        match=r"its 3 file\(s\) declare 0.4 GB of pixel data; reading it needs about 1.6 GB of memory and 1.0 GB",
    ):
        read_volume(tmp_path / "bomb")
    assert len(list((tmp_path / "bomb").iterdir())) == 3  # the input is untouched


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz", ".nii", ".raw.nrrd", ".mhd"])
def test_header_declaring_fewer_or_more_slices_than_its_data_is_refused(tmp_path, small_ct, suffix) -> None:
    path = tmp_path / f"ct{suffix}"
    if suffix in (".raw.nrrd", ".mhd"):  # raw data (attached NRRD, detached MetaImage)
        image = sitk.GetImageFromArray(small_ct.array)
        sitk.WriteImage(image, str(path), useCompression=False)
    else:
        write_volume(small_ct, path)
    assert read_volume(path).shape == SHAPE
    header = path if suffix != ".nii.gz" else None
    for declared, fault in ((5, "declares too few"), (7, "cut short")):
        if suffix.startswith(".nii"):
            out = tmp_path / f"bad{declared}{suffix}"
            set_nifti_slices(path, out, declared)
        else:
            old = b"sizes: 24 20 6" if suffix.endswith("nrrd") else b"DimSize = 24 20 6"
            out = replace_in(
                header, old, old[:-1] + str(declared).encode(), tmp_path / f"bad{declared}{suffix}"
            )
            if suffix == ".mhd":
                (tmp_path / f"bad{declared}.raw").write_bytes((tmp_path / "ct.raw").read_bytes())
                replace_in(out, b"ct.raw", f"bad{declared}.raw".encode())
        with pytest.raises(UserError, match=fault):
            read_volume(out)


def set_nifti_slices(path: Path, out: Path, slices: int) -> None:
    """Copy a NIfTI-1 file with dim[3] (the slice count) changed in its header."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = bytearray(f.read())
    assert struct.unpack("<h", data[46:48])[0] == SHAPE[0]
    data[46:48] = struct.pack("<h", slices)
    with opener(out, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("where", ["/etc/passwd", "../outside.raw", "link.raw"])
def test_mhd_data_file_outside_its_folder_is_refused(tmp_path, small_ct, where) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(small_ct.array), str(folder / "ct.mhd"), useCompression=False)
    (tmp_path / "outside.raw").write_bytes((folder / "ct.raw").read_bytes())
    (folder / "link.raw").symlink_to(tmp_path / "outside.raw")
    replace_in(folder / "ct.mhd", b"ElementDataFile = ct.raw", f"ElementDataFile = {where}".encode())
    with pytest.raises(UserError, match=f"ElementDataFile '{where}' .*outside the header's folder"):
        read_volume(folder / "ct.mhd")


@pytest.mark.parametrize("where", ["/etc/passwd", "../outside.raw", "link.raw"])
def test_nhdr_data_file_outside_its_folder_is_refused(tmp_path, small_ct, where) -> None:
    """A detached NRRD header's ``data file`` is read only beside it: an absolute path, a '..' path
    or a symlink out would read any file the user can (here one of the right size, read as a scan)."""
    folder = tmp_path / "case"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(small_ct.array), str(folder / "ct.nhdr"), useCompression=False)
    (tmp_path / "outside.raw").write_bytes((folder / "ct.raw").read_bytes())
    (folder / "link.raw").symlink_to(tmp_path / "outside.raw")
    replace_in(folder / "ct.nhdr", b"data file: ct.raw", f"data file: {where}".encode())
    with pytest.raises(UserError, match=f"data file '{re.escape(where)}' .*outside the header's folder"):
        read_volume(folder / "ct.nhdr")


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("garbage.nrrd", b"garbage", "not an NRRD file"),
        ("garbage.nii", b"garbage" * 100, "not a NIfTI file"),
        ("garbage.mha", b"ObjectType = Image\nNDims = 3\n", "not a MetaImage header"),
    ],
)
def test_a_file_that_is_no_volume_says_so_not_where_itk_was_built(tmp_path, name, content, why) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=why) as e:
        read_volume(tmp_path / name)
    assert "/src/" not in str(e.value) and ".cxx" not in str(e.value)


def test_a_self_referencing_symlink_is_one_line(tmp_path) -> None:
    loop = tmp_path / "loop.nrrd"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="symbolic link loop"):
        read_volume(loop)


# --------------------------------------------------------------------------------------- terminal


def test_reader_noise_never_reaches_the_terminal(tmp_path) -> None:
    """pydicom's VR warnings and ITK's "No Series were found" block are not the user's business."""
    paths = series(tmp_path / "s")
    for path in paths:
        edit(path, InstanceNumber="1.5", SeriesDescription="x" * 80)  # IS not an integer, LO too long
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no images\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "IPv2DenoiseLib.app.cli", "info"]
    good = subprocess.run([*cli, str(tmp_path / "s")], capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "Warning" not in good.stderr and "Invalid value" not in good.stderr, good.stderr
    empty = subprocess.run(
        [*cli, str(tmp_path / "empty")], capture_output=True, text=True, env=env, timeout=300
    )
    assert empty.returncode == 2
    assert empty.stderr.strip().splitlines() == [empty.stderr.strip()], empty.stderr
    assert "no DICOM image found" in empty.stderr


def test_refusals_reach_the_user_as_one_line_and_exit_2(tmp_path, capsys, monkeypatch) -> None:
    """`info` and `denoise` on a mixed-patient series and on a gzip bomb: one error line, status 2."""
    from IPv2DenoiseLib.app.cli import main as cli_main  # lazy: the CLI only for this test

    paths = series(tmp_path / "mixed")
    edit(paths[-1], PatientID="B")
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 200\nencoding: gzip\n\n" + gzip.compress(b"")
    )
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1000")
    for args, expected in (
        (["info", str(tmp_path / "mixed")], "mixes two patients: PatientID 1CT1"),
        (["denoise", str(tmp_path / "mixed"), str(tmp_path / "out.nrrd")], "mixes two patients"),
        (["info", str(bomb)], "decompress to only 0 bytes of image"),
    ):
        code = cli_main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and expected in lines[-1] and "error: " in lines[-1], lines
        assert sum("error" in line for line in lines) == 1 and "Traceback" not in "".join(lines), lines
    assert not (tmp_path / "out.nrrd").exists()
