"""Stop the local Ray cluster a batch run started, even when the run is killed with ``kill -9``.

Ray ties its GCS server and raylet to the driver that started them, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) outlive a killed driver for good. So before
``ray.init`` starts a local cluster, the driver starts this watchdog in a session of its own, with
a pipe on its stdin. While the pipe is open the watchdog notes every descendant process of the
driver started after the watchdog itself (pid and start time, from ``/proc``, every
:data:`POLL_S` seconds). At end of file (the
driver closed the pipe after ``ray.shutdown()``, or died) it stops those of them still running:
SIGTERM, then SIGKILL after :data:`GRACE_S`. The start time makes sure a reused pid is never hit;
processes of other Ray clusters are never descendants of the driver. Linux only (``/proc``);
elsewhere it does nothing.

Run as ``python -m IPv2DenoiseLib.app.batch.ray_watchdog DRIVER_PID``; imports no ray.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Seconds between two looks at the driver's descendants.
POLL_S = 0.5
#: Seconds between SIGTERM and SIGKILL.
GRACE_S = 5.0

#: A process as (pid, start time in clock ticks since boot): unique even when pids are reused.
Process = tuple[int, int]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a running process; None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> set[Process]:
    """Every running descendant of ``root`` (children, their children ...) with its start time."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = info
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: set[Process] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add((pid, table[pid][1]))
        todo.extend(children.get(pid, []))
    return found


def _running(processes: set[Process]) -> set[Process]:
    return {(pid, start) for pid, start in processes if (info := _stat(pid)) and info[1] == start}


def stop(processes: set[Process], *, grace: float = GRACE_S) -> set[Process]:
    """SIGTERM those of ``processes`` still running, SIGKILL what is left after ``grace`` seconds."""
    targets = _running(processes)
    for pid, _ in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while (left := _running(targets)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


def watch(driver: int) -> set[Process]:
    """Note the driver's descendants started after this watchdog (what Ray starts, not what the
    driver ran before, e.g. a test session's servers) until stdin ends, then stop them."""
    seen: set[Process] = set()
    me, (_, born) = os.getpid(), _stat(os.getpid())
    while True:
        seen |= {(pid, start) for pid, start in descendants(driver) if pid != me and start >= born}
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # end of file: the driver is done or dead
            return stop(seen)


def start_watchdog() -> subprocess.Popen:
    """Start the watchdog of this process; close its ``stdin`` (or die) to make it stop what we started."""
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's process group leaves it to clean up
    )


def main(argv: list[str]) -> int:
    if Path("/proc").is_dir():
        watch(int(argv[0]))
    else:
        sys.stdin.buffer.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
