"""``denoise --dicom --send`` and the ``serve`` DICOM node, end to end with a real Orthanc and the shipped model."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from orthanc_server import free_port
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from serve_node import (
    NODE_AET,
    Node,
    derived_in_orthanc,
    derived_series_count,
    fresh_study,
    jpeg_lossless,
    store,
)

from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue
from IPv2DenoiseLib.io.volumes import read_volume, write_volume


def test_denoise_dicom_then_send(orthanc, tmp_path, capsys) -> None:
    sources = fresh_study(tmp_path / "in")
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    out = tmp_path / "derived"
    code = main(
        ["denoise", str(tmp_path / "in"), str(out), "--dicom", "--series-number", "350"]
        + ["--send", orthanc.node, "--device", "cpu", "--calling-aet", "IPV2TEST"]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list(out.iterdir())) == len(sources)
    back = derived_in_orthanc(orthanc, study_uid, len(sources))
    assert len(back) == len(sources)
    source_uids = {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    for ds in back:
        assert ds.SeriesNumber == 350
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
        default = ModelCatalogue.read().default  # the shipped default names itself
        assert f"model {default} " in ds.DerivationDescription and "sha256" in ds.DerivationDescription


def test_denoise_dicom_from_nrrd_makes_a_new_series(tmp_path, capsys) -> None:
    hu = read_volume(get_testdata_file("CT_small.dcm")).array
    write_volume(Volume(hu.repeat(2, axis=0), spacing=(0.66, 0.66, 2.0)), tmp_path / "ct.nrrd")
    out = tmp_path / "series"
    args = ["denoise", str(tmp_path / "ct.nrrd"), str(out), "--dicom", "--device", "cpu"]
    assert main(args + ["--patient-id", "NRRD-1", "--patient-name", "Test^Nrrd"]) == 0
    files = sorted(out.iterdir())
    ds = pydicom.dcmread(files[0])
    assert len(files) == 2 and ds.PatientID == "NRRD-1" and "SourceImageSequence" not in ds
    assert main(["denoise", str(tmp_path / "ct.nrrd"), str(tmp_path / "x.nrrd"), "--send", "h:1:A"]) == 2
    assert "--send needs --dicom" in capsys.readouterr().err
    assert main(args) == 2  # OUT exists and is not empty: refused before any work
    assert "not an empty folder" in capsys.readouterr().err
    # PACS unreachable after denoising: one line, exit 2, and the series is kept complete in OUT
    kept = tmp_path / "kept"
    closed = f"127.0.0.1:{free_port()}:PACS"
    assert (
        main(["denoise", str(tmp_path / "ct.nrrd"), str(kept), "--dicom", "--send", closed, "--timeout", "2"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot reach PACS@127.0.0.1" in err[-1] and "Traceback" not in "".join(err)
    assert len(list(kept.glob("*.dcm"))) == 2


@pytest.fixture()
def spool(tmp_path) -> Path:
    return tmp_path / "spool"


@pytest.mark.slow
def test_serve_skips_bad_instances_keeps_series_when_pacs_is_down_and_resumes(
    orthanc, tmp_path, spool
) -> None:
    first = fresh_study(tmp_path / "first")
    second = fresh_study(tmp_path / "second", n=3)
    node = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=3)  # the PACS is down
    try:
        wrong = AE(ae_title="MODALITY")
        wrong.add_requested_context(CTImageStorage)
        assert wrong.associate("127.0.0.1", node.port, ae_title="NOT_THE_NODE").is_rejected
        mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        corrupt = pydicom.dcmread(first[0])  # a series of its own: it fails, the good one goes on
        corrupt.SOPInstanceUID, corrupt.SeriesInstanceUID = (
            pydicom.uid.generate_uid(),
            pydicom.uid.generate_uid(),
        )
        corrupt.PixelData = corrupt.PixelData[:100]
        statuses = store(node.port, [mr, corrupt] + [pydicom.dcmread(p) for p in first])
        assert statuses == [0x0000, 0xC210] + [0x0000] * len(first)
        log = node.wait_for("will retry", 60)  # denoised, PACS unreachable: kept, not failed
        assert "skipped a MR instance" in log and "refused a corrupt CT instance" in log
        assert "forward destination not available now" in log
        assert store(node.port, map(pydicom.dcmread, second)) == [0x0000] * 3  # still in its quiet period
    finally:
        assert node.stop() == 0  # SIGTERM: a clean stop
    assert "2 series left in the spool" in node.text()
    assert len(list((spool / "ready").iterdir())) == 1 and len(list((spool / "work").iterdir())) == 1
    (arriving,) = (spool / "incoming").iterdir()
    assert len(list(arriving.glob("*.dcm"))) == len(second)

    node = Node(spool, orthanc.node, quiet=1.0)  # the PACS is back; the next start resumes both
    try:
        back = derived_in_orthanc(orthanc, pydicom.dcmread(first[0]).StudyInstanceUID, len(first))
        assert len(derived_in_orthanc(orthanc, pydicom.dcmread(second[0]).StudyInstanceUID, 3)) == 3
        # two senders at once, each with its own series
        more = [fresh_study(tmp_path / f"sender{i}", n=3) for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(lambda paths: store(node.port, map(pydicom.dcmread, paths)), more))
        assert statuses == [[0x0000] * 3] * 2
        for paths in more:
            assert len(derived_in_orthanc(orthanc, pydicom.dcmread(paths[0]).StudyInstanceUID, 3)) == 3
    finally:
        assert node.stop() == 0
    log = node.text()
    assert "resuming 1 queued and 1 incoming series" in log
    assert log.count("; noise ") == 4
    assert len(back) == len(first)
    leftovers = [p for d in ("incoming", "ready", "work") for p in (spool / d).iterdir()]
    assert not leftovers, (leftovers, log)
    (junk,) = (spool / "failed").iterdir()  # the corrupt instance's series, refused and never sent again
    assert junk.name.startswith(str(corrupt.SeriesInstanceUID))
    assert "1 instance(s) were refused (0xC210, " in (junk / "reason.txt").read_text()


def test_a_full_forward_pacs_is_retried_with_the_same_uids(tmp_path, spool) -> None:
    """The forward PACS (a real pynetdicom Storage SCP) stores two instances, then answers 0xA700
    "Out of Resources" for longer than the node's ``--retries``: the series is kept, not failed, and
    once the PACS has room the same derived instances (same UIDs) go again. (Before, the series
    failed after ~3 s and the two stored instances stayed in the PACS as a partial derived series.)"""
    from pynetdicom import evt

    stored: dict[str, pydicom.Dataset] = {}
    refused: set[str] = set()
    full = True

    def on_store(event) -> int:
        ds = event.dataset
        if full and len(stored) >= 2:
            refused.add(str(ds.SOPInstanceUID))
            return 0xA700
        stored[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    pacs = AE(ae_title="FULLPACS")
    pacs.add_supported_context(CTImageStorage)
    pacs.add_supported_context("1.2.840.10008.1.1")  # Verification: the node C-ECHOes first
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    series = fresh_study(tmp_path / "in", n=4)
    node = Node(
        spool, f"127.0.0.1:{port}:FULLPACS", quiet=1.0, extra=["--retries", "1", "--retry-seconds", "1"]
    )
    try:
        assert store(node.port, map(pydicom.dcmread, series)) == [0x0000] * len(series)
        log = node.wait_for("will retry", 60)
        assert "denoised, but 2 of 4 instance(s) refused" in log and "0xA700" in log, log
        assert "FAILED" not in log and not list((spool / "failed").iterdir())
        assert len(stored) == 2 and len(refused) == 2
        first_try = set(stored) | refused
        full = False  # room again
        node.wait_for("sent 4 to", 60)
    finally:
        assert node.stop() == 0
        server.shutdown()
    assert set(stored) == first_try  # the same derived instances, not a second series
    assert len({str(ds.SeriesInstanceUID) for ds in stored.values()}) == 1
    assert not [p for d in ("incoming", "ready", "work", "failed") for p in (spool / d).iterdir()]


def test_a_second_node_on_one_spool_is_refused(tmp_path, spool) -> None:
    """One node per spool: a second one would clear the first one's work/ and tmp/ and send its
    queued series again. It exits 2 with one line naming the holder, and touches nothing."""
    import os
    import subprocess
    import sys

    from serve_node import LIB

    first = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=5)
    try:
        in_progress = spool / "work" / "a-derived-series-being-written"
        in_progress.mkdir()
        second = subprocess.run(
            [sys.executable, "-m", "IPv2DenoiseLib", "serve", "--port", str(free_port()), "--aet", NODE_AET]
            + ["--forward", f"127.0.0.1:{free_port()}:PACS", "--spool", str(spool), "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(LIB)},
        )
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "in use by another node" in errors[0], second.stderr
        assert f"pid {first.process.pid}" in errors[0] and "Traceback" not in second.stderr
        assert in_progress.is_dir()  # the first node's work is untouched
        assert first.process.poll() is None
    finally:
        assert first.stop() == 0
    again = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=5)  # released by the stop
    assert again.stop() == 0


def test_orthanc_sends_study_to_serve_and_gets_the_derived_series(orthanc, tmp_path, spool) -> None:
    sources = fresh_study(tmp_path / "in", n=8)
    for path in sources:
        orthanc.post_bytes("/instances", path.read_bytes())
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    (study,) = [i for i in orthanc.post("/tools/lookup", study_uid) if i["Type"] == "Study"]
    node = Node(spool, orthanc.node, quiet=1.0)
    try:
        orthanc.add_modality("ipv2node", NODE_AET, node.port)
        job = orthanc.post("/modalities/ipv2node/store", study["ID"])
        assert job["InstancesCount"] == len(sources) and job["FailedInstancesCount"] == 0
        log = node.wait_for("; noise ", 90)
        back = derived_in_orthanc(orthanc, study_uid, len(sources))
    finally:
        assert node.stop() == 0
    line = next(line for line in log.splitlines() if "; noise " in line)
    assert "received 8 instance(s) from ORTHANC" in line and f"sent 8 to {orthanc.aet}" in line
    before, after = (float(v) for v in line.split("noise ")[1].removesuffix(" HU").split(" -> "))
    assert after < before
    source_uids = {pydicom.dcmread(p).SOPInstanceUID for p in sources}
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in back} == source_uids
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in back)
    leftovers = [p for d in ("incoming", "ready", "work", "failed") for p in (spool / d).iterdir()]
    assert not leftovers, (leftovers, log)


@pytest.mark.slow
def test_serve_accepts_only_allowed_peers_caps_instances_and_takes_compressed_ct(
    orthanc, tmp_path, spool, capsys
) -> None:
    sources = fresh_study(tmp_path / "in", n=4)
    allow = ["--allow-aet", "MODALITY", "--allow-aet", "SCANNER2", "--allow-host", "127.0.0.1"]
    node = Node(spool, orthanc.node, quiet=1.0, host=None, extra=allow + ["--max-instance-mb", "0.1"])
    try:
        log = node.text()
        assert "accepting from calling AE MODALITY, SCANNER2 at 127.0.0.1/32; instances up to 0.1 MB" in log
        assert (
            f"listening as {NODE_AET} on 127.0.0.1:{node.port}" in log
        )  # loopback unless --host says otherwise
        stranger = AE(ae_title="INTRUDER")
        stranger.add_requested_context(CTImageStorage)
        assoc = stranger.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_rejected
        answer = (
            assoc.acceptor.primitive
        )  # rejected permanent, by the service user: calling AE not recognised
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
        other_host = AE(ae_title="MODALITY")
        other_host.add_requested_context(CTImageStorage)
        assoc = other_host.associate("127.0.0.1", node.port, ae_title=NODE_AET, bind_address=("127.0.0.2", 0))
        assert assoc.is_rejected and assoc.acceptor.primitive.result == 0x01
        # compressed as scanners send it (RLE, JPEG lossless), one corrupt compressed and one too large instance
        rle = [pydicom.dcmread(p) for p in sources]
        for ds in rle:
            ds.compress(pydicom.uid.RLELossless)
        junk_series = pydicom.uid.generate_uid()  # refused instances of their own series (see below)
        broken = pydicom.dcmread(sources[0])
        broken.SOPInstanceUID, broken.SeriesInstanceUID = pydicom.uid.generate_uid(), junk_series
        broken.compress(pydicom.uid.RLELossless)
        broken.PixelData = broken.PixelData[:-2000]
        large = pydicom.dcmread(sources[0])
        large.SOPInstanceUID, large.SeriesInstanceUID = pydicom.uid.generate_uid(), junk_series
        large.add_new(0x00091010, "OB", bytes(120_000))
        large.compress(pydicom.uid.RLELossless)
        bomb = pydicom.dcmread(sources[0])  # 30 kB of RLE declaring 128 MB of pixels: refused undecoded
        bomb.SOPInstanceUID, bomb.SeriesInstanceUID = pydicom.uid.generate_uid(), junk_series
        bomb.compress(pydicom.uid.RLELossless)
        bomb.Rows = bomb.Columns = 8192
        statuses = store(node.port, [broken, large, bomb, *rle], transfer_syntax=pydicom.uid.RLELossless)
        assert statuses == [0xC210, 0xA700, 0xA700] + [0x0000] * len(rle)
        back = derived_in_orthanc(orthanc, rle[0].StudyInstanceUID, len(rle))
        jpeg = jpeg_lossless(fresh_study(tmp_path / "jpeg", n=3), tmp_path / "jpeg-lossless")
        assert {str(ds.file_meta.TransferSyntaxUID) for ds in jpeg} == {pydicom.uid.JPEGLosslessSV1}
        assert store(node.port, jpeg, transfer_syntax=pydicom.uid.JPEGLosslessSV1) == [0x0000] * 3
        assert len(derived_in_orthanc(orthanc, jpeg[0].StudyInstanceUID, 3)) == 3
        log = node.wait_for("; noise ", 30, count=2)
    finally:
        assert node.stop() == 0
    assert "rejected an association from INTRUDER@127.0.0.1: calling AE not in --allow-aet" in log
    assert "rejected an association from MODALITY@127.0.0.2: host not in --allow-host" in log
    assert "larger than --max-instance-mb 0.1" in log and "refused a corrupt CT instance" in log
    assert "decoded pixel data of 128 MB, larger than --max-instance-mb 0.1" in log
    assert "Traceback" not in log  # one line per event, nothing of pydicom's decoder tracebacks
    (junk,) = (spool / "failed").iterdir()  # both refusals are remembered for their series
    assert (
        junk.name.startswith(junk_series)
        and "3 instance(s) were refused" in (junk / "reason.txt").read_text()
    )
    assert len(back) == len(rle)
    # the warnings reach the log and the derived series, worded exactly as `denoise` prints them
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "d.nrrd"), "--device", "cpu"]) == 0
    printed = [line.removeprefix("warning: ") for line in capsys.readouterr().err.splitlines()]
    warnings = [line for line in printed if "training range" in line or "truncated" in line]
    assert warnings, printed
    for message in warnings:
        assert f"warning: {message}" in log
        assert all(message in ds.DerivationDescription for ds in back)


def test_a_refused_instance_keeps_its_series_back_until_it_is_sent_again(orthanc, tmp_path, spool) -> None:
    """ "Never forwards a partial series" holds for a corrupt instance and one over the cap too, as
    for a full spool: a series with a refused instance fails with the reason, also after a restart
    (a missing end slice would pass every later check), and the same instance sent again,
    readable and within the cap, clears it."""
    kept_back = fresh_study(tmp_path / "kept-back", n=3)
    mended = fresh_study(tmp_path / "mended", n=3)
    cap = ["--max-instance-mb", "0.1"]
    node = Node(spool, orthanc.node, quiet=60.0, extra=cap)  # stopped within its quiet period
    try:
        last = pydicom.dcmread(kept_back[-1])
        last.PixelData = last.PixelData[:100]  # the series' own last slice, truncated
        statuses = store(node.port, [*map(pydicom.dcmread, kept_back[:-1]), last])
        assert statuses == [0x0000, 0x0000, 0xC210]
    finally:
        assert node.stop() == 0
    node = Node(spool, orthanc.node, quiet=2.0, extra=cap)  # resumes the series and its refusal
    try:
        big = pydicom.dcmread(mended[0])
        big.add_new(0x00091010, "OB", bytes(120_000))  # over the 0.1 MB cap
        assert store(node.port, [big]) == [0xA700]
        assert store(node.port, map(pydicom.dcmread, mended)) == [0x0000] * 3  # sent again, within the cap
        back = derived_in_orthanc(orthanc, pydicom.dcmread(mended[0]).StudyInstanceUID, 3)
        log = node.wait_for("was not denoised", 30)
    finally:
        assert node.stop() == 0
    assert "resuming 0 queued and 1 incoming series" in log and len(back) == 3
    assert derived_series_count(orthanc, str(last.StudyInstanceUID)) == []  # nothing forwarded
    (failed,) = (spool / "failed").iterdir()
    reason = (failed / "reason.txt").read_text()
    assert failed.name.startswith(str(last.SeriesInstanceUID)) and str(last.SOPInstanceUID) in reason
    assert "1 instance(s) were refused (0xC210, pixel data too short)" in reason
    assert "send the whole series again once the refused instance is readable" in reason


def test_an_instance_far_over_the_cap_is_stopped_while_it_arrives(tmp_path, spool) -> None:
    """pynetdicom holds a whole message in memory before the C-STORE handler runs: a 64 MB
    "instance" against a 0.1 MB cap is aborted after about 1.1 MB, the node's peak memory does not
    grow by the instance, the next association stores as before, and the instance's series is
    kept back (never forwarded without it)."""
    sources = fresh_study(tmp_path / "in", n=2)
    node = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=2, extra=["--max-instance-mb", "0.1"])
    try:
        status = Path(f"/proc/{node.process.pid}/status")  # VmHWM: the node's peak resident memory

        def peak_rss() -> int:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024

        before = peak_rss()
        huge = pydicom.dcmread(sources[0])
        huge.SOPInstanceUID = pydicom.uid.generate_uid()
        huge.PixelData = bytes(64 * 2**20)  # the bulk where a scanner's is: after the header
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        answer = assoc.send_c_store(huge)
        assert "Status" not in answer  # no answer: the node aborted the association
        log = node.wait_for("aborted the association with MODALITY@127.0.0.1", 30)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established
        assert "an instance passed 1.1 MB while arriving (cap 0.1 MB)" in log
        assert peak_rss() - before < 32 * 2**20  # without the abort: +258 MB for a 256 MB instance
        # the node serves on: the series' other instance is stored, and the series is kept back
        # (its header, in the first 64 KB that arrived, named it)
        assert store(node.port, [pydicom.dcmread(sources[1])]) == [0x0000]
        log = node.wait_for("was not denoised", 30)
    finally:
        assert node.stop() == 0
    (failed,) = (spool / "failed").iterdir()
    reason = (failed / "reason.txt").read_text()
    assert failed.name.startswith(str(huge.SeriesInstanceUID)) and str(huge.SOPInstanceUID) in reason
    assert "(aborted while arriving, over --max-instance-mb 0.1)" in reason


def _tree(folder: Path, *, leave_out: tuple[Path, ...]) -> dict[str, str]:
    """Every path under ``folder`` (apart from those under ``leave_out``) and its file's sha256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_file()
        else "dir"
        for path in folder.rglob("*")
        if not any(path == out or out in path.parents for out in leave_out)
    }


def test_instances_with_hostile_uids_are_refused_and_nothing_lands_outside_the_spool(
    tmp_path, monkeypatch
) -> None:
    """The node names spool files by the peer's UIDs: a SeriesInstanceUID or SOPInstanceUID of
    '../../../escaped' would put the instance, or the refusal marker of one over --max-instance-mb
    (named from its header alone), outside the spool. A readable one is refused with 0xC210 and a
    line naming the invalid UID, a too large one with 0xA700, and nothing is written outside the
    spool (the spool sits two folders down in tmp_path, so each '..' path would land in tmp_path)."""
    for mode in ("reading_validation_mode", "writing_validation_mode"):  # as a hostile peer writes them
        monkeypatch.setattr(pydicom.config.settings, mode, pydicom.config.IGNORE)
    spool, logs = tmp_path / "site" / "node" / "spool", tmp_path / "logs"
    spool.parent.mkdir(parents=True)
    logs.mkdir()
    (source,) = fresh_study(tmp_path / "in", n=1)
    hostile = "../../../escaped"

    def instance(
        *, series: str | None = None, sop: str | None = None, large: bool = False
    ) -> pydicom.Dataset:
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series or pydicom.uid.generate_uid()
        ds.SOPInstanceUID = sop or pydicom.uid.generate_uid()
        if large:
            ds.add_new(0x00091010, "OB", bytes(120_000))  # over the 0.1 MB cap
        return ds

    sent = [
        instance(series=hostile),
        instance(sop=hostile),
        instance(series=hostile, large=True),
        instance(sop=hostile, large=True),
    ]
    before = _tree(tmp_path, leave_out=(spool, logs))
    closed = f"127.0.0.1:{free_port()}:PACS"
    node = Node(spool, closed, quiet=60, extra=["--max-instance-mb", "0.1"], log_dir=logs)
    try:
        statuses = store(node.port, sent)
    finally:
        assert node.stop() == 0
    log = node.text()
    assert statuses == [0xC210, 0xC210, 0xA700, 0xA700], log
    invalid = [
        line for line in log.splitlines() if "refused a corrupt instance from MODALITY@127.0.0.1" in line
    ]
    assert len(invalid) == 2 and all("invalid UID" in line and repr(hostile) in line for line in invalid), log
    assert log.count("larger than --max-instance-mb 0.1") == 2 and "Traceback" not in log
    assert _tree(tmp_path, leave_out=(spool, logs)) == before  # nothing outside the spool
    assert not [p for p in spool.rglob("*") if "escaped" in p.name]


def test_serve_without_allow_lists_says_so_loudly_and_hints_name_its_own_options(
    tmp_path, spool, capsys
) -> None:
    node = Node(spool, f"127.0.0.1:{free_port()}:PACS", quiet=1.0, host=None)
    try:
        warning = next(line for line in node.text().splitlines() if "accepting from" in line)
        failed = next(line for line in node.text().splitlines() if "failed series" in line)
    finally:
        assert node.stop() == 0
    assert "WARNING" in warning and "ANY calling AE" in warning and "any host" in warning
    # failed series hold patient data and fill the disk: by default they go a month after they failed
    assert (
        f"{spool / 'failed'} holds 0 failed series (0.0 MB); each is deleted 30 day(s) after it failed"
        in failed
    )
    never = ["--forward", "pacs:104:PACS", "--keep-failed-days", "0"]
    with pytest.raises(SystemExit) as exited:  # argparse: one usage line, exit status 2
        main(["serve", "--port", "11112", "--aet", "NODE", *never])
    assert exited.value.code == 2
    assert "expected a number of days > 0 or 'forever', got '0'" in capsys.readouterr().err
    assert main(["serve", "--port", "11112", "--aet", "NODE", "--forward", "pacs:104"]) == 2
    err = capsys.readouterr().err
    assert "expected HOST:PORT:AET" in err and "--aet" not in err
    bad_host = ["--forward", "pacs:104:PACS", "--allow-host", "pacs.example.org"]
    assert main(["serve", "--port", "11112", "--aet", "NODE", *bad_host]) == 2
    assert "--allow-host 'pacs.example.org': expected an IP address or network" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_fails_mixed_patients_and_gaps_naming_the_final_path_and_its_own_remedy(
    orthanc, tmp_path, spool
) -> None:
    mixed = [pydicom.dcmread(p) for p in fresh_study(tmp_path / "mixed", n=4)]
    for ds in mixed[2:]:
        ds.PatientID = "SOMEONE-ELSE"
    gapped = [pydicom.dcmread(p) for p in fresh_study(tmp_path / "gapped", n=5)]
    del gapped[2]  # a slice missing in the middle
    node = Node(spool, orthanc.node, quiet=1.0)
    try:
        assert store(node.port, mixed + gapped) == [0x0000] * 8
        node.wait_for("FAILED", 60, count=2)
    finally:
        assert node.stop() == 0
    failed_lines = [line for line in node.text().splitlines() if "FAILED" in line]
    assert len(failed_lines) == 2
    by_series = {line.split("series ")[1].split(":")[0]: line for line in failed_lines}
    mixed_line, gap_line = by_series[mixed[0].SeriesInstanceUID], by_series[gapped[0].SeriesInstanceUID]
    for line in (mixed_line, gap_line):
        assert str(spool / "ready") not in line and str(spool / "failed") in line  # the path after the move
    assert "mixes two patients" in mixed_line and "SOMEONE-ELSE" in mixed_line
    assert "--resample-gaps" in gap_line and "those are options of `ipv2-denoise denoise`" in gap_line
    for folder in (spool / "failed").iterdir():
        assert str(spool / "ready") not in (folder / "reason.txt").read_text()
    assert derived_series_count(orthanc, mixed[0].StudyInstanceUID) == []
