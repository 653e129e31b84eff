"""Send DICOM instances to a PACS: C-ECHO + C-STORE (pynetdicom) or STOW-RS (dicomweb-client).

A destination is either a DICOM node ``HOST:PORT`` with its called AE title (``HOST:PORT:AET``
or a separate ``aet``), or a DICOMweb base URL (``http(s)://host/dicom-web``). Sending checks the
node first (TCP connect, then C-ECHO) so that an unreachable PACS or a wrong AE title costs one
timeout and gives one clear line, then stores every instance and reports each one's outcome.
Transient failures (association aborted, no response, "Refused: Out of Resources" 0xA7xx,
HTTP 5xx) are retried with a growing delay; permanent refusals are not.

References
----------
DICOM PS3.4 B.2.3 (Storage Service Class statuses), PS3.8 7.1.1.9 (A-ASSOCIATE-RJ reasons),
PS3.18 10.5 (STOW-RS; FailedSOPSequence and FailureReason in the response).
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import ProgressCallback

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "DEFAULT_CALLING_AET",
    "DestinationUnavailable",
    "DicomNode",
    "ArrivingSizeGuard",
    "InstanceResult",
    "SendReport",
    "TRANSFER_SLACK_BYTES",
    "UID_PATTERN",
    "associate",
    "check_aet",
    "check_reachable",
    "dicom_files",
    "echo",
    "header_uids",
    "make_ae",
    "parse_destination",
    "parse_node",
    "send",
    "send_instances",
    "stow_instances",
]

DEFAULT_CALLING_AET = "IPV2DENOISE"
#: Transfer syntaxes we accept when we receive (the node's C-STORE, a C-GET): uncompressed, then
#: what scanners and PACS send compressed (GDCM, in SimpleITK and python-gdcm, decodes them all).
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
]
#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters; the only tag used in file names.
UID_PATTERN = re.compile(r"[0-9][0-9.]{0,63}")
#: Storage statuses worth another try: the SCP may have room again in a moment.
_TRANSIENT = range(0xA700, 0xA800)
#: Presentation contexts per association (PS3.8 allows 128).
_MAX_CONTEXTS = 120


class DestinationUnavailable(UserError):
    """The PACS cannot be reached, refuses the association or does not answer (nothing was stored).

    A :class:`UserError` (one line, exit 2) that a long-running caller (the node) may retry later.
    """


@dataclass(frozen=True)
class DicomNode:
    """A DICOM application entity on the network.

    Attributes
    ----------
    host : str
        Host name or IP address (IPv6 without brackets).
    port : int
        TCP port, 1–65535.
    aet : str
        The called AE title (checked by :func:`check_aet`).
    """

    host: str
    port: int
    aet: str

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def check_aet(aet: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (1-16 characters, no backslash or control characters).

    Parameters
    ----------
    aet : str
        The AE title as given (surrounding spaces are dropped).
    what : str
        What it is, for the message (``called AE title`` …).

    Returns
    -------
    str
        The stripped AE title.

    Raises
    ------
    UserError
        Empty, longer than 16 characters, a backslash or a control character.
    """
    aet = aet.strip()
    if not 1 <= len(aet) <= 16 or "\\" in aet or not aet.isprintable():
        raise UserError(f"{what} {aet!r}: must be 1 to 16 printable characters without a backslash")
    return aet


def parse_node(text: str, aet: str | None = None, *, what: str = "destination") -> DicomNode:
    """``HOST:PORT:AET`` (or ``HOST:PORT`` plus ``aet``) -> :class:`DicomNode`.

    Parameters
    ----------
    text : str
        The node as a user wrote it (``[::1]:104:PACS`` for IPv6).
    aet : str, optional
        The called AE title from ``--aet``; must agree with one in ``text``.
    what : str
        What the node is, for the messages (``destination``, ``--forward`` …).

    Returns
    -------
    DicomNode
        The parsed node.

    Raises
    ------
    UserError
        Malformed text, no or conflicting AE title, a port outside 1–65535, an invalid AE title.
    """
    parts = text.rsplit(":", 2) if text.count(":") >= 2 else text.split(":")
    if len(parts) == 3:
        host, port, node_aet = parts
        if aet and aet != node_aet:
            raise UserError(f"{what} {text!r} names AE title {node_aet!r} but --aet says {aet!r}")
    elif len(parts) == 2:
        (host, port), node_aet = parts, aet
    else:
        raise UserError(f"{what} {text!r}: expected HOST:PORT:AET, HOST:PORT with --aet, or an http(s) URL")
    if not node_aet:
        raise UserError(f"{what} {text!r}: no called AE title; give HOST:PORT:AET or --aet AET")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"{what} {text!r}: expected HOST:PORT with a port between 1 and 65535")
    return DicomNode(host.strip("[]"), int(port), check_aet(node_aet, "called AE title"))


def parse_destination(text: str, aet: str | None = None) -> DicomNode | str:
    """A DICOMweb base URL (returned as is) or a :class:`DicomNode`.

    Parameters
    ----------
    text : str
        ``http(s)://…/dicom-web`` or ``HOST:PORT[:AET]``.
    aet : str, optional
        The called AE title when ``text`` has none.

    Returns
    -------
    DicomNode or str
        The node, or the URL without a trailing slash.
    """
    if text.startswith(("http://", "https://")):
        return text.rstrip("/")
    return parse_node(text, aet)


@dataclass
class InstanceResult:
    """What happened to one file.

    Attributes
    ----------
    path : pathlib.Path
        The file sent.
    sop_instance_uid : str
        Its SOP Instance UID.
    ok : bool
        Whether the destination stored it (a warning status counts as stored).
    status : str
        ``"0x0000"``, ``"0xA700"``, ``"HTTP 409"``, ``"not sent"`` …
    reason : str
        The status's meaning and the peer's comment; empty on plain success.
    attempts : int
        How many times it was sent.
    transient : bool
        Its last failure may pass later (0xA7xx "Out of Resources", no response, a dropped
        association): a caller that can wait sends it again later instead of giving up.
    """

    path: Path
    sop_instance_uid: str = ""
    ok: bool = False
    status: str = "not sent"  # "0x0000", "0xA700", "HTTP 409", ...
    reason: str = ""
    attempts: int = 0
    transient: bool = False

    def line(self) -> str:
        word = "stored" if self.ok and not self.reason else ("warning" if self.ok else "REFUSED")
        tail = f"  {self.status} {self.reason}".rstrip() if (self.reason or not self.ok) else ""
        return f"{word:8s} {self.path.name}  {self.sop_instance_uid}{tail}"


@dataclass
class SendReport:
    """Per-instance outcome of one send.

    Attributes
    ----------
    destination : str
        The node (``AET@host:port``) or URL.
    results : list of InstanceResult
        One per file, in the order given.
    seconds : float
        Wall time of the send, s.
    """

    destination: str
    results: list[InstanceResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[InstanceResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.failed

    @property
    def may_pass_later(self) -> bool:
        """Some instances failed, each with a transient failure (see :attr:`InstanceResult.transient`)."""
        return bool(self.failed) and all(r.transient for r in self.failed)

    def summary(self) -> str:
        n, bad = len(self.results), len(self.failed)
        if not bad:
            return f"stored {n} instance(s) on {self.destination} in {self.seconds:.1f} s"
        shown = "; ".join(
            f"{r.path.name} ({r.status} {r.reason})".replace(" )", ")") for r in self.failed[:5]
        )
        more = f"; and {bad - 5} more" if bad > 5 else ""
        return f"{bad} of {n} instance(s) refused by {self.destination}: {shown}{more}"

    def raise_for_failures(self) -> None:
        """Raise a one-line :class:`UserError` naming the refused instances and why."""
        if self.failed:
            raise UserError(self.summary())


#: MediaStorageSOPClassUID of a DICOMDIR (Media Storage Directory Storage): an index, not an instance.
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _is_dicomdir(path: Path) -> bool:
    """A DICOMDIR (a disc's index), which a PACS does not store."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - an unreadable file meta is the sender's to report, per file
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS


def dicom_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The DICOM Part 10 files in a folder (recursively, hidden files skipped) or a list of paths.

    Parameters
    ----------
    paths : path-like or iterable of path-like
        One file or folder, or a list of files.

    Returns
    -------
    list of pathlib.Path
        The files with the ``DICM`` preamble, sorted for a folder.

    Raises
    ------
    UserError
        The path does not exist, or no DICOM file was found.
    """
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if not root.exists():
            raise UserError(f"{root}: no such file or folder")
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        candidates = [p for p in candidates if not any(part.startswith(".") for part in p.parts[-1:])]
    else:
        candidates = [Path(p) for p in paths]
    found = []
    for p in candidates:
        with open(p, "rb") as f:
            head = f.read(132)
        if len(head) == 132 and head[128:132] == b"DICM" and not _is_dicomdir(p):
            found.append(p)
    if not found:
        raise UserError(f"{paths}: no DICOM files (Part 10, 'DICM' preamble) found")
    return found


# ------------------------------------------------------------------------------------ DIMSE


def _status_text(code: int) -> str:
    return STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]


def check_reachable(node: DicomNode, timeout: float) -> None:
    """Open and close a TCP connection to ``node``: an unreachable PACS costs one timeout, one line.

    Parameters
    ----------
    node : DicomNode
        The peer.
    timeout : float
        Connection timeout, s.

    Raises
    ------
    DestinationUnavailable
        Unknown host, no answer within ``timeout``, connection refused.
    """
    try:
        with socket.create_connection((node.host, node.port), timeout=timeout):
            pass
    except socket.gaierror:
        raise DestinationUnavailable(f"cannot reach {node}: unknown host {node.host!r}") from None
    except TimeoutError:
        raise DestinationUnavailable(
            f"cannot reach {node}: no answer within {timeout:g} s (host down or firewalled?)"
        ) from None
    except OSError as exc:
        raise DestinationUnavailable(f"cannot reach {node}: {exc.strerror or exc}") from None


def make_ae(calling_aet: str, timeout: float) -> AE:
    """Our application entity with ``calling_aet`` and every timeout set to ``timeout``.

    Parameters
    ----------
    calling_aet : str
        Our AE title (checked by :func:`check_aet`).
    timeout : float
        Connection, ACSE, DIMSE and network timeouts, s.

    Returns
    -------
    pynetdicom.AE
        The application entity, without presentation contexts yet.
    """
    ae = AE(ae_title=check_aet(calling_aet, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def header_uids(raw: BinaryIO, transfer_syntax: str) -> tuple[str, str, str] | None:
    """(Modality, SeriesInstanceUID, SOPInstanceUID) from the first groups (up to 0020) of an
    encoded data set without file meta, as a C-STORE brings it, or None when they cannot be read
    (broken, deflated) or the two UIDs are no UIDs: what a receiver may name a refused instance by,
    without decoding the whole of it (it may be huge or corrupt, or cut off).

    Parameters
    ----------
    raw : binary file-like
        The encoded data set from its start (its position is restored).
    transfer_syntax : str
        The presentation context's transfer syntax UID.

    Returns
    -------
    tuple of str, or None
    """
    syntax = UID(str(transfer_syntax or ""))
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    start = raw.tell()
    try:
        raw.seek(0)
        ds = read_dataset(
            raw,
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            stop_when=lambda tag, vr, length: tag.group > 0x0020,
        )
        modality, series, sop = (
            str(ds.get(k, "")) for k in ("Modality", "SeriesInstanceUID", "SOPInstanceUID")
        )
    except Exception:  # noqa: BLE001 (a header too broken to name its series)
        return None
    finally:
        raw.seek(start)
    if not (UID_PATTERN.fullmatch(series) and UID_PATTERN.fullmatch(sop)):
        return None
    return modality, series, sop


#: How far an arriving message may pass an instance size cap before :class:`ArrivingSizeGuard` aborts
#: its association (the command set and the encoding; up to that the whole instance arrives and its
#: C-STORE handler refuses it with a status).
TRANSFER_SLACK_BYTES = 2**20


class ArrivingSizeGuard:
    """Aborts an association whose arriving instance passes a size cap, while it arrives.

    pynetdicom gathers a whole DIMSE message in memory before the C-STORE handler sees it, so a
    size cap checked in the handler bounds nothing: one peer sending a 10 GB "instance" fills the
    receiver's memory. Bound :meth:`on_pdu` to ``EVT_PDU_RECV`` and :meth:`on_closed` to
    ``EVT_CONN_CLOSE``: each P-DATA-TF PDU's fragments are counted as they come (command set and
    data set apart; a last fragment ends either, PS3.8 E.2), and past ``max_instance_bytes`` +
    :data:`TRANSFER_SLACK_BYTES` the association is aborted (A-ABORT) and ``warn`` gets one line.
    Written by hand: pynetdicom offers the events, not the limit.

    Parameters
    ----------
    max_instance_bytes : int
        The size cap the C-STORE handler applies.
    warn : callable
        ``warn(message)``: one line naming the peer, called once per aborted association.
    on_abort : callable, optional
        ``on_abort(header)`` with the aborted instance's :func:`header_uids` (read from the first
        :data:`HEAD_BYTES` of its data set; None when they cannot be read), so that a receiver can
        keep its series back.
    """

    #: Bytes of each arriving data set kept to name it (its header) if it must be aborted.
    HEAD_BYTES = 64 * 2**10

    def __init__(
        self,
        max_instance_bytes: int,
        warn: Callable[[str], None],
        on_abort: Callable[[tuple[str, str, str] | None], None] | None = None,
    ) -> None:
        self.limit = max_instance_bytes + TRANSFER_SLACK_BYTES
        self.max_instance_bytes = max_instance_bytes
        self.warn = warn
        self.on_abort = on_abort
        self._receiving: dict[int, list[int]] = {}  # per association: command bytes, data set bytes
        self._heads: dict[int, bytearray] = {}  # per association: the start of the arriving data set
        self._aborted: set[int] = set()
        self._lock = threading.Lock()

    def on_pdu(self, event) -> None:
        """``EVT_PDU_RECV`` handler: count a P-DATA-TF PDU's fragments, abort past the limit."""
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if not items:
            return
        key = id(event.assoc)
        with self._lock:
            if key in self._aborted:
                return
            sizes = self._receiving.setdefault(key, [0, 0])
            head = self._heads.setdefault(key, bytearray())
            for item in items:
                data = item.data or b"\x00"
                control = data[0]  # bit 0: command (1) or data set (0); bit 1: last fragment
                part = 0 if control & 0x01 else 1
                sizes[part] += len(data) - 1
                if part == 1 and len(head) < self.HEAD_BYTES:
                    head += data[1 : 1 + self.HEAD_BYTES - len(head)]
                if sizes[part] > self.limit:
                    self._aborted.add(key)
                    peer = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
                    self.warn(
                        f"aborted the association with {str(peer.ae_title).strip()}@{peer.address}: an "
                        f"instance passed {self.limit / 2**20:.4g} MB while arriving (cap "
                        f"{self.max_instance_bytes / 2**20:.4g} MB)"
                    )
                    event.assoc.abort()  # non-blocking inside a handler
                    if self.on_abort is not None:
                        syntax = next(
                            (
                                c.transfer_syntax[0]
                                for c in event.assoc.accepted_contexts
                                if c.context_id == item.context_id
                            ),
                            "",
                        )
                        self.on_abort(header_uids(io.BytesIO(bytes(head)), syntax))
                    return
                if control & 0x02:
                    sizes[part] = 0
                    if part == 1:
                        head.clear()

    def on_closed(self, event) -> None:
        """``EVT_CONN_CLOSE`` handler: forget the association."""
        with self._lock:
            self._receiving.pop(id(event.assoc), None)
            self._heads.pop(id(event.assoc), None)
            self._aborted.discard(id(event.assoc))

    def handlers(self) -> list[tuple]:
        """The ``(event, handler)`` pairs to bind."""
        return [(evt.EVT_PDU_RECV, self.on_pdu), (evt.EVT_CONN_CLOSE, self.on_closed)]


def associate(ae: AE, node: DicomNode, *, ext_neg: Sequence | None = None, handlers: Sequence = ()):
    """An established association with ``node``, or one line that says why not.

    Parameters
    ----------
    ae : pynetdicom.AE
        Our application entity with its requested contexts.
    node : DicomNode
        The peer.
    ext_neg : sequence, optional
        Extended negotiation items (e.g. SCP/SCU role selection for C-GET).
    handlers : sequence
        Further ``(event, handler)`` pairs for the association (e.g. ``EVT_C_STORE``).

    Returns
    -------
    pynetdicom.association.Association
        The established association (the caller releases it).

    Raises
    ------
    DestinationUnavailable
        Rejected (with the PACS's reason), aborted, or no answer.
    """
    answers: list = []  # the ACSE primitives the peer sent (A-ASSOCIATE-AC/RJ, A-ABORT, A-P-ABORT)

    def on_acse(event) -> None:
        answers.append(event.primitive)

    started = time.monotonic()
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.aet,
        ext_neg=list(ext_neg) if ext_neg else None,
        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), *handlers],
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        reasons = [a.reason_str for a in answers if getattr(a, "result", None) in (0x01, 0x02)]
        reason = reasons[0] if reasons else "no reason given"
        hint = " (check the called AE title)" if "Called AE" in reason else ""
        hint = hint or (" (the PACS does not know this calling AE title)" if "Calling AE" in reason else "")
        raise DestinationUnavailable(f"association with {node} rejected: {reason}{hint}")
    if any(getattr(a, "result", None) == 0x00 for a in answers):
        raise DestinationUnavailable(
            f"association with {node} aborted: the PACS accepted none of our presentation contexts"
        )
    if answers:
        raise DestinationUnavailable(f"association with {node} aborted by the peer")
    if time.monotonic() - started < 0.9 * ae.acse_timeout:  # not a timeout: the peer hung up first
        raise DestinationUnavailable(
            f"association with {node} failed: the PACS closed the connection without an answer"
            " (a wrong called AE title or an unknown calling AE title, on some PACS)"
        )
    raise DestinationUnavailable(f"association with {node} failed: no answer within {ae.acse_timeout:g} s")


def echo(node: DicomNode, *, calling_aet: str = DEFAULT_CALLING_AET, timeout: float = 10.0) -> float:
    """C-ECHO ``node``; returns the round-trip seconds or raises a one-line :class:`UserError`.

    Parameters
    ----------
    node : DicomNode
        The destination.
    calling_aet : str
        Our AE title.
    timeout : float
        Connection, association and response timeout, s.

    Returns
    -------
    float
        Round-trip time of the echo, s.

    Raises
    ------
    DestinationUnavailable
        Unreachable host, rejected or aborted association, or a failed echo status.
    """
    check_reachable(node, timeout)
    ae = make_ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    start = time.monotonic()
    assoc = associate(ae, node)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise DestinationUnavailable(
            f"C-ECHO to {node} failed: {'no response' if code is None else f'status 0x{code:04X}'}"
        )
    return time.monotonic() - start


def _contexts(headers: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) to request: each file's own syntax plus the uncompressed ones."""
    by_class: dict[str, list[str]] = {}
    for ds in headers:
        syntaxes = by_class.setdefault(str(ds.SOPClassUID), [])
        for ts in (str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
    if len(by_class) > _MAX_CONTEXTS:
        raise UserError(f"{len(by_class)} different SOP classes in one send; at most {_MAX_CONTEXTS}")
    return list(by_class.items())


#: Why a file given to a send is not sent: it is not an instance a PACS stores.
NOT_AN_INSTANCE = "not an instance to store (no SOPClassUID / SOPInstanceUID: a DICOMDIR?)"


def _storable(header: Dataset) -> bool:
    """Whether a file's header names the SOP class and instance a C-STORE or STOW-RS needs."""
    return bool(str(header.get("SOPClassUID", "") or "").strip()) and bool(
        str(header.get("SOPInstanceUID", "") or "").strip()
    )


def _store_one(assoc, path: Path, result: InstanceResult) -> None:
    """C-STORE one file on an open association, recording the outcome (and whether it may pass
    later) in ``result``."""
    if not assoc.is_established:  # dropped mid-way: the rest go to the next attempt
        result.status, result.reason, result.transient = "aborted", "association dropped", True
        return
    try:
        status = assoc.send_c_store(pydicom.dcmread(path))
    except ValueError as exc:  # no accepted context for its class or transfer syntax: final
        result.status, result.transient = "not sent", False
        result.reason = f"the destination accepted no presentation context for it ({str(exc)[:120]})"
        return
    code = getattr(status, "Status", None)
    if code is None:
        result.status, result.reason, result.transient = (
            "no response",
            "association aborted or timed out",
            True,
        )
        return
    result.status = f"0x{code:04X}"
    result.ok = code == 0x0000 or code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF
    result.reason = "" if code == 0x0000 else _status_text(code)
    comment = getattr(status, "ErrorComment", "")
    if comment:
        result.reason = f"{result.reason}: {comment}"
    result.transient = not result.ok and code in _TRANSIENT


def send_instances(
    paths: Sequence[str | Path],
    node: DicomNode,
    *,
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout: float = 10.0,
    retries: int = 3,
    retry_delay: float = 1.0,
    progress: ProgressCallback | None = None,
) -> SendReport:
    """C-STORE every file to ``node`` (after a C-ECHO); never raises for refused instances.

    Transient failures are retried up to ``retries`` times, waiting ``retry_delay`` x 2^(n-1) s;
    a dropped association is re-opened. Raises :class:`UserError` only when the node cannot be
    reached or refuses the association (see :func:`echo`).

    Parameters
    ----------
    paths : sequence of path-like
        DICOM Part 10 files.
    node : DicomNode
        The destination.
    calling_aet : str
        Our AE title.
    timeout : float
        Network timeouts, s.
    retries : int
        Further attempts for instances with a transient status or a dropped association.
    retry_delay : float
        First wait between attempts, s (doubled each time).
    progress : ProgressCallback, optional
        ``progress(stored, total, "C-STORE")`` after each instance.

    Returns
    -------
    SendReport
        One result per file; check :attr:`SendReport.ok` or call
        :meth:`SendReport.raise_for_failures`.
    """
    start = time.monotonic()
    echo(node, calling_aet=calling_aet, timeout=timeout)
    paths = [Path(p) for p in paths]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    report = SendReport(
        str(node), [InstanceResult(p, str(h.get("SOPInstanceUID", ""))) for p, h in zip(paths, headers)]
    )
    pending = [i for i, h in enumerate(headers) if _storable(h)]
    for i in sorted(set(range(len(paths))) - set(pending)):
        report.results[i].reason = NOT_AN_INSTANCE
    ae = make_ae(calling_aet, timeout)
    for sop_class, syntaxes in _contexts([headers[i] for i in pending]):
        ae.add_requested_context(sop_class, syntaxes)
    for attempt in range(max(0, retries) + 1):
        if not pending:
            break
        if attempt:
            time.sleep(retry_delay * 2 ** (attempt - 1))
        assoc = associate(ae, node)
        retry_later = []
        try:
            for i in pending:
                result = report.results[i]
                result.attempts += 1
                _store_one(assoc, paths[i], result)
                if result.transient:
                    retry_later.append(i)
                if progress is not None:
                    progress(sum(r.ok for r in report.results), len(paths), "C-STORE")
        finally:
            if assoc.is_established:
                assoc.release()
        pending = retry_later
    report.seconds = time.monotonic() - start
    return report


# ------------------------------------------------------------------------------------ DICOMweb


def _stow_outcomes(response: Dataset) -> tuple[set[str], dict[str, str]]:
    """(stored SOP Instance UIDs, {failed UID: reason}) from a STOW-RS response dataset."""
    stored = {str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])}
    failed = {}
    for item in response.get("FailedSOPSequence", []):
        code = int(item.get("FailureReason", 0x0110))
        failed[str(item.ReferencedSOPInstanceUID)] = f"0x{code:04X} {_status_text(code)}"
    return stored, failed


#: HTTP codes whose body is a STOW-RS response naming stored and failed instances (PS3.18 10.5.3).
STOW_PARTIAL_CODES = (400, 409)


def http_body_excerpt(response: requests.Response | None, limit: int = 120) -> str:
    """`` (server says: ...)`` from the first line of an error body, or nothing."""
    if response is None:
        return ""
    try:
        text = response.text.strip().splitlines()[0][:limit] if response.text.strip() else ""
    except (ValueError, AttributeError, IndexError):
        return ""
    return f" (server says: {text})" if text else ""


def stow_response_dataset(response: requests.Response) -> Dataset:
    """The STOW-RS response dataset of a 400/409 answer; empty when the body is not one (any JSON)."""
    try:
        return Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - a server's body is hostile: any JSON, any shape
        return Dataset()


def stow_instances(
    paths: Sequence[str | Path],
    url: str,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    batch: int = 16,
    progress: ProgressCallback | None = None,
) -> SendReport:
    """STOW-RS every file to the DICOMweb base ``url`` (``.../dicom-web``) in batches.

    dicomweb-client retries HTTP 429/5xx itself (``retries`` attempts); a 409 (some or all
    refused) is read for its FailedSOPSequence. Raises :class:`UserError` when the server cannot
    be reached or answers with another HTTP error (e.g. 404: wrong URL).

    Parameters
    ----------
    paths : sequence of path-like
        DICOM Part 10 files.
    url : str
        The DICOMweb base URL.
    timeout : float
        HTTP timeout, s.
    retries : int
        Further attempts after HTTP 429/5xx.
    batch : int
        Instances per STOW-RS request.
    progress : ProgressCallback, optional
        ``progress(sent, total, "STOW-RS")`` after each batch.

    Returns
    -------
    SendReport
        One result per file.

    Raises
    ------
    DestinationUnavailable
        The server cannot be reached.
    UserError
        An HTTP error other than 400/409 (wrong URL, no permission …).
    """
    start = time.monotonic()
    paths = [Path(p) for p in paths]
    client = DICOMwebClient(url, timeout=timeout)
    client.set_http_retry_params(
        retry=retries > 0, max_attempts=max(1, retries + 1), wait_exponential_multiplier=500
    )
    report = SendReport(url)
    for first in range(0, len(paths), batch):
        read = list(
            zip(paths[first : first + batch], (pydicom.dcmread(p) for p in paths[first : first + batch]))
        )
        report.results.extend(
            InstanceResult(p, reason=NOT_AN_INSTANCE) for p, ds in read if not _storable(ds)
        )
        chunk = [ds for _, ds in read if _storable(ds)]
        results = [InstanceResult(p, str(ds.SOPInstanceUID), attempts=1) for p, ds in read if _storable(ds)]
        report.results.extend(results)
        if not chunk:
            continue
        try:
            response = client.store_instances(chunk)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code not in STOW_PARTIAL_CODES:  # 404 (wrong URL), 401/403, ...: no STOW response to read
                raise UserError(
                    f"STOW-RS to {url} failed: HTTP {code} {getattr(exc.response, 'reason', '')}"
                    f"{http_body_excerpt(exc.response)}; check the DICOMweb base URL (…/dicom-web)"
                ) from None
            response = stow_response_dataset(exc.response)
            for r in results:
                r.status = f"HTTP {code}"
        except requests.RequestException as exc:
            raise DestinationUnavailable(
                f"cannot reach {url}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            ) from None
        stored, failed = _stow_outcomes(response)
        for r in results:
            if r.sop_instance_uid in failed:
                r.ok, r.reason = False, failed[r.sop_instance_uid]
            elif r.sop_instance_uid in stored or (not failed and r.status == "not sent"):
                r.ok, r.status = True, "HTTP 200"
                r.reason = ""
            else:
                r.reason = r.reason or "not acknowledged by the server"
        if progress is not None:
            progress(len(report.results), len(paths), "STOW-RS")
    report.seconds = time.monotonic() - start
    return report


def send(
    paths: Sequence[str | Path],
    destination: DicomNode | str,
    *,
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout: float = 10.0,
    retries: int = 3,
    retry_delay: float = 1.0,
    progress: ProgressCallback | None = None,
) -> SendReport:
    """Send to a :class:`DicomNode` (C-STORE) or a DICOMweb URL (STOW-RS).

    Parameters
    ----------
    paths : sequence of path-like
        DICOM Part 10 files.
    destination : DicomNode or str
        A node, or a DICOMweb base URL (see :func:`parse_destination`).
    calling_aet : str
        Our AE title (C-STORE only).
    timeout : float
        Network timeouts, s (at least 1 s for STOW-RS).
    retries : int
        Further attempts after transient failures.
    retry_delay : float
        First wait between C-STORE attempts, s.
    progress : ProgressCallback, optional
        Called as the instances are sent.

    Returns
    -------
    SendReport
        One result per file, as :func:`send_instances` or :func:`stow_instances`.
    """
    if isinstance(destination, DicomNode):
        return send_instances(
            paths,
            destination,
            calling_aet=calling_aet,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
            progress=progress,
        )
    return stow_instances(paths, destination, timeout=max(timeout, 1.0), retries=retries, progress=progress)
