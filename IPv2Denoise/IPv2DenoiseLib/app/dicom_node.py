"""A denoising DICOM node: Storage SCP in, derived series out to a forward destination.

A scanner or PACS C-STOREs CT instances to the node (pynetdicom Storage SCP, several associations
at once). Only the calling AE titles and hosts of the allow-lists may associate (others are
rejected at association time); one instance may be at most ``max_instance_bytes``. Uncompressed
and the compressed transfer syntaxes scanners send (JPEG lossless, JPEG-LS, JPEG 2000, RLE) are
accepted; compressed pixel data is decoded once on arrival (pydicom's GDCM plugin) to refuse
corrupt instances.

The spool (``incoming/<SeriesInstanceUID>/``) is the node's promise to the sender. An instance is
acknowledged (0x0000) only when its file is on disk (fsync) and its SOPInstanceUID is appended
(fsync) to the series' manifest ``.acknowledged``; when that cannot be done (full disk) the
answer is 0xA700 "Out of Resources" and the refusal is remembered (in memory and as an empty
``<uid>.refused`` marker), as it is for a CT instance refused as corrupt (0xC210) or over the
size cap (0xA700) whose header names its series (the marker then holds why). A series is
complete when no instance of it has arrived for ``quiet_seconds``: if one of its instances was refused and not sent again it moves to
``failed/`` (never forwarded partial; an instance of it arriving again re-opens it, so the
sender's retry of the refused instances completes it), else it is renamed to ``ready/`` and queued. Before
denoising, every acknowledged instance must be present (files nobody acknowledged, left by a
kill during a transfer, are dropped). At most ``jobs`` series are denoised at a time, each by the
one :class:`~IPv2DenoiseLib.app.pipeline.DenoisePipeline` (one model, loaded once; read, check,
denoise, warn, export as ``denoise --dicom`` does); each becomes a derived series in ``work/``
that is C-STOREd to the forward node (``io.dicom_net``). After the send the job leaves ``ready/`` by one rename (the
"sent" mark) before anything is deleted, so a kill at any step never re-denoises a sent series
(which would give a second derived series) nor sends half of one. A series that fails
(unreadable, mixed patients, refused by the forward node) moves to ``failed/`` with a
``reason.txt``; it is deleted ``keep_failed_days`` after it failed (checked at start and hourly),
leaving a record of its instances (``forwarded/<SeriesInstanceUID>.failed.json``, kept
``remember_forwarded_days``) so that its late instances (e.g. its sender's retry of the refused
ones) still fail rather than become a partial series.
The pipeline's warnings (training range, truncated field of view, the reader's), worded as
``denoise`` prints them, go to the log and into the derived series' DerivationDescription.

Each forwarded series leaves a record, ``forwarded/<SeriesInstanceUID>.json`` (when, as which
derived series, the source instances it covered; written whole, then renamed, before the job
leaves ``ready/``), kept ``remember_forwarded_days``. A later batch of that series (instances
arriving after its quiet period) that lacks any instance of an earlier batch (forwarded, queued,
or failed: in ``failed/``, or its record once deleted) is not forwarded, which would put a partial
"denoised" series into the PACS: it moves to ``failed/`` saying so; the whole series sent again (a
batch with every instance of each earlier one) is denoised and forwarded as usual.
"""

from __future__ import annotations

import errno
import glob
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from IPv2DenoiseLib.app.pipeline import DenoisePipeline
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.locks import lock_holder, open_lock_file, record_holder, try_lock
from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions
from IPv2DenoiseLib.io.dicom_net import (
    ACCEPTED_TRANSFER_SYNTAXES,
    UID_PATTERN,
    ArrivingSizeGuard,
    DestinationUnavailable,
    DicomNode,
    check_aet,
    echo,
    header_uids,
    send_instances,
)
from IPv2DenoiseLib.io.dicom_series import declared_pixel_bytes

__all__ = [
    "DenoisingNode",
    "HostAllowList",
    "KILL_AT_ENV",
    "NodeConfig",
    "out_of_space",
    "read_manifest",
]

LOG = logging.getLogger("ipv2denoise.node")
#: C-STORE status "Cannot understand" (PS3.4 B.2.3), sent back for an instance we cannot decode.
CANNOT_UNDERSTAND = 0xC210
#: C-STORE status "Refused: Out of Resources" (PS3.4 B.2.3): spool full, or instance over the size cap.
OUT_OF_RESOURCES = 0xA700
#: A-ASSOCIATE-RJ: rejected permanent, by the service user; reason "no reason given" (a host not
#: allowed; PS3.8 has no reason for it) or "calling AE title not recognised".
REJECT_PERMANENT, REJECT_BY_USER, NO_REASON, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x01, 0x03
#: Modalities the node denoises; other instances are acknowledged and skipped.
CT_MODALITIES = {"CT"}
#: Longest wait between attempts to reach an unavailable forward destination.
MAX_RETRY_SECONDS = 600.0
#: Per-series manifest of acknowledged instances: one "SOPInstanceUID<TAB>calling AE" line each.
MANIFEST = ".acknowledged"
#: Suffix of the marker left for a refused instance of a series (it holds why; empty: spool full).
REFUSED = ".refused"
#: Why an instance was refused, as the failed series' reason names it.
SPOOL_FULL = "0xA700, spool full"
#: Facts of a denoised series (kept in the job so a re-send does not denoise again).
FACTS = ".denoised.json"
#: Disk-space errors: the series waits in the spool and is tried again (never FAILED for it).
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
#: Lock file in the spool, held by the node using it (``pid N on host H`` inside).
SPOOL_LOCK = "node.lock"
#: Fault injection for the kill tests: the node SIGKILLs itself at this step (see ``_crash_point``).
KILL_AT_ENV = "IPV2DENOISE_NODE_KILL_AT"
#: Why a series failed, in its folder under ``failed/``.
REASON = "reason.txt"
#: Spool folder of the forwarded series' records, one ``<SeriesInstanceUID>.json`` each (and of the
#: failed series ``keep_failed_days`` deleted, one ``<SeriesInstanceUID>.failed.json`` each).
FORWARDED = "forwarded"
#: Suffix of the record a failed series leaves in ``forwarded/`` when it is deleted.
FAILED_RECORD = ".failed.json"
#: Seconds in a day (the retentions are given in days).
DAY = 86400.0
#: Longest wait between two prunings of ``failed/`` and ``forwarded/``.
MAX_HOUSEKEEPING_SECONDS = 3600.0


class HostAllowList:
    """Hosts allowed to associate: IP addresses and networks (``10.0.0.0/24``, ``::1``); empty: any."""

    def __init__(self, entries: Sequence[str] = ()) -> None:
        self.entries = tuple(entries)
        self.networks = []
        for entry in self.entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise UserError(
                    f"--allow-host {entry!r}: expected an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
                ) from None

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) if self.networks else "any host"


@dataclass
class NodeConfig:
    """How the node listens, whom it accepts, where it spools and where it forwards."""

    aet: str
    port: int
    forward: DicomNode
    spool: Path
    host: str = "127.0.0.1"
    quiet_seconds: float = 10.0
    jobs: int = 1
    timeout: float = 30.0
    retries: int = 3
    #: series number and description of the derived series (model and warnings come from the pipeline)
    options: DerivedSeriesOptions = field(default_factory=DerivedSeriesOptions)
    stop_grace_seconds: float = 30.0
    #: first wait before re-sending to an unavailable forward destination (doubles, at most 10 min)
    retry_seconds: float = 30.0
    #: calling AE titles allowed to associate; empty: any (logged loudly)
    allow_aets: tuple[str, ...] = ()
    #: hosts allowed to associate; empty: any
    allow_hosts: HostAllowList = field(default_factory=HostAllowList)
    #: largest instance accepted (encoded bytes); larger ones are refused with 0xA700, and an
    #: association whose instance passes it by 1 MB while arriving is aborted (``ArrivingSizeGuard``)
    max_instance_bytes: int = 512 * 2**20
    #: days a failed series stays in ``failed/`` after it failed; None: until deleted by hand
    keep_failed_days: float | None = 30.0
    #: days a forwarded series, or a failed one after it was deleted, is remembered: late instances
    #: of it are recognised that long
    remember_forwarded_days: float = 7.0


@dataclass(frozen=True)
class _Earlier:
    """An earlier batch of a series: forwarded (its record), queued in ``ready/``, or failed (its
    folder in ``failed/``, or its record once deleted)."""

    at: float
    instances: frozenset[str]
    #: what became of it: "was denoised and forwarded at T as derived series number N (UID U, …)"
    what: str
    #: its derived series, as a PACS user finds it: "derived series number N"; None: it failed
    derived: str | None
    #: of a failed batch: what the node keeps of it (its folder, or its record); deleted, it is forgotten
    kept: Path | None = None


@dataclass
class _Arrival:
    last_seen: float
    acknowledged: set[str] = field(default_factory=set)
    senders: set[str] = field(default_factory=set)
    #: SOPInstanceUID → why it was refused (e.g. "0xA700, spool full"), until it is sent again
    refused: dict[str, str] = field(default_factory=dict)


def _marker_reason(marker: Path) -> str:
    """Why the instance of a ``<uid>.refused`` marker was refused (an empty marker: a full spool)."""
    try:
        return marker.read_text(encoding="utf-8").strip()[:300] or SPOOL_FULL
    except (OSError, UnicodeDecodeError):
        return SPOOL_FULL


def _write_refusal_markers(folder: Path, refused: dict[str, str]) -> None:
    """Leave a ``<uid>.refused`` marker per refused instance in the series folder (best effort: an
    empty file usually fits on a full disk; one that does not is logged and kept in memory)."""
    try:
        folder.mkdir(exist_ok=True)
        for sop_uid, why in refused.items():
            marker = folder / f"{sop_uid}{REFUSED}"
            marker.touch()
            if why != SPOOL_FULL:
                marker.write_text(why, encoding="utf-8")
    except OSError as exc:
        LOG.warning(
            "series %s: could not record %d refused instance(s) on disk (%s); remembered until the node stops",
            folder.name,
            len(refused),
            exc.strerror or exc,
        )


def _arrival_on_disk(folder: Path) -> _Arrival:
    """A series' arrival as its folder records it (manifest and refusal markers), as of now."""
    acknowledged = read_manifest(folder) or {}
    refused = {
        p.name.removesuffix(REFUSED): _marker_reason(p)
        for p in folder.glob(f"*{REFUSED}")
        if p.name.removesuffix(REFUSED) not in acknowledged
    }
    return _Arrival(time.monotonic(), set(acknowledged), set(acknowledged.values()) or {"spool"}, refused)


def _incomplete_reason(refused: dict[str, str]) -> str:
    """Why a series with refused instances (SOPInstanceUID -> why) was not denoised, and the remedy."""
    first = sorted(refused)[0]
    remedy = (
        "free space and send the whole series again"
        if set(refused.values()) == {SPOOL_FULL}
        else "send the whole series again once the refused instance is readable and within the cap"
    )
    return (
        f"{len(refused)} instance(s) were refused ({refused[first]}) and not "
        f"sent again, e.g. {first}; the series is incomplete and was not denoised: {remedy}"
    )


def _pixel_data_problem(ds: Dataset) -> str | None:
    """Why the CT instance's pixel data is unusable, or None: missing, short, or not decodable."""
    if "PixelData" not in ds:
        return "no pixel data"
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.pixel_array  # noqa: B018 (decoded once by pydicom's plugins to refuse corrupt data now)
        except Exception as exc:  # noqa: BLE001 (any decoder failure means the same to the sender)
            return f"compressed pixel data cannot be decoded: {str(exc).splitlines()[0][:120]}"
        return None
    return None if len(ds.PixelData) >= declared_pixel_bytes(ds) else "pixel data too short"


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_manifest(folder: Path, sop_uid: str, sender: str) -> None:
    """Append one acknowledged instance to the series manifest, durably; on failure leave it unchanged."""
    line = f"{sop_uid}\t{''.join(c if c.isprintable() else '?' for c in sender)}\n".encode()
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            os.write(fd, line)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never leave a torn line that would claim an unacknowledged instance
            raise
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict[str, str] | None:
    """SOPInstanceUID -> calling AE of the acknowledged instances; None when the folder has no manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    acknowledged = {}
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        sop_uid, _, sender = line.rstrip("\n").partition("\t")
        if line.endswith("\n") and UID_PATTERN.fullmatch(sop_uid):
            acknowledged[sop_uid] = sender
    return acknowledged


def out_of_space(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps: pydicom re-raises write errors without errno) is a full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an unexpected error (pydicom puts a whole traceback into its messages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _crash_point(step: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process at ``step`` when asked to."""
    if os.environ.get(KILL_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _instances_of(folder: Path) -> set[str]:
    """SOPInstanceUIDs of a spooled series: its manifest, else (spooled by an older node) its files."""
    acknowledged = read_manifest(folder)
    return set(acknowledged) if acknowledged is not None else {p.stem for p in folder.glob("*.dcm")}


def _when(epoch: float) -> str:
    """``epoch`` as local date and time (as the log's own time stamps)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _write_durably(path: Path, text: str, staging: Path) -> None:
    """Write ``path`` whole or not at all: staged in ``staging`` (fsync), renamed, its folder fsynced."""
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=staging)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _batches_of(parent: Path, series_uid: str) -> list[Path]:
    """The series' batch folders in ``ready/`` or ``failed/`` (``<SeriesInstanceUID>.<ns>``), by name;
    a glob of ``1.2.3.*`` alone would also match series 1.2.3.4."""
    found = []
    for entry in parent.glob(f"{glob.escape(series_uid)}.*"):
        uid, _, stamp = entry.name.rpartition(".")
        if uid == series_uid and stamp.isdigit():
            found.append(entry)
    return sorted(found, key=lambda f: f.name)


def _failed_series(failed: Path) -> list[Path]:
    """The series folders in ``failed/`` (``<SeriesInstanceUID>.<ns>``); other entries are not the node's."""
    found = []
    for entry in failed.iterdir():
        uid, _, stamp = entry.name.rpartition(".")
        if stamp.isdigit() and UID_PATTERN.fullmatch(uid) and entry.is_dir():
            found.append(entry)
    return sorted(found)


def _failed_at(folder: Path) -> float:
    """When a series failed: the later time of its folder and its ``reason.txt`` (``_fail`` sets both)."""
    times = []
    for path in (folder / REASON, folder):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=time.time())


def _size_of(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder`` (what vanishes meanwhile is not counted)."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return files, size


class DenoisingNode:
    """Storage SCP + spool + job queue; see the module docstring.

    Parameters
    ----------
    config : NodeConfig
    pipeline : DenoisePipeline
        Reads, denoises and exports each series (from up to ``config.jobs`` threads at once; load
        its model first with ``pipeline.denoiser()``); its warnings are logged and written into the
        derived series.
    """

    def __init__(self, config: NodeConfig, pipeline: DenoisePipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.aet = check_aet(config.aet, "--aet")
        self.allow_aets = tuple(check_aet(a, "--allow-aet") for a in config.allow_aets)
        self.dirs = {
            name: config.spool / name for name in ("incoming", "ready", "work", "failed", "tmp", FORWARDED)
        }
        self._lock = threading.Lock()
        self._arrivals: dict[str, _Arrival] = {}
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, config.jobs), thread_name_prefix="denoise")
        self._server = None
        self._monitor: threading.Thread | None = None
        self._spool_lock: int | None = None  # descriptor of the spool's lock while the node runs
        # an instance far over the cap is stopped while it arrives, not after it is in memory
        self._size_guard = ArrivingSizeGuard(config.max_instance_bytes, LOG.warning, self._on_aborted)

    def accepted_line(self) -> str:
        """One line saying whom the node accepts C-STOREs from."""
        if self.allow_aets:
            who = "calling AE " + ", ".join(self.allow_aets)
        else:
            who = "ANY calling AE (no --allow-aet: whoever reaches the port can store here and have series forwarded)"
        return (
            f"accepting from {who} at {self.config.allow_hosts}; instances up to "
            f"{self.config.max_instance_bytes / 2**20:.4g} MB"
        )

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> DenoisingNode:
        """Hold the spool, create it, resume what a previous run left, and start listening.

        Raises
        ------
        UserError
            Another node holds the spool (its pid and host named), or the port cannot be bound.
        """
        self._hold_spool()
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        resumed = sorted(self.dirs["ready"].iterdir())
        keep = {job.name for job in resumed}  # a derived series waiting to be sent is not denoised again
        for leftover in list(self.dirs["work"].iterdir()) + list(self.dirs["tmp"].iterdir()):
            if leftover.name in keep and leftover.parent == self.dirs["work"]:
                continue
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        self._housekeep()
        self._log_failed()
        for folder in sorted(self.dirs["incoming"].iterdir()):
            self._arrivals[folder.name] = _arrival_on_disk(folder)
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
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        try:
            self._server = ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                evt_handlers=[
                    (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store),
                    *self._size_guard.handlers(),
                ],
            )
        except OSError as exc:
            raise UserError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        for job in resumed:  # once listening: a node that cannot start forwards nothing
            self._submit(job)
        self._monitor = threading.Thread(target=self._watch, name="quiet-period", daemon=True)
        self._monitor.start()
        (LOG.info if self.allow_aets else LOG.warning)(self.accepted_line())
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

    def _hold_spool(self) -> None:
        """Take the spool's lock for the node's life: a second node on one spool would clear this
        one's ``tmp/`` and ``work/`` and send its queued series twice. The kernel releases it when the
        node dies (``kill -9`` included)."""
        spool = self.config.spool
        try:
            spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--spool {spool}: cannot create it ({exc.strerror or exc})") from None
        path = spool / SPOOL_LOCK
        fd = open_lock_file(path)
        if not try_lock(fd):
            os.close(fd)
            raise UserError(
                f"--spool {spool} is in use by another node ({lock_holder(path)}); stop that one first, "
                "or give this one its own --spool"
            )
        record_holder(fd)
        self._spool_lock = fd

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
        if self._spool_lock is not None:
            os.close(self._spool_lock)  # releases the spool for the next node
            self._spool_lock = None

    def wait(self) -> None:
        """Block until :meth:`request_stop` (e.g. from a signal handler)."""
        while not self._stop.wait(0.2):
            pass

    def request_stop(self) -> None:
        self._stop.set()

    # -------------------------------------------------------------------------------- receiving

    def _on_requested(self, event) -> None:
        """Reject an association from a host or calling AE title not on the allow-lists."""
        requestor = event.assoc.requestor  # its ae_title is filled in only after negotiation
        calling, address = str(requestor.primitive.calling_ae_title).strip(), str(requestor.address)
        if not self.config.allow_hosts.allows(address):
            why, diagnostic = "host not in --allow-host", NO_REASON
        elif self.allow_aets and calling not in self.allow_aets:
            why, diagnostic = "calling AE not in --allow-aet", CALLING_AE_NOT_RECOGNISED
        else:
            return
        LOG.warning("rejected an association from %s@%s: %s", calling, address, why)
        # as pynetdicom rejects (acse.negotiate_association): the A-ASSOCIATE-RJ, then end the association
        event.assoc.acse.send_reject(REJECT_PERMANENT, REJECT_BY_USER, diagnostic)
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()

    @property
    def _cap(self) -> str:
        return f"--max-instance-mb {self.config.max_instance_bytes / 2**20:.4g}"

    def _keep_back(self, header: tuple[str, str, str] | None, why: str) -> None:
        """A refused instance whose whole data set cannot be used (too large, unreadable, cut off)
        keeps its series back when its header (:func:`io.dicom_net.header_uids`) names a CT series."""
        if header is not None and header[0] in CT_MODALITIES:
            _, series, sop = header
            self._remember_refusal(series, sop, why=why)

    def _on_aborted(self, header: tuple[str, str, str] | None) -> None:
        """An instance cut off while arriving (far over the cap) keeps its series back."""
        self._keep_back(header, f"aborted while arriving, over {self._cap}")

    def _header(self, event) -> tuple[str, str, str] | None:
        """:func:`io.dicom_net.header_uids` of a received C-STORE's data set."""
        raw = event.request.DataSet
        return header_uids(raw, event.context.transfer_syntax) if raw is not None else None

    def _on_store(self, event) -> int | Dataset:
        calling = str(event.assoc.requestor.ae_title).strip()
        sender = f"{calling}@{event.assoc.requestor.address}"
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.config.max_instance_bytes:
            LOG.warning(
                "refused an instance of %.2f MB from %s: larger than %s", size / 2**20, sender, self._cap
            )
            self._keep_back(self._header(event), f"0xA700, larger than {self._cap}")
            status = Dataset()
            status.Status = OUT_OF_RESOURCES
            status.ErrorComment = "instance larger than this node accepts"
            return status
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            modality = str(ds.get("Modality", ""))
            # a few kB of JPEG-LS or RLE may declare gigabytes: checked before anything decodes it
            decoded = declared_pixel_bytes(ds) if modality in CT_MODALITIES and "PixelData" in ds else 0
            oversize = decoded > self.config.max_instance_bytes
            problem = _pixel_data_problem(ds) if modality in CT_MODALITIES and not oversize else None
            if not (UID_PATTERN.fullmatch(sop_uid) and UID_PATTERN.fullmatch(series_uid)):  # file names
                raise ValueError(f"invalid UID {sop_uid!r} / {series_uid!r}")
        except Exception as exc:  # noqa: BLE001 (whatever a peer sends, the node keeps serving)
            why = str(exc).splitlines()[0][:160]
            LOG.warning("refused a corrupt instance from %s: %s", sender, why)
            self._keep_back(self._header(event), f"0xC210, unreadable: {why}")
            return CANNOT_UNDERSTAND
        if modality not in CT_MODALITIES:
            LOG.warning(
                "skipped a %s instance %s from %s (only CT is denoised)", modality or "?", sop_uid, sender
            )
            return 0x0000
        if oversize:
            why = f"decoded pixel data of {decoded / 2**20:.4g} MB, larger than {self._cap}"
            LOG.warning("refused CT instance %s from %s: %s", sop_uid, sender, why)
            self._remember_refusal(series_uid, sop_uid, why=f"0xA700, {why}")
            status = Dataset()
            status.Status = OUT_OF_RESOURCES
            status.ErrorComment = "decoded instance larger than this node accepts"
            return status
        if problem:
            LOG.warning("refused a corrupt CT instance %s from %s: %s", sop_uid, sender, problem)
            self._remember_refusal(series_uid, sop_uid, why=f"0xC210, {problem}")
            return CANNOT_UNDERSTAND
        try:
            self._spool_instance(event.encoded_dataset(include_meta=True), series_uid, sop_uid, calling)
        except OSError as exc:
            self._remember_refusal(series_uid, sop_uid, why=SPOOL_FULL)
            LOG.error(
                "refused instance %s of series %s from %s with 0xA700 Out of Resources: cannot store it in %s: %s",
                sop_uid,
                series_uid,
                sender,
                self.config.spool,
                exc.strerror or exc,
            )
            return OUT_OF_RESOURCES
        return 0x0000

    def _spool_instance(self, data: bytes, series_uid: str, sop_uid: str, calling: str) -> None:
        """Put one instance durably into ``incoming/<series>/`` and the manifest; raise OSError when it cannot."""
        fd, tmp = tempfile.mkstemp(suffix=".dcm", dir=self.dirs["tmp"])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the sender hears "success"
            with self._lock:
                folder = self.dirs["incoming"] / series_uid
                arrival = self._arrival_of(series_uid)
                folder.mkdir(exist_ok=True)
                already = sop_uid in arrival.acknowledged  # sent again: the same instance
                target = folder / f"{sop_uid}.dcm"
                os.replace(tmp, target)
                _fsync_dir(folder)
                _crash_point("received")
                if not already:
                    try:
                        _append_manifest(folder, sop_uid, calling)
                    except OSError:
                        target.unlink(missing_ok=True)  # not acknowledged: not part of the series
                        raise
                (folder / f"{sop_uid}{REFUSED}").unlink(missing_ok=True)
                arrival.last_seen = time.monotonic()
                arrival.acknowledged.add(sop_uid)
                arrival.senders.add(calling)
                arrival.refused.pop(sop_uid, None)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _remember_refusal(self, series_uid: str, sop_uid: str, *, why: str) -> None:
        """Record that an instance of the series was refused (full spool, corrupt, too large): the
        series must not be forwarded without it."""
        with self._lock:
            arrival = self._arrival_of(series_uid)
            arrival.last_seen = time.monotonic()
            arrival.refused[sop_uid] = why
            _write_refusal_markers(self.dirs["incoming"] / series_uid, {sop_uid: why})

    def _arrival_of(self, series_uid: str) -> _Arrival:
        """The series' arrival; a new one re-opens the series if it failed for refused instances.

        A sender answered 0xA700 (full spool) or 0xC210 retries the refused instances, often after
        the quiet period has failed the series. Those instances alone must not become a series of
        their own (a partial series, forwarded): the failed series comes back to ``incoming/`` with
        its acknowledged instances and its refusals, and the retried instances complete it.
        Call with the lock held.
        """
        arrival = self._arrivals.get(series_uid)
        if arrival is not None:
            return arrival
        folder = self.dirs["incoming"] / series_uid
        failed = [f for f in _batches_of(self.dirs["failed"], series_uid) if any(f.glob(f"*{REFUSED}"))]
        if failed and not folder.exists():
            os.replace(failed[-1], folder)
            _fsync_dir(self.dirs["incoming"])
            (folder / REASON).unlink(missing_ok=True)
            arrival = _arrival_on_disk(folder)
            LOG.info(
                "series %s: re-opened from %s (%d instance(s) acknowledged, %d refused): an instance of it arrived again",
                series_uid,
                failed[-1],
                len(arrival.acknowledged),
                len(arrival.refused),
            )
        else:
            arrival = _Arrival(time.monotonic())
        self._arrivals[series_uid] = arrival
        return arrival

    def _watch(self) -> None:
        housekeeping = time.monotonic() + self._housekeeping_seconds()
        while not self._stop.wait(min(0.25, self.config.quiet_seconds / 4)):
            try:
                self._close_quiet_series()
                if time.monotonic() >= housekeeping:
                    housekeeping = time.monotonic() + self._housekeeping_seconds()
                    self._housekeep()
            except Exception as exc:  # noqa: BLE001 (the thread must outlive a full disk; it retries)
                LOG.error("quiet-period check failed, will try again: %s", exc)

    def _close_quiet_series(self) -> None:
        """Queue each series nothing arrived for during the quiet period; fail it instead when one
        of its instances was refused, or when it is a late part of a series forwarded or queued before."""
        now = time.monotonic()
        with self._lock:
            quiet = [
                uid for uid, a in self._arrivals.items() if now - a.last_seen >= self.config.quiet_seconds
            ]
            for uid in quiet:
                arrival = self._arrivals[uid]
                folder = self.dirs["incoming"] / uid
                name = f"{uid}.{time.time_ns()}"
                if not folder.is_dir():
                    LOG.error("series %s: nothing stored; %d instance(s) refused", uid, len(arrival.refused))
                elif arrival.refused:
                    # markers a full disk kept out at the time: the series re-opens when they come again
                    _write_refusal_markers(folder, arrival.refused)
                    self._fail(
                        folder,
                        name,
                        _incomplete_reason(arrival.refused),
                        received=len(arrival.acknowledged),
                        senders=arrival.senders,
                    )
                elif late := self._late_reason(uid, folder):
                    self._fail(
                        folder, name, late, received=len(arrival.acknowledged), senders=arrival.senders
                    )
                else:
                    job = self.dirs["ready"] / name
                    os.replace(folder, job)
                    _fsync_dir(self.dirs["ready"])
                    self._submit(job)
                del self._arrivals[uid]

    # ------------------------------------------------------------------------ late instances

    def _earlier_batches(self, series_uid: str) -> list[_Earlier]:
        """The series' earlier batches, oldest first: queued in ``ready/``, failed (in ``failed/``,
        or the record pruning left of it) and forwarded (its record). Call with the lock held: a job
        leaves ``ready/`` only after writing its record, or by its move to ``failed/``, and pruning
        writes a failed series' record before deleting it, each under the lock, so every batch is seen."""
        earlier = []
        for job in _batches_of(self.dirs["ready"], series_uid):
            at, instances = int(job.name.rpartition(".")[2]) / 1e9, frozenset(_instances_of(job))
            what = f"was complete at {_when(at)} with {len(instances)} instance(s), queued to be denoised"
            derived = f"the derived series of those {len(instances)} instance(s) once it arrives"
            earlier.append(_Earlier(at, instances, what, derived))
        for folder in _batches_of(self.dirs["failed"], series_uid):
            at, instances = _failed_at(folder), frozenset(_instances_of(folder))
            what = (
                f"failed at {_when(at)} with {len(instances)} instance(s) (kept in {folder}, why in {REASON})"
            )
            earlier.append(_Earlier(at, instances, what, None, folder))
        record = self._series_record(series_uid, FAILED_RECORD)
        if record is not None:
            at, instances = float(record.get("failed_at", 0)), frozenset(record.get("instances", ()))
            what = (
                f"failed at {_when(at)} with {len(instances)} instance(s) and was deleted at "
                f"{_when(float(record.get('deleted_at', 0)))} (--keep-failed-days)"
            )
            earlier.append(_Earlier(at, instances, what, None, self._record_path(series_uid, FAILED_RECORD)))
        record = self._series_record(series_uid)
        if record is not None:
            at, instances = float(record.get("forwarded_at", 0)), frozenset(record.get("instances", ()))
            number = record.get("derived_series_number") or "?"
            what = (
                f"was denoised and forwarded at {_when(at)} as derived series number {number} "
                f"(UID {record.get('derived_series_uid', '?')}, {len(instances)} instance(s))"
            )
            earlier.append(_Earlier(at, instances, what, f"derived series number {number}"))
        return sorted(earlier, key=lambda e: e.at)

    def _late_reason(self, series_uid: str, folder: Path) -> str | None:
        """Why a batch must not be forwarded: it lacks instances of an earlier batch of its series
        (forwarded, queued, or failed) and would be a partial derived series; None when it has all
        of them (the whole series sent again) or there is none. Call with the lock held."""
        earlier = self._earlier_batches(series_uid)
        if not earlier:
            return None
        arrived = _instances_of(folder)
        lacking = [e for e in earlier if not e.instances <= arrived]
        if not lacking:
            delivered = [e for e in earlier if e.derived is not None]
            cited = (delivered or earlier)[-1]
            LOG.info(
                "series %s: sent again whole (%d instance(s), all %d of the batch that %s): it is "
                "denoised and forwarded%s",
                series_uid,
                len(arrived),
                len(cited.instances),
                cited.what,
                " as a new derived series; the earlier one stays in the PACS" if delivered else "",
            )
            return None
        last = lacking[-1]
        new = len(arrived - last.instances)
        head = f"{len(arrived)} instance(s) arrived after series {series_uid} {last.what}"
        if last.derived is None:  # it failed: nothing of it is in the PACS
            which = "all of them are in it" if new == 0 else f"{new} of them are not in it"
            return (
                f"{head}; {which}: they were not forwarded as a partial series; send the whole series "
                "again to get one complete derived series (to send it without instances the failed one "
                f"had, e.g. mended at the source, delete {last.kept} first)"
            )
        if new == 0:
            return (
                f"{head}; all of them are in it already: not forwarded again as a partial series, "
                "nothing is missing (delete this folder, or send the whole series again for a new derived series)"
            )
        return (
            f"{head}; {new} of them are not in it: they were not forwarded as a partial series; "
            "send the whole series again to get one complete derived series "
            f"(then delete {last.derived} in the PACS: it lacks them)"
        )

    def _record_path(self, series_uid: str, suffix: str = ".json") -> Path:
        """Where the series' record is: ``forwarded/<uid>.json`` (its last forwarding), or
        ``forwarded/<uid>.failed.json`` (its failed batches that pruning deleted)."""
        return self.dirs[FORWARDED] / f"{series_uid}{suffix}"

    def _series_record(self, series_uid: str, suffix: str = ".json") -> dict | None:
        """The series' record (see ``_record_path``), or None."""
        path = self._record_path(series_uid, suffix)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # written whole by rename: only a damaged disk gets here
            LOG.warning("series %s: ignored the unreadable record %s: %s", series_uid, path, exc)
            return None
        return record if isinstance(record, dict) else None

    def _record_forwarded(self, series_uid: str, job: Path, out: Path) -> None:
        """Remember that the job's series was forwarded, as which derived series, covering which
        instances. Written before the job leaves ``ready/``: a kill in between sends (and records)
        the same derived series again."""
        try:
            derived = dcmread(min(out.glob("*.dcm")), stop_before_pixels=True)
            record = {
                "series": series_uid,
                "forwarded_at": time.time(),
                "destination": str(self.config.forward),
                "derived_series_uid": str(derived.SeriesInstanceUID),
                "derived_series_number": str(derived.get("SeriesNumber", "")),
                "instances": sorted(_instances_of(job)),
            }
            with self._lock:  # the quiet-period check sees the job in ready/ or this record
                _write_durably(self._record_path(series_uid), json.dumps(record), self.dirs["tmp"])
        except Exception as exc:  # noqa: BLE001 (the series is delivered; only the record is missing)
            LOG.error(
                "series %s: forwarded, but could not record it (%s): instances of it arriving later "
                "would be forwarded as a derived series of their own",
                series_uid,
                _one_line(exc),
            )

    # ------------------------------------------------------------------------------ housekeeping

    def _housekeeping_seconds(self) -> float:
        """How often ``failed/`` and ``forwarded/`` are pruned: hourly, or a tenth of a shorter retention."""
        days = [self.config.remember_forwarded_days, self.config.keep_failed_days]
        return max(1.0, min([MAX_HOUSEKEEPING_SECONDS] + [d * DAY / 10 for d in days if d is not None]))

    def _housekeep(self) -> None:
        """Delete the failed series older than ``keep_failed_days`` and forget the forwarded ones,
        and the failed ones deleted, older than ``remember_forwarded_days``."""
        now = time.time()
        keep = self.config.keep_failed_days
        if keep is not None:
            for folder in _failed_series(self.dirs["failed"]):
                failed_at = _failed_at(folder)
                if now - failed_at >= keep * DAY:
                    self._delete_failed(folder, failed_at)
        horizon = now - self.config.remember_forwarded_days * DAY
        forgotten = {"forwarded": 0, "failed and deleted": 0}
        with self._lock:  # not while a job writes a record
            for record in self.dirs[FORWARDED].glob("*.json"):
                try:
                    if record.stat().st_mtime < horizon:
                        record.unlink()
                        kind = "failed and deleted" if record.name.endswith(FAILED_RECORD) else "forwarded"
                        forgotten[kind] += 1
                except OSError:
                    pass
        if any(forgotten.values()):
            LOG.info(
                "forgot %s more than %g day(s) ago (their late instances are no longer recognised)",
                " and ".join(f"{n} series {what}" for what, n in forgotten.items() if n),
                self.config.remember_forwarded_days,
            )

    def _delete_failed(self, folder: Path, failed_at: float) -> None:
        """Delete one failed series: record its instances (``_record_failed``), then one rename into
        ``tmp/`` (emptied at every start), then delete. Without the record, instances of it arriving
        later (its sender's retry of those it refused, often minutes later) would become a series of
        their own, forwarded partial, once a short ``--keep-failed-days`` deleted it."""
        files, size = _size_of(folder)
        series_uid = folder.name.rpartition(".")[0]
        aside = self.dirs["tmp"] / f"deleted-{folder.name}"
        try:
            with self._lock:  # not while an instance sent again re-opens it, nor a batch is checked
                if not folder.is_dir():
                    return
                awaited = len(_arrival_on_disk(folder).refused)
                try:
                    self._record_failed(series_uid, folder, failed_at)
                except OSError as exc:
                    LOG.error(
                        "kept the failed series %s past --keep-failed-days: could not record its instances "
                        "(%s), and instances of it arriving later would then be forwarded as a partial "
                        "series; tried again at the next pruning",
                        folder,
                        exc.strerror or exc,
                    )
                    return
                os.replace(folder, aside)
                _fsync_dir(self.dirs["failed"])
        except OSError as exc:
            LOG.error("could not delete the failed series %s: %s", folder, exc.strerror or exc)
            return
        shutil.rmtree(aside, ignore_errors=True)
        retry = (
            f"; it still awaited {awaited} refused instance(s): sent again now, they fail instead of "
            "becoming a partial series (send the whole series again)"
            if awaited
            else ""
        )
        (LOG.warning if awaited else LOG.info)(
            "deleted the failed series %s (%d file(s), %.1f MB): it failed %s, more than %g day(s) ago "
            "(--keep-failed-days)%s; its instances are remembered %g day(s) in %s",
            folder,
            files,
            size / 2**20,
            _when(failed_at),
            self.config.keep_failed_days,
            retry,
            self.config.remember_forwarded_days,
            self._record_path(series_uid, FAILED_RECORD),
        )

    def _record_failed(self, series_uid: str, folder: Path, failed_at: float) -> None:
        """Remember a failed series' instances before its folder is deleted, with those of its
        batches deleted before: late instances of it still fail (``_earlier_batches``). Kept
        ``remember_forwarded_days`` as a forwarded series' record. Call with the lock held."""
        before = self._series_record(series_uid, FAILED_RECORD) or {}
        record = {
            "series": series_uid,
            "failed_at": max(failed_at, float(before.get("failed_at", 0))),
            "deleted_at": time.time(),
            "instances": sorted(set(before.get("instances", ())) | _instances_of(folder)),
        }
        _write_durably(self._record_path(series_uid, FAILED_RECORD), json.dumps(record), self.dirs["tmp"])

    def _log_failed(self) -> None:
        """One line: how many failed series the spool holds, their size, and how long they are kept."""
        folders = _failed_series(self.dirs["failed"])
        size = sum(_size_of(f)[1] for f in folders)
        held = f"{self.dirs['failed']} holds {len(folders)} failed series ({size / 2**20:.1f} MB)"
        if self.config.keep_failed_days is None:
            LOG.warning(
                "%s; kept until deleted by hand (--keep-failed-days forever): they hold patient data "
                "and fill the spool",
                held,
            )
        else:
            LOG.info(
                "%s; each is deleted %g day(s) after it failed (--keep-failed-days)",
                held,
                self.config.keep_failed_days,
            )

    def _submit(self, job: Path, attempt: int = 0) -> None:
        if self._stop.is_set():
            return  # stays in ready/ for the next start
        self._executor.submit(self._process, job, attempt)

    # ------------------------------------------------------------------------------- processing

    def _check_complete(self, job: Path) -> None:
        """Every acknowledged instance present; drop files nobody acknowledged (a kill mid-transfer)."""
        acknowledged = read_manifest(job)
        if acknowledged is None:
            return  # spooled by an older version of the node: every file was acknowledged
        present = {p.stem for p in job.glob("*.dcm")}
        missing = sorted(set(acknowledged) - present)
        if missing:
            raise UserError(
                f"{len(missing)} acknowledged instance(s) are missing from the spool, e.g. {missing[0]}; "
                "not forwarding a partial series"
            )
        for stray in sorted(present - set(acknowledged)):
            LOG.warning("series %s: dropped instance %s, never acknowledged (cut off)", job.name, stray)
            (job / f"{stray}.dcm").unlink()

    def _denoise_to(self, job: Path, out: Path) -> dict:
        """Denoise the job's series into the derived series ``out``; its figures are kept in the job."""
        facts_file = job / FACTS
        if out.is_dir() and facts_file.exists():  # an earlier attempt denoised it; only sending failed
            return json.loads(facts_file.read_text())
        self._check_complete(job)
        volume = self.pipeline.read(job)
        t0 = time.monotonic()
        outcome = self.pipeline.denoise(volume)
        denoise_s = time.monotonic() - t0
        shutil.rmtree(out, ignore_errors=True)
        files = self.pipeline.export_dicom(outcome, out, series_options=self.config.options)
        facts = {
            "slices": len(files),
            "denoise_seconds": denoise_s,
            "noise_before_hu": outcome.noise_before_hu,
            "noise_after_hu": outcome.noise_after_hu,
            "warnings": outcome.warnings,
        }
        staged = job / f"{FACTS}.tmp"
        staged.write_text(json.dumps(facts))
        os.replace(staged, facts_file)  # whole or absent: the mark that ``out`` is complete
        return facts

    def _process(self, job: Path, attempt: int = 0) -> None:
        start = time.monotonic()
        series_uid = job.name.rsplit(".", 1)[0]
        senders = ",".join(sorted(set((read_manifest(job) or {}).values()))) or "spool"
        received = len(list(job.glob("*.dcm")))
        out = self.dirs["work"] / job.name
        try:
            facts = self._denoise_to(job, out)
            for message in facts.get("warnings", []):
                LOG.warning("series %s: warning: %s", series_uid, message)
            _crash_point("denoised")
            report = send_instances(
                sorted(out.glob("*.dcm")),
                self.config.forward,
                calling_aet=self.aet,
                timeout=self.config.timeout,
                retries=self.config.retries,
            )
            if report.may_pass_later:  # e.g. 0xA700: the PACS is full now; the same UIDs go again later
                raise DestinationUnavailable(report.summary())
            report.raise_for_failures()
        except Exception as exc:  # noqa: BLE001 (one bad series must not stop the node)
            if not isinstance(exc, DestinationUnavailable) and not out_of_space(exc):
                reason = str(exc) if isinstance(exc, UserError) else _one_line(exc)
                self._fail_job(job, out, reason, received, senders, start)
                return
            delay = min(self.config.retry_seconds * 2**attempt, MAX_RETRY_SECONDS)
            what = "denoised, but " if out.is_dir() else ""
            problem = exc if isinstance(exc, DestinationUnavailable) else "no space left in the spool"
            LOG.warning(
                "series %s: %s%s; will retry in %.0f s (kept in %s)", series_uid, what, problem, delay, job
            )
            self._retry_later(job, attempt + 1, delay)
            return
        self._record_forwarded(series_uid, job, out)
        _crash_point("sent")
        self._discard_sent(job, out)
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

    def _discard_sent(self, job: Path, out: Path) -> None:
        """Remove a sent series: first one rename out of ``ready/`` (the "sent" mark), then delete.

        A kill before the rename re-sends the same derived instances (same UIDs: nothing new in the
        PACS); after it, the next start finds nothing to do and clears ``tmp/``.
        """
        sent = self.dirs["tmp"] / f"sent-{job.name}"
        os.replace(job, sent)
        _fsync_dir(self.dirs["ready"])
        _crash_point("cleanup")
        derived = self.dirs["tmp"] / f"sent-{job.name}-derived"
        if out.is_dir():
            os.replace(out, derived)
        shutil.rmtree(sent, ignore_errors=True)
        shutil.rmtree(derived, ignore_errors=True)

    def _retry_later(self, job: Path, attempt: int, delay: float) -> None:
        """Queue ``job`` again after ``delay`` s, unless the node stops first (then the next start resumes it)."""

        def resubmit() -> None:
            if not self._stop.wait(delay):
                self._submit(job, attempt)

        threading.Thread(target=resubmit, name="retry", daemon=True).start()

    def _fail_job(self, job: Path, out: Path, reason: str, received: int, senders: str, start: float) -> None:
        """Fail a queued series; it moves from ``ready/`` to ``failed/`` under the lock, so the
        quiet-period check sees it in one of the two (``_earlier_batches``)."""
        shutil.rmtree(out, ignore_errors=True)
        with self._lock:
            self._fail(job, job.name, reason, received=received, senders=senders, start=start)

    def _fail(
        self,
        folder: Path,
        name: str,
        reason: str,
        *,
        received: int,
        senders: str | set[str],
        start: float | None = None,
    ) -> None:
        """Move a series' instances to ``failed/NAME`` with ``reason.txt``; log one line with the final path."""
        target = self.dirs["failed"] / name
        reason = reason.replace(str(folder), str(target))  # the reader names the folder it read
        if re.search(r"--(force|series|resample-gaps)\b", reason):
            reason += (
                f" (those are options of `ipv2-denoise denoise`: run it on {target} with --dicom and "
                f"--send {self.config.forward.host}:{self.config.forward.port}:{self.config.forward.aet})"
            )
        try:
            os.replace(folder, target)
        except OSError as exc:
            LOG.error("could not move %s to %s: %s", folder, target, exc)
            target = folder
        try:
            (target / REASON).write_text(reason + "\n")
        except OSError as exc:  # a full disk: the log line below still says why
            LOG.error("could not write %s: %s", target / REASON, exc.strerror or exc)
        try:
            os.utime(target)  # the time it failed, for --keep-failed-days, also without reason.txt
        except OSError:
            pass
        senders = ",".join(sorted(senders)) if isinstance(senders, set) else senders
        after = f" after {time.monotonic() - start:.1f} s" if start is not None else ""
        LOG.error(
            "series %s: received %d instance(s) from %s; FAILED%s: %s (kept in %s)",
            name.rsplit(".", 1)[0],
            received,
            senders or "spool",
            after,
            reason,
            target,
        )
