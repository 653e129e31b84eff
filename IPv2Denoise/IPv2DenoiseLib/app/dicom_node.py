"""A denoising DICOM node: Storage SCP in, derived series out to a forward destination.

A scanner or PACS C-STOREs CT instances to the node (pynetdicom Storage SCP, several associations
at once). Each instance is written atomically into a spool folder per series
(``incoming/<SeriesInstanceUID>/``). A series is complete when no instance of it has arrived for
``quiet_seconds``; it is then renamed to ``ready/`` and queued. At most ``jobs`` series are
denoised at a time (one model, loaded once); each becomes a derived series (``io.dicom_export``)
that is C-STOREd to the forward node (``io.dicom_net``), then the spool copy is removed.

Nothing is lost on a stop: every stored instance is on disk before the sender gets its
success status; on SIGTERM the node stops listening, lets open associations and running jobs
finish, and leaves queued and still-arriving series in the spool, where the next start resumes
them (``ready/`` at once, ``incoming/`` after a new quiet period). A series that fails
(unreadable, refused by the forward node) moves to ``failed/`` with a ``reason.txt``.
Non-CT instances are acknowledged and skipped; corrupt ones are refused (0xC210); both are logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.imaging.masks import soft_tissue_mask
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions, export_derived_series
from IPv2DenoiseLib.io.dicom_net import DestinationUnavailable, DicomNode, check_aet, echo, send_instances
from IPv2DenoiseLib.io.volumes import read_volume

__all__ = ["NodeConfig", "DenoisingNode", "series_noise"]

LOG = logging.getLogger("ipv2denoise.node")
#: C-STORE status "Cannot understand" (PS3.4 B.2.3), sent back for an instance we cannot decode.
CANNOT_UNDERSTAND = 0xC210
#: Modalities the node denoises; other instances are acknowledged and skipped.
CT_MODALITIES = {"CT"}
#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters; used as file and folder names.
_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: Longest wait between attempts to reach an unavailable forward destination.
MAX_RETRY_SECONDS = 600.0


@dataclass
class NodeConfig:
    """How the node listens, where it spools and where it forwards."""

    aet: str
    port: int
    forward: DicomNode
    spool: Path
    host: str = "0.0.0.0"
    quiet_seconds: float = 10.0
    jobs: int = 1
    timeout: float = 30.0
    retries: int = 3
    options: DerivedSeriesOptions = field(default_factory=DerivedSeriesOptions)
    stop_grace_seconds: float = 30.0
    #: first wait before re-sending to an unavailable forward destination (doubles, at most 10 min)
    retry_seconds: float = 30.0


@dataclass
class _Arrival:
    last_seen: float
    instances: int = 0
    senders: set[str] = field(default_factory=set)


def series_noise(before: Volume, after: Volume) -> tuple[float, float]:
    """Noise SD (HU) of a series before and after, over the same (input's) soft-tissue region."""
    region = soft_tissue_mask(before.array)
    return estimate_noise_hu(before.array, region=region), estimate_noise_hu(after.array, region=region)


def _pixel_data_ok(ds: Dataset) -> bool:
    """Uncompressed pixel data as long as Rows x Columns x frames x samples x bytes says."""
    if "PixelData" not in ds:
        return False
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return True  # checked when the series is read
    expected = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(getattr(ds, "NumberOfFrames", 1) or 1)
        * int(getattr(ds, "SamplesPerPixel", 1))
        * (int(ds.BitsAllocated) // 8)
    )
    return len(ds.PixelData) >= expected


class DenoisingNode:
    """Storage SCP + spool + job queue; see the module docstring.

    Parameters
    ----------
    config : NodeConfig
    denoise : callable(Volume) -> Volume
        The loaded model's denoising (called from up to ``config.jobs`` threads at once).
    """

    def __init__(self, config: NodeConfig, denoise: Callable[[Volume], Volume]) -> None:
        self.config = config
        self.denoise = denoise
        self.aet = check_aet(config.aet, "--aet")
        self.dirs = {name: config.spool / name for name in ("incoming", "ready", "work", "failed", "tmp")}
        self._lock = threading.Lock()
        self._arrivals: dict[str, _Arrival] = {}
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, config.jobs), thread_name_prefix="denoise")
        self._server = None
        self._monitor: threading.Thread | None = None

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> DenoisingNode:
        """Create the spool, resume what a previous run left, and start listening."""
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        resumed = sorted(self.dirs["ready"].iterdir())
        keep = {job.name for job in resumed}  # a derived series waiting to be sent is not denoised again
        for leftover in list(self.dirs["work"].iterdir()) + list(self.dirs["tmp"].iterdir()):
            if leftover.name in keep and leftover.parent == self.dirs["work"]:
                continue
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        for job in resumed:
            self._submit(job)
        now = time.monotonic()
        for folder in sorted(self.dirs["incoming"].iterdir()):
            self._arrivals[folder.name] = _Arrival(now, len(list(folder.glob("*.dcm"))), {"spool"})
        if resumed or self._arrivals:
            LOG.info(
                "resuming %d queued and %d incoming series from %s",
                len(resumed),
                len(self._arrivals),
                self.config.spool,
            )
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = True
        ae.maximum_associations = 32
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.timeout
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        try:
            self._server = ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            )
        except OSError as exc:
            raise UserError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self._monitor = threading.Thread(target=self._watch, name="quiet-period", daemon=True)
        self._monitor.start()
        LOG.info(
            "listening as %s on %s:%d; forwarding to %s; series complete after %g s quiet; %d job(s) at a time",
            self.aet,
            self.config.host,
            self.config.port,
            self.config.forward,
            self.config.quiet_seconds,
            max(1, self.config.jobs),
        )
        try:
            echo(self.config.forward, calling_aet=self.aet, timeout=self.config.timeout)
        except DestinationUnavailable as exc:
            LOG.warning("forward destination not available now (series will wait in the spool): %s", exc)
        return self

    def stop(self) -> None:
        """Stop listening, finish open transfers and running jobs; queued series stay in the spool."""
        self._stop.set()
        if self._server is not None:
            ae = self._server.ae
            self._server.shutdown()
            deadline = time.monotonic() + self.config.stop_grace_seconds
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in ae.active_associations:
                assoc.abort()
            self._server = None
        if self._monitor is not None:
            self._monitor.join()
        self._executor.shutdown(wait=True, cancel_futures=True)
        left = len(list(self.dirs["ready"].iterdir())) + len(list(self.dirs["incoming"].iterdir()))
        LOG.info("stopped; %d series left in the spool for the next start", left)

    def wait(self) -> None:
        """Block until :meth:`request_stop` (e.g. from a signal handler)."""
        while not self._stop.wait(0.2):
            pass

    def request_stop(self) -> None:
        self._stop.set()

    # -------------------------------------------------------------------------------- receiving

    def _on_store(self, event) -> int:
        sender = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            modality = str(ds.get("Modality", ""))
            ok = _pixel_data_ok(ds) if modality in CT_MODALITIES else True
            if not (_UID.fullmatch(sop_uid) and _UID.fullmatch(series_uid)):  # they become file names
                raise ValueError(f"invalid UID {sop_uid!r} / {series_uid!r}")
        except Exception as exc:  # noqa: BLE001 (whatever a peer sends, the node keeps serving)
            LOG.warning("refused a corrupt instance from %s: %s", sender, str(exc).splitlines()[0][:160])
            return CANNOT_UNDERSTAND
        if modality not in CT_MODALITIES:
            LOG.warning(
                "skipped a %s instance %s from %s (only CT is denoised)", modality or "?", sop_uid, sender
            )
            return 0x0000
        if not ok:
            LOG.warning("refused a corrupt CT instance %s from %s: pixel data too short", sop_uid, sender)
            return CANNOT_UNDERSTAND
        fd, tmp = tempfile.mkstemp(suffix=".dcm", dir=self.dirs["tmp"])
        with os.fdopen(fd, "wb") as f:
            f.write(event.encoded_dataset(include_meta=True))
            f.flush()
            os.fsync(f.fileno())  # on disk before the sender hears "success"
        with self._lock:
            folder = self.dirs["incoming"] / series_uid
            folder.mkdir(exist_ok=True)
            os.replace(tmp, folder / f"{sop_uid}.dcm")
            arrival = self._arrivals.setdefault(series_uid, _Arrival(0.0))
            arrival.last_seen = time.monotonic()
            arrival.instances += 1
            arrival.senders.add(str(event.assoc.requestor.ae_title))
        return 0x0000

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.config.quiet_seconds / 4)):
            now = time.monotonic()
            with self._lock:
                quiet = [
                    uid for uid, a in self._arrivals.items() if now - a.last_seen >= self.config.quiet_seconds
                ]
                for uid in quiet:
                    arrival = self._arrivals.pop(uid)
                    job = self.dirs["ready"] / f"{uid}.{time.time_ns()}"
                    os.replace(self.dirs["incoming"] / uid, job)
                    (job / ".senders").write_text(",".join(sorted(arrival.senders)))
                    self._submit(job)

    def _submit(self, job: Path, attempt: int = 0) -> None:
        if self._stop.is_set():
            return  # stays in ready/ for the next start
        self._executor.submit(self._process, job, attempt)

    # ------------------------------------------------------------------------------- processing

    def _denoise_to(self, job: Path, out: Path) -> dict:
        """Denoise the job's series into the derived series ``out``; its figures are kept in the job."""
        facts_file = job / ".denoised.json"
        if out.is_dir() and facts_file.exists():  # an earlier attempt denoised it; only sending failed
            return json.loads(facts_file.read_text())
        volume = read_volume(job)
        t0 = time.monotonic()
        result = self.denoise(volume)
        denoise_s = time.monotonic() - t0
        before, after = series_noise(volume, result)
        shutil.rmtree(out, ignore_errors=True)
        files = export_derived_series(
            result, out, source_files=volume.meta["dicom_files"], options=self.config.options
        )
        facts = {
            "slices": len(files),
            "denoise_seconds": denoise_s,
            "noise_before_hu": before,
            "noise_after_hu": after,
        }
        facts_file.write_text(json.dumps(facts))
        return facts

    def _process(self, job: Path, attempt: int = 0) -> None:
        start = time.monotonic()
        series_uid = job.name.rsplit(".", 1)[0]
        senders = (job / ".senders").read_text() if (job / ".senders").exists() else "spool"
        received = len(list(job.glob("*.dcm")))
        out = self.dirs["work"] / job.name
        try:
            facts = self._denoise_to(job, out)
            report = send_instances(
                sorted(out.glob("*.dcm")),
                self.config.forward,
                calling_aet=self.aet,
                timeout=self.config.timeout,
                retries=self.config.retries,
            )
            report.raise_for_failures()
        except DestinationUnavailable as exc:
            delay = min(self.config.retry_seconds * 2**attempt, MAX_RETRY_SECONDS)
            LOG.warning(
                "series %s: denoised, but %s; will retry in %.0f s (kept in %s)", series_uid, exc, delay, job
            )
            self._retry_later(job, attempt + 1, delay)
            return
        except Exception as exc:  # noqa: BLE001 (one bad series must not stop the node)
            reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            shutil.rmtree(out, ignore_errors=True)
            self._fail(job, reason)
            LOG.error(
                "series %s: received %d instance(s) from %s; FAILED after %.1f s: %s (kept in %s)",
                series_uid,
                received,
                senders,
                time.monotonic() - start,
                reason,
                self.dirs["failed"] / job.name,
            )
            return
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(job, ignore_errors=True)
        seconds = time.monotonic() - start
        LOG.info(
            "series %s: received %d instance(s) from %s, denoised %d slice(s) in %.1f s, sent %d to %s; "
            "%.1f s in all; noise %.1f -> %.1f HU",
            series_uid,
            received,
            senders,
            facts["slices"],
            facts["denoise_seconds"],
            len(report.results),
            self.config.forward,
            seconds,
            facts["noise_before_hu"],
            facts["noise_after_hu"],
        )

    def _retry_later(self, job: Path, attempt: int, delay: float) -> None:
        """Queue ``job`` again after ``delay`` s, unless the node stops first (then the next start resumes it)."""

        def resubmit() -> None:
            if not self._stop.wait(delay):
                self._submit(job, attempt)

        threading.Thread(target=resubmit, name="retry", daemon=True).start()

    def _fail(self, job: Path, reason: str) -> None:
        target = self.dirs["failed"] / job.name
        try:
            os.replace(job, target)
            (target / "reason.txt").write_text(reason + "\n")
        except OSError as exc:
            LOG.error("could not move %s to %s: %s", job, target, exc)
