"""One job at a time per web server: read, denoise or export in a background thread, with progress,
ETA, warnings and Cancel.

The work itself is :class:`~IPv2DenoiseLib.app.pipeline.DenoisePipeline` (the same read, checks,
model, warnings and derived-series export as ``denoise``) and
:func:`~IPv2DenoiseLib.imaging.metrics.scan_comparison_table` (the numbers of ``demo`` and the
Slicer module). :class:`JobRunner` only schedules it: the page polls :meth:`JobRunner.snapshot`,
so any number of browsers can watch one job without touching it, and a second start while one
runs is refused with a "busy" message. :class:`LoadedModel` keeps the network of the last denoise
loaded for the next one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPv2DenoiseLib.app.pipeline import DenoiseOptions, DenoiseOutcome, DenoisePipeline, WarningSink
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled, CancelToken, EtaEstimator, ProgressCallback
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable

if TYPE_CHECKING:
    from IPv2DenoiseLib.denoiser.infer import Denoiser

log = logging.getLogger(__name__)

#: What a job runs: ``work(progress, warn, cancel)`` returns its result or raises.
Work = Callable[[ProgressCallback, WarningSink, CancelToken], Any]

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"


@dataclass(frozen=True)
class JobSnapshot:
    """What the page shows about the current (or last) job."""

    serial: int = 0
    kind: str = ""
    state: str = IDLE
    fraction: float = 0.0
    eta_s: float | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()
    error: str = ""
    seconds: float = 0.0

    @property
    def busy(self) -> bool:
        return self.state == RUNNING


@dataclass
class _Job:
    serial: int
    kind: str
    cancel: CancelToken = field(default_factory=CancelToken)
    eta: EtaEstimator = field(default_factory=EtaEstimator)
    started: float = field(default_factory=time.monotonic)
    state: str = RUNNING
    fraction: float = 0.0
    eta_s: float | None = None
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    result: Any = None


class JobRunner:
    """Runs at most one :data:`Work` at a time in a daemon thread; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._serial = 0

    def start(self, kind: str, work: Work) -> int:
        """Start ``work``; returns its serial number.

        Raises
        ------
        UserError
            A job is already running (the server is busy).
        """
        with self._lock:
            if self._job is not None and self._job.state == RUNNING:
                raise UserError(f"busy: a {self._job.kind} job is running; wait for it or cancel it")
            self._serial += 1
            job = _Job(self._serial, kind, message=f"{kind}: starting")
            self._job = job
            self._thread = threading.Thread(
                target=self._run, args=(job, work), name=f"ipv2-web-{kind}-{job.serial}", daemon=True
            )
            self._thread.start()
            return job.serial

    def _run(self, job: _Job, work: Work) -> None:
        def progress(done: int, total: int, message: str = "") -> None:
            job.cancel.check()  # also stops steps that take no token (the DICOM writer)
            with self._lock:
                job.fraction = min(1.0, done / total) if total else 0.0
                job.eta_s = job.eta.eta(done, total)
                if message:
                    job.message = message

        def warn(message: str) -> None:
            with self._lock:
                if message not in job.warnings:
                    job.warnings.append(message)

        try:
            result = work(progress, warn, job.cancel)
        except Cancelled:
            state, error, result = CANCELLED, "", None
        except UserError as exc:
            state, error, result = FAILED, str(exc), None
        except Exception as exc:  # a bug must reach the page (and the log), not kill the thread silently
            log.exception("%s job failed", job.kind)
            state, error, result = FAILED, f"{type(exc).__name__}: {exc}", None
        else:
            state, error = DONE, ""
        with self._lock:
            job.state, job.error, job.result = state, error, result
            job.seconds = time.monotonic() - job.started
            job.eta_s = None
            if state == DONE:
                job.fraction = 1.0
            job.message = {DONE: f"{job.kind}: done", CANCELLED: f"{job.kind}: cancelled"}.get(
                state, f"{job.kind}: failed"
            )

    def cancel(self) -> bool:
        """Ask the running job to stop at its next check; False when none runs."""
        with self._lock:
            if self._job is None or self._job.state != RUNNING:
                return False
            self._job.cancel.cancel()
            self._job.message = f"{self._job.kind}: cancelling"
            return True

    def snapshot(self) -> JobSnapshot:
        """The current or last job, as the page shows it."""
        with self._lock:
            job = self._job
            if job is None:
                return JobSnapshot()
            seconds = job.seconds if job.state != RUNNING else time.monotonic() - job.started
            return JobSnapshot(
                job.serial,
                job.kind,
                job.state,
                job.fraction,
                job.eta_s,
                job.message,
                tuple(job.warnings),
                job.error,
                seconds,
            )

    def result(self, serial: int) -> Any:
        """The result of finished job ``serial`` (None when it failed, was cancelled or is not the last)."""
        with self._lock:
            job = self._job
            return job.result if job is not None and job.serial == serial and job.state == DONE else None

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        """Block until the current job ends (scripts and tests)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()


# ----------------------------------------------------------------------------------- the work


@dataclass
class DenoiseResult:
    """A denoised scan and its ROI metrics table (the same numbers as ``demo``)."""

    outcome: DenoiseOutcome
    table: MetricsTable


@dataclass
class ExportResult:
    """A derived DICOM series written into the data root, and what the PACS said (if sent)."""

    folder: Path
    files: list[Path]
    sent: str = ""


def read_work(source: Path, *, series_uid: str | None = None) -> Work:
    """Read a volume file or DICOM series (only ``series_uid`` when given) with every input check of the CLI."""

    def work(progress: ProgressCallback, warn: WarningSink, cancel: CancelToken) -> Volume:
        volume = DenoisePipeline(progress=progress, warn=warn, cancel=cancel).read(
            source, series_uid=series_uid
        )
        for message in volume.meta.get("warnings", []):
            warn(message)
        return volume

    return work


@dataclass(frozen=True)
class PacsPeer:
    """The ``--pacs`` of the server: where the page searches, retrieves from and sends to."""

    #: A DicomNode (C-FIND / C-GET / C-STORE) or a DICOMweb base URL (QIDO / WADO / STOW-RS).
    destination: Any
    calling_aet: str | None = None
    timeout: float = 10.0
    retries: int = 3
    #: The time one retrieval may take at most, s (``--retrieve-max-minutes``); None: the library's
    #: default, :data:`~IPv2DenoiseLib.io.dicom_query.MAX_RETRIEVE_SECONDS`.
    retrieve_max_seconds: float | None = None

    @property
    def aet(self) -> str:
        from IPv2DenoiseLib.io.dicom_net import DEFAULT_CALLING_AET  # lazy: pynetdicom

        return self.calling_aet or DEFAULT_CALLING_AET


def search_work(peer: PacsPeer, patient: str, study_date: str) -> Work:
    """The PACS's CT series of the matching patients (:func:`~IPv2DenoiseLib.io.dicom_query.find_series`)."""

    def work(progress: ProgressCallback, warn: WarningSink, cancel: CancelToken) -> list:
        from IPv2DenoiseLib.io.dicom_query import find_series  # lazy: pynetdicom

        progress(0, 1, f"search: asking {peer.destination}")
        return find_series(
            peer.destination,
            patient=patient,
            study_date=study_date,
            calling_aet=peer.aet,
            timeout=peer.timeout,
            progress=progress,  # per study
            cancel=cancel,  # Cancel stops it before the next study (it ran to the end and showed "done")
        )

    return work


def retrieve_work(peer: PacsPeer, match: Any, folder: Path) -> Work:
    """Fetch the chosen series into ``folder`` (unless a complete earlier copy is there), then read it
    with every input check of the CLI, as :func:`read_work` does. The retrieval is bounded in time by
    ``peer.retrieve_max_seconds``."""

    def work(progress: ProgressCallback, warn: WarningSink, cancel: CancelToken) -> Volume:
        from IPv2DenoiseLib.io.dicom_query import MAX_RETRIEVE_SECONDS, retrieve_series  # lazy: pynetdicom

        read = read_work(folder, series_uid=match.series_uid)  # the chosen series, whatever else lies there
        have = sum(f.is_file() for f in folder.iterdir()) if folder.is_dir() else 0  # whatever their names
        if have and match.instances in (None, have):  # a copy is written whole or not at all
            try:
                return read(progress, warn, cancel)
            except UserError:  # not that series, or not all of it (changed on disk): fetch it again
                pass
        limit = peer.retrieve_max_seconds
        max_seconds = MAX_RETRIEVE_SECONDS if limit is None else limit
        retrieve_series(
            peer.destination,
            match.study_uid,
            match.series_uid,
            folder,
            calling_aet=peer.aet,
            timeout=max(peer.timeout, 30.0),
            progress=progress,
            cancel=cancel,
            max_seconds=max_seconds,
            replace=folder.is_dir() and any(folder.iterdir()),
        )
        return read(progress, warn, cancel)

    return work


class LoadedModel:
    """The one network a web server keeps loaded from one denoise job to the next.

    Loading reads the weights and verifies their sha256 (0.5-2 s); a page denoises scan after scan
    with the same choices. It holds one network: another model, ensemble, refine or device
    replaces it (the old one is dropped before the new one loads, so two never share the memory),
    and so does a weights file changed on disk. ``--adapt`` fine-tunes a copy, never this network.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Hashable = None
        self._denoiser: Denoiser | None = None
        #: How many times a network was loaded (the page's jobs and the tests read it).
        self.loads = 0

    def get(self, key: Hashable, load: Callable[[], Denoiser]) -> Denoiser:
        """The network held for ``key``, or ``load()``'s, which then replaces the one held.

        Parameters
        ----------
        key : hashable
            What the network depends on (see :func:`model_key`).
        load : callable
            Loads it (raises as the pipeline does: a missing file, a wrong checksum).

        Returns
        -------
        Denoiser
            The loaded network; the caller must not modify it.
        """
        with self._lock:
            if self._denoiser is None or self._key != key:
                self._key, self._denoiser = None, None  # released before the next one loads
                self._denoiser = load()
                self._key = key
                self.loads += 1
            return self._denoiser


def model_key(pipeline: DenoisePipeline) -> Hashable:
    """What a pipeline's network depends on: the model (its file's size and time too), ensemble, refine, device."""
    reference, options = pipeline.reference, pipeline.options
    try:
        st = os.stat(reference.weights)
        stamp: tuple[int, int, int] | None = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:  # gone: the load says so in one line
        stamp = None
    return (reference, stamp, options.ensemble, options.refine, options.device)


class _KeptModelPipeline(DenoisePipeline):
    """A :class:`DenoisePipeline` that takes its network from a :class:`LoadedModel`."""

    def __init__(self, options: DenoiseOptions, kept: LoadedModel, **hooks: Any) -> None:
        super().__init__(options, **hooks)
        self._kept = kept

    def denoiser(self) -> Denoiser:
        """The kept network, loaded (by the pipeline's own :meth:`DenoisePipeline.denoiser`) only when the choice changed."""
        return self._kept.get(model_key(self), super().denoiser)


def denoise_work(volume: Volume, options: DenoiseOptions, *, model: LoadedModel | None = None) -> Work:
    """Denoise ``volume`` through the pipeline, then the ROI metrics table of ``demo``.

    With ``model``, the network loaded for an earlier job with the same choices is used again.
    """

    def work(progress: ProgressCallback, warn: WarningSink, cancel: CancelToken) -> DenoiseResult:
        from IPv2DenoiseLib.imaging.metrics import scan_comparison_table  # lazy: scikit-image

        hooks: dict[str, Any] = {"progress": progress, "warn": warn, "cancel": cancel}
        pipeline = (
            _KeptModelPipeline(options, model, **hooks)
            if model is not None
            else DenoisePipeline(options, **hooks)
        )
        outcome = pipeline.denoise(volume)
        cancel.check()
        table = scan_comparison_table(
            outcome.source.array, outcome.denoised.array, spacing=outcome.source.spacing
        )
        return DenoiseResult(outcome, table)

    return work


def export_work(
    result: DenoiseResult,
    folder: Path,
    *,
    options: DenoiseOptions,
    pacs: PacsPeer | None = None,
) -> Work:
    """Write the derived DICOM series into ``folder`` (atomically), then send it to ``pacs`` if given."""

    def work(progress: ProgressCallback, warn: WarningSink, cancel: CancelToken) -> ExportResult:
        pipeline = DenoisePipeline(options, progress=progress, warn=warn, cancel=cancel)
        files = pipeline.export_dicom(result.outcome, folder)
        sent = ""
        if pacs is not None:
            from IPv2DenoiseLib.io.dicom_net import send  # lazy: pynetdicom

            try:
                report = send(
                    files,
                    pacs.destination,
                    calling_aet=pacs.aet,
                    timeout=pacs.timeout,
                    retries=pacs.retries,
                    progress=progress,
                )
                report.raise_for_failures()
            except BaseException:
                # a failed or cancelled send: the written series stays, and the page says so
                warn(
                    f"export: the derived series was written to {folder.name}/ ({len(files)} files) and stays "
                    "there; sending it to the PACS did not finish (the PACS may hold part of it): send that "
                    "folder again with `ipv2-denoise send`"
                )
                raise
            sent = report.summary()
        return ExportResult(folder, files, sent)

    return work


def table_cells(table: MetricsTable) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table as ``demo``'s metrics.md shows them (the same rounding)."""
    lines = [line for line in table.to_markdown().splitlines() if line.startswith("|")]
    header, *rows = [
        [cell.strip().replace("\\|", "|") for cell in line.strip().strip("|").split(" | ")]
        for line in lines
        if not line.startswith("|---")
    ]
    return header, rows


def warnings_of(snapshots: Sequence[JobSnapshot]) -> list[str]:
    """Every distinct warning of these jobs, in order."""
    seen: list[str] = []
    for snap in snapshots:
        seen.extend(w for w in snap.warnings if w not in seen)
    return seen


__all__ = [
    "CANCELLED",
    "DONE",
    "FAILED",
    "IDLE",
    "RUNNING",
    "DenoiseResult",
    "ExportResult",
    "JobRunner",
    "JobSnapshot",
    "LoadedModel",
    "PacsPeer",
    "Work",
    "denoise_work",
    "export_work",
    "model_key",
    "read_work",
    "retrieve_work",
    "search_work",
    "table_cells",
    "warnings_of",
]
