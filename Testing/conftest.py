"""Shared fixtures: real DICOM series built from pydicom's bundled GE chest slice, small CT volumes."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume

os.environ.setdefault("OMP_NUM_THREADS", "2")


def require_dciodvfy() -> str:
    """The ``dciodvfy`` program (dicom3tools); fails, never skips, without it: the README's test
    command (``scripts/setup.sh --test``) installs it, and a skipped conformance check is no pass."""
    import shutil

    found = shutil.which("dciodvfy")
    if found is None:
        pytest.fail("dciodvfy is not installed: run scripts/setup.sh --test (apt-get install dicom3tools)")
    return found


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


def chest_like_volume(seed: int, shape: tuple[int, int, int] = (8, 64, 64)) -> np.ndarray:
    """A small noisy chest-like CT in HU (air, an elliptic body at 40 HU, two lungs at -850 HU); fast to make."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    cy, cx = ny / 2 + rng.uniform(-2, 2), nx / 2 + rng.uniform(-2, 2)
    body = ((yy - cy) / (0.38 * ny)) ** 2 + ((xx - cx) / (0.45 * nx)) ** 2 < 1
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((yy - cy) / (0.26 * ny)) ** 2 + ((xx - cx - side * 0.2 * nx) / (0.14 * nx)) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(lungs, -890.0, 0.0)
    noisy = hu[None] + rng.normal(0.0, 60.0, (nz, ny, nx))
    return noisy.astype(np.float32)


def write_batch_archive(root: Path) -> dict[str, str]:
    """A small archive of six studies: four volume files (NIfTI, NRRD, MHA), one real DICOM CT series
    (pydicom's CT_small slice) and one truncated NRRD. Returns case id -> kind ("ok" or "corrupt")."""
    files = {
        "site_a/p01": "site_a/p01.nii.gz",
        "site_a/p02": "site_a/p02.nrrd",
        "site_b/p03": "site_b/p03.mha",
        "site_b/deep/p04": "site_b/deep/p04.nii.gz",
    }
    for seed, name in enumerate(sorted(files.values())):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_volume(
            Volume(chest_like_volume(seed), (5.0, 5.0, 5.0), (-160.0, -160.0, 10.0 * seed)), root / name
        )
    write_ct_series(root / "site_b" / "dicom" / "p05", 4)
    corrupt = root / "site_a" / "p06.nrrd"
    corrupt.write_bytes((root / files["site_a/p02"]).read_bytes()[:300])  # a transfer cut short
    cases = {case: "ok" for case in files}
    cases["site_b/dicom/p05"] = "ok"
    cases["site_a/p06"] = "corrupt"
    (root / ".hidden").mkdir()
    write_volume(Volume(chest_like_volume(9), (5.0, 5.0, 5.0)), root / ".hidden" / "ignored.nrrd")
    return cases


@pytest.fixture(scope="session")
def noise_aware_weights() -> Path:
    """Trained weights of the plain noise-aware network (``unet-nm``, 16 channels): the fast tier
    shipped until 2026-12-06, kept in ``campaign/`` since the fast tier became texture-aware. For the
    tests that start a texture-aware network from a noise-aware one."""
    path = Path(__file__).resolve().parents[1] / "campaign" / "unet_nm_ipv2_fast_until_2026-12-06.safetensors"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def batch_archive(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Session-wide read-only archive for the batch tests (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("archive")
    return root, write_batch_archive(root)


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


#: ``ipv2-denoise make-dataset`` arguments for two small synthetic cases (96² px, 4 slices) in OUT.
def make_dataset_args(out: Path, cases: int = 2) -> list[str]:
    return [
        "make-dataset",
        "--cases",
        str(cases),
        "--out",
        str(out),
        "--size",
        "96",
        "--slices",
        "4",
        "--spacing",
        "3.6",
        "--slice-thickness",
        "5",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="session")
def made_dataset(tmp_path_factory) -> Path:
    """Two small synthetic case folders made once by the ``make-dataset`` command (read-only for tests)."""
    from IPv2DenoiseLib.app.cli import main

    out = tmp_path_factory.mktemp("made") / "ds"
    assert main(make_dataset_args(out)) == 0
    return out
