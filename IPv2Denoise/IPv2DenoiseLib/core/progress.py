"""Progress reporting and cancellation shared by every long job (docs/architecture.md).

A job takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``; it calls
``progress(done, total, message)`` and ``cancel.check()`` between units of work. A job whose
partial work is worth keeping (training) also takes ``stop: StopRequest | None``. Front ends turn
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

from IPv2DenoiseLib.core.errors import ExitCode, UserError

ProgressCallback = Callable[[int, int, str], None]


class Cancelled(UserError):
    """Raised by :meth:`CancelToken.check` once cancellation was requested."""

    exit_code = ExitCode.CANCELLED


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


class StopRequest:
    """Thread-safe flag asking a job to end early and keep its work, unlike :class:`CancelToken`,
    which abandons it: a training leg ends at its next step, validates and exports what it learned.

    A job sets ``listening`` while it can honour a request; a front end (the ``train`` command's
    signal handler) aborts at once when nothing listens, since then there is nothing to keep.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        #: Why the stop was asked for (e.g. ``"SIGTERM"``), recorded in the leg's model card.
        self.reason: str | None = None
        #: Whether a job is running that will honour a request at its next step.
        self.listening = False

    def request(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class EtaEstimator:
    """Seconds left from the rate since the first report (None until some work is done).

    The rate starts at the first report, not when the estimator is made: what a job does before
    its first unit of work (a training leg builds its noise pool for minutes) is not work, and
    counting it made an 85-minute leg say "about 106 min left" nine minutes in.
    """

    def __init__(self) -> None:
        self.start = time.monotonic()
        #: Time and amount done at the first report: where the rate is measured from.
        self.first: tuple[float, float] | None = None

    def eta(self, done: float, total: float) -> float | None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, done)
        first_time, first_done = self.first
        if total <= 0 or done <= 0:
            return None
        if done <= first_done:  # one report so far: the rate since the start is all there is
            return max(0.0, (now - self.start) * (total - done) / done)
        return max(0.0, (now - first_time) * (total - done) / (done - first_done))


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
        """Print a non-progress record (e.g. ``{"result": path}``, ``{"device": ...}``, ``{"warning": ...}``)."""
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def write(self, line: str) -> None:
        """A free-text line becomes ``{"log": line}``."""
        self.emit(log=line)

    def close(self) -> None:
        pass


class TqdmProgress:
    """A progress callback drawing a tqdm bar on stderr.

    Front ends print their own lines (e.g. "running on: ...") *before* creating the bar, or
    through :meth:`write`, so a line never lands on the bar's first frame.
    """

    def __init__(
        self, desc: str = "", unit: str = "it", disable: bool | None = None, percent: bool = False
    ) -> None:
        from tqdm import tqdm  # lazy: the Slicer module imports progress before tqdm is installed

        fmt = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]" if percent else None
        self.bar = tqdm(
            total=0,
            desc=desc,
            unit=unit,
            disable=disable,
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format=fmt,
        )
        self.reported = False

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.reported:  # the rate (and ETA) from the first report on, as EtaEstimator
            self.reported = True
            self.bar.reset(total=total)
            self.bar.initial = done
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if message:
            self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        """Print ``line`` above the bar."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def time_left(seconds: float | None) -> str:
    """An ETA as every front end words it: ``about 12 s left``, ``about 3 min 05 s left``; empty when unknown.

    The one phrasing of the plain progress lines, the web page and the Slicer panel.
    """
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    return (
        f"about {seconds // 60} min {seconds % 60:02d} s left" if seconds >= 60 else f"about {seconds} s left"
    )


class PlainLinesProgress:
    """A progress callback for logs and pipes: one plain line every ``every_s`` seconds.

    Also prints when the message changes stage (reading, loading, writing) and at the end, so a
    job piped to a file or run by a scheduler shows it is alive: ``denoise: 42% (12 s, about
    17 s left) denoised 21/50 slices``.
    """

    def __init__(self, desc: str = "", every_s: float = 5.0, stream: TextIO | None = None) -> None:
        self.desc, self.every_s = desc, every_s
        self.stream = stream or sys.stderr
        self.eta = EtaEstimator()
        self.last_time: float | None = None
        self.last_stage = ""

    def __call__(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        stage = message.split(" ", 1)[0]
        finished = total > 0 and done >= total
        if (
            self.last_time is not None
            and now - self.last_time < self.every_s
            and stage == self.last_stage
            and not finished
        ):
            return
        self.last_time, self.last_stage = now, stage
        fraction = done / total if total else 0.0
        eta = self.eta.eta(done, total)
        left = "" if eta is None or finished else f", {time_left(eta)}"
        elapsed = now - self.eta.start
        prefix = f"{self.desc}: " if self.desc else ""
        self.stream.write(f"{prefix}{100 * fraction:3.0f}% ({elapsed:.0f} s{left}) {message}".rstrip() + "\n")
        self.stream.flush()

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def make_progress(json_progress: bool, desc: str = "", unit: str = "it", *, percent: bool = False):
    """The CLI's callback: JSON lines when asked (Slicer subprocess), a tqdm bar in a terminal,
    plain periodic lines when stderr is a pipe or a file."""
    if json_progress:
        return JsonLinesProgress()
    if sys.stderr.isatty():
        return TqdmProgress(desc=desc, unit=unit, percent=percent)
    return PlainLinesProgress(desc=desc)


class Stages:
    """Maps the stages of one job (read, load model, compute, write) onto one monotone 0..1000 scale.

    ``Stages(progress, read=1, model=1, denoise=20, write=2)`` gives each stage its share;
    ``stages.stage("read")`` returns a :data:`ProgressCallback` for that stage alone, and
    ``stages.start("write", "writing OUT")`` reports the start of a stage that has no steps.
    """

    SCALE = 1000

    def __init__(self, progress: ProgressCallback | None, **weights: float) -> None:
        self.progress = progress
        total = float(sum(weights.values())) or 1.0
        self.offsets: dict[str, tuple[float, float]] = {}
        start = 0.0
        for name, weight in weights.items():
            self.offsets[name] = (start, weight / total)
            start += weight / total

    def stage(self, name: str) -> ProgressCallback:
        start, share = self.offsets[name]

        def report(done: int, total: int, message: str = "") -> None:
            if self.progress is not None:
                fraction = start + share * (min(done, total) / total if total else 0.0)
                self.progress(int(round(self.SCALE * fraction)), self.SCALE, message)

        return report

    def start(self, name: str, message: str) -> None:
        self.stage(name)(0, 1, message)

    def finish(self, message: str = "done") -> None:
        if self.progress is not None:
            self.progress(self.SCALE, self.SCALE, message)


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

    def within(self, message: str, units: int = 1) -> ProgressCallback:
        """A callback for one long call that counts as the next ``units`` units: its own
        ``(done, total)`` moves the bar inside them, so a step of minutes (a training, a whole
        volume's dose simulation) is not silent. The caller still counts the units after it.

        Parameters
        ----------
        message : str
            What the bar says meanwhile.
        units : int
            How many units the call stands for.

        Returns
        -------
        ProgressCallback
            Reports ``(done + units * fraction) / total`` on a fine scale.
        """
        scale = 1000

        def report(done: int, total: int, _message: str = "") -> None:
            if self.progress is not None and total > 0:
                fraction = self.done + units * min(done, total) / total
                self.progress(int(scale * fraction), scale * self.total, message)

        return report
