"""``ipv2-denoise send`` against a real Orthanc: C-STORE, C-FIND, C-GET back, STOW-RS, and the failures."""

from __future__ import annotations

import socket
import time

import numpy as np
import pydicom
import pytest
from conftest import write_ct_series
from orthanc_server import free_port
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions, ModelProvenance, export_derived_series
from IPv2DenoiseLib.io.volumes import read_volume

TEST_AET = "IPV2TEST"


@pytest.fixture()
def derived_series(tmp_path):
    """A derived series (3 slices of the real CT_small.dcm) written by the exporter, and its source."""
    write_ct_series(tmp_path / "src", 3)
    source = read_volume(tmp_path / "src")
    files = export_derived_series(
        source.with_array(source.array - 5.0),
        tmp_path / "derived",
        source_files=source.meta["dicom_files"],
        options=DerivedSeriesOptions(model=ModelProvenance("unet-ipv2", sha256="0" * 64)),
    )
    return files, source


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cstore_then_cfind_cget_and_cmove_back(orthanc, derived_series, capsys) -> None:
    files, _ = derived_series
    folder = files[0].parent
    assert main(["send", str(folder), "--to", orthanc.node, "--calling-aet", TEST_AET]) == 0
    out, err = capsys.readouterr()
    assert out.count("stored") == len(files) and "stored 3 instance(s)" in err
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, files)}
    series_uid = next(iter(sent.values())).SeriesInstanceUID

    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = next(iter(sent.values())).StudyInstanceUID
    query.SeriesInstanceUID = series_uid
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = ""
    received: list[Dataset] = []

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        orthanc.dicom_port,
        ae_title=orthanc.aet,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        matches = [
            ident
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01)
        ]
        assert len(matches) == 1
        assert "denoised" in matches[0].SeriesDescription
        assert int(matches[0].NumberOfSeriesRelatedInstances) == len(files)
        get = Dataset()
        get.QueryRetrieveLevel = "SERIES"
        get.StudyInstanceUID = query.StudyInstanceUID
        get.SeriesInstanceUID = series_uid
        statuses = [
            status.Status for status, _ in assoc.send_c_get(get, StudyRootQueryRetrieveInformationModelGet)
        ]
        assert statuses[-1] == 0x0000
    finally:
        assoc.release()
    assert {str(ds.SOPInstanceUID) for ds in received} == set(sent)
    moved = _c_move_series(orthanc, query.StudyInstanceUID, series_uid)
    assert {str(ds.SOPInstanceUID) for ds in moved} == set(sent)
    for ds in received + moved:
        original = sent[str(ds.SOPInstanceUID)]
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        assert ds.DerivationDescription == original.DerivationDescription
        assert (
            ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            == original.SourceImageSequence[0].ReferencedSOPInstanceUID
        )


def _c_move_series(orthanc, study_uid: str, series_uid: str) -> list[Dataset]:
    """C-MOVE a series from Orthanc to a Storage SCP started here (registered in Orthanc by AE title)."""
    received: list[Dataset] = []

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    scp = AE(ae_title="IPV2MOVE")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        orthanc.add_modality("ipv2move", "IPV2MOVE", port)
        ae = AE(ae_title=TEST_AET)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        assert assoc.is_established
        move = Dataset()
        move.QueryRetrieveLevel = "SERIES"
        move.StudyInstanceUID = study_uid
        move.SeriesInstanceUID = series_uid
        try:
            responses = list(assoc.send_c_move(move, "IPV2MOVE", StudyRootQueryRetrieveInformationModelMove))
        finally:
            assoc.release()
        assert responses[-1][0].Status == 0x0000
    finally:
        server.shutdown()
    return received


def test_stow_rs_into_orthanc_dicomweb(orthanc, derived_series, capsys) -> None:
    files, _ = derived_series
    assert main(["send", str(files[0].parent), "--to", orthanc.dicomweb_url]) == 0
    assert "stored 3 instance(s)" in capsys.readouterr().err
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    stored = orthanc.series_instances(series_uid)
    assert len(stored) == len(files)


def test_unreachable_pacs_is_one_line_exit_2(tmp_path, derived_series, capsys) -> None:
    files, _ = derived_series
    closed = free_port()  # nobody listens
    start = time.monotonic()
    assert main(["send", str(files[0].parent), "--to", f"127.0.0.1:{closed}:PACS", "--timeout", "2"]) == 2
    assert "cannot reach PACS@127.0.0.1" in _one_line_error(capsys)
    # a host that accepts the connection but never answers (a hung PACS): the timeout bounds the wait
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        assert main(["send", str(files[0].parent), "--to", f"127.0.0.1:{port}:PACS", "--timeout", "1"]) == 2
        assert "no answer within 1 s" in _one_line_error(capsys)
    assert time.monotonic() - start < 15


def test_wrong_called_aet_is_rejected(orthanc, derived_series, capsys) -> None:
    files, _ = derived_series
    node = f"127.0.0.1:{orthanc.dicom_port}"
    code = main(["send", str(files[0].parent), "--to", node, "--aet", "NOT_ORTHANC", "--timeout", "30"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "NOT_ORTHANC" in err, err
    # Orthanc answers A-ASSOCIATE-RJ and closes at once. Now and then its close reaches us as a TCP
    # reset that discards the unread reject (seen once in a fresh-clone run), so the line names the
    # likely cause instead of quoting the PACS. Either way the user is told to look at the AE title.
    quoted = "rejected: Called AE title not recognised (check the called AE title)" in err
    hung_up = "closed the connection without an answer (a wrong called AE title" in err
    assert quoted or hung_up, err


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_refused_instances_are_named_and_the_rest_stored(orthanc, tmp_path, capsys, protocol) -> None:
    """Orthanc refuses an instance without SeriesInstanceUID (C-STORE 0xA700, STOW-RS FailureReason
    0xC000); the others must still arrive."""
    paths = sorted(write_ct_series(tmp_path / "broken", 3))
    for path in paths:  # fresh instance UIDs (the fixture series may be in Orthanc already)
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if path == paths[1]:
            del ds.SeriesInstanceUID
        ds.save_as(path)
    series_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    destination, code, who = {
        "dimse": (orthanc.node, "0xA700", orthanc.aet),
        "dicomweb": (orthanc.dicomweb_url, "0xC000", orthanc.dicomweb_url),
    }[protocol]
    args = ["send", str(tmp_path / "broken"), "--to", destination, "--retries", "1", "--timeout", "5"]
    assert main(args) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and f"1 of 3 instance(s) refused by {who}" in lines[0]
    assert paths[1].name in lines[0] and code in lines[0]
    assert out.out.count("REFUSED") == 1 and out.out.count("stored") == 2
    assert len(orthanc.series_instances(series_uid)) == 2


def test_stow_rs_to_a_url_that_answers_404_with_json_is_one_line(derived_series, capsys) -> None:
    """A real HTTP server answering every POST with 404 and a JSON body (a wrong DICOMweb base URL)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"HttpError": "Not Found", "Message": "Unknown resource"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            """Quiet: the test reports its assertions, not the server's access log."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        files, _ = derived_series
        url = f"http://127.0.0.1:{server.server_address[1]}/wrong/dicom-web"
        code = main(["send", str(files[0].parent), "--to", url, "--retries", "0"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "Unknown resource" in lines[0], err


def _fresh_series(folder, n: int = 2) -> list:
    """A CT series with fresh instance UIDs (the shared Orthanc may hold the fixture's already)."""
    paths = sorted(write_ct_series(folder, n))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)
    return paths


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_a_disc_with_a_dicomdir_is_sent_without_it(orthanc, tmp_path, capsys, protocol) -> None:
    """A CD's folder holds a DICOMDIR (an index with no SOPInstanceUID): it is not an instance to
    store, so ``send`` leaves it out and stores the images (before: an AttributeError traceback)."""
    from pydicom.dataset import FileMetaDataset

    paths = _fresh_series(tmp_path / "cdrom" / "IMAGES")
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index.FileSetID = "DISC"
    index.save_as(tmp_path / "cdrom" / "DICOMDIR", enforce_file_format=True)
    destination = {"dimse": orthanc.node, "dicomweb": orthanc.dicomweb_url}[protocol]
    assert main(["send", str(tmp_path / "cdrom"), "--to", destination]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("stored") == len(paths) and "DICOMDIR" not in out
    assert len(orthanc.series_instances(pydicom.dcmread(paths[0]).SeriesInstanceUID)) == len(paths)


def test_an_instance_the_pacs_accepts_no_context_for_is_named_not_a_traceback(tmp_path, capsys) -> None:
    """A PACS (a real pynetdicom SCP) that takes CT only uncompressed, sent an RLE file: that file is
    "not sent" with the reason, the uncompressed one is stored (before: a ValueError traceback)."""
    stored = []

    def on_store(event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    pacs = AE(ae_title="PLAINPACS")
    pacs.add_supported_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    pacs.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        plain, compressed = _fresh_series(tmp_path / "mixed")
        ds = pydicom.dcmread(compressed)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(compressed)
        assert main(["send", str(tmp_path / "mixed"), "--to", f"127.0.0.1:{port}:PLAINPACS"]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "1 of 2 instance(s) refused" in err, err
    assert "accepted no presentation context" in err and compressed.name in err
    assert stored == [str(pydicom.dcmread(plain).SOPInstanceUID)]
