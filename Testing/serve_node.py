"""``ipv2-denoise serve`` as a child process for the node tests, and the DICOM helpers they share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pydicom
from conftest import write_ct_series
from orthanc_server import free_port
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

NODE_AET = "IPV2NODE"
LIB = Path(__file__).resolve().parents[1] / "IPv2Denoise"


class Node:
    """``ipv2-denoise serve`` as a child process (the real CLI, its own model load).

    ``host=None`` leaves ``--host`` at its default; ``extra`` are more options; ``env`` more
    environment variables (e.g. the node's fault injection); the log goes to ``log_dir`` (default:
    beside the spool).
    """

    def __init__(
        self,
        spool: Path,
        forward: str,
        quiet: float,
        *,
        host: str | None = "127.0.0.1",
        extra: Iterable[str] = (),
        env: dict[str, str] | None = None,
        wait_for: str = "listening as",
        log_dir: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.log = (log_dir or spool.parent) / f"serve-{self.port}.log"
        environment = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")])
        )
        environment.update(env or {})
        cmd = [sys.executable, "-m", "IPv2DenoiseLib", "serve", "--port", str(self.port), "--aet", NODE_AET]
        cmd += ["--forward", forward, "--spool", str(spool), "--quiet-seconds", str(quiet), "--device", "cpu"]
        cmd += ["--jobs", "2"] + (["--host", host] if host else []) + list(extra)
        self.process = subprocess.Popen(cmd, stderr=open(self.log, "w"), env=environment)  # noqa: SIM115
        self.wait_for(wait_for, 60)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float, count: int = 1) -> str:
        """The log once it holds ``needle`` (``count`` times); fails after ``timeout`` s or when the node ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return self.text()
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged within {timeout:g} s:\n{self.text()}")

    def wait_killed(self, timeout: float = 60) -> int:
        """Wait for the node to end by itself (fault injection kills it); its exit status."""
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=60)


def store(port: int, datasets, *, calling_aet: str = "MODALITY", transfer_syntax=None) -> list[int]:
    """C-STORE ``datasets`` to the node over one association; their statuses."""
    ae = AE(ae_title=calling_aet)
    for context in (CTImageStorage, MRImageStorage):
        if transfer_syntax:
            ae.add_requested_context(context, [transfer_syntax])
        else:
            ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def derived_in_orthanc(orthanc, study_uid: str, count: int, timeout: float = 60.0) -> list[pydicom.Dataset]:
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


def derived_series_count(orthanc, study_uid: str) -> list[int]:
    """Instances per derived ("denoised") series of the study in Orthanc."""
    return [
        len(s["Instances"])
        for s in orthanc.study_series(study_uid)
        if "denoised" in s["MainDicomTags"].get("SeriesDescription", "")
    ]


def fresh_study(folder: Path, n: int = 4) -> list[Path]:
    """A CT series of its own study (new StudyInstanceUID) so tests sharing Orthanc do not collide."""
    paths = write_ct_series(folder, n, shuffle=False)
    study = pydicom.uid.generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path)
    return paths


def jpeg_lossless(paths: Iterable[Path], folder: Path) -> list[pydicom.Dataset]:
    """The files re-encoded as JPEG Lossless SV1 (what many CT scanners send), by GDCM; as datasets."""
    import gdcm  # lazy: only these tests transcode

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read(), path
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change(), path
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(folder / path.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write(), path
        ds = pydicom.dcmread(path)  # GDCM's writer also edits the header (RescaleType): keep ours
        ds["PixelData"] = pydicom.dcmread(folder / path.name)["PixelData"]  # encapsulated, undefined length
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        out.append(ds)
    return out
