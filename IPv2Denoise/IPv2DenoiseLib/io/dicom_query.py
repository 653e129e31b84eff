"""Find CT series on a PACS and fetch one: C-FIND + C-GET (pynetdicom) or QIDO-RS + WADO-RS (requests).

The peer is the same :class:`~IPv2DenoiseLib.io.dicom_net.DicomNode` or DICOMweb base URL that
``send`` stores to. :func:`find_series` asks study by study (STUDY level, then SERIES level inside
each study: the strict hierarchical query every PACS answers), checking its cancel token between
studies, and returns what a person chooses from. :func:`retrieve_series` fetches one series into a
new folder, written atomically, so a cancelled or failed retrieval leaves nothing behind.

Everything the PACS sends is hostile until checked: the UIDs we ask with are validated, every
received instance must be a CT image of the series we asked for, named by the series' list of
instances (C-FIND at IMAGE level, or QIDO-RS) and not received already, and under the size cap,
and file names are a counter, never a tag value. A list shorter than the series' own count
(NumberOfSeriesRelatedInstances: a PACS that caps its C-FIND answers) is partial: over C-GET the
count is held instead (:meth:`_Receiver.take_count`), over WADO-RS, which fetches only what the
list names, the retrieval is refused. An instance over the cap is cut off while it
arrives: C-GET aborts the association, and WADO-RS fetches instance by instance (as QIDO-RS lists
them, at most ``max_instances``), reading each answer in pieces and closing it once past the cap.
Every DICOMweb answer, the QIDO-RS searches of :func:`find_series` too (capped at
:data:`MAX_SEARCH_MB`), is read so, by :func:`_read_bounded`. A retrieval as a whole is bounded in
time (:data:`MAX_RETRIEVE_SECONDS`): a server that trickles its answers, each piece within the
network timeout, is hung up on at the limit (:class:`_Deadline`). The series is then read by the
usual reader with all of its checks (``io/dicom_series``).

References
----------
DICOM PS3.4 C.4.1 (C-FIND), C.4.3 (C-GET) and C.6.2 (Study Root information model); PS3.18 10.6
(QIDO-RS) and 10.4 (WADO-RS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from io import BytesIO
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, PoolManager

from IPv2DenoiseLib.core.atomic import atomic_dir
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled, CancelToken, ProgressCallback
from IPv2DenoiseLib.core.text import printable_line
from IPv2DenoiseLib.io.dicom_net import (
    ACCEPTED_TRANSFER_SYNTAXES,
    DEFAULT_CALLING_AET,
    TRANSFER_SLACK_BYTES,
    UID_PATTERN,
    ArrivingSizeGuard,
    DestinationUnavailable,
    DicomNode,
    associate,
    check_reachable,
    make_ae,
)

__all__ = [
    "MAX_INSTANCE_MB",
    "MAX_INSTANCES",
    "MAX_MATCHES",
    "MAX_RETRIEVE_SECONDS",
    "MAX_SEARCH_MB",
    "SeriesMatch",
    "check_uid",
    "find_series",
    "retrieve_series",
]

log = logging.getLogger(__name__)

#: Studies asked about per search, and series listed at most (a broad search must not stall the page).
MAX_MATCHES = 200
#: Size of one QIDO-RS search answer accepted at most, MB: 200 rows of the fields asked for are tens
#: of kB, so this leaves room for a server that sends every attribute, and cuts off an endless answer.
MAX_SEARCH_MB = 16.0
#: Instances one retrieval accepts, and the size of one (a PACS is not trusted to be reasonable).
MAX_INSTANCES = 5000
MAX_INSTANCE_MB = 64.0
#: Time one retrieval may take at most, s (the list of instances and every image together): a server
#: that trickles its answers (each piece within the network timeout) must not hold the retrieval, and
#: the web page's one job, forever. 30 min bring a 1 GB series over 5 Mbit/s.
MAX_RETRIEVE_SECONDS = 1800.0
#: The storage classes a retrieval accepts: what the reader turns into a CT volume.
CT_STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
#: C-FIND / C-GET statuses: pending.
_PENDING = (0xFF00, 0xFF01)
#: The C-FIND status "matching terminated due to cancel": a PACS that caps its answers (Orthanc's
#: ``LimitFindInstances``) ends a longer list with it, though we asked for no cancel.
_CUT_SHORT = 0xFE00
#: C-STORE statuses we answer the PACS with.
_STORE_OK, _STORE_REFUSED_OUT_OF_RESOURCES, _STORE_NOT_OURS = 0x0000, 0xA700, 0xC000
#: Characters PS3.4 C.2.2.2.4 gives a wildcard meaning in a C-FIND key.
_WILDCARDS = set("*?")


@dataclass(frozen=True)
class SeriesMatch:
    """One CT series a search found, as a person chooses it.

    Attributes
    ----------
    study_uid, series_uid : str
        Validated UIDs (digits and dots).
    patient_id, patient_name : str
        As the PACS reports them (shown, never used as paths).
    study_date : str
        ``YYYYMMDD`` or empty.
    study_description, series_description : str
        Free text from the PACS.
    series_number : str
        The series number, or empty.
    instances : int or None
        Number of instances, when the PACS says.
    """

    study_uid: str
    series_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: str = ""
    instances: int | None = None

    def label(self) -> str:
        """One line for a list: date, patient, study and series description, images.

        Returns
        -------
        str
            e.g. ``2024-03-01 · P001 DOE^JANE · Chest low dose · #3 Lung 1.0 · 120 images``.
        """
        date = self.study_date
        if len(date) == 8 and date.isdigit():
            date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
        series = " ".join(
            p for p in (f"#{self.series_number}" if self.series_number else "", self.series_description) if p
        )
        parts = [date, f"{self.patient_id} {self.patient_name}".strip(), self.study_description, series]
        if self.instances is not None:
            parts.append(f"{self.instances} images")
        return " · ".join(printable_line(p) for p in parts if p)


def check_uid(text: str, what: str = "UID") -> str:
    """A DICOM UID as PS3.5 9.1 allows it (digits and dots, at most 64 characters).

    Parameters
    ----------
    text : str
        The UID as received or typed.
    what : str
        What it is, for the message.

    Returns
    -------
    str
        The UID, stripped of surrounding spaces and the NUL padding some PACS send.

    Raises
    ------
    UserError
        Not a UID.
    """
    uid = str(text or "").strip().rstrip("\x00")
    if not UID_PATTERN.fullmatch(uid) or ".." in uid or uid.endswith("."):
        raise UserError(f"{what} {printable_line(text)!r} is not a DICOM UID (digits and dots, at most 64)")
    return uid


def _search_text(text: str) -> str:
    """The patient search a person typed, checked: no backslash (a C-FIND value separator)."""
    text = str(text or "").strip()
    if "\\" in text or not text.isprintable() or len(text) > 64:
        raise UserError("patient search: at most 64 printable characters, no backslash")
    return text


def _date_range(text: str) -> str:
    """``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD`` or an open range, checked; empty for any date."""
    text = str(text or "").strip().replace("/", "").replace(" ", "")
    parts = text.split("-") if text else []
    ok = len(parts) <= 2 and all(p == "" or (len(p) == 8 and p.isdigit()) for p in parts)
    if not ok or (parts and not any(parts)):
        raise UserError(f"study date {text!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    return text


def _patient_keys(patient: str) -> list[dict[str, str]]:
    """C-FIND key sets for ``patient``: the ID as typed, and the name containing it (merged after)."""
    if not patient:
        return [{}]
    name = patient if _WILDCARDS & set(patient) else f"*{patient}*"
    return [{"PatientID": patient}, {"PatientName": name}]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _count(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def find_series(
    peer: DicomNode | str,
    *,
    patient: str = "",
    study_date: str = "",
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout: float = 10.0,
    limit: int = MAX_MATCHES,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> list[SeriesMatch]:
    """The CT series on ``peer`` of the patients matching ``patient``, newest study first.

    Parameters
    ----------
    peer : DicomNode or str
        A DICOM node (C-FIND, Study Root) or a DICOMweb base URL (QIDO-RS).
    patient : str
        A patient ID, or part of a name (``DOE`` finds ``DOE^JANE``); ``*`` and ``?`` are wildcards;
        empty: every patient.
    study_date : str
        ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD`` or ``YYYYMMDD-``; empty: any date.
    calling_aet : str
        Our AE title (DIMSE).
    timeout : float
        Connection and response timeout, s.
    limit : int
        Studies asked about, and series returned, at most.
    progress : ProgressCallback, optional
        ``progress(studies done, studies found, message)`` after each study's series are listed.
    cancel : CancelToken, optional
        Checked before each query (one per study), and while a C-FIND's matches or a DICOMweb
        answer's pieces arrive.

    Returns
    -------
    list of SeriesMatch
        The CT series, newest study first; instances the PACS returned with malformed UIDs are left out.

    Raises
    ------
    UserError
        A malformed search, the PACS refused the query, or a DICOMweb answer was refused (over
        :data:`MAX_SEARCH_MB`, compressed, not DICOM JSON); ``Cancelled`` when ``cancel`` fired.
    DestinationUnavailable
        The PACS cannot be reached or refuses the association.
    """
    patient, study_date = _search_text(patient), _date_range(study_date)
    with _Asker(peer, calling_aet=calling_aet, timeout=timeout, cancel=cancel) as ask:
        studies: dict[str, dict[str, str]] = {}
        for keys in _patient_keys(patient):
            query = {**keys, **({"StudyDate": study_date} if study_date else {})}
            for study in ask.studies(query, limit):
                studies.setdefault(study["StudyInstanceUID"], study)
        ordered = sorted(
            studies.values(), key=lambda s: (s.get("StudyDate", ""), s["StudyInstanceUID"]), reverse=True
        )[:limit]
        matches: list[SeriesMatch] = []
        for done, study in enumerate(ordered, 1):
            found = [_match(study, series) for series in ask.ct_series(study["StudyInstanceUID"])]
            matches += found[: limit - len(matches)]
            if progress is not None:
                progress(
                    done, len(ordered), f"search: {done} of {len(ordered)} studies, {len(matches)} CT series"
                )
            if len(matches) >= limit:
                break
    return matches


def _match(study: dict[str, str], series: dict[str, str]) -> SeriesMatch:
    return SeriesMatch(
        study_uid=study["StudyInstanceUID"],
        series_uid=series["SeriesInstanceUID"],
        patient_id=study.get("PatientID", ""),
        patient_name=study.get("PatientName", ""),
        study_date=study.get("StudyDate", ""),
        study_description=study.get("StudyDescription", ""),
        series_description=series.get("SeriesDescription", ""),
        series_number=series.get("SeriesNumber", ""),
        instances=_count(series.get("NumberOfSeriesRelatedInstances")),
    )


STUDY_FIELDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyDescription")
SERIES_FIELDS = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "NumberOfSeriesRelatedInstances",
)


def _valid_uid_rows(rows: Iterable[dict[str, str]], key: str) -> list[dict[str, str]]:
    """Rows whose ``key`` is a well-formed UID (a hostile or broken PACS's other rows are dropped)."""
    valid = []
    for row in rows:
        try:
            row[key] = check_uid(row.get(key, ""))
        except UserError:
            continue
        valid.append(row)
    return valid


class _Asker:
    """The queries of one search, by C-FIND or QIDO-RS; the cancel token is checked before each.

    Used as a context manager: DICOMweb queries share one HTTP session (closed at the end).
    """

    def __init__(
        self, peer: DicomNode | str, *, calling_aet: str, timeout: float, cancel: CancelToken | None
    ) -> None:
        self.peer, self.calling_aet, self.timeout, self.cancel = peer, calling_aet, timeout, cancel
        self.session = requests.Session()

    def __enter__(self) -> _Asker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def _rows(
        self, level: str, query: dict[str, str], fields: tuple[str, ...], limit: int
    ) -> list[dict[str, str]]:
        if self.cancel is not None:
            self.cancel.check()
        if isinstance(self.peer, DicomNode):
            identifier = _identifier(level, fields, query)
            return _c_find(
                self.peer,
                identifier,
                fields,
                calling_aet=self.calling_aet,
                timeout=self.timeout,
                limit=limit,
                cancel=self.cancel,
            )
        return _qido(
            self.session,
            self.peer,
            level,
            query,
            fields,
            timeout=self.timeout,
            limit=limit,
            cancel=self.cancel,
        )

    def studies(self, query: dict[str, str], limit: int) -> list[dict[str, str]]:
        """The studies with a CT series matching ``query`` (STUDY level), at most ``limit``."""
        rows = self._rows("STUDY", {**query, "ModalitiesInStudy": "CT"}, STUDY_FIELDS, limit)
        return _valid_uid_rows(rows, "StudyInstanceUID")

    def ct_series(self, study_uid: str) -> list[dict[str, str]]:
        """The CT series of one study (SERIES level), at most :data:`MAX_MATCHES`."""
        query = {"StudyInstanceUID": study_uid, "Modality": "CT"}
        rows = self._rows("SERIES", query, SERIES_FIELDS, MAX_MATCHES)
        # a PACS that ignores the Modality key (or a study's other series) must not offer non-CT series
        return [r for r in _valid_uid_rows(rows, "SeriesInstanceUID") if r["Modality"].upper() == "CT"]


def _identifier(level: str, fields: Iterable[str], query: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in fields:
        setattr(ds, keyword, "")
    for keyword, value in query.items():
        setattr(ds, keyword, value)
    return ds


def _c_find(
    node: DicomNode, identifier: Dataset, fields: Iterable[str], **options: Any
) -> list[dict[str, str]]:
    """The first ``limit`` matches of one C-FIND (``options``: those of :func:`_c_find_matches`); an
    answer the PACS cut short is refused: a search must not show part of what matches as all of it."""
    rows, cut_short = _c_find_matches(node, identifier, fields, **options)
    if cut_short:
        raise UserError(
            f"C-FIND on {node}: the PACS cut its answer short (status 0x{_CUT_SHORT:04X}: a cap on"
            " C-FIND answers, e.g. Orthanc's LimitFindResults); narrow the search or lift the cap"
        )
    return rows


def _c_find_matches(
    node: DicomNode,
    identifier: Dataset,
    fields: Iterable[str],
    *,
    calling_aet: str,
    timeout: float,
    limit: int,
    cancel: CancelToken | None,
    deadline: _Deadline | None = None,
) -> tuple[list[dict[str, str]], bool]:
    """The first ``limit`` matches of one C-FIND, and whether the PACS cut its answer short (it ended
    with 0xFE00 though we asked for no cancel: Orthanc does so past its ``LimitFindInstances``)."""
    check_reachable(node, timeout)
    ae = make_ae(calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, node)
    if deadline is not None:  # a retrieval's listing: aborted when its time is up
        deadline.on_expiry(_aborter(assoc))
    rows: list[dict[str, str]] = []
    cut_short = False
    try:
        for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise DestinationUnavailable(f"C-FIND on {node}: no answer within {timeout:g} s")
            if cancel is not None:
                cancel.check()
            if code in _PENDING and found is not None:
                rows.append({k: _text(found, k) for k in fields})
                if len(rows) >= limit:
                    break
            elif code == _CUT_SHORT:
                cut_short = True
            elif code not in _PENDING and code != 0x0000:
                raise UserError(
                    f"C-FIND on {node} refused: status 0x{code:04X}"
                    " (does the PACS allow queries from our calling AE title?)"
                )
    except Cancelled:
        assoc.abort()  # the PACS stops sending matches at once
        raise
    finally:
        if assoc.is_established:
            assoc.release()
    return rows, cut_short


def _qido(
    session: requests.Session,
    url: str,
    level: str,
    query: dict[str, str],
    fields: Iterable[str],
    *,
    timeout: float,
    limit: int,
    cancel: CancelToken | None,
) -> list[dict[str, str]]:
    """One QIDO-RS search (PS3.18 10.6) at STUDY level, or at SERIES level in one study; the answer is
    read by :func:`_read_bounded` (refused past :data:`MAX_SEARCH_MB`) and its first ``limit`` rows kept."""
    study_uid = query.get("StudyInstanceUID", "")
    params: dict[str, Any] = {k: v for k, v in query.items() if k != "StudyInstanceUID" and v}
    params.update(includefield=list(fields), limit=limit)
    if level == "STUDY":
        target, what = f"{url.rstrip('/')}/studies", "the study search"
        params["fuzzymatching"] = "false"
    else:
        target, what = (
            f"{url.rstrip('/')}/studies/{study_uid}/series",
            f"the series search of study {study_uid}",
        )
    cap = int(MAX_SEARCH_MB * 2**20)
    try:
        found = _qido_json(
            session, target, params, url=url, what=what, limit=cap, cap=cap, timeout=timeout, cancel=cancel
        )
    except _Refused as exc:
        raise UserError(f"QIDO-RS on {url}: refused, {exc}") from None
    except requests.RequestException as exc:
        raise DestinationUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None
    rows = []
    for item in found[:limit]:
        try:
            ds = Dataset.from_json(item)
        except Exception:  # noqa: BLE001 - a server's JSON is hostile: any shape
            continue
        rows.append({k: _text(ds, k) for k in fields})
    return rows


# --------------------------------------------------------------------------------- retrieval


class _Receiver:
    """Checks and writes each instance a retrieval brings; remembers why any was refused.

    ``listed`` holds the SOPInstanceUIDs the series' list of instances names (C-FIND at IMAGE level,
    or QIDO-RS), set by :meth:`expect` before any image comes: an instance it does not name, or one
    already received, is refused (a series with one slice twice and another missing has the right
    count). A PACS that caps its C-FIND answers lists only part of a larger series: when the series'
    own count says so (:meth:`take_count`), the list is partial, an instance of the series it does
    not name is taken too, and the count is held instead: no instance twice, none past the count,
    and at the end exactly the count, every listed one among them. After the first refusal nothing
    more is written: the retrieval is lost.
    """

    def __init__(self, folder: Path, series_uid: str, max_instances: int, max_bytes: int) -> None:
        self.folder, self.series_uid = folder, series_uid
        self.max_instances, self.max_bytes = max_instances, max_bytes
        self.written: list[Path] = []
        self.refusals: list[str] = []
        self.listed: set[str] = set()
        self.received: set[str] = set()
        #: The series' own count of instances (NumberOfSeriesRelatedInstances), None when unknown.
        self.series_count: int | None = None
        #: The list names fewer instances than the series' count: it was capped.
        self.partial = False

    def refuse(self, reason: str, status: int) -> int:
        if reason not in self.refusals:
            self.refusals.append(reason)
        return status

    def expect(self, sop_uids: Iterable[object]) -> list[str]:
        """Take the series' list of instances: checked UIDs, each once, in its order (returned).

        Raises ``_Refused`` for more than ``max_instances`` (before any image is asked for) or for
        an entry that is not a UID.
        """
        sop_uids = list(sop_uids)
        if len(sop_uids) > self.max_instances:
            raise _Refused(f"more than {self.max_instances} instances")
        listed: dict[str, None] = {}
        for uid in sop_uids:
            try:
                listed[check_uid(str(uid))] = None
            except UserError:
                raise _Refused("the instance list names an instance without a valid SOPInstanceUID") from None
        self.listed = set(listed)
        return list(listed)

    def take_count(self, count: int | None) -> bool:
        """Take the series' own count of instances (None: the PACS gave none); True when it shows
        the list to be partial (more than it names).

        Raises ``_Refused`` for a count over ``max_instances`` (before any image is asked for).
        """
        self.series_count = count
        self.partial = count is not None and count > len(self.listed)
        if self.partial and count > self.max_instances:
            raise _Refused(f"more than {self.max_instances} instances (the series has {count})")
        return self.partial

    def unexpected(self, dataset: Dataset, asked: str | None) -> str | None:
        """Why an instance is not one this retrieval waits for (None when it is): not the very one
        ``asked`` for (WADO-RS asks for each), one received already, or one the list does not name."""
        sent = _sop_uid(dataset)
        named = printable_line(sent) or "one without a UID"
        if asked is not None and sent != asked:
            return f"asked for instance {asked}, the server sent {named}"
        if sent in self.received:
            return f"the PACS sent instance {named} twice"
        if sent not in self.listed and not self.partial:
            why = f"the PACS sent instance {named}, which the series' list of instances does not name"
            # without a count, nothing tells a stranger from an instance that a capped list left out
            if self.series_count is None:
                why += (
                    " (if the PACS caps its C-FIND answers, lift the cap: on Orthanc LimitFindInstances = 0)"
                )
            return why
        return None

    def store(
        self, dataset: Dataset, file_meta: FileMetaDataset | None, size: int, asked: str | None = None
    ) -> int:
        """Check one received instance (``asked``: the SOPInstanceUID requested, when one was) and
        write it as ``NNNNN.dcm``; returns the C-STORE status."""
        if self.refusals:  # the retrieval is lost already: write nothing more
            return _STORE_REFUSED_OUT_OF_RESOURCES
        if size > self.max_bytes:
            mb, cap = size / 2**20, self.max_bytes / 2**20
            return self.refuse(
                f"an instance of {mb:.2f} MB is over the {cap:.2f} MB cap", _STORE_REFUSED_OUT_OF_RESOURCES
            )
        if len(self.written) >= self.max_instances:
            return self.refuse(f"more than {self.max_instances} instances", _STORE_REFUSED_OUT_OF_RESOURCES)
        series = _series_uid(dataset)
        if series != self.series_uid:
            return self.refuse(
                f"the PACS sent an instance of another series ({printable_line(series)})", _STORE_NOT_OURS
            )
        sop_class = str(dataset.get("SOPClassUID", ""))
        if sop_class not in CT_STORAGE_CLASSES:
            return self.refuse(
                f"the PACS sent a non-CT instance (SOP class {printable_line(sop_class)})", _STORE_NOT_OURS
            )
        if why := self.unexpected(dataset, asked):
            return self.refuse(why, _STORE_NOT_OURS)
        if self.partial and self.series_count is not None and len(self.written) >= self.series_count:
            return self.refuse(
                f"the PACS sent more than the series' {self.series_count} instances", _STORE_NOT_OURS
            )
        path = self.folder / f"{len(self.written) + 1:05d}.dcm"  # a counter, never a tag value
        dataset.file_meta = file_meta or FileMetaDataset()
        dataset.file_meta.setdefault("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
        dataset.save_as(path, enforce_file_format=True)
        self.written.append(path)
        self.received.add(_sop_uid(dataset))
        return _STORE_OK

    def refuse_missing(self) -> None:
        """Once the PACS says it is done: refuse the retrieval if listed instances did not come, or,
        after a partial list, fewer than the series' count (a shortened series is not kept; when none
        came, the caller says the PACS sent nothing)."""
        if not self.written or self.refusals:
            return
        missing = len(self.listed - self.received)
        if missing:
            self.refusals.append(
                f"{missing} of the {len(self.listed)} instances the series' list names did not come"
            )
        elif self.partial and self.series_count is not None and len(self.received) < self.series_count:
            self.refusals.append(
                f"{len(self.received)} of the series' {self.series_count} instances came"
                f" (its capped list named {len(self.listed)})"
            )


def _sop_uid(dataset: Dataset) -> str:
    """The instance's SOPInstanceUID as sent (less NUL padding); empty when it has none."""
    return str(dataset.get("SOPInstanceUID", "")).strip().rstrip("\x00")


def _series_uid(dataset: Dataset) -> str:
    """The SeriesInstanceUID as sent (less NUL padding); empty when there is none."""
    return str(dataset.get("SeriesInstanceUID", "")).strip().rstrip("\x00")


class _Deadline:
    """The time one retrieval may take; when it is up, every connection the retrieval opened is
    hung up.

    The network timeout bounds each wait for the peer, not the whole: a server that trickles its
    answer (a few bytes now and then) would hold a retrieval forever. At the limit a timer thread
    shuts each registered socket down and aborts each registered association, which wakes a read
    blocked on it wherever it is (status line, headers, body, DIMSE message); the retrieval then
    fails, and :func:`retrieve_series` says that the time limit passed. Used as a context manager
    (the timer runs inside it); ``math.inf`` seconds: no limit.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expired = threading.Event()
        self._hang_ups: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire) if math.isfinite(seconds) else None
        if self._timer is not None:
            self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def on_expiry(self, hang_up: Callable[[], object]) -> None:
        """Call ``hang_up`` when the time is up (at once, if it is)."""
        with self._lock:
            if not self._expired.is_set():
                self._hang_ups.append(hang_up)
                return
        _quietly(hang_up)

    def watch_socket(self, sock: object) -> None:
        """Shut ``sock`` down (both ways) when the time is up; the socket is not kept alive for it."""
        if not isinstance(sock, socket.socket):
            return
        ref = weakref.ref(sock)

        def shut_down() -> None:
            if (still_open := ref()) is not None:
                # the plain socket's shutdown, a TLS one's too: its own would drop the TLS state
                # under the thread reading it
                socket.socket.shutdown(still_open, socket.SHUT_RDWR)

        self.on_expiry(shut_down)

    def _expire(self) -> None:
        with self._lock:
            self._expired.set()
            hang_ups, self._hang_ups = self._hang_ups, []
        for hang_up in hang_ups:
            _quietly(hang_up)


def _quietly(hang_up: Callable[[], object]) -> None:
    """Run ``hang_up``; what it closes may have closed meanwhile."""
    try:
        hang_up()
    except Exception:  # noqa: BLE001 - a socket or association already closed: nothing to hang up
        pass


def _aborter(assoc: Association) -> Callable[[], object]:
    """A hang-up for :meth:`_Deadline.on_expiry`: abort ``assoc`` if it is still established."""
    return lambda: assoc.is_established and assoc.abort()


class _HangUpAdapter(HTTPAdapter):
    """requests' transport adapter, each connection of which (direct or through a proxy) is hung
    up when ``deadline`` passes: its sockets are registered with :meth:`_Deadline.watch_socket`
    as they connect. Written by hand: requests and urllib3 offer per-read timeouts only."""

    def __init__(self, deadline: _Deadline) -> None:
        self.deadline = deadline
        super().__init__()  # calls init_poolmanager

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._watch(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        new = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if new:
            self._watch(manager)
        return manager

    def _watch(self, manager: PoolManager) -> None:
        """Make ``manager``'s pools open connections that register their socket with the deadline."""
        manager.pool_classes_by_scheme = {
            scheme: self._watched_pool(pool) for scheme, pool in manager.pool_classes_by_scheme.items()
        }

    def _watched_pool(self, pool: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
        deadline = self.deadline

        class WatchedConnection(pool.ConnectionCls):
            def connect(self) -> None:
                super().connect()
                deadline.watch_socket(self.sock)

        return type(pool.__name__, (pool,), {"ConnectionCls": WatchedConnection})


@dataclass(frozen=True)
class _Retrieval:
    """One C-GET retrieval: the PACS, the series, where its instances go and what bounds it; the
    steps that list and fetch the series (:func:`_c_get`, :func:`_c_find_instances`,
    :func:`_c_find_series_count`) take it whole."""

    node: DicomNode
    study_uid: str
    series_uid: str
    receiver: _Receiver
    calling_aet: str
    timeout: float
    cancel: CancelToken | None
    deadline: _Deadline
    progress: ProgressCallback | None = None


def retrieve_series(
    peer: DicomNode | str,
    study_uid: str,
    series_uid: str,
    folder: str | os.PathLike,
    *,
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout: float = 30.0,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    max_instances: int = MAX_INSTANCES,
    max_instance_mb: float = MAX_INSTANCE_MB,
    max_seconds: float = MAX_RETRIEVE_SECONDS,
    replace: bool = False,
) -> list[Path]:
    """Fetch one series from ``peer`` into the new folder ``folder`` (atomically: all of it, or nothing).

    Parameters
    ----------
    peer : DicomNode or str
        A DICOM node (C-GET, Study Root, at SERIES level: the PACS sends the instances on the same
        association, so it needs no route back to us) or a DICOMweb base URL (QIDO-RS lists the
        series' instances, WADO-RS fetches each).
    study_uid, series_uid : str
        The series to fetch (checked to be UIDs).
    folder : path-like
        Where the files go; must not exist yet or be empty.
    calling_aet : str
        Our AE title (DIMSE).
    timeout : float
        Connection and response timeout, s: how long one wait for the PACS may take.
    progress : ProgressCallback, optional
        ``progress(received, expected, message)`` as instances arrive.
    cancel : CancelToken, optional
        Checked between instances; a cancelled retrieval leaves no folder.
    max_instances : int
        Instances accepted at most.
    max_instance_mb : float
        Size of one instance accepted at most, MB. A transfer past it plus 1 MB (the encoding)
        is cut off while it arrives; over DICOMweb that bounds every answer, the instance list too.
    max_seconds : float
        Time the whole retrieval may take at most, s (:data:`MAX_RETRIEVE_SECONDS`; ``math.inf``:
        no limit). At the limit its connections are hung up (a server trickling its answers holds
        it no longer) and it fails in one line; a C-GET says so within ``timeout`` after that.
    replace : bool
        Replace an existing ``folder`` (an earlier retrieval of the series) once this one is complete.

    Returns
    -------
    list of pathlib.Path
        The files written, ``00001.dcm`` … in the order they arrived.

    Raises
    ------
    UserError
        Malformed UIDs or ``max_seconds``, the PACS refused the retrieval or sent nothing, or sent
        what is not this CT series (named: another series, an instance twice or one its list of
        the series' instances does not name, or, after a list capped short of the series' count,
        other than that count), or capped its list with no count to check against (C-GET) or at
        all (WADO-RS), or the retrieval took longer than ``max_seconds``; ``Cancelled`` when
        ``cancel`` fired.
    DestinationUnavailable
        The PACS cannot be reached or refuses the association.
    """
    study_uid, series_uid = (
        check_uid(study_uid, "StudyInstanceUID"),
        check_uid(series_uid, "SeriesInstanceUID"),
    )
    if not max_seconds > 0:
        raise UserError(f"max_seconds {max_seconds}: the time limit of a retrieval must be positive")
    folder = Path(folder)
    with atomic_dir(folder, replace=replace) as staging, _Deadline(max_seconds) as deadline:
        receiver = _Receiver(staging, series_uid, max_instances, int(max_instance_mb * 2**20))
        try:
            if isinstance(peer, DicomNode):
                _c_get(
                    _Retrieval(
                        peer,
                        study_uid,
                        series_uid,
                        receiver,
                        calling_aet=calling_aet,
                        timeout=timeout,
                        cancel=cancel,
                        deadline=deadline,
                        progress=progress,
                    )
                )
            else:
                _wado(
                    peer,
                    study_uid,
                    series_uid,
                    receiver,
                    timeout=timeout,
                    progress=progress,
                    cancel=cancel,
                    deadline=deadline,
                )
        except Cancelled:
            raise
        except Exception:  # whatever the hang-up broke: the time limit is the reason
            if deadline.expired:
                raise UserError(_past_deadline(series_uid, peer, deadline)) from None
            raise
        if deadline.expired:  # an answer cut short by the hang-up: the time limit is the reason
            raise UserError(_past_deadline(series_uid, peer, deadline))
        if receiver.refusals:
            raise UserError(
                f"retrieving series {series_uid} from {peer}: refused, {'; '.join(receiver.refusals)}"
            )
        if not receiver.written:
            raise UserError(f"retrieving series {series_uid} from {peer}: the PACS sent no CT image of it")
        written = [folder / p.name for p in receiver.written]
    return written


def _past_deadline(series_uid: str, peer: DicomNode | str, deadline: _Deadline) -> str:
    """The one line of a retrieval stopped at its time limit: the limit, and how to raise it (the web
    server's option, the API)."""
    return (
        f"retrieving series {series_uid} from {peer}: stopped after {deadline.seconds:g} s, the time limit"
        " of one retrieval (is the PACS that slow, or the series that large?); nothing was kept; raise"
        " the limit with ipv2-denoise web --retrieve-max-minutes M, or retrieve_series(max_seconds=…)"
        f" (default {MAX_RETRIEVE_SECONDS:g} s, io.dicom_query.MAX_RETRIEVE_SECONDS)"
    )


def _c_get(retrieval: _Retrieval) -> None:
    """C-FIND lists the series' instances (IMAGE level) and counts them (SERIES level), then one
    C-GET at SERIES level brings them.

    Each instance that comes must be one the list names, and come once (:meth:`_Receiver.store`,
    the check WADO-RS makes too); one listed but never sent is refused at the end. A list shorter
    than the series' count (a PACS that caps its C-FIND answers) is taken as partial and the count
    held instead (:meth:`_Receiver.take_count`). A refusal lands in ``receiver.refusals`` (the
    caller says it, nothing is kept).
    """
    node, receiver, timeout = retrieval.node, retrieval.receiver, retrieval.timeout
    cancel, deadline, series_uid = retrieval.cancel, retrieval.deadline, retrieval.series_uid
    if not _c_find_instances(retrieval):
        return
    check_reachable(node, timeout)
    ae = make_ae(retrieval.calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in CT_STORAGE_CLASSES:
        ae.add_requested_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    roles = [build_role(sop_class, scp_role=True) for sop_class in CT_STORAGE_CLASSES]
    on_store = _store_handler(receiver, cancel, deadline)
    # an instance far over the cap is stopped while it arrives (the handler sees it only when whole)
    guard = ArrivingSizeGuard(receiver.max_bytes, receiver.refusals.append)
    assoc = associate(ae, node, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store), *guard.handlers()])
    deadline.on_expiry(_aborter(assoc))
    identifier = _identifier("SERIES", (), _series_keys(retrieval))
    try:
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            code = getattr(status, "Status", None)
            if code is not None and code not in _PENDING:
                _check_every_image_came(status, code, node=node, series_uid=series_uid, receiver=receiver)
            if code is None:
                if receiver.refusals:  # the size guard aborted the association: said by the caller
                    return
                raise DestinationUnavailable(f"C-GET from {node}: no answer within {timeout:g} s")
            if cancel is not None:
                cancel.check()
            if retrieval.progress is not None and code in _PENDING:
                done, total = _sub_operations(status)
                retrieval.progress(done, total, f"retrieve: {done} of {total} images")
            if code not in _PENDING and code not in (0x0000, 0xB000) and not receiver.refusals:
                raise UserError(
                    f"C-GET of series {series_uid} from {node} failed: status 0x{code:04X}; the PACS may not"
                    " hold this series, or may not let our calling AE title retrieve"
                )
    except BaseException:
        assoc.abort()  # a cancelled or failed retrieval stops the PACS sending at once
        raise
    assoc.release()
    receiver.refuse_missing()


def _store_handler(
    receiver: _Receiver, cancel: CancelToken | None, deadline: _Deadline
) -> Callable[[Any], int]:
    """The ``EVT_C_STORE`` handler of a C-GET: each instance to ``receiver``, none once cancelled or
    past the deadline (the C-GET loop, or the deadline, aborts the association)."""

    def on_store(event: Any) -> int:
        if (cancel is not None and cancel.cancelled) or deadline.expired:
            return _STORE_REFUSED_OUT_OF_RESOURCES
        size = event.request.DataSet.getbuffer().nbytes if event.request.DataSet is not None else 0
        return receiver.store(event.dataset, event.file_meta, size)

    return on_store


def _series_keys(retrieval: _Retrieval) -> dict[str, str]:
    """The C-FIND / C-GET keys that name the retrieval's series."""
    return {"StudyInstanceUID": retrieval.study_uid, "SeriesInstanceUID": retrieval.series_uid}


def _c_find_instances(retrieval: _Retrieval) -> bool:
    """Give ``receiver`` the SOPInstanceUIDs a C-FIND at IMAGE level lists for the series (asked for
    one more than accepted, so that too many is seen) and the series' count; False when the list is
    refused (the reason is in ``receiver.refusals``). An unknown series lists none: the C-GET then
    says so.

    A list shorter than the count is partial (the PACS caps its C-FIND answers): the count is held
    instead, with one warning. A list the PACS says it cut short (0xFE00) with no count to check the
    rest against is refused, naming the cap.
    """
    receiver = retrieval.receiver
    rows, cut_short = _c_find_matches(
        retrieval.node,
        _identifier("IMAGE", ("SOPInstanceUID",), _series_keys(retrieval)),
        ("SOPInstanceUID",),
        calling_aet=retrieval.calling_aet,
        timeout=retrieval.timeout,
        limit=receiver.max_instances + 1,
        cancel=retrieval.cancel,
        deadline=retrieval.deadline,
    )
    try:
        listed = receiver.expect(row["SOPInstanceUID"] for row in rows)
        count = _c_find_series_count(retrieval)
        if receiver.take_count(count):
            log.warning(
                "%s capped its C-FIND list of series %s at %d of the series' %d instances (e.g. Orthanc's"
                " LimitFindInstances): the retrieval checks that count instead (each instance of the series,"
                " once, every listed one among them)",
                retrieval.node,
                retrieval.series_uid,
                len(listed),
                count,
            )
        elif cut_short and count is None:
            raise _Refused(
                f"the PACS cut its list of the series' instances short after {len(listed)} (it caps its"
                " C-FIND answers) and gave no count of the series' instances to check the rest against;"
                " lift the cap (on Orthanc: LimitFindInstances = 0)"
            )
    except _Refused as exc:
        receiver.refusals.append(str(exc))
        return False
    return True


def _c_find_series_count(retrieval: _Retrieval) -> int | None:
    """The series' own count of instances (NumberOfSeriesRelatedInstances, by a C-FIND at SERIES
    level); None when the PACS does not say it for this series."""
    fields = ("SeriesInstanceUID", "NumberOfSeriesRelatedInstances")
    rows = _c_find(
        retrieval.node,
        _identifier("SERIES", fields, _series_keys(retrieval)),
        fields,
        calling_aet=retrieval.calling_aet,
        timeout=retrieval.timeout,
        limit=2,  # one match is expected: read to its end, so the association is released cleanly
        cancel=retrieval.cancel,
        deadline=retrieval.deadline,
    )
    named = [row for row in rows if row["SeriesInstanceUID"].rstrip("\x00") == retrieval.series_uid]
    return _count(named[0]["NumberOfSeriesRelatedInstances"]) if named else None


def _check_every_image_came(
    status: Dataset, code: int, *, node, series_uid: str, receiver: _Receiver
) -> None:
    """The final C-GET answer must report no failed sub-operation: 0xB000 ("complete, with
    failures") means images of the series did not come, and a shortened series is not kept."""
    failed = _count(status.get("NumberOfFailedSuboperations", 0)) or 0
    if (code == 0xB000 or failed) and not receiver.refusals:
        done = _count(status.get("NumberOfCompletedSuboperations", 0)) or 0
        raise UserError(
            f"C-GET of series {series_uid} from {node}: {failed or 'some'} of its images could not be sent "
            f"({done} came; status 0x{code:04X}); a shortened series is not kept: ask the PACS administrator "
            "(a transfer syntax or SOP class it cannot send us?)"
        )


def _sub_operations(status: Dataset) -> tuple[int, int]:
    """(images done, images in all) from a pending C-GET response."""

    def number(keyword: str) -> int:
        return _count(status.get(keyword, 0)) or 0

    done = sum(
        number(k)
        for k in (
            "NumberOfCompletedSuboperations",
            "NumberOfFailedSuboperations",
            "NumberOfWarningSuboperations",
        )
    )
    return done, done + number("NumberOfRemainingSuboperations")


#: What a WADO-RS instance answer is read in: a multipart/related body of one DICOM part (PS3.18 8.7.3).
_WADO_ACCEPT = 'multipart/related; type="application/dicom"'
_DICOM = "application/dicom"
_DICOM_JSON = ("application/dicom+json", "application/json")
#: Bytes read from a DICOMweb answer at a time; the size cap is checked after each piece.
_CHUNK_BYTES = 2**16


class _Refused(Exception):
    """A DICOMweb answer a search or retrieval refuses; the message is one line saying why."""


def _wado(
    url: str,
    study_uid: str,
    series_uid: str,
    receiver: _Receiver,
    *,
    timeout: float,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    deadline: _Deadline,
) -> None:
    """QIDO-RS lists the series' instances and counts them, then WADO-RS fetches them one by one.

    Every answer is read in pieces and closed as soon as it passes the instance size cap (plus
    :data:`~IPv2DenoiseLib.io.dicom_net.TRANSFER_SLACK_BYTES`, as for C-GET), so no answer, endless
    or not, is held in memory past it; a list of more instances than accepted is refused before any
    is fetched, and so is a list shorter than the series' own count (a server that caps its answers:
    the instances it leaves out cannot be asked for); each answer must be the very instance asked
    for (:meth:`_Receiver.store`). Every
    connection is hung up when ``deadline`` passes. A refusal lands in ``receiver.refusals`` (the
    caller says it, nothing is kept).
    """
    series_url = f"{url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
    limit = receiver.max_bytes + TRANSFER_SLACK_BYTES
    timeout = max(timeout, 1.0)
    with requests.Session() as session:
        hang_up = _HangUpAdapter(deadline)
        session.mount("http://", hang_up)
        session.mount("https://", hang_up)
        try:
            sop_uids = _list_instances(session, series_url, url, receiver, limit, timeout, cancel)
            count = _qido_series_count(
                session,
                url,
                study_uid,
                series_uid,
                limit=limit,
                cap=receiver.max_bytes,
                timeout=timeout,
                cancel=cancel,
            )
            if count is not None and count > len(sop_uids):
                raise _Refused(
                    f"the instance list names {len(sop_uids)} of the series' {count} instances (the server"
                    " caps its answers; on Orthanc: LimitFindInstances = 0), and WADO-RS fetches only the"
                    " instances it names"
                )
            for sop_uid in sop_uids:
                if cancel is not None:
                    cancel.check()
                dataset, size = _fetch_instance(
                    session, f"{series_url}/instances/{sop_uid}", url, receiver, limit, timeout, cancel
                )
                if receiver.store(dataset, dataset.file_meta, size, asked=sop_uid) != _STORE_OK:
                    return
                if progress is not None:
                    done = len(receiver.written)
                    progress(done, len(sop_uids), f"retrieve: {done} of {len(sop_uids)} images")
        except _Refused as exc:
            receiver.refusals.append(str(exc))
        except requests.RequestException as exc:
            raise DestinationUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None


def _list_instances(
    session: requests.Session,
    series_url: str,
    url: str,
    receiver: _Receiver,
    limit: int,
    timeout: float,
    cancel: CancelToken | None,
) -> list[str]:
    """The SOPInstanceUIDs QIDO-RS lists for the series (checked, in its order, each once)."""
    rows = _qido_json(
        session,
        f"{series_url}/instances",
        {"limit": receiver.max_instances + 1},
        url=url,
        what="the instance list",
        limit=limit,
        cap=receiver.max_bytes,
        timeout=timeout,
        cancel=cancel,
        whole=True,
    )
    uids = []
    for row in rows:
        try:
            uids.append(str(Dataset.from_json(row).get("SOPInstanceUID", "")))
        except Exception:  # noqa: BLE001 - a server's JSON is hostile: any shape
            raise _Refused("the instance list names an instance without a valid SOPInstanceUID") from None
    return receiver.expect(uids)


def _qido_series_count(
    session: requests.Session,
    url: str,
    study_uid: str,
    series_uid: str,
    *,
    limit: int,
    cap: int,
    timeout: float,
    cancel: CancelToken | None,
) -> int | None:
    """The series' own count of instances (NumberOfSeriesRelatedInstances) by QIDO-RS at SERIES
    level; None when the server does not say it for this series."""
    rows = _qido_json(
        session,
        f"{url.rstrip('/')}/studies/{study_uid}/series",
        {"SeriesInstanceUID": series_uid, "includefield": "NumberOfSeriesRelatedInstances"},
        url=url,
        what="the series' count of instances",
        limit=limit,
        cap=cap,
        timeout=timeout,
        cancel=cancel,
    )
    for row in rows:
        try:
            ds = Dataset.from_json(row)
        except Exception:  # noqa: BLE001 - a server's JSON is hostile: any shape
            continue
        if _series_uid(ds) == series_uid:
            return _count(ds.get("NumberOfSeriesRelatedInstances"))
    return None


def _qido_json(
    session: requests.Session,
    request_url: str,
    params: dict[str, Any],
    *,
    url: str,
    what: str,
    limit: int,
    cap: int,
    timeout: float,
    cancel: CancelToken | None,
    whole: bool = False,
) -> list:
    """A QIDO-RS answer: a DICOM JSON list, read by :func:`_read_bounded` (refused past ``limit`` bytes).

    The media type is checked before reading; ``whole``: an answer that says it left results out
    (PS3.18 8.3.4.4, Warning 299) is refused too. No content (HTTP 204, or an empty body) is no match.
    """
    with session.get(
        request_url,
        params=params,
        headers={"Accept": ", ".join(_DICOM_JSON), "Accept-Encoding": "identity"},
        stream=True,
        timeout=max(timeout, 1.0),
    ) as response:
        if response.status_code == 204:
            return []
        if response.status_code != 200:
            raise UserError(
                f"QIDO-RS on {url} failed: HTTP {response.status_code}; "
                "check the DICOMweb base URL (…/dicom-web)"
            )
        media = _content_type(response).get_content_type()
        if media not in _DICOM_JSON:
            raise _Refused(f"{what} came as {printable_line(media)}, not DICOM JSON")
        if whole and "additional results" in response.headers.get("Warning", "").lower():
            raise _Refused(f"{what} came short (the server has more it did not send)")
        body = _read_bounded(response, limit, cap, what, cancel)
    if not body.strip():
        return []
    try:
        rows = json.loads(body)
    except (ValueError, RecursionError):
        raise _Refused(f"{what} is not JSON") from None
    if not isinstance(rows, list):
        raise _Refused(f"{what} is not a JSON list")
    return rows


def _fetch_instance(
    session: requests.Session,
    instance_url: str,
    url: str,
    receiver: _Receiver,
    limit: int,
    timeout: float,
    cancel: CancelToken | None,
) -> tuple[Dataset, int]:
    """One instance by WADO-RS, and its size in bytes; the media type is checked before reading."""
    with session.get(
        instance_url,
        headers={"Accept": _WADO_ACCEPT, "Accept-Encoding": "identity"},
        stream=True,
        timeout=timeout,
    ) as response:
        if response.status_code != 200:
            raise UserError(
                f"WADO-RS from {url} failed: HTTP {response.status_code} "
                f"(instance {instance_url.rsplit('/', 1)[-1]}); a shortened series is not kept"
            )
        header = _content_type(response)
        _check_dicom_answer(header)
        body = _read_bounded(response, limit, receiver.max_bytes, "an instance", cancel)
    bare = header.get_content_type() == _DICOM
    content = body if bare else _single_part(body, _param(header, "boundary"))
    try:
        return dcmread(BytesIO(content)), len(content)
    except Exception:  # noqa: BLE001 - a server's bytes are hostile: any parse error
        raise _Refused("an answer is not a DICOM instance") from None


def _content_type(response: requests.Response) -> Message:
    """The answer's Content-Type header, parsed by the standard library's MIME header parser
    (quoted and unquoted parameters, any case); an absent one reads as ``text/plain``."""
    header = Message()
    header["Content-Type"] = response.headers.get("Content-Type", "")
    return header


def _param(header: Message, name: str) -> str:
    """A Content-Type parameter's value ("" if absent)."""
    value = header.get_param(name, "")
    return str(collapse_rfc2231_value(value) if value else "")


def _check_dicom_answer(header: Message) -> None:
    """Refuse, before reading it, an answer that is neither DICOM nor multipart/related DICOM with a
    boundary (a bare DICOM body is not PS3.18 but common: dicomweb-client takes it too)."""
    media, kind, boundary = (
        header.get_content_type(),
        _param(header, "type") or _DICOM,
        _param(header, "boundary"),
    )
    if media == _DICOM:
        return
    if media != "multipart/related" or kind.lower() != _DICOM:
        raise _Refused(
            f"an answer came as {printable_line(header['Content-Type'] or 'nothing')[:80]}, "
            "not multipart/related DICOM"
        )
    if not 0 < len(boundary) <= 70 or not boundary.isascii():  # RFC 2046 5.1.1
        raise _Refused("a multipart answer came without a valid boundary")


def _read_bounded(
    response: requests.Response, limit: int, cap: int, what: str, cancel: CancelToken | None
) -> bytearray:
    """The answer's body, read in pieces; refused (and the connection closed) once past ``limit``.

    A compressed answer is refused before reading (we asked for none; a small compressed piece
    could inflate past any cap at once), and so is one that announces more than ``limit``.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _Refused(f"{what} came compressed ({printable_line(encoding)[:40]}) though none was asked for")
    announced = _count(response.headers.get("Content-Length"))
    if announced is not None and announced > limit:
        raise _Refused(f"{what} of {announced / 2**20:.4g} MB was announced (cap {cap / 2**20:.4g} MB)")
    body = bytearray()
    for piece in response.iter_content(chunk_size=_CHUNK_BYTES):
        body += piece
        if len(body) > limit:  # the caller's ``with`` closes the connection: the rest is never read
            raise _Refused(
                f"{what} passed {limit / 2**20:.4g} MB while arriving (cap {cap / 2**20:.4g} MB); "
                "the connection was closed"
            )
        if cancel is not None:
            cancel.check()
    return body


def _single_part(body: bytearray, boundary: str) -> bytearray:
    """The content of the one part of a multipart/related ``body`` (RFC 2046 5.1.1), copied once.

    Written by hand: dicomweb-client's decoder is private and reads without bound, and the standard
    library's ``email`` parser is exact but takes about 60 ms per MB here (per instance) and several
    copies of the body; the part's headers are parsed by ``email``.
    """
    delimiter = b"\r\n--" + boundary.encode("ascii")
    if body.startswith(delimiter[2:]):  # no preamble
        first = -2
    elif (first := body.find(delimiter)) < 0:
        raise _Refused("a multipart answer has no boundary line")
    start = first + len(delimiter)
    end = body.find(delimiter, start)
    if end < 0:
        raise _Refused("a multipart answer ended before its closing boundary")
    if body[end + len(delimiter) : end + len(delimiter) + 2] != b"--":
        raise _Refused("one instance came as several parts")
    head_end = body.find(b"\r\n\r\n", start, end)  # after transport padding, CRLF and the headers
    if head_end < 0:
        raise _Refused("a multipart part has no end of its headers")
    part = BytesHeaderParser().parsebytes(bytes(body[start:head_end]).lstrip(b" \t\r\n") + b"\r\n\r\n")
    if "Content-Type" in part and part.get_content_type() != _DICOM:
        raise _Refused(f"a part came as {printable_line(part.get_content_type())[:80]}, not DICOM")
    return body[head_end + 4 : end]
