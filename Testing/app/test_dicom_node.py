"""``denoise --dicom --send`` and the ``serve`` DICOM node, end to end with a real Orthanc and the shipped model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from conftest import write_ct_series
from orthanc_server import free_port
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import read_volume, write_volume

NODE_AET = "IPV2NODE"
LIB = Path(__file__).resolve().parents[2] / "IPv2Denoise"


def _derived_in_orthanc(orthanc, study_uid: str, count: int, timeout: float = 60.0) -> list[pydicom.Dataset]:
    """Wait until a derived ("denoised") series of ``count`` instances is in ``study_uid``; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for series in orthanc.study_series(study_uid):
            description = series["MainDicomTags"].get("SeriesDescription", "")
            if "denoised" in description and len(series["Instances"]) >= count:
                files = []
                for instance in orthanc.get(f"/series/{series['ID']}/instances"):
                    raw = orthanc.get_bytes(f"/instances/{instance['ID']}/file")
                    files.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)))
                return files
        time.sleep(0.3)
    raise AssertionError(f"no derived series of {count} instances in study {study_uid} within {timeout:g} s")


def _fresh_study(folder: Path, n: int = 4) -> list[Path]:
    """A CT series of its own study (new StudyInstanceUID) so tests sharing Orthanc do not collide."""
    paths = write_ct_series(folder, n, shuffle=False)
    study = pydicom.uid.generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path)
    return paths


def test_denoise_dicom_then_send(orthanc, tmp_path, capsys) -> None:
    sources = _fresh_study(tmp_path / "in")
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    out = tmp_path / "derived"
    code = main(
        ["denoise", str(tmp_path / "in"), str(out), "--dicom", "--series-number", "350"]
        + ["--send", orthanc.node, "--device", "cpu", "--calling-aet", "IPV2TEST"]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list(out.iterdir())) == len(sources)
    back = _derived_in_orthanc(orthanc, study_uid, len(sources))
    assert len(back) == len(sources)
    source_uids = {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    for ds in back:
        assert ds.SeriesNumber == 350
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
        assert "unet-ipv2" in ds.DerivationDescription and "sha256" in ds.DerivationDescription


def test_denoise_dicom_from_nrrd_makes_a_new_series(tmp_path, capsys) -> None:
    hu = read_volume(get_testdata_file("CT_small.dcm")).array
    write_volume(Volume(hu.repeat(2, axis=0), spacing=(0.66, 0.66, 2.0)), tmp_path / "ct.nrrd")
    out = tmp_path / "series"
    args = ["denoise", str(tmp_path / "ct.nrrd"), str(out), "--dicom", "--device", "cpu"]
    assert main(args + ["--patient-id", "NRRD-1", "--patient-name", "Test^Nrrd"]) == 0
    files = sorted(out.iterdir())
    ds = pydicom.dcmread(files[0])
    assert len(files) == 2 and ds.PatientID == "NRRD-1" and "SourceImageSequence" not in ds
    assert main(["denoise", str(tmp_path / "ct.nrrd"), str(tmp_path / "x.nrrd"), "--send", "h:1:A"]) == 2
    assert "--send needs --dicom" in capsys.readouterr().err
    assert main(args) == 2  # OUT exists and is not empty: refused before any work
    assert "not an empty folder" in capsys.readouterr().err
    # PACS unreachable after denoising: one line, exit 2, and the series is kept complete in OUT
    kept = tmp_path / "kept"
    closed = f"127.0.0.1:{free_port()}:PACS"
    assert (
        main(["denoise", str(tmp_path / "ct.nrrd"), str(kept), "--dicom", "--send", closed, "--timeout", "2"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot reach PACS@127.0.0.1" in err[-1] and "Traceback" not in "".join(err)
    assert len(list(kept.glob("*.dcm"))) == 2


class Node:
    """``ipv2-denoise serve`` as a child process (the real CLI, its own model load)."""

    def __init__(self, spool: Path, forward: str, quiet: float) -> None:
        self.port = free_port()
        self.log = spool.parent / f"serve-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "IPv2DenoiseLib", "serve", "--port", str(self.port), "--aet", NODE_AET]
        cmd += ["--forward", forward, "--spool", str(spool), "--quiet-seconds", str(quiet), "--device", "cpu"]
        cmd += ["--host", "127.0.0.1", "--jobs", "2"]
        self.process = subprocess.Popen(cmd, stderr=open(self.log, "w"), env=env)  # noqa: SIM115
        self.wait_for("listening as", 60)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return self.text()
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged within {timeout:g} s:\n{self.text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _store(port: int, datasets) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture()
def spool(tmp_path) -> Path:
    return tmp_path / "spool"


def test_serve_skips_bad_instances_keeps_series_when_pacs_is_down_and_resumes(
    orthanc, tmp_path, spool
) -> None:
    first = _fresh_study(tmp_path / "first")
    second = _fresh_study(tmp_path / "second", n=3)
    node = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=3)  # the PACS is down
    try:
        wrong = AE(ae_title="MODALITY")
        wrong.add_requested_context(CTImageStorage)
        assert wrong.associate("127.0.0.1", node.port, ae_title="NOT_THE_NODE").is_rejected
        mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        corrupt = pydicom.dcmread(first[0])
        corrupt.SOPInstanceUID = pydicom.uid.generate_uid()
        corrupt.PixelData = corrupt.PixelData[:100]
        statuses = _store(node.port, [mr, corrupt] + [pydicom.dcmread(p) for p in first])
        assert statuses == [0x0000, 0xC210] + [0x0000] * len(first)
        log = node.wait_for("will retry", 60)  # denoised, PACS unreachable: kept, not failed
        assert "skipped a MR instance" in log and "refused a corrupt CT instance" in log
        assert "forward destination not available now" in log
        assert _store(node.port, map(pydicom.dcmread, second)) == [0x0000] * 3  # still in its quiet period
    finally:
        assert node.stop() == 0  # SIGTERM: a clean stop
    assert "2 series left in the spool" in node.text()
    assert len(list((spool / "ready").iterdir())) == 1 and len(list((spool / "work").iterdir())) == 1
    (arriving,) = (spool / "incoming").iterdir()
    assert len(list(arriving.glob("*.dcm"))) == len(second)

    node = Node(spool, orthanc.node, quiet=1.0)  # the PACS is back; the next start resumes both
    try:
        back = _derived_in_orthanc(orthanc, pydicom.dcmread(first[0]).StudyInstanceUID, len(first))
        assert len(_derived_in_orthanc(orthanc, pydicom.dcmread(second[0]).StudyInstanceUID, 3)) == 3
        # two senders at once, each with its own series
        more = [_fresh_study(tmp_path / f"sender{i}", n=3) for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(lambda paths: _store(node.port, map(pydicom.dcmread, paths)), more))
        assert statuses == [[0x0000] * 3] * 2
        for paths in more:
            assert len(_derived_in_orthanc(orthanc, pydicom.dcmread(paths[0]).StudyInstanceUID, 3)) == 3
    finally:
        assert node.stop() == 0
    log = node.text()
    assert "resuming 1 queued and 1 incoming series" in log
    assert log.count("; noise ") == 4
    assert len(back) == len(first)
    leftovers = [p for d in ("incoming", "ready", "work", "failed") for p in (spool / d).iterdir()]
    assert not leftovers, (leftovers, log)


def test_orthanc_sends_study_to_serve_and_gets_the_derived_series(orthanc, tmp_path, spool) -> None:
    sources = _fresh_study(tmp_path / "in", n=8)
    for path in sources:
        orthanc.post_bytes("/instances", path.read_bytes())
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    (study,) = [i for i in orthanc.post("/tools/lookup", study_uid) if i["Type"] == "Study"]
    node = Node(spool, orthanc.node, quiet=1.0)
    try:
        orthanc.add_modality("ipv2node", NODE_AET, node.port)
        job = orthanc.post("/modalities/ipv2node/store", study["ID"])
        assert job["InstancesCount"] == len(sources) and job["FailedInstancesCount"] == 0
        log = node.wait_for("; noise ", 90)
        back = _derived_in_orthanc(orthanc, study_uid, len(sources))
    finally:
        assert node.stop() == 0
    line = next(line for line in log.splitlines() if "; noise " in line)
    assert "received 8 instance(s) from ORTHANC" in line and f"sent 8 to {orthanc.aet}" in line
    before, after = (float(v) for v in line.split("noise ")[1].removesuffix(" HU").split(" -> "))
    assert after < before
    source_uids = {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in back} == source_uids
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in back)
    leftovers = [p for d in ("incoming", "ready", "work", "failed") for p in (spool / d).iterdir()]
    assert not leftovers, (leftovers, log)
