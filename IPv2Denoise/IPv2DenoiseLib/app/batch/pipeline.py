"""Process batch cases: read, denoise, write, record — and the local engine that overlaps them.

:class:`CaseProcessor` holds the model (loaded once) and does the three steps of a case;
every failure a study can cause (unreadable, not CT, too small, ...) becomes a ``failed`` row
with a one-line reason instead of stopping the batch. :func:`run_local` runs the steps as a
pipeline: a reader thread prefetches the next studies into a bounded queue while the main
thread runs the network and a writer thread writes and records the previous case, so disk and
decompression overlap with compute, and at most ``prefetch + 3`` volumes are in memory however
large the archive.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from IPv2DenoiseLib.io.volumes import read_dicom_series, read_volume

RowCallback = Callable[[dict[str, Any]], None]


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
        return {
            "model": self.denoiser.name,
            "model_sha256": self.denoiser.card.get("sha256"),
            "remove_background": self.settings.options.remove_background,
            "ensemble": self.settings.options.ensemble,
            "format": "dicom" if self.settings.dicom else "nrrd",
            # only when set, so the done records of earlier runs stay valid
            **({"resample_gaps": True} if self.settings.resample_gaps else {}),
            **({"refine": True} if self.settings.options.refine else {}),
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
            record = verified_record(
                self.out_root,
                case.case_id,
                fingerprint=fingerprint,
                settings=self.record_settings,
                dicom=self.settings.dicom,
            )
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
            return loaded
        except Exception as exc:
            return self.failed(loaded.case, _one_line(exc), started=loaded.started, attempts=loaded.attempts)

    def store(self, loaded: Loaded) -> dict[str, Any]:
        """Write the output atomically, then its done record; returns the summary row."""
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
            return self.failed(case, _one_line(exc), started=loaded.started, attempts=loaded.attempts)

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
        try:
            out = output_path(self.out_root, case.case_id, dicom=self.settings.dicom)
            with claim_output(out, what=f"case {case.case_id}", wait=True):
                record = verified_record(
                    self.out_root,
                    case.case_id,
                    fingerprint=item.fingerprint,
                    settings=self.record_settings,
                    dicom=self.settings.dicom,
                )
                if record is not None:  # an earlier attempt finished while this one waited
                    return self._from_record(case, record, attempts)
                item = self.denoise(item)
                return self.store(item) if isinstance(item, Loaded) else item
        except UserError as exc:  # the claim's lock file cannot be made (a file in the way, a full disk)
            return self.failed(case, str(exc), started=item.started, attempts=attempts)


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
    """
    stop = stop or threading.Event()
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if prefetch < 1:
        _run_one_by_one(cases, processor, emit, stop)
    else:
        _run_overlapped(cases, processor, emit, stop, prefetch)
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
) -> None:
    """Writer thread: store each denoised case from ``written_q`` (or pass its failure row on)."""
    try:
        while (item := written_q.get()) is not _END:
            emit(processor.store(item) if isinstance(item, Loaded) else item)
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
) -> None:
    """Read ahead and write behind in two threads while this thread runs the network.

    Re-raises the first exception of either thread; on Ctrl-C the writer finishes the case it holds.
    """
    loaded_q: queue.Queue = queue.Queue(maxsize=prefetch)
    written_q: queue.Queue = queue.Queue(maxsize=1)
    crashed: list[BaseException] = []
    reader = threading.Thread(
        target=_read_all, args=(cases, processor, loaded_q, stop, crashed), name="batch-reader", daemon=True
    )
    writer = threading.Thread(
        target=_write_all, args=(processor, written_q, emit, stop, crashed), name="batch-writer", daemon=True
    )
    reader.start()
    writer.start()
    try:
        while (item := loaded_q.get()) is not _END:
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


__all__ = ["BatchSettings", "CaseProcessor", "Loaded", "case_row", "run_local"]
