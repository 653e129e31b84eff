"""Run the denoiser as a background subprocess speaking JSON lines (no Qt here).

The Slicer widget starts a :class:`BackgroundProcess` and polls it from a ``QTimer``; reader
threads only put lines on queues and never touch the GUI. Cancelling kills the whole process
tree with psutil (``Popen.kill`` would only stop a launcher such as ``PythonSlicer``) and is
*sticky*: once requested, the job reports :attr:`ExitCode.CANCELLED` whatever the child's own
exit status, so a half-finished result is never imported.

Protocol (``ipv2-denoise denoise ... --json-progress``), one JSON object per stdout line::

    {"device": "CUDA NVIDIA H100 80GB HBM3, 79 GiB"}
    {"progress": 0.42, "eta_s": 12.3, "message": "slab 3/7"}
    {"warning": "the field of view is truncated: ..."}
    {"result": "/tmp/out.nrrd", "seconds": 3.2}

Exit status 0 on success, 2 with a one-line stderr on a user error, 130 when cancelled.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.core.errors import ExitCode

__all__ = [
    "BackgroundProcess",
    "ExitCode",
    "JobStatus",
    "denoise_command",
    "kill_process_tree",
    "parse_json_line",
]


def parse_json_line(line: str) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None for any other text (log lines, warnings)."""
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class JobStatus:
    """What the child has said so far, folded from its JSON records."""

    fraction: float = 0.0
    eta_s: float | None = None
    message: str = ""
    device: str | None = None
    result: str | None = None
    seconds: float | None = None
    log: list[str] = field(default_factory=list)
    #: One line each from the child (a truncated field of view, input outside the training range, ...).
    warnings: list[str] = field(default_factory=list)
    #: The model the child loaded, and the record of its fine-tuning on the scan (``--adapt``).
    model: str | None = None
    adapted: dict[str, Any] | None = None
    #: :meth:`~IPv2DenoiseLib.core.provenance.ModelProvenance.to_record` of the weights the child ran.
    provenance: dict[str, Any] | None = None

    @property
    def warning(self) -> str | None:
        """The first warning, or None."""
        return self.warnings[0] if self.warnings else None

    def apply(self, record: Mapping[str, Any]) -> None:
        """Update from one JSON record (unknown keys are ignored)."""
        if "device" in record:
            self.device = str(record["device"])
        if "model" in record:
            self.model = str(record["model"])
        if isinstance(record.get("adapted"), Mapping):
            self.adapted = dict(record["adapted"])
        if isinstance(record.get("provenance"), Mapping):
            self.provenance = dict(record["provenance"])
        if "warning" in record:  # also in the log, which the Slicer module shows
            self.warnings.append(str(record["warning"]))
            self.log.append(f"warning: {record['warning']}")
        if "progress" in record:
            self.fraction = max(self.fraction, min(1.0, float(record["progress"])))
            eta = record.get("eta_s")
            self.eta_s = None if eta is None else float(eta)
            self.message = str(record.get("message") or self.message)
        if "result" in record:
            self.result = str(record["result"])
            self.seconds = None if record.get("seconds") is None else float(record["seconds"])
            self.fraction = 1.0
            self.eta_s = 0.0


def kill_process_tree(pid: int, *, timeout: float = 3.0) -> list[int]:
    """Terminate ``pid`` and all its descendants (then kill the stubborn); returns the pids hit."""
    # lazy: Slicer does not bundle psutil, and its module scanner imports this file at start-up,
    # before ensure_in_slicer (at the first Apply) can install it; a kill follows an Apply
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        procs = parent.children(recursive=True)  # collect before the parent dies and they reparent
    except psutil.NoSuchProcess:
        procs = []
    procs.append(parent)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]


class BackgroundProcess:
    """A subprocess whose stdout JSON lines and stderr are read by daemon threads.

    Parameters
    ----------
    args : sequence of str
        Command line (no shell).
    env : mapping, optional
        Extra environment variables (merged over ``os.environ``).
    cwd : path, optional

    Notes
    -----
    Call :meth:`poll` regularly (the widget: every 100-200 ms from a QTimer); it drains the queue
    into :attr:`status` and returns the new records. :meth:`wait` is the blocking path for scripts
    and tests.
    """

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None):
        self.args = [str(a) for a in args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.status = JobStatus()
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue[dict[str, Any] | str] = queue.Queue()
        self._stderr: list[str] = []
        self._stderr_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._cancel_requested = False
        self.started_at: float | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> BackgroundProcess:
        if self._proc is not None:
            raise RuntimeError("process already started")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=self.env,
            cwd=self.cwd,
        )
        self.started_at = time.monotonic()
        for target, stream in (
            (self._read_stdout, self._proc.stdout),
            (self._read_stderr, self._proc.stderr),
        ):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            record = parse_json_line(line)
            self._queue.put(record if record is not None else line.rstrip("\n"))
        stream.close()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            with self._stderr_lock:
                self._stderr.append(line.rstrip("\n"))
        stream.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def returncode(self) -> int | None:
        """None while running; :attr:`ExitCode.CANCELLED` after a cancel request (sticky)."""
        if self._proc is None or self._proc.poll() is None:
            return None
        return int(ExitCode.CANCELLED) if self._cancel_requested else self._proc.returncode

    @property
    def stderr(self) -> str:
        with self._stderr_lock:
            return "\n".join(self._stderr)

    def error_message(self) -> str:
        """The child's last non-empty stderr line (the one-line user error), or a generic text."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        if lines:
            return lines[-1]
        return f"the denoiser stopped with exit status {self.returncode}"

    def poll(self) -> list[dict[str, Any] | str]:
        """Drain what the reader thread collected; JSON records update :attr:`status`."""
        items: list[dict[str, Any] | str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                self.status.apply(item)
            elif item.strip():
                self.status.log.append(item)
            items.append(item)
        return items

    def finished(self) -> bool:
        """True once the child exited and both streams were read to the end."""
        return self.returncode is not None and not any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child ends (and the readers finish); returns :attr:`returncode`."""
        if self._proc is None:
            raise RuntimeError("process not started")
        self._proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        self.poll()
        return self.returncode  # type: ignore[return-value]

    def cancel(self) -> None:
        """Request cancel (sticky) and kill the whole process tree."""
        self._cancel_requested = True
        if self._proc is not None and self._proc.poll() is None:
            kill_process_tree(self._proc.pid)


def denoise_command(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    options: DenoiseOptions,
    *,
    python: str | None = None,
) -> list[str]:
    """The ``python -m IPv2DenoiseLib denoise IN OUT OPTIONS --json-progress`` command line.

    ``python`` defaults to ``sys.executable`` (inside Slicer: PythonSlicer, so the child sees the
    torch installed into Slicer). The options were checked when ``options`` was made.
    """
    return [
        python or sys.executable,
        "-m",
        "IPv2DenoiseLib",
        "denoise",
        str(input_path),
        str(output_path),
        *options.command_line(),
        "--json-progress",
    ]
