"""Shared fixtures: real DICOM series built from pydicom's bundled GE chest slice, small CT volumes."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def write_ct_series(
    folder: Path,
    n_slices: int = 4,
    *,
    slice_spacing: float = 2.5,
    modality: str = "CT",
    series_number: int = 1,
    shuffle: bool = True,
) -> list[Path]:
    """Write ``n_slices`` DICOM files of one series derived from pydicom's ``CT_small.dcm``.

    Each slice is the real GE chest slice with a position ``slice_spacing`` mm further along z and
    its pixels offset by ``10 * index`` raw units, so the slice order can be checked after reading.
    Files are named in shuffled order so readers must sort by position, not by name.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    order = np.random.default_rng(series_number).permutation(n_slices) if shuffle else np.arange(n_slices)
    paths = []
    for index in range(n_slices):
        ds = copy.deepcopy(template)
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + slice_spacing * index]
        ds.SliceLocation = z + slice_spacing * index
        pixels = template.pixel_array.astype(np.int16) + np.int16(10 * index)
        ds.PixelData = pixels.tobytes()
        path = folder / f"IM{int(order[index]):04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def ct_series(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``ct_series(n_slices=4, **kw)`` writes a series under tmp_path and returns its folder."""

    def make(n_slices: int = 4, name: str = "series", **kwargs) -> Path:
        folder = tmp_path / name
        write_ct_series(folder, n_slices, **kwargs)
        return folder

    return make


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) on free loopback ports.

    Session-scoped (it starts in well under a second, but its storage is shared by the network
    tests, which use fresh UIDs). Fails, never skips, when Orthanc is missing: CI installs it.
    """
    from orthanc_server import start_orthanc

    try:
        server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()
