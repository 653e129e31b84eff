"""Finding and fetching CT series on a PACS (``io/dicom_query``) against a real Orthanc, over DIMSE
(C-FIND + C-GET) and DICOMweb (QIDO-RS + WADO-RS), and against a hostile PACS (a real pynetdicom
peer in this process) that answers a C-GET with another series, an image twice or one it did not
list, or too slowly, and hostile DICOMweb servers (real HTTP servers on loopback in this process)
that answer with too much or trickle their answer (over HTTPS too); a search is cancelled against
such peers (a pynetdicom C-FIND peer and a QIDO-RS server) that record what they were asked. A
second real Orthanc caps its C-FIND answers (``LimitFindInstances``, ``LimitFindResults``), as a
hospital PACS may."""

from __future__ import annotations

import datetime
import gzip
import io
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_ct_series
from orthanc_server import Orthanc, free_port, start_orthanc
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from IPv2DenoiseLib.core.atomic import STAGING_DIR
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled, CancelToken
from IPv2DenoiseLib.io.dicom_net import DestinationUnavailable, DicomNode, parse_node, send
from IPv2DenoiseLib.io.dicom_query import check_uid, find_series, retrieve_series
from IPv2DenoiseLib.io.volumes import read_volume


@pytest.fixture(scope="module")
def on_pacs(orthanc, tmp_path_factory) -> dict:
    """One patient with two studies on the real Orthanc: a 6-slice CT (2021) and, in a 2023
    study, a 3-slice CT and a 2-slice MR series."""
    tmp = tmp_path_factory.mktemp("on-pacs")
    patient = f"Q{time.monotonic_ns() % 10**9}"
    studies = {"old": generate_uid(), "new": generate_uid()}
    plan = [
        ("ct6", 6, "CT", "old", "20210305"),
        ("ct3", 3, "CT", "new", "20230711"),
        ("mr", 2, "MR", "new", "20230711"),
    ]
    files, series = [], {}
    for name, n, modality, study, date in plan:
        paths = write_ct_series(tmp / name, n, modality=modality, series_number=len(series) + 1)
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName = patient, "QUERY^TEST^PATIENT"
            ds.StudyInstanceUID, ds.StudyDate, ds.StudyDescription = studies[study], date, f"study {study}"
            ds.SeriesDescription = name
            ds.save_as(path)
        series[name] = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
        files += paths
    send(files, parse_node(orthanc.node)).raise_for_failures()
    return {"patient": patient, "series": series, "studies": studies, "folder": tmp}


def peers(orthanc) -> dict[str, object]:
    return {"dimse": parse_node(orthanc.node), "dicomweb": orthanc.dicomweb_url}


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_find_lists_the_patients_ct_series_newest_first(orthanc, on_pacs, protocol) -> None:
    peer = peers(orthanc)[protocol]
    by_id = find_series(peer, patient=on_pacs["patient"])
    assert [m.series_uid for m in by_id] == [on_pacs["series"]["ct3"], on_pacs["series"]["ct6"]]  # no MR
    assert [m.instances for m in by_id] == [3, 6]
    assert by_id[0].study_date == "20230711" and by_id[0].patient_id == on_pacs["patient"]
    assert (
        by_id[0]
        .label()
        .startswith(f"2023-07-11 · {on_pacs['patient']} QUERY^TEST^PATIENT · study new · #2 ct3")
    )
    if protocol == "dimse":  # Debian's DICOMweb plugin (1.7) matches no PatientName in QIDO-RS at all
        by_name = find_series(peer, patient="test^pat")  # part of the name, any case
        assert {m.series_uid for m in by_name} >= {on_pacs["series"]["ct3"], on_pacs["series"]["ct6"]}
    in_2021 = find_series(peer, patient=on_pacs["patient"], study_date="20210101-20211231")
    assert [m.series_uid for m in in_2021] == [on_pacs["series"]["ct6"]]
    assert find_series(peer, patient="NOBODY-HAS-THIS-ID") == []


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_retrieve_writes_the_series_pixel_for_pixel(orthanc, on_pacs, protocol, tmp_path) -> None:
    match = find_series(peers(orthanc)[protocol], patient=on_pacs["patient"])[1]  # the 6-slice CT
    seen: list[tuple[int, int]] = []
    files = retrieve_series(
        peers(orthanc)[protocol],
        match.study_uid,
        match.series_uid,
        tmp_path / "got",
        progress=lambda done, total, _="": seen.append((done, total)),
    )
    assert [f.name for f in files] == [f"{i:05d}.dcm" for i in range(1, 7)]  # counter names, no tag values
    assert seen and seen[-1][1] == 6 and seen[-1][0] >= 5
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in (on_pacs["folder"] / "ct6").iterdir()}
    for path in files:
        ds = pydicom.dcmread(path)
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(originals[str(ds.SOPInstanceUID)]).pixel_array)
    assert read_volume(tmp_path / "got").shape == (6, 128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got"]  # no staging left


def test_cancel_leaves_no_folder(orthanc, on_pacs, tmp_path) -> None:
    match = find_series(parse_node(orthanc.node), patient=on_pacs["patient"])[1]
    cancel = CancelToken()

    def progress(done: int, total: int, message: str = "") -> None:
        cancel.cancel()  # after the first image

    with pytest.raises(Cancelled):
        retrieve_series(
            parse_node(orthanc.node),
            match.study_uid,
            match.series_uid,
            tmp_path / "got",
            progress=progress,
            cancel=cancel,
        )
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging


def test_instances_over_the_size_cap_are_refused_and_nothing_is_kept(orthanc, on_pacs, tmp_path) -> None:
    match = find_series(parse_node(orthanc.node), patient=on_pacs["patient"])[0]
    with pytest.raises(UserError, match=r"refused, an instance of 0\.0\d MB is over the 0\.01 MB cap"):
        retrieve_series(
            parse_node(orthanc.node),
            match.study_uid,
            match.series_uid,
            tmp_path / "got",
            max_instance_mb=0.01,
        )
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_an_unknown_series_is_one_line(orthanc, on_pacs, tmp_path) -> None:
    with pytest.raises(UserError, match=r"C-GET of series [0-9.]+ from ORTHANC@.* failed: status 0xC000"):
        retrieve_series(parse_node(orthanc.node), on_pacs["studies"]["new"], generate_uid(), tmp_path / "got")
    assert not (tmp_path / "got").exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda node, d: retrieve_series(node, "1.2.3", "../../etc", d), "is not a DICOM UID"),
        (lambda node, d: retrieve_series(node, "1.2..3", "1.2.3", d), "is not a DICOM UID"),
        (lambda node, d: find_series(node, patient="A\\B"), "no backslash"),
        (lambda node, d: find_series(node, study_date="2021-13"), "expected YYYYMMDD"),
    ],
)
def test_malformed_requests_are_refused_before_any_network(tmp_path, call, message) -> None:
    nowhere = DicomNode("127.0.0.1", free_port(), "NOBODY")  # never contacted
    with pytest.raises(UserError, match=message):
        call(nowhere, tmp_path / "got")
    assert check_uid(" 1.2.840.10008\x00") == "1.2.840.10008"


def test_an_unreachable_pacs_is_one_line(tmp_path) -> None:
    with pytest.raises(DestinationUnavailable, match="cannot reach"):
        find_series(DicomNode("127.0.0.1", free_port(), "NOBODY"), timeout=2)


def test_a_search_the_pacs_cut_short_is_refused_naming_the_cap() -> None:
    """A real pynetdicom peer answers a study search with one match, then ends it 0xFE00, as a PACS
    capping its C-FIND answers (Orthanc's LimitFindResults) does: the search is refused in one line
    that names the cap, not shown as if the one match were all (until 2026-12-07 the line asked
    whether the PACS allowed our AE title)."""

    def on_find(event):
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID, match.PatientID, match.StudyDate = "1.2.3.4", "P1", "20260101"
        yield 0xFF00, match
        yield 0xFE00, None

    ae = AE(ae_title="CAPPED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        with pytest.raises(UserError) as refused:
            find_series(DicomNode("127.0.0.1", port, "CAPPED"), patient="P*", timeout=5)
    finally:
        server.shutdown()
    message = str(refused.value)
    assert "cut its answer short" in message and "LimitFindResults" in message and "\n" not in message
    assert "AE title" not in message


@contextmanager
def hostile_pacs(
    *instances: pydicom.Dataset,
    listed: list[str] | None = None,
    pause_s: float = 0.0,
    series_count: int | None = None,
    cut_short: bool = False,
) -> Iterator[DicomNode]:
    """A real pynetdicom peer (AE ``HOSTILE``, in this process) that answers any C-GET with ``instances``
    (waiting ``pause_s`` before each), and a C-FIND at IMAGE level with ``listed`` (by default, as a
    PACS lists them: the SOPInstanceUIDs of those of ``instances`` in the series asked about), ended
    with 0xFE00 if ``cut_short`` (as a PACS capping its answers does). At SERIES level it says the
    series has ``series_count`` instances; without one, it answers as at IMAGE level (no count)."""

    def on_find(event):
        series = str(event.identifier.SeriesInstanceUID)
        if event.identifier.QueryRetrieveLevel == "SERIES" and series_count is not None:
            match = Dataset()
            match.QueryRetrieveLevel, match.SeriesInstanceUID = "SERIES", series
            match.NumberOfSeriesRelatedInstances = series_count
            yield 0xFF00, match
            return
        uids = (
            listed
            if listed is not None
            else [str(i.SOPInstanceUID) for i in instances if i.SeriesInstanceUID == series]
        )
        for uid in uids:
            match = Dataset()
            match.QueryRetrieveLevel, match.SOPInstanceUID = "IMAGE", uid
            yield 0xFF00, match
        if cut_short:
            yield 0xFE00, None

    def on_get(event):
        yield len(instances)  # sub-operations to come
        for instance in instances:
            time.sleep(pause_s)
            yield (0xFF00, instance)

    ae = AE(ae_title="HOSTILE")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, scu_role=False, scp_role=True)
    port = free_port()
    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield DicomNode("127.0.0.1", port, "HOSTILE")
    finally:
        server.shutdown()


def test_a_pacs_that_sends_another_series_is_refused(tmp_path) -> None:
    """A real pynetdicom peer answers our C-GET with an instance of a different series (and a
    crafted SOPInstanceUID): refused by name, nothing kept, no file named after a tag."""
    instance = pydicom.dcmread(write_ct_series(tmp_path / "theirs", 1)[0])
    instance.SOPInstanceUID = "1.2.3/../../evil"
    with hostile_pacs(instance) as pacs:
        with pytest.raises(UserError, match=r"refused, the PACS sent an instance of another series"):
            retrieve_series(pacs, "1.2.3", "1.2.3.4", tmp_path / "got", timeout=5)
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_a_retrieval_that_lost_images_on_the_way_is_not_kept(tmp_path) -> None:
    """A real pynetdicom peer answers our C-GET with three images of the series, one of which it
    cannot send us (an MR object: we accept CT storage only), and ends "complete, with failures"
    (0xB000). The two that came are a shortened series: refused in one line, nothing kept. (Before,
    the two were kept and opened as the series.)"""
    files = write_ct_series(tmp_path / "theirs", 3)
    instances = [pydicom.dcmread(f) for f in files]
    instances[2].SOPClassUID = instances[2].file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    study, series = str(instances[0].StudyInstanceUID), str(instances[0].SeriesInstanceUID)
    with hostile_pacs(*instances) as pacs:
        with pytest.raises(UserError, match=r"1 of its images could not be sent \(2 came; status 0xB000\)"):
            retrieve_series(pacs, study, series, tmp_path / "got", timeout=5)
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_a_pacs_that_sends_a_huge_instance_is_cut_off_while_it_arrives(tmp_path) -> None:
    """A real pynetdicom peer answers our C-GET with a 48 MB "instance" of the right series: against
    a 0.1 MB cap the association is aborted after about 1.1 MB (pynetdicom would otherwise hold the
    whole message in memory before our handler refuses it), and the refusal names why; nothing is
    kept."""
    instance = pydicom.dcmread(write_ct_series(tmp_path / "theirs", 1)[0])
    instance.add_new(0x00091010, "OB", bytes(48 * 2**20))
    with hostile_pacs(instance) as pacs:
        started = time.monotonic()
        with pytest.raises(
            UserError,
            match=r"refused, aborted the association with HOSTILE@127\.0\.0\.1: "
            r"an instance passed 1\.1 MB while arriving \(cap 0\.1 MB\)",
        ):
            retrieve_series(
                pacs,
                str(instance.StudyInstanceUID),
                str(instance.SeriesInstanceUID),
                tmp_path / "got",
                timeout=10,
                max_instance_mb=0.1,
            )
        # pynetdicom's C-GET loop notices the abort at its response timeout (10 s here), not before
        assert time.monotonic() - started < 10 + 5
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize("mode", ["twice", "unlisted", "short"])
def test_a_pacs_that_sends_other_images_than_it_listed_is_refused(tmp_path, mode) -> None:
    """A real pynetdicom peer lists three images of the series (C-FIND at IMAGE level), then answers
    the C-GET with the first two and the first again (twice), or the first two and an image of another
    series under this series' UID (unlisted), or the first two alone, saying it is done (short). The
    count of images fits (or the PACS says all went well), so until 2026-12-07 each was kept: a series
    with one slice twice and another missing, or with a stranger's slice. Now refused in one line,
    nothing kept (the check WADO-RS makes, `test_a_wado_server_answering_one_instance_with_another_is_refused`)."""
    ours = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "ours", 3)]
    stranger = pydicom.dcmread(write_ct_series(tmp_path / "stranger", 1, series_number=7)[0])
    stranger.StudyInstanceUID, stranger.SeriesInstanceUID = (
        ours[0].StudyInstanceUID,
        ours[0].SeriesInstanceUID,
    )
    study, series = str(ours[0].StudyInstanceUID), str(ours[0].SeriesInstanceUID)
    first = str(ours[0].SOPInstanceUID)
    sent = {"twice": [*ours[:2], ours[0]], "unlisted": [*ours[:2], stranger], "short": ours[:2]}[mode]
    why = {
        "twice": f"the PACS sent instance {first} twice",
        "unlisted": f"the PACS sent instance {stranger.SOPInstanceUID}, which the series' list of"
        " instances does not name (if the PACS caps its C-FIND answers, lift the cap: on Orthanc"
        " LimitFindInstances = 0)",
        "short": "1 of the 3 instances the series' list names did not come",
    }[mode]
    with hostile_pacs(*sent, listed=[str(ds.SOPInstanceUID) for ds in ours]) as pacs:
        with pytest.raises(UserError) as refused:
            retrieve_series(pacs, study, series, tmp_path / "got", timeout=5)
    assert str(refused.value) == f"retrieving series {series} from {pacs}: refused, {why}"  # one line
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


#: Matches a C-FIND at IMAGE level answers at most on the capped Orthanc (LimitFindInstances).
FIND_CAP = 3
#: Matches a C-FIND at PATIENT, STUDY or SERIES level answers at most on it (LimitFindResults).
RESULTS_CAP = 2


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory) -> Iterator[tuple[Orthanc, list[Path]]]:
    """A second real Orthanc that caps its C-FIND answers, as a hospital PACS may be configured: its
    lists of a series' instances (C-FIND at IMAGE level, and its QIDO-RS) stop after
    :data:`FIND_CAP` matches (``LimitFindInstances``), its searches for studies or series after
    :data:`RESULTS_CAP` (``LimitFindResults``). It holds one 6-slice CT series; yields it and the
    series' files."""
    folder = tmp_path_factory.mktemp("capped-orthanc")
    try:
        pacs = start_orthanc(
            folder, extra_config={"LimitFindInstances": FIND_CAP, "LimitFindResults": RESULTS_CAP}
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        files = write_ct_series(folder / "ct6", 6)
        send(files, parse_node(pacs.node)).raise_for_failures()
        yield pacs, files
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def past_the_results_cap(capped_orthanc, tmp_path_factory) -> dict[str, str]:
    """Three patients on the capped Orthanc, each with one-slice CT series: one with a study more
    than :data:`RESULTS_CAP` (three studies), one with a series more in a study (three), and one at
    the cap (two studies of two series each); maps each case to its patient ID."""
    pacs, _ = capped_orthanc
    tmp = tmp_path_factory.mktemp("past-the-results-cap")
    stamp = time.monotonic_ns() % 10**9
    plan = {"studies": [1, 1, 1], "series": [3], "at the cap": [2, 2]}  # series per study
    patients, files = {}, []
    for case, studies in plan.items():
        patients[case] = f"CAP{len(patients)}-{stamp}"
        for s, n_series in enumerate(studies):
            study_uid = generate_uid()
            for number in range(1, n_series + 1):
                (path,) = write_ct_series(tmp / f"{len(patients)}-{s}-{number}", 1, series_number=number)
                ds = pydicom.dcmread(path)
                ds.PatientID, ds.StudyInstanceUID, ds.StudyDate = patients[case], study_uid, f"202{s}0101"
                ds.save_as(path)
                files.append(path)
    send(files, parse_node(pacs.node)).raise_for_failures()
    return patients


@pytest.mark.parametrize("past", ["studies", "series"])
def test_a_search_past_orthancs_results_cap_is_refused_naming_the_cap(
    capped_orthanc, past_the_results_cap, past
) -> None:
    """A real Orthanc capped at 2 matches per C-FIND (``LimitFindResults``) sends 2 matches, then
    0xFE00, for a patient with 3 CT studies (STUDY level) or a study with 3 CT series (SERIES level):
    the search is refused in one line naming the cap, not shown as if 2 were all. A patient at the
    cap (2 studies of 2 series; Orthanc ends that answer 0x0000) is listed whole."""
    pacs, _ = capped_orthanc
    node = parse_node(pacs.node)
    at_the_cap = find_series(node, patient=past_the_results_cap["at the cap"])
    assert len(at_the_cap) == 4 and len({m.study_uid for m in at_the_cap}) == 2
    with pytest.raises(UserError) as refused:
        find_series(node, patient=past_the_results_cap[past])
    assert str(refused.value) == (
        f"C-FIND on {node}: the PACS cut its answer short (status 0xFE00: a cap on C-FIND answers,"
        " e.g. Orthanc's LimitFindResults); narrow the search or lift the cap"
    )


def test_a_series_past_the_pacs_listing_cap_is_retrieved_whole_by_its_count(
    capped_orthanc, tmp_path, caplog
) -> None:
    """A real Orthanc answers a C-FIND at IMAGE level with 3 matches at most (``LimitFindInstances``),
    then 0xFE00. Until 2026-12-07 the retrieval of its 6-slice series was refused ("C-FIND …
    refused: status 0xFE00"; a PACS capping without saying so had its C-GET refused as sending
    images its list did not name): no series past the cap could be opened. Now the list is taken as
    partial, the series' own count (6, by a C-FIND at SERIES level) is held instead, one warning
    says so, and the series comes whole."""
    pacs, files = capped_orthanc
    first = pydicom.dcmread(files[0])
    with caplog.at_level(logging.WARNING, logger="IPv2DenoiseLib.io.dicom_query"):
        got = retrieve_series(
            parse_node(pacs.node), str(first.StudyInstanceUID), str(first.SeriesInstanceUID), tmp_path / "got"
        )
    sop_uids = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    assert sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in got) == sop_uids
    assert read_volume(tmp_path / "got").shape == (6, 128, 128)
    (warning,) = [r for r in caplog.records if r.name == "IPv2DenoiseLib.io.dicom_query"]
    assert warning.levelno == logging.WARNING and "\n" not in warning.getMessage()
    assert f"capped its C-FIND list of series {first.SeriesInstanceUID} at 3 of the series' 6 instances" in (
        warning.getMessage()
    )


def test_a_dicomweb_list_capped_short_of_the_series_is_refused(capped_orthanc, tmp_path) -> None:
    """The same capped Orthanc over DICOMweb: its QIDO-RS list names 4 of the 6 instances and does
    not say it left any out (no Warning 299). Until 2026-12-07 those 4 were fetched and kept, a
    shortened series opened as the whole. The series' own count (QIDO-RS at SERIES level) now shows
    the list short; WADO-RS can fetch only the instances it names, so the retrieval is refused in
    one line naming the cap, and nothing is kept."""
    pacs, files = capped_orthanc
    first = pydicom.dcmread(files[0])
    with pytest.raises(
        UserError,
        match=r"refused, the instance list names \d of the series' 6 instances \(the server caps its"
        r" answers; on Orthanc: LimitFindInstances = 0\)",
    ):
        retrieve_series(
            pacs.dicomweb_url, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), tmp_path / "got"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mode", ["twice", "another series", "past the count", "short", "a listed one missing"]
)
def test_a_pacs_whose_list_is_capped_is_held_to_the_series_count(tmp_path, mode) -> None:
    """A real pynetdicom peer lists 2 of a series' 4 images (its C-FIND capped: it ends 0xFE00) and
    says at SERIES level that the series has 4, then answers the C-GET with one image twice, one of
    another series, 5 images of the series, 3 of them, or 4 of the series without a listed one. The
    list being partial, images it does not name are taken, but each of these is refused in one
    line, and nothing is kept (all 4 once:
    ``test_a_series_past_the_pacs_listing_cap_is_retrieved_whole_by_its_count``)."""
    ours = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "ours", 5)]  # the 5th: past the count
    other = pydicom.dcmread(write_ct_series(tmp_path / "other", 1, series_number=7)[0])
    study, series = str(ours[0].StudyInstanceUID), str(ours[0].SeriesInstanceUID)
    sent = {
        "twice": [*ours[:3], ours[2]],
        "another series": [*ours[:3], other],
        "past the count": ours,
        "short": ours[:3],
        "a listed one missing": [ours[0], *ours[2:]],
    }[mode]
    why = {
        "twice": f"the PACS sent instance {ours[2].SOPInstanceUID} twice",
        "another series": f"the PACS sent an instance of another series ({other.SeriesInstanceUID})",
        "past the count": "the PACS sent more than the series' 4 instances",
        "short": "3 of the series' 4 instances came (its capped list named 2)",
        "a listed one missing": "1 of the 2 instances the series' list names did not come",
    }[mode]
    listed = [str(ds.SOPInstanceUID) for ds in ours[:2]]
    with hostile_pacs(*sent, listed=listed, series_count=4, cut_short=True) as pacs:
        with pytest.raises(UserError) as refused:
            retrieve_series(pacs, study, series, tmp_path / "got", timeout=5)
    assert str(refused.value) == f"retrieving series {series} from {pacs}: refused, {why}"  # one line
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_a_capped_list_without_a_count_is_refused_naming_the_cap(tmp_path) -> None:
    """A real pynetdicom peer cuts its list of a series' images short (2 of 3, then 0xFE00) and says
    no count at SERIES level: nothing tells the images it left out from a stranger's, so the
    retrieval is refused before any image comes, in one line saying the PACS capped its answer and
    how to lift the cap. (Until 2026-12-07: "C-FIND … refused: status 0xFE00 (does the PACS allow
    queries from our calling AE title?)", the wrong lead.)"""
    ours = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "ours", 3)]
    study, series = str(ours[0].StudyInstanceUID), str(ours[0].SeriesInstanceUID)
    with hostile_pacs(*ours, listed=[str(ds.SOPInstanceUID) for ds in ours[:2]], cut_short=True) as pacs:
        with pytest.raises(UserError) as refused:
            retrieve_series(pacs, study, series, tmp_path / "got", timeout=5)
    assert str(refused.value) == (
        f"retrieving series {series} from {pacs}: refused, the PACS cut its list of the series' instances"
        " short after 2 (it caps its C-FIND answers) and gave no count of the series' instances to check"
        " the rest against; lift the cap (on Orthanc: LimitFindInstances = 0)"
    )
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


#: The one line of a retrieval stopped at a 2 s limit.
TIME_LIMIT_MESSAGE = (
    r"^retrieving series [0-9.]+ from \S+: stopped after 2 s, the time limit of one retrieval .*; nothing was"
    r" kept; raise the limit with ipv2-denoise web --retrieve-max-minutes M, or"
    r" retrieve_series\(max_seconds=…\) \(default 1800 s, io\.dicom_query\.MAX_RETRIEVE_SECONDS\)$"
)


def test_a_pacs_that_sends_too_slowly_is_stopped_at_the_time_limit(tmp_path) -> None:
    """A real pynetdicom peer sends the six images of a C-GET one every 1.5 s (each within the
    network timeout, so no timeout fires): against a 2 s limit the association is aborted, the
    retrieval says so in one line naming the limit and how to raise it, and nothing is kept."""
    instances = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "theirs", 6)]
    study, series = str(instances[0].StudyInstanceUID), str(instances[0].SeriesInstanceUID)
    with hostile_pacs(*instances, pause_s=1.5) as pacs:
        started = time.monotonic()
        with pytest.raises(UserError, match=TIME_LIMIT_MESSAGE):
            retrieve_series(pacs, study, series, tmp_path / "got", timeout=3, max_seconds=2)
        assert time.monotonic() - started < 2 + 3 + 2  # the limit, then the C-GET's response timeout
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@dataclass
class FakeDicomweb:
    """A DICOMweb server on loopback (a real HTTP server, a thread in this process) and what it did."""

    url: str
    paths: list[str] = field(default_factory=list)
    #: body bytes each answer got out before it ended or the client hung up, in order of ending
    sent: list[int] = field(default_factory=list)

    def settled(self, timeout: float = 30.0) -> list[int]:
        """``sent`` once every answer begun has ended (a hung-up client ends it at the next write)."""
        deadline = time.monotonic() + timeout
        while len(self.sent) < len(self.paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.sent


#: Where an "endless" answer stops: only so that a client reading without bound (the code until
#: 2026-12-07) cannot take the test machine down; a bounded one hangs up after about 1 MB (a
#: retrieval's test cap) or 16 MB (a search's cap).
ENDLESS_BYTES = 64 * 2**20
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XYZ'
PART_HEAD = b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n"
Answer = tuple[int, dict[str, str], Iterable[bytes]]
#: The status of an answer whose pieces are its status line and headers too (:func:`fake_dicomweb`).
RAW = 0


def pieces(body: bytes, size: int = 2**16) -> list[bytes]:
    """``body`` in pieces, so that what got out before the client hung up can be counted."""
    return [body[start : start + size] for start in range(0, len(body), size)]


def whole(kind: str, body: bytes) -> Answer:
    """A complete answer with its Content-Length."""
    return 200, {"Content-Type": kind, "Content-Length": str(len(body))}, pieces(body)


def multipart(*instances: bytes) -> bytes:
    return b"".join(PART_HEAD + i + b"\r\n" for i in instances) + b"--XYZ--\r\n"


def listing(*sop_uids: str) -> bytes:
    """A QIDO-RS instance list (DICOM JSON) naming ``sop_uids``."""
    return json.dumps([{"00080018": {"vr": "UI", "Value": [uid]}} for uid in sop_uids]).encode()


def endless(head: bytes, piece: bytes = bytes(2**16)) -> Iterator[bytes]:
    """``head``, then ``piece`` again and again (up to :data:`ENDLESS_BYTES`); for one answer."""
    yield head
    for _ in range(ENDLESS_BYTES // len(piece)):
        yield piece


def instance_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@contextmanager
def fake_dicomweb(
    answer: Callable[[str], Answer], tls: ssl.SSLContext | None = None
) -> Iterator[FakeDicomweb]:
    """Answers every GET with ``answer(path)`` (the path with its query); a body is written piece
    by piece, over a connection closed after each answer. An answer of status ``RAW`` is sent as
    its body alone: the pieces are the status line and headers as well. With ``tls``, over HTTPS."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            record.paths.append(self.path)
            status, headers, body = answer(self.path)
            if status != RAW:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
            sent = 0
            try:
                for piece in body:
                    self.wfile.write(piece)
                    sent += len(piece)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):  # the client hung up
                pass
            record.sent.append(sent)

        def log_message(self, *args) -> None:
            """Quiet: the test reports its assertions, not the server's access log."""

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    if tls is not None:  # the handshake in each answer's thread, not in the accepting one
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    scheme = "https" if tls is not None else "http"
    record = FakeDicomweb(f"{scheme}://127.0.0.1:{server.server_address[1]}/dicom-web")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()


#: A QIDO-RS answer with no match (HTTP 204): a series search that says no count of instances.
NO_MATCH: Answer = (204, {"Content-Length": "0"}, [])


@contextmanager
def dicomweb_server(
    listed: Answer,
    instance: Callable[[str], Answer],
    series: Answer = NO_MATCH,
    tls: ssl.SSLContext | None = None,
) -> Iterator[FakeDicomweb]:
    """Answers a QIDO-RS instance search (a path ending ``/instances``) with ``listed``, a series
    search (``/series``: the series' count of instances) with ``series``, and any other GET
    (WADO-RS: an instance, or the whole series as the code until 2026-12-07 asked) with
    ``instance(path)``; with ``tls``, over HTTPS."""

    def answer(path: str) -> Answer:
        route = path.split("?")[0]
        if route.endswith("/instances"):
            return listed
        return series if route.endswith("/series") else instance(path)

    with fake_dicomweb(answer, tls) as record:
        yield record


@pytest.fixture(scope="module")
def huge_instance(tmp_path_factory) -> tuple[pydicom.Dataset, bytes]:
    """A CT instance of 48 MB (a private OB element, as in the C-GET test above), and its file bytes."""
    ds = pydicom.dcmread(write_ct_series(tmp_path_factory.mktemp("huge"), 1)[0])
    ds.add_new(0x00091010, "OB", bytes(48 * 2**20))
    return ds, instance_bytes(ds)


def test_a_wado_answer_short_of_its_search_is_not_kept(tmp_path) -> None:
    """A DICOMweb server whose QIDO-RS search lists three images of the series but which delivers
    two of them (HTTP 404 for the third): refused in one line, nothing kept. (Until 2026-12-07
    the two were kept and opened as the series.)"""
    files = write_ct_series(tmp_path / "theirs", 3)
    instances = [pydicom.dcmread(f) for f in files]
    study, series = str(instances[0].StudyInstanceUID), str(instances[0].SeriesInstanceUID)
    have = {str(ds.SOPInstanceUID): f.read_bytes() for ds, f in zip(instances[:2], files[:2])}

    def instance(path: str) -> Answer:
        body = have.get(path.rsplit("/", 1)[-1])
        return whole(MULTIPART, multipart(body)) if body else (404, {"Content-Length": "0"}, [])

    listed = whole("application/dicom+json", listing(*(str(ds.SOPInstanceUID) for ds in instances)))
    with dicomweb_server(listed, instance) as pacs:
        with pytest.raises(UserError, match=r"WADO-RS from .* failed: HTTP 404 \(instance [0-9.]+\)"):
            retrieve_series(pacs.url, study, series, tmp_path / "got", timeout=5)
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize("mode", ["announced", "unannounced", "endless"])
def test_a_wado_instance_over_the_cap_is_cut_off_while_it_arrives(huge_instance, tmp_path, mode) -> None:
    """A DICOMweb server answers with a 48 MB instance of the series (with its Content-Length, or
    without: the body ends when the connection does) or with a part that never ends. Against a
    0.1 MB cap the retrieval hangs up before 1.1 MB (or on the Content-Length alone) and says so in
    one line naming the server and the cap; nothing is kept. (Until 2026-12-07 the whole answer was
    read into memory first, and the 48 MB instance was even kept: the cap counted its pixels only.)"""
    ds, data = huge_instance
    answers = {
        "announced": whole(MULTIPART, multipart(data)),
        "unannounced": (200, {"Content-Type": MULTIPART}, pieces(multipart(data))),
        "endless": (200, {"Content-Type": MULTIPART}, endless(PART_HEAD)),
    }
    listed = whole("application/dicom+json", listing(str(ds.SOPInstanceUID)))
    with dicomweb_server(listed, lambda path: answers[mode]) as pacs:
        arriving = r"passed 1\.1 MB while arriving" if mode != "announced" else r"of 48\.\d+ MB was announced"
        with pytest.raises(
            UserError, match=rf"from {re.escape(pacs.url)}: refused, an instance {arriving} \(cap 0\.1 MB\)"
        ):
            retrieve_series(
                pacs.url,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                tmp_path / "got",
                timeout=10,
                max_instance_mb=0.1,
            )
        assert max(pacs.settled()) < 24 * 2**20  # hung up: the rest never left the server
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize("mode", ["no boundary", "compressed"])
def test_a_wado_answer_that_is_not_plain_multipart_dicom_is_refused_unread(
    huge_instance, tmp_path, mode
) -> None:
    """A DICOMweb server answers multipart/related without a boundary (then bytes without end), or
    gzip-compressed although we ask for none (48 MB in 220 kB: a decompression bomb). Both are refused
    on their headers, before the body is read. (Until 2026-12-07 the first was read whole into
    memory, and the second inflated and its instance kept.)"""
    ds, data = huge_instance
    answers = {
        "no boundary": (200, {"Content-Type": 'multipart/related; type="application/dicom"'}, endless(b"")),
        "compressed": (
            200,
            {"Content-Type": MULTIPART, "Content-Encoding": "gzip"},
            [gzip.compress(multipart(data), compresslevel=1)],
        ),
    }
    listed = whole("application/dicom+json", listing(str(ds.SOPInstanceUID)))
    why = "a multipart answer came without a valid boundary" if mode == "no boundary" else "came compressed"
    with dicomweb_server(listed, lambda path: answers[mode]) as pacs:
        with pytest.raises(UserError, match=rf"from {re.escape(pacs.url)}: refused, .*{why}"):
            retrieve_series(
                pacs.url, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), tmp_path / "got", timeout=10
            )
        assert max(pacs.settled()) < 24 * 2**20
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize("mode", ["endless", "too many"])
def test_a_wado_instance_list_past_the_bounds_is_refused_before_any_image(tmp_path, mode) -> None:
    """The QIDO-RS list of the series' instances never ends, or names more instances than a
    retrieval accepts: refused in one line before any image is asked for. (Until 2026-12-07 the
    endless list was read whole into memory, and the series was fetched before the bound was checked.)"""
    files = write_ct_series(tmp_path / "theirs", 3)
    instances = [pydicom.dcmread(f) for f in files]
    sop_uids = [str(ds.SOPInstanceUID) for ds in instances]
    row = listing(sop_uids[0])[1:-1] + b","
    listed = {
        "endless": (200, {"Content-Type": "application/dicom+json"}, endless(b"[", row * 1024)),
        "too many": whole("application/dicom+json", listing(*sop_uids)),
    }[mode]
    why = {"endless": r"the instance list passed 1\.1 MB while arriving", "too many": "more than 2 instances"}
    series = whole(MULTIPART, multipart(*(f.read_bytes() for f in files)))
    with dicomweb_server(listed, lambda path: series) as pacs:
        with pytest.raises(UserError, match=rf"from {re.escape(pacs.url)}: refused, {why[mode]}"):
            retrieve_series(
                pacs.url,
                str(instances[0].StudyInstanceUID),
                str(instances[0].SeriesInstanceUID),
                tmp_path / "got",
                timeout=10,
                max_instances=2,
                max_instance_mb=0.1,
            )
        assert all(p.split("?")[0].endswith("/instances") for p in pacs.paths)  # no image asked for
        assert max(pacs.settled()) < 24 * 2**20
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_a_wado_instance_list_the_server_pages_is_refused(tmp_path) -> None:
    """A QIDO-RS list that says it left results out (PS3.18 Warning 299): fetching only what it
    names would keep a shortened series, so it is refused in one line and nothing is kept."""
    files = write_ct_series(tmp_path / "theirs", 3)
    first = pydicom.dcmread(files[0])
    body = listing(*(str(pydicom.dcmread(f).SOPInstanceUID) for f in files[:2]))
    status, headers, sent = whole("application/dicom+json", body)
    headers["Warning"] = '299 pacs: "There are 1 additional results that can be requested"'
    with dicomweb_server((status, headers, sent), lambda path: (404, {}, [])) as pacs:
        with pytest.raises(UserError, match=r"refused, the instance list came short"):
            retrieve_series(
                pacs.url, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), tmp_path / "got"
            )
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize(
    "kind",
    ["application/dicom", "multipart/related; type=application/dicom; boundary=XYZ"],
    ids=["bare DICOM", "unquoted type"],
)
def test_a_wado_server_that_bends_the_media_type_is_still_read(tmp_path, kind) -> None:
    """Answers some servers send: a bare DICOM body (not PS3.18, taken by dicomweb-client too), and
    the multipart type parameter unquoted, after a preamble. The series is read pixel for pixel."""
    files = write_ct_series(tmp_path / "theirs", 2)
    by_uid = {str(pydicom.dcmread(f).SOPInstanceUID): f.read_bytes() for f in files}
    first = pydicom.dcmread(files[0])

    def instance(path: str) -> Answer:
        data = by_uid[path.rsplit("/", 1)[-1]]
        return whole(kind, data if kind == "application/dicom" else b"preamble\r\n" + multipart(data))

    with dicomweb_server(whole("application/dicom+json", listing(*by_uid)), instance) as pacs:
        got = retrieve_series(
            pacs.url, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), tmp_path / "got"
        )
    assert [pydicom.dcmread(f).PixelData for f in got] == [pydicom.dcmread(f).PixelData for f in files]


# ------------------------------------------------------------------------------------ searching

DICOM_JSON = "application/dicom+json"
#: ``io.dicom_query.MAX_SEARCH_MB``, as the refusal says it (and docs/web.md).
SEARCH_CAP_MB = 16


def study_row(uid: str, date: str) -> Dataset:
    """A STUDY-level match as a PACS answers it."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyDescription = uid, date, "study"
    ds.PatientID, ds.PatientName = "P1", "SEARCH^TEST"
    return ds


def series_row(study_uid: str) -> Dataset:
    """A SERIES-level match: one CT series of ``study_uid``."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 1, "lung"
    ds.NumberOfSeriesRelatedInstances = 10
    return ds


def json_list(*rows: Dataset) -> bytes:
    return json.dumps([row.to_json_dict() for row in rows]).encode()


@contextmanager
def finding_pacs(studies: dict[str, str]) -> Iterator[tuple[DicomNode, list[str]]]:
    """A real pynetdicom C-FIND peer (AE ``FINDER``, in this process): STUDY level answers ``studies``
    (UID: date), SERIES level one CT series of the study asked about; yields the node and the list
    of studies asked about at SERIES level, in order."""
    asked: list[str] = []

    def on_find(event):
        query = event.identifier
        if query.QueryRetrieveLevel == "STUDY":
            for uid, date in studies.items():
                yield 0xFF00, study_row(uid, date)
        else:
            asked.append(str(query.StudyInstanceUID))
            yield 0xFF00, series_row(str(query.StudyInstanceUID))

    ae = AE(ae_title="FINDER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield DicomNode("127.0.0.1", port, "FINDER"), asked
    finally:
        server.shutdown()


@contextmanager
def qido_server(studies: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """The same over QIDO-RS (a real HTTP server on loopback): yields the base URL and the list of
    studies asked about at SERIES level (``…/studies/UID/series``), in order."""
    asked: list[str] = []

    def answer(path: str) -> Answer:
        route = path.split("?")[0].rstrip("/").split("/")
        if route[-1] == "studies":
            return whole(DICOM_JSON, json_list(*(study_row(u, d) for u, d in studies.items())))
        asked.append(route[-2])
        return whole(DICOM_JSON, json_list(series_row(route[-2])))

    with fake_dicomweb(answer) as record:
        yield record.url, asked


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_cancel_stops_a_search_before_its_next_study(protocol) -> None:
    """A search reports progress study by study (one query each), and Cancel (here from the
    progress callback after the first study) stops it there: ``Cancelled``, and the PACS is asked
    about no further study. (Until 2026-12-07 ``find_series`` took no cancel token and no progress
    callback: the web page's Cancel let all of up to 200 queries run and the search end as done.)"""
    studies = {generate_uid(): f"2024010{day}" for day in (1, 2, 3)}
    newest_first = sorted(studies, key=studies.__getitem__, reverse=True)
    with (finding_pacs if protocol == "dimse" else qido_server)(studies) as (peer, asked):
        seen: list[tuple[int, int, str]] = []
        found = find_series(peer, patient="P1", timeout=5, progress=lambda *report: seen.append(report))
        assert [m.study_uid for m in found] == newest_first and asked == newest_first
        assert [(done, total) for done, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
        assert seen[-1][2] == "search: 3 of 3 studies, 3 CT series"

        asked.clear()
        cancel = CancelToken()
        with pytest.raises(Cancelled, match="cancelled by the user"):
            find_series(peer, patient="P1", timeout=5, progress=lambda *_: cancel.cancel(), cancel=cancel)
        assert asked == newest_first[:1]  # the first study only: no further query


def test_cancel_stops_a_dicomweb_search_while_its_answer_arrives() -> None:
    """A QIDO-RS server sends its study search slowly (64 kB every 50 ms, 10 s in all): Cancel from
    another thread stops the search at the next piece, and the connection is closed."""
    pieces_in_all = 200

    def slowly() -> Iterator[bytes]:
        yield b"["
        for _ in range(pieces_in_all):
            time.sleep(0.05)
            yield b" " * 2**16

    cancel = CancelToken()
    with fake_dicomweb(lambda path: (200, {"Content-Type": DICOM_JSON}, slowly())) as pacs:
        timer = threading.Timer(0.5, cancel.cancel)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(Cancelled):
                find_series(pacs.url, timeout=5, cancel=cancel)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 3
        assert pacs.settled()[0] < pieces_in_all * 2**16  # hung up: the rest never left the server


def big_study_search(study_uid: str, megabytes: int) -> bytes:
    """A study search answer of about ``megabytes`` MB: rows with a 1 MB StudyDescription each."""
    row = study_row(study_uid, "20240101").to_json_dict()
    row["00081030"] = {"vr": "LO", "Value": ["x" * 2**20]}
    return json.dumps([row] * megabytes).encode()


@pytest.mark.parametrize("mode", ["endless", "announced", "compressed", "endless series search"])
def test_a_qido_search_answer_past_the_cap_is_refused(mode) -> None:
    """A QIDO-RS server answers the study search (or a study's series search) with DICOM JSON that
    never ends, with 20 MB it announces (Content-Length), or with 20 MB gzip-compressed though none
    was asked for. Each is refused in one line naming the server and the 16 MB cap, the endless
    ones cut off while they arrive. (Until 2026-12-07 dicomweb-client read every answer whole
    into memory, inflated the compressed one, and offered the 20 MB answers' study.)"""
    study = generate_uid()
    row = json_list(study_row(study, "20240101"))[1:-1] + b","
    endless_json = (200, {"Content-Type": DICOM_JSON}, endless(b"[", row * 1024))
    big = big_study_search(study, 20)
    study_answer = {
        "endless": endless_json,
        "announced": whole(DICOM_JSON, big),
        "compressed": (
            200,
            {"Content-Type": DICOM_JSON, "Content-Encoding": "gzip"},
            [gzip.compress(big, compresslevel=1)],
        ),
        "endless series search": whole(DICOM_JSON, json_list(study_row(study, "20240101"))),
    }[mode]
    series_answer = (
        endless_json if mode == "endless series search" else whole(DICOM_JSON, json_list(series_row(study)))
    )

    def answer(path: str) -> Answer:
        return study_answer if path.split("?")[0].endswith("/studies") else series_answer

    what, why = {
        "endless": ("the study search", rf"passed {SEARCH_CAP_MB} MB while arriving"),
        "announced": ("the study search", r"of 20\.\d+ MB was announced"),
        "compressed": ("the study search", r"came compressed \(gzip\) though none was asked for"),
        "endless series search": (
            f"the series search of study {re.escape(study)}",
            rf"passed {SEARCH_CAP_MB} MB while arriving",
        ),
    }[mode]
    cap = "" if mode == "compressed" else rf" \(cap {SEARCH_CAP_MB} MB\)"
    with fake_dicomweb(answer) as pacs:
        with pytest.raises(
            UserError, match=rf"^QIDO-RS on {re.escape(pacs.url)}: refused, {what} {why}{cap}"
        ):
            find_series(pacs.url, timeout=10)
        assert max(pacs.settled()) < ENDLESS_BYTES * 3 // 4  # hung up: the rest never left the server


def test_a_wado_server_answering_one_instance_with_another_is_refused(tmp_path) -> None:
    """A server that answers the request for the third image with the first again: the count of
    images matched the search, so a series with one slice twice and one missing was kept."""
    files = write_ct_series(tmp_path / "theirs", 3)
    instances = [pydicom.dcmread(f) for f in files]
    study, series = str(instances[0].StudyInstanceUID), str(instances[0].SeriesInstanceUID)
    by_uid = {str(ds.SOPInstanceUID): f.read_bytes() for ds, f in zip(instances, files)}
    first, third = str(instances[0].SOPInstanceUID), str(instances[2].SOPInstanceUID)

    def instance(path: str) -> Answer:
        asked = path.rsplit("/", 1)[-1]
        return whole(MULTIPART, multipart(by_uid[first if asked == third else asked]))

    with dicomweb_server(whole("application/dicom+json", listing(*by_uid)), instance) as pacs:
        with pytest.raises(UserError, match=f"asked for instance {third}, the server sent {first}"):
            retrieve_series(pacs.url, study, series, tmp_path / "got", timeout=5)
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def trickle(head: bytes, seconds: float) -> Iterator[bytes]:
    """``head``, then one byte every 0.2 s for ``seconds`` (each well within any read timeout)."""
    yield head
    for _ in range(int(seconds / 0.2)):
        time.sleep(0.2)
        yield b"x"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> tuple[ssl.SSLContext, Path]:
    """A TLS context for a server on 127.0.0.1 and the PEM file of its self-signed certificate (made
    with ``cryptography``; a client trusts it as a hospital's own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipv2-denoise test DICOMweb server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = {
        k: False for k in ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    }
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_wado_server_that_trickles_its_answer_is_hung_up_on_at_the_time_limit(
    tmp_path, where, scheme, request, monkeypatch
) -> None:
    """A DICOMweb server answers an instance with one byte every 0.2 s, in its body or before its
    headers end: every read gets something within the 5 s timeout, so until 2026-12-07 one such
    answer held the retrieval (and the web page's one job) as long as the server liked. Against a
    2 s limit the connection is hung up there, wherever the answer is, and the retrieval fails in
    one line naming the limit and how to raise it; nothing is kept. Over HTTPS too (a TLS socket is
    hung up below its TLS layer), the server's certificate trusted as requests trusts a hospital's
    own CA: ``REQUESTS_CA_BUNDLE``."""
    tls = None
    if scheme == "https":
        tls, certificate = request.getfixturevalue("tls_server")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    ds = pydicom.dcmread(write_ct_series(tmp_path / "theirs", 1)[0])
    slow_for_s = 30.0
    answer = {
        "body": (200, {"Content-Type": MULTIPART}, trickle(PART_HEAD, slow_for_s)),
        "headers": (RAW, {}, trickle(b"HTTP/1.1 200 OK\r\nContent-Type: " + MULTIPART.encode(), slow_for_s)),
    }[where]
    listed = whole("application/dicom+json", listing(str(ds.SOPInstanceUID)))
    with dicomweb_server(listed, lambda path: answer, tls=tls) as pacs:
        assert pacs.url.startswith(f"{scheme}://")
        started = time.monotonic()
        with pytest.raises(UserError, match=TIME_LIMIT_MESSAGE):
            retrieve_series(
                pacs.url,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                tmp_path / "got",
                timeout=5,
                max_seconds=2,
            )
        assert time.monotonic() - started < 2 + 2  # at the limit, not at a read timeout
        # the list, the series' count, the instance: the server saw the hang-up, its answer ended early
        assert len(pacs.settled(timeout=5)) == 3
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()


def test_a_wado_server_whose_certificate_is_not_trusted_is_refused(tls_server, tmp_path, monkeypatch) -> None:
    """The same HTTPS server with its certificate trusted by nobody: the retrieval verifies it and
    stops in one line (the trust of the test above is the CA bundle, not a check left out)."""
    tls, _ = tls_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    listed = whole("application/dicom+json", listing(generate_uid()))
    with dicomweb_server(listed, lambda path: NO_MATCH, tls=tls) as pacs:
        with pytest.raises(DestinationUnavailable, match=rf"^cannot reach {re.escape(pacs.url)}: SSLError$"):
            retrieve_series(pacs.url, generate_uid(), generate_uid(), tmp_path / "got", timeout=5)
    assert list(tmp_path.iterdir()) == []
