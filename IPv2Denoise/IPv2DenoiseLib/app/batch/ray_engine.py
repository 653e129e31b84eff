"""``--engine ray``: the batch on a Ray cluster, with actors that each hold the model.

Imported only when ``--engine ray`` is asked for: this is the one module that imports ray (the
optional extra ``ipv2-denoise[cluster]``). Each actor owns a :class:`CaseProcessor` (one per GPU,
or one per ``cpus_per_worker`` CPUs) and runs the same read → denoise → write → record steps as
the local engine, so outputs and summaries are the same. An actor is threaded (two calls at a
time, the network behind a lock), so one case is read or written while another is denoised.

A worker process that dies (killed, out of memory, node lost) is restarted by Ray
(``max_restarts=-1``); the cases it held fail with ``RayActorError`` and are submitted again, to
whichever actor is free, up to ``retries`` times. Nothing is written twice: outputs are atomic
and the retry first checks the done record, so a case that finished before its worker died is
recognised, not recomputed. A worker that only stopped answering (``ActorUnavailableError``, a
network fault between nodes) may still be running the case when its retry starts elsewhere: the
retry waits for the case's output claim (:meth:`CaseProcessor.process`) and then finds the first
attempt's record, so the case is never written by two attempts at once.

A case that fails because OUT takes no more writes (full disk, quota, read-only) stops the run as
on the local engine: no more cases are submitted, the ones in flight end, and
:class:`~IPv2DenoiseLib.app.batch.pipeline.OutputUnwritable` is raised.

A local cluster this module starts (no ``--address``) is stopped with the run, also when the run
is killed: see :mod:`~IPv2DenoiseLib.app.batch.ray_watchdog`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import RayActorError

from IPv2DenoiseLib.app.batch.cases import Case
from IPv2DenoiseLib.app.batch.pipeline import (
    STOP_KEY,
    BatchSettings,
    CaseProcessor,
    OutputUnwritable,
    case_row,
)
from IPv2DenoiseLib.app.batch.ray_watchdog import start_watchdog
from IPv2DenoiseLib.core.errors import UserError

#: Calls queued per actor: one being denoised while the next is read (the actor runs two threads).
CALLS_PER_WORKER = 2


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=CALLS_PER_WORKER)
class BatchWorker:
    """A Ray actor holding one :class:`CaseProcessor` (the model loaded once per worker process)."""

    def __init__(self, settings: BatchSettings, threads: int) -> None:
        self.processor = CaseProcessor(settings, threads=threads)

    def describe(self) -> dict[str, str]:
        return {"worker": self.processor.worker, "device": self.processor.device_name}

    def process(self, case: Case, attempts: int) -> dict[str, Any]:
        return self.processor.process(case, attempts=attempts)


#: Seconds to wait for a cluster's head node to accept a TCP connection before giving up.
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when nothing listens at ``HOST:PORT`` (``ray://HOST:PORT`` too).

    ``ray.init`` itself retries an unreachable head node for minutes before it gives up. ``auto``
    (find the cluster started on this machine) and addresses without a port are left to Ray.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot connect to the Ray cluster at {address}: nothing answers at {host}:{port} "
            f"within {timeout:.0f} s ({exc.strerror or exc}); is its head node running (`ray start --head`)?"
        ) from None


class _DropTokenNotice(logging.Filter):
    """Ray announces its default token authentication on every local start, one stray line on the
    user's terminal; the setting itself (on, the secure default) is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


#: The logger of that notice (a logger name, not an import of Ray's private module).
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextmanager
def connect(address: str | None, *, num_cpus: int | None = None) -> Iterator[bool]:
    """Join the cluster at ``address``, or start a local one, for the ``with`` block; yields True
    when this call started Ray. A local cluster started here is shut down at the end, and a
    watchdog stops its processes even when this process is killed (``kill -9``)."""
    if ray.is_initialized():
        yield False
        return
    address = (
        address or os.environ.get("RAY_ADDRESS") or None
    )  # Ray's own convention (e.g. in `ray job submit`)
    if address is not None:
        check_reachable(address)
    watchdog: subprocess.Popen | None = None
    if address is None:  # started before Ray, so it sees every process Ray starts here
        watchdog = start_watchdog()
    notice = _DropTokenNotice()
    logging.getLogger(_TOKEN_LOGGER).addFilter(notice)
    try:
        try:
            local = {"num_cpus": num_cpus, "include_dashboard": False} if address is None else {}
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **local)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise UserError(f"cannot connect to {where}: {' '.join(str(exc).split())[:200]}") from None
        finally:
            logging.getLogger(_TOKEN_LOGGER).removeFilter(notice)
        try:
            yield True
        finally:
            ray.shutdown()
    finally:
        if watchdog is not None:
            watchdog.stdin.close()  # the watchdog now stops whatever of the cluster is left
            watchdog.wait()


def plan_workers(
    *, workers: int | None, cpus_per_worker: float, gpus_per_worker: float | None, device: str
) -> tuple[int, float, float]:
    """(number of actors, CPUs each, GPUs each) from the cluster's resources.

    By default one actor per GPU when the cluster has GPUs (and ``device`` is not ``cpu``),
    otherwise one per ``cpus_per_worker`` CPUs.
    """
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster_gpus >= 1 and device != "cpu" else 0.0
    if gpus_per_worker > 0:
        fit = math.floor(cluster_gpus / gpus_per_worker + 1e-9)
    else:
        fit = math.floor(cluster_cpus / cpus_per_worker + 1e-9)
    if fit < 1:
        raise UserError(
            f"the Ray cluster has {cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs; one worker needs "
            f"{cpus_per_worker:g} CPUs and {gpus_per_worker:g} GPUs"
        )
    return min(workers or fit, fit), cpus_per_worker, gpus_per_worker


def run_ray(
    cases: list[Case],
    settings: BatchSettings,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    retries: int = 2,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_event: Callable[..., None] | None = None,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Process ``cases`` on Ray actors; returns one row per case in completion order.

    ``on_event(**record)`` receives one ``worker_index`` event per actor (with ``worker``: host:pid,
    and ``device``) and a ``retry`` event per resubmitted case.
    A case whose worker died more than ``retries`` times is recorded as failed.

    Raises
    ------
    OutputUnwritable
        OUT took no more writes: no case was submitted after the first that failed so, the cases
        in flight ended, and their rows were reported first.
    """
    with connect(address):
        return _run_on_cluster(
            cases,
            settings,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            retries=retries,
            on_row=on_row,
            event=on_event or (lambda **record: None),
            stop=stop or threading.Event(),
        )


def _run_on_cluster(
    cases: list[Case],
    settings: BatchSettings,
    *,
    workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float | None,
    retries: int,
    on_row: Callable[[dict[str, Any]], None] | None,
    event: Callable[..., None],
    stop: threading.Event,
) -> list[dict[str, Any]]:
    """Start the actors on the connected cluster and feed them the cases."""
    count, cpus, gpus = plan_workers(
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        device=settings.options.device,
    )
    if gpus > 0 and settings.options.device == "auto":
        settings = replace(settings, options=replace(settings.options, device="cuda"))
    threads = max(1, int(cpus))
    actors = [
        BatchWorker.options(num_cpus=cpus, num_gpus=gpus).remote(settings, threads) for _ in range(count)
    ]
    try:
        described = ray.get([actor.describe.remote() for actor in actors])
    except RayActorError as exc:  # the model or the device failed to load in a worker
        cause = getattr(exc, "cause", None) or exc
        raise UserError(f"a Ray worker could not start: {' '.join(str(cause).split())[:300]}") from None
    for index, info in enumerate(described):
        event(worker_index=index, **info)
    return _schedule(actors, cases, retries=retries, on_row=on_row, event=event, stop=stop)


def _schedule(
    actors: list, cases: list[Case], *, retries: int, on_row, event, stop: threading.Event
) -> list[dict[str, Any]]:
    """Feed cases to healthy actors, at most :data:`CALLS_PER_WORKER` each; resubmit the cases of a
    dead one and probe it (the probe waits for Ray's restart) before giving it work again.
    The actors are killed at the end."""
    scheduler = _Scheduler(actors, cases, retries=retries, on_row=on_row, event=event, stop=stop)
    try:
        rows = scheduler.run()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    if scheduler.halted:
        raise OutputUnwritable(scheduler.halted)
    return rows


class _Scheduler:
    """One run of :func:`_schedule`: the pending cases, the calls in flight per actor, and the probes
    of actors that died (an actor is healthy again when its probe answers)."""

    def __init__(
        self, actors: list, cases: list[Case], *, retries: int, on_row, event, stop: threading.Event
    ) -> None:
        self.actors, self.retries, self.on_row, self.event, self.stop = actors, retries, on_row, event, stop
        self.pending: deque[tuple[Case, int]] = deque((case, 1) for case in cases)
        self.in_flight: dict[Any, tuple[int, Case, int]] = {}
        self.probes: dict[Any, int] = {}
        self.healthy = set(range(len(actors)))
        self.load = [0] * len(actors)
        self.rows: list[dict[str, Any]] = []
        #: Why OUT takes no more writes, once a case found out (then nothing more is submitted).
        self.halted = ""

    def run(self) -> list[dict[str, Any]]:
        """Submit, wait for one answer, handle it; until no case is pending or in flight."""
        while self.pending or self.in_flight:
            self.submit()
            if not self.in_flight and (not self.probes or self.stop.is_set()):  # stopped: nothing to wait for
                self.fail_stranded()
                break
            (ref,), _ = ray.wait([*self.in_flight, *self.probes], num_returns=1)
            if ref in self.probes:
                self.probe_answered(ref)
            else:
                self.case_answered(ref)
        return self.rows

    def finish(self, row: dict[str, Any]) -> None:
        """Keep a case's final row and report it; a row saying OUT takes no more writes stops the run."""
        reason = row.pop(STOP_KEY, None)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        if reason and not self.halted:
            self.halted = reason
            self.stop.set()

    def submit(self) -> None:
        """Give pending cases to the least-loaded healthy actors that have room (none once stopped)."""
        while self.pending and not self.stop.is_set():
            free = [i for i in self.healthy if self.load[i] < CALLS_PER_WORKER]
            if not free:
                break
            index = min(free, key=lambda i: self.load[i])
            case, attempt = self.pending.popleft()
            self.in_flight[self.actors[index].process.remote(case, attempt)] = (index, case, attempt)
            self.load[index] += 1

    def fail_stranded(self) -> None:
        """Every worker is gone for good: the pending cases fail (unless the run is being stopped)."""
        if self.pending and not self.stop.is_set():
            for case, attempt in self.pending:
                self.finish(case_row(case, "failed", error="no Ray worker left to run it", attempts=attempt))

    def probe_answered(self, ref: Any) -> None:
        """A restarted actor answered its probe: it is healthy again (one that died for good is dropped)."""
        index = self.probes.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError:  # died for good (restarts exhausted or its node is gone)
            return
        self.healthy.add(index)
        self.event(worker_index=index, restarted=True, **info)

    def case_answered(self, ref: Any) -> None:
        """A case came back: its row, or, if its actor died, a retry or a failed row."""
        index, case, attempt = self.in_flight.pop(ref)
        self.load[index] -= 1
        try:
            row = ray.get(ref)
        except RayActorError as exc:
            self.probe_dead_actor(index)
            if attempt <= self.retries:
                self.event(retry=case.case_id, attempt=attempt + 1, reason=type(exc).__name__)
                self.pending.appendleft((case, attempt + 1))
                return
            row = case_row(
                case,
                "failed",
                error=f"its Ray worker died {attempt} times ({type(exc).__name__})",
                attempts=attempt,
            )
        self.finish(row)

    def probe_dead_actor(self, index: int) -> None:
        """Take a dead actor out of service and probe it; the probe waits for Ray's restart."""
        if index in self.healthy:
            self.healthy.discard(index)
            self.probes[self.actors[index].describe.options(max_task_retries=-1).remote()] = index


__all__ = ["BatchWorker", "connect", "plan_workers", "run_ray"]
