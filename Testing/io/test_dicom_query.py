"""Finding and fetching CT series on a PACS (``io/dicom_query``) against a real Orthanc, over DIMSE
(C-FIND + C-GET) and DICOMweb (QIDO-RS + WADO-RS), and against a hostile PACS (a real pynetdicom
peer in this process) that answers a C-GET with another series."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pydicom
import pytest
from conftest import write_ct_series
from orthanc_server import free_port
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

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


@contextmanager
def hostile_pacs(*instances: pydicom.Dataset) -> Iterator[DicomNode]:
    """A real pynetdicom peer (AE ``HOSTILE``, in this process) that answers any C-GET with ``instances``."""

    def on_get(event):
        yield len(instances)  # sub-operations to come
        for instance in instances:
            yield (0xFF00, instance)

    ae = AE(ae_title="HOSTILE")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, scu_role=False, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)])
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


def test_a_wado_answer_short_of_its_search_is_not_kept(tmp_path) -> None:
    """A DICOMweb server (a real HTTP server in this process) whose QIDO-RS search lists three
    images of the series but whose WADO-RS answer carries two: refused in one line, nothing kept.
    (Before, the two were kept and opened as the series.)"""
    import io
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = write_ct_series(tmp_path / "theirs", 3)
    first = pydicom.dcmread(files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    listed = [{"00080018": {"vr": "UI", "Value": [str(pydicom.dcmread(f).SOPInstanceUID)]}} for f in files]

    class ShortServer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0].endswith("/instances"):  # QIDO-RS: three instances
                body, kind = json.dumps(listed).encode(), "application/dicom+json"
            else:  # WADO-RS: two of them
                parts = io.BytesIO()
                for f in files[:2]:
                    parts.write(
                        b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
                    )
                parts.write(b"--XYZ--\r\n")
                body, kind = parts.getvalue(), 'multipart/related; type="application/dicom"; boundary=XYZ'
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), ShortServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(UserError, match=r"2 of the 3 images its search lists came"):
            retrieve_series(url, study, series, tmp_path / "got", timeout=5)
    finally:
        server.shutdown()
    assert not (tmp_path / "got").exists() and not (tmp_path / STAGING_DIR).exists()
