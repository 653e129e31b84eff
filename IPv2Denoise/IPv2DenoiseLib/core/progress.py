"""Progress reporting and cancellation shared by every long job (DESIGN.md §3).

A job takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``; it calls
``progress(done, total, message)`` and ``cancel.check()`` between units of work. Front ends turn
the callback into a tqdm bar (CLI), JSON lines (``--json-progress``, read by the Slicer module) or
a Qt progress bar.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from IPv2DenoiseLib.core.errors import UserError

ProgressCallback = Callable[[int, int, str], None]


class Cancelled(UserError):
    """Raised by :meth:`CancelToken.check` once cancellation was requested."""

    exit_code = 130


class CancelToken:
    """Thread-safe flag a front end sets to stop a job at its next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class EtaEstimator:
    """Seconds left from the rate so far (None until some work is done)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def eta(self, done: float, total: float) -> float | None:
        if done <= 0 or total <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return max(0.0, elapsed * (total - done) / done)


class JsonLinesProgress:
    """A progress callback printing ``{"progress": f, "eta_s": s, "message": m}`` per line.

    ``progress`` never decreases, so a reader can draw a monotone bar.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.eta = EtaEstimator()
        self.last = 0.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        fraction = min(1.0, max(self.last, done / total if total else 0.0))
        self.last = fraction
        eta = self.eta.eta(done, total)
        record = {
            "progress": round(fraction, 4),
            "eta_s": None if eta is None else round(eta, 1),
            "message": message,
        }
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def emit(self, **record) -> None:
        """Print a non-progress record (e.g. ``{"result": path}`` or ``{"device": ...}``)."""
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class TqdmProgress:
    """A progress callback drawing a tqdm bar on stderr."""

    def __init__(self, desc: str = "", unit: str = "it", disable: bool | None = None) -> None:
        from tqdm import tqdm  # lazy: the Slicer module imports progress before tqdm is installed

        self.bar = tqdm(total=0, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if message:
            self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_progress(json_progress: bool, desc: str = "", unit: str = "it"):
    """The CLI's callback: JSON lines when asked (Slicer subprocess), else a tqdm bar."""
    return JsonLinesProgress() if json_progress else TqdmProgress(desc=desc, unit=unit)


class Steps:
    """Counts units of work: each call checks the cancel token, then reports ``(done, total, message)``."""

    def __init__(
        self, total: int, progress: ProgressCallback | None = None, cancel: CancelToken | None = None
    ) -> None:
        self.total, self.done = total, 0
        self.progress, self.cancel = progress, cancel

    def __call__(self, message: str = "") -> None:
        self.done += 1
        if self.cancel is not None:
            self.cancel.check()
        if self.progress is not None:
            self.progress(self.done, self.total, message)
