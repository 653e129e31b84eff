"""A real Orthanc PACS for the network tests: Debian's ``orthanc`` (+ ``orthanc-dicomweb``) on loopback.

:func:`start_orthanc` writes a throwaway JSON configuration (plus any ``extra_config``, e.g. a cap
on C-FIND answers) and storage folder, starts the ``Orthanc`` binary on free loopback ports (DICOM
and HTTP), waits for its REST API and returns an :class:`Orthanc` handle (REST helpers, ``stop()``).
``.ci/run`` installs the packages on CI.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    process: subprocess.Popen
    dicom_port: int
    http_port: int
    folder: Path
    aet: str = ORTHANC_AET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def node(self) -> str:
        """``HOST:PORT:AET`` as the CLI takes it."""
        return f"127.0.0.1:{self.dicom_port}:{self.aet}"

    def get(self, path: str):
        r = requests.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        r = requests.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.content

    def post_bytes(self, path: str, data: bytes):
        r = requests.post(self.url + path, data=data, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body, timeout: float = 60):
        """POST ``body``: a str as is (e.g. a UID for /tools/lookup), anything else as JSON."""
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        r = requests.post(self.url + path, data=data, timeout=timeout)
        r.raise_for_status()
        return r.json() if r.content else None

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Register a DICOM node Orthanc may send to (REST ``PUT /modalities/NAME``)."""
        body = {"AET": aet, "Host": host, "Port": port}
        requests.put(f"{self.url}/modalities/{name}", data=json.dumps(body), timeout=10).raise_for_status()

    def series_instances(self, series_uid: str) -> list[dict]:
        """Orthanc's instances (with ``MainDicomTags``) of a series; [] when it has none."""
        ids = self.post("/tools/lookup", series_uid) or []
        series = [i for i in ids if i["Type"] == "Series"]
        if not series:
            return []
        return self.get(f"/series/{series[0]['ID']}/instances")

    def study_series(self, study_uid: str) -> list[dict]:
        ids = [i for i in (self.post("/tools/lookup", study_uid) or []) if i["Type"] == "Study"]
        return self.get(f"/studies/{ids[0]['ID']}/series") if ids else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(folder: Path, *, extra_config: dict | None = None, timeout: float = 30.0) -> Orthanc:
    """Start Orthanc with a fresh configuration and storage in ``folder``; raise when it cannot.

    ``extra_config`` is merged into the JSON configuration (its keys win, top level only), e.g.
    ``{"LimitFindResults": 2}`` for a PACS that caps its C-FIND answers.
    """
    binary = shutil.which("Orthanc")
    if binary is None:
        raise RuntimeError(
            "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "ipv2-denoise-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {},
        "SaveJobs": False,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra_config or {}),
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "w")  # noqa: SIM115 (kept open for the child's lifetime)
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    server = Orthanc(process, dicom_port, http_port, folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}; see {folder / 'orthanc.log'}")
        try:
            server.get("/system")
            return server
        except requests.RequestException:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on port {http_port} within {timeout:g} s")
