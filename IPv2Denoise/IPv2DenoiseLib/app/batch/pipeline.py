"""Process batch cases: read, denoise, write, record — and the local engine that overlaps them.

:class:`CaseProcessor` holds the model (loaded once) and does the three steps of a case;
every failure a study can cause (unreadable, not CT, too small, ...) becomes a ``failed`` row
with a one-line reason instead of stopping the batch. :func:`run_local` runs the steps as a
pipeline: a reader thread prefetches the next studies into a bounded queue while the main
thread runs the network and a writer thread writes and records the previous case, so disk and
decompression overlap with compute. At most ``prefetch + 4`` cases are in flight (one being read,
``prefetch`` queued, one being denoised, one queued for the writer, one being written); a denoised
case drops its source array before it is queued for the writer, so they hold about ``prefetch + 5``
volume-sized arrays (plus the network's working memory), however large the archive.

OUT's file system refusing writes (full, over quota, read-only: :data:`FATAL_ERRNOS`) is not one
study's problem: the first case that fails so stops the run (:class:`OutputUnwritable`), instead
of denoising every remaining case only to fail writing it.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from IPv2DenoiseLib.app.batch.cases import Case
from IPv2DenoiseLib.app.batch.records import (
    forget_record,
    hash_output,
    output_path,
    verified_record,
    write_record,
)
from IPv2DenoiseLib.app.pipeline import DenoiseOptions, DenoiseOutcome, DenoisePipeline
from IPv2DenoiseLib.core.atomic import claim_output, remove_stale_partials
from IPv2DenoiseLib.core.device import describe_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH
from IPv2DenoiseLib.io.volumes import read_dicom_series, read_volume

RowCallback = Callable[[dict[str, Any]], None]

#: Errors of OUT's file system after which no case can be written: the run stops.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Key of a failed row whose failure stops the run (its value: the one-line reason); never in a summary.
STOP_KEY = "stop_run"
#: Bytes the probe writes (and fsyncs) in OUT after a failed write, to tell a full disk from one study's problem.
PROBE_BYTES = 1 << 16


class OutputUnwritable(UserError):
    """OUT takes no more writes (full disk, quota, read-only file system); the run stopped."""


def unwritable_reason(exc: BaseException, folder: Path) -> str:
    """Why OUT takes no more writes, if that is why writing a case failed with ``exc``; else "".

    Judged from an :class:`OSError` with an errno of :data:`FATAL_ERRNOS` in ``exc`` or what it
    wraps, from the message of a one-line error that names one (``write_volume`` replaces ITK's
    exception), or else from a probe: a small file written and synced in ``folder``.

    Parameters
    ----------
    exc : BaseException
        What writing the case raised.
    folder : pathlib.Path
        The case's output folder (or OUT), on the file system to probe.

    Returns
    -------
    str
        One line naming the cause and the folder, or ``""`` when the case alone failed.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in FATAL_ERRNOS:
            return f"cannot write into {folder}: {cause.strerror or os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if any(os.strerror(code) in text for code in FATAL_ERRNOS):
        return _one_line(exc)
    return _probe_unwritable(folder)


def _probe_unwritable(folder: Path) -> str:
    """Nothing (``""``) when a small file can be written and synced in ``folder``; else why not
    (for the errnos of :data:`FATAL_ERRNOS` only: another failure is the case's own)."""
    while not folder.is_dir() and folder != folder.parent:  # the case's folder may not exist yet
        folder = folder.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".ipv2-batch-probe-", dir=folder)
    except OSError as exc:
        return f"cannot write into {folder}: {exc.strerror}" if exc.errno in FATAL_ERRNOS else ""
    try:
        os.write(fd, bytes(PROBE_BYTES))
        os.fsync(fd)
    except OSError as exc:
        return f"cannot write into {folder}: {exc.strerror}" if exc.errno in FATAL_ERRNOS else ""
    finally:
        os.close(fd)
        os.unlink(name)
    return ""


def _without_source_array(outcome: DenoiseOutcome) -> None:
    """Let a denoised case hold one volume-sized array, not two, until it is written.

    The noise after denoising (measured against the source) is computed and cached first; the
    writers use only the denoised volume and the source's geometry and meta.
    """
    _ = outcome.noise_after_hu  # cached_property: measured now, while the source is here
    source = outcome.source
    outcome.source = Volume(
        np.broadcast_to(np.float32(0), source.shape),  # the shape, in 4 bytes
        source.spacing,
        source.origin,
        source.direction,
        source.meta,
    )


@dataclass(frozen=True)
class BatchSettings:
    """What every worker needs to process cases the same way (picklable: sent to Ray actors)."""

    out_root: str
    #: Model, device, background removal, ensemble, refinement, slab: as ``denoise`` (``adapt`` is not offered).
    options: DenoiseOptions = DenoiseOptions()
    dicom: bool = False
    run_id: str = ""
    #: ``--resample-gaps``: read DICOM series with missing slices onto an even grid (else: failed row).
    resample_gaps: bool = False


@dataclass
class Loaded:
    """A case read into memory (between the pipeline's steps)."""

    case: Case
    volume: Volume
    fingerprint: str
    started: float
    attempts: int = 1
    outcome: DenoiseOutcome | None = None

    @property
    def result(self) -> Volume | None:
        """The denoised volume, once denoised."""
        return self.outcome.denoised if self.outcome is not None else None


def case_row(case: Case, status: str, **values: Any) -> dict[str, Any]:
    """A summary row for ``case`` (see :data:`~IPv2DenoiseLib.app.batch.records.SUMMARY_COLUMNS`)."""
    row = {
        "case": case.case_id,
        "status": status,
        "input": case.source or (case.files[0] if case.files else ""),
        "output": "",
        "series_uid": case.series_uid,
        "seconds": 0.0,
        "device": "",
        "worker": "",
        "attempts": 1,
        "error": "",
    }
    row.update(values)
    return row


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


class CaseProcessor:
    """Reads, denoises and writes cases with one model loaded once; thread-safe (one network at a time)."""

    def __init__(self, settings: BatchSettings, *, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.out_root = Path(settings.out_root)
        self.pipeline = DenoisePipeline(settings.options)  # one model, loaded once per worker
        self.device = self.pipeline.device
        self.device_name = describe_device(self.device)
        self.denoiser = self.pipeline.denoiser()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._network = threading.Lock()

    @property
    def record_settings(self) -> dict[str, Any]:
        """What a done record must match besides the input: the model and what is written."""
        options = self.settings.options
        return {
            "model": self.denoiser.name,
            "model_sha256": self.denoiser.card.get("sha256"),
            "remove_background": options.remove_background,
            "ensemble": options.ensemble,
            "format": "dicom" if self.settings.dicom else "nrrd",
            # only when set, so the done records of earlier runs stay valid
            **({"resample_gaps": True} if self.settings.resample_gaps else {}),
            **({"refine": True} if options.refine else {}),
            **({"strength": options.strength} if options.strength != DEFAULT_STRENGTH else {}),
        }

    # ------------------------------------------------------------------------------------ rows

    def _row(self, case: Case, status: str, **values: Any) -> dict[str, Any]:
        output = ""
        if status != "failed":  # a failed case may be one whose id was refused as an output path
            out = output_path(self.out_root, case.case_id, dicom=self.settings.dicom)
            output = out.relative_to(self.out_root).as_posix()
        values = {"device": self.device_name, "worker": self.worker, **values}  # a record's own win
        return case_row(case, status, output=output, **values)

    def failed(
        self, case: Case, error: str, *, started: float | None = None, attempts: int = 1
    ) -> dict[str, Any]:
        seconds = round(time.monotonic() - started, 3) if started is not None else 0.0
        return self._row(case, "failed", error=error, seconds=seconds, attempts=attempts)

    def _from_record(self, case: Case, record: dict[str, Any], attempts: int) -> dict[str, Any]:
        # A retried case whose first attempt finished (then its worker died) was done in this run.
        status = "done" if record.get("run_id") == self.settings.run_id else "skipped"
        return self._row(
            case,
            status,
            **{
                k: record.get(k)
                for k in ("shape", "seconds", "device", "worker", "noise_before_hu", "noise_after_hu")
            },
            warnings="; ".join(record.get("warnings") or []),
            output_sha256=record.get("output_sha256"),
            attempts=attempts,
        )

    # ----------------------------------------------------------------------------------- steps

    def load(self, case: Case, *, attempts: int = 1) -> Loaded | dict[str, Any]:
        """Read a case (or return its row when it is already done and verified, or cannot be read)."""
        started = time.monotonic()
        if case.error:
            return self.failed(case, case.error, started=started, attempts=attempts)
        try:
            out = output_path(self.out_root, case.case_id, dicom=self.settings.dicom).resolve()
            if any(out == Path(f).resolve() or out in Path(f).resolve().parents for f in case.files):
                raise UserError(f"{out} would overwrite the input; choose an OUT outside the input files")
            fingerprint = case.fingerprint()
            record = self._done_record(case, fingerprint)
            if record is not None:
                return self._from_record(case, record, attempts)
            if case.kind == "dicom":
                volume = read_dicom_series(case.files, resample_gaps=self.settings.resample_gaps)
            else:
                volume = read_volume(case.files[0])
            return Loaded(case, volume, fingerprint, started, attempts)
        except Exception as exc:  # one study's problem must not stop the archive
            return self.failed(case, _one_line(exc), started=started, attempts=attempts)

    def denoise(self, loaded: Loaded) -> Loaded | dict[str, Any]:
        """Run the network (one case at a time per processor)."""
        try:
            with self._network:
                loaded.outcome = self.pipeline.denoise(loaded.volume)
            _without_source_array(loaded.outcome)
            loaded.volume = loaded.outcome.source
            return loaded
        except Exception as exc:
            return self.failed(loaded.case, _one_line(exc), started=loaded.started, attempts=loaded.attempts)

    def _claimed(self, case: Case) -> AbstractContextManager:
        """The case's output claim, waiting for another holder (another run, shard or Ray attempt)."""
        out = output_path(self.out_root, case.case_id, dicom=self.settings.dicom)
        return claim_output(out, what=f"case {case.case_id}", wait=True)

    def _done_record(self, case: Case, fingerprint: str) -> dict | None:
        """The case's done record when it matches this input and these settings (else None)."""
        return verified_record(
            self.out_root,
            case.case_id,
            fingerprint=fingerprint,
            settings=self.record_settings,
            dicom=self.settings.dicom,
        )

    def store(self, loaded: Loaded) -> dict[str, Any]:
        """Write the output atomically, then its done record; returns the summary row.

        Holds the case's output claim while writing (waiting for another holder): a case that
        another run or shard is writing, or has just finished, is then reported from its done
        record instead of being written twice (the local engine's writer; Ray's workers claim in
        :meth:`process`).
        """
        case = loaded.case
        try:
            with self._claimed(case):
                record = self._done_record(case, loaded.fingerprint)
                if record is not None:  # another run finished it meanwhile
                    return self._from_record(case, record, loaded.attempts)
                return self._store_claimed(loaded)
        except Exception as exc:  # the claim's lock file cannot be made (a file in the way, a full disk)
            return self._write_failed(case, exc, started=loaded.started, attempts=loaded.attempts)

    def _write_failed(
        self, case: Case, exc: BaseException, *, started: float, attempts: int
    ) -> dict[str, Any]:
        """The failed row of a case that could not be written; marked to stop the run
        (:data:`STOP_KEY`) when OUT itself takes no more writes."""
        row = self.failed(case, _one_line(exc), started=started, attempts=attempts)
        try:
            folder = output_path(self.out_root, case.case_id, dicom=self.settings.dicom).parent
        except UserError:
            folder = self.out_root
        reason = unwritable_reason(exc, folder)
        if reason:
            row[STOP_KEY] = reason
        return row

    def _store_claimed(self, loaded: Loaded) -> dict[str, Any]:
        """:meth:`store` once the output claim is held."""
        case = loaded.case
        try:
            out = output_path(self.out_root, case.case_id, dicom=self.settings.dicom)
            forget_record(self.out_root, case.case_id)  # from here on the case is not done until re-recorded
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(out)
            self._write(loaded, out)
            sha256, size = hash_output(out)
            noise_before = round(loaded.outcome.noise_before_hu, 3)
            noise_after = round(loaded.outcome.noise_after_hu, 3)
            seconds = round(time.monotonic() - loaded.started, 3)
            shape = "x".join(map(str, loaded.volume.shape))
            write_record(
                self.out_root,
                case.case_id,
                {
                    "case": case.case_id,
                    "run_id": self.settings.run_id,
                    "input_fingerprint": loaded.fingerprint,
                    "inputs": len(case.files),
                    "settings": self.record_settings,
                    "output": out.relative_to(self.out_root).as_posix(),
                    "output_sha256": sha256,
                    "output_bytes": size,
                    "shape": shape,
                    "seconds": seconds,
                    "device": self.device_name,
                    "worker": self.worker,
                    "noise_before_hu": noise_before,
                    "noise_after_hu": noise_after,
                    "warnings": loaded.outcome.warnings,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
            return self._row(
                case,
                "done",
                shape=shape,
                seconds=seconds,
                attempts=loaded.attempts,
                noise_before_hu=noise_before,
                noise_after_hu=noise_after,
                output_sha256=sha256,
                warnings="; ".join(loaded.outcome.warnings),
            )
        except Exception as exc:
            return self._write_failed(case, exc, started=loaded.started, attempts=loaded.attempts)

    def _write(self, loaded: Loaded, out: Path) -> None:
        if not self.settings.dicom:
            self.pipeline.write_volume(loaded.outcome, out)
            return
        # An earlier, unrecorded output of this case is replaced whole once the new one is written,
        # and only if it is a folder of *.dcm files (never a folder of other things found there).
        self.pipeline.export_dicom(loaded.outcome, out, replace_existing=out.exists())

    def process(self, case: Case, *, attempts: int = 1) -> dict[str, Any]:
        """All steps of one case in this thread (the Ray actors' unit of work, and ``--prefetch 0``).

        Denoising and writing hold the case's output claim, waiting while another attempt of the
        case holds it: Ray resubmits a case whose worker stopped answering, and that worker may
        still be running it. The later attempt then finds the earlier one's done record and
        returns its row instead of writing the output a second time.
        """
        item = self.load(case, attempts=attempts)
        if not isinstance(item, Loaded):
            return item
        started = item.started
        try:
            with self._claimed(case):
                record = self._done_record(case, item.fingerprint)
                if record is not None:  # an earlier attempt finished while this one waited
                    return self._from_record(case, record, attempts)
                item = self.denoise(item)
                return self._store_claimed(item) if isinstance(item, Loaded) else item
        except Exception as exc:  # the claim's lock file cannot be made (a file in the way, a full disk)
            return self._write_failed(case, exc, started=started, attempts=attempts)


_END = object()


def run_local(
    cases: Iterable[Case],
    processor: CaseProcessor,
    *,
    prefetch: int = 2,
    on_row: RowCallback | None = None,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Process ``cases`` on this machine; returns one row per case in completion order.

    With ``prefetch >= 1`` a reader thread keeps up to ``prefetch`` read cases in a bounded
    queue and a writer thread writes the previous result while the network runs; ``prefetch=0``
    does each case's steps one after the other (the baseline the benchmark compares against).
    ``stop`` ends the run after the cases in flight.

    Raises
    ------
    OutputUnwritable
        OUT took no more writes (full disk, quota, read-only): the run stopped at the first case
        that failed so; the rows of the cases finished before are reported (``on_row``) first.
    """
    stop = stop or threading.Event()
    rows: list[dict[str, Any]] = []
    halted: list[str] = []  # why OUT takes no more writes, once a case found out

    def emit(row: dict[str, Any]) -> None:
        reason = row.pop(STOP_KEY, None)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if reason and not halted:
            halted.append(reason)
            stop.set()

    if prefetch < 1:
        _run_one_by_one(cases, processor, emit, stop)
    else:
        _run_overlapped(cases, processor, emit, stop, prefetch, halted)
    if halted:
        raise OutputUnwritable(halted[0])
    return rows


def _run_one_by_one(
    cases: Iterable[Case], processor: CaseProcessor, emit: RowCallback, stop: threading.Event
) -> None:
    """Each case's read, denoise and write in turn, in this thread (``prefetch=0``)."""
    for case in cases:
        if stop.is_set():
            break
        emit(processor.process(case))


def _read_all(
    cases: Iterable[Case],
    processor: CaseProcessor,
    loaded_q: queue.Queue,
    stop: threading.Event,
    crashed: list[BaseException],
) -> None:
    """Reader thread: read cases into ``loaded_q`` until done or stopped, then put the end marker."""
    try:
        for case in cases:
            if stop.is_set():
                break
            loaded_q.put(processor.load(case))
    except BaseException as exc:  # a bug here must surface in the main thread, not hang it
        crashed.append(exc)
    finally:
        loaded_q.put(_END)


def _write_all(
    processor: CaseProcessor,
    written_q: queue.Queue,
    emit: RowCallback,
    stop: threading.Event,
    crashed: list[BaseException],
    halted: list[str],
) -> None:
    """Writer thread: store each denoised case from ``written_q`` (or pass its failure row on);
    once OUT takes no more writes (``halted``), denoised cases are dropped, not written."""
    try:
        while (item := written_q.get()) is not _END:
            if isinstance(item, Loaded):
                if not halted:
                    emit(processor.store(item))
            else:
                emit(item)
    except BaseException as exc:
        crashed.append(exc)
        stop.set()
        while written_q.get() is not _END:  # keep draining so the main thread never blocks
            pass


def _run_overlapped(
    cases: Iterable[Case],
    processor: CaseProcessor,
    emit: RowCallback,
    stop: threading.Event,
    prefetch: int,
    halted: list[str],
) -> None:
    """Read ahead and write behind in two threads while this thread runs the network.

    Re-raises the first exception of either thread; on Ctrl-C the writer finishes the case it holds.
    Once OUT takes no more writes (``halted``), cases already read are dropped, not denoised.
    """
    loaded_q: queue.Queue = queue.Queue(maxsize=prefetch)
    written_q: queue.Queue = queue.Queue(maxsize=1)
    crashed: list[BaseException] = []
    reader = threading.Thread(
        target=_read_all, args=(cases, processor, loaded_q, stop, crashed), name="batch-reader", daemon=True
    )
    writer = threading.Thread(
        target=_write_all,
        args=(processor, written_q, emit, stop, crashed, halted),
        name="batch-writer",
        daemon=True,
    )
    reader.start()
    writer.start()
    try:
        while (item := loaded_q.get()) is not _END:
            if isinstance(item, Loaded) and halted:
                continue  # nothing more can be written: do not denoise it
            written_q.put(processor.denoise(item) if isinstance(item, Loaded) else item)
    except BaseException:
        stop.set()  # Ctrl-C: let the writer finish the case it holds, drop the rest
        raise
    finally:
        written_q.put(_END)
        writer.join()
        if reader.is_alive():
            while loaded_q.get() is not _END:  # unblock a reader waiting on a full queue
                pass
            reader.join()
    if crashed:
        raise crashed[0]


__all__ = [
    "FATAL_ERRNOS",
    "STOP_KEY",
    "BatchSettings",
    "CaseProcessor",
    "Loaded",
    "OutputUnwritable",
    "case_row",
    "run_local",
    "unwritable_reason",
]
