"""The node's spool under a full disk and kills: never a partial series forwarded, never an acknowledged one lost.

A real ``ipv2-denoise serve`` child process, a real Orthanc, a real 2 MB tmpfs for the full disk
(root only; skipped with the reason otherwise) and SIGKILL at each step of a series' life (the
node's fault injection, ``IPV2DENOISE_NODE_KILL_AT``, makes the kill land exactly there).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from orthanc_server import free_port
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from serve_node import NODE_AET, Node, derived_in_orthanc, derived_series_count, fresh_study, store

from IPv2DenoiseLib.app.dicom_node import KILL_AT_ENV

#: Each test here takes more than ~20 s on 2 CPU cores (a real Orthanc, a tmpfs spool, kills).
pytestmark = pytest.mark.slow

SPOOL_DIRS = ("incoming", "ready", "work", "failed")


@pytest.fixture()
def small_disk(tmp_path) -> Path:
    """A 2 MB tmpfs (unmounted afterwards); skipped when mounting is not permitted here."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_instances: int, instance_bytes: int) -> Path:
    """Fill ``disk`` so that about ``leave_instances`` more instances fit."""
    page = os.statvfs(disk).f_frsize
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    per_instance = math.ceil(instance_bytes / page) * page
    filler = disk / "filler"
    filler.write_bytes(bytes(max(0, free - leave_instances * per_instance - page // 2 - 2 * page)))
    return filler


def _fill_up(path: Path) -> None:
    """Write to ``path`` until the disk is full (tmpfs allocates whole pages)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(fd)


def _leftovers(spool: Path) -> list[Path]:
    return [p for d in SPOOL_DIRS for p in (spool / d).iterdir()]


def test_full_spool_answers_out_of_resources_and_never_forwards_a_partial_series(
    orthanc, tmp_path, small_disk
) -> None:
    spool = small_disk / "spool"
    big = fresh_study(tmp_path / "big", n=24)
    instance_bytes = big[0].stat().st_size
    node = Node(spool, orthanc.node, quiet=2.0, log_dir=tmp_path)
    try:
        filler = _fill(small_disk, 16, instance_bytes)
        statuses = store(node.port, map(pydicom.dcmread, big))
        stored = statuses.count(0x0000)
        assert 0 < stored < len(big) and set(statuses) == {0x0000, 0xA700}, statuses
        assert statuses == sorted(statuses), statuses  # stored until the disk was full, then refused
        log = node.wait_for("FAILED", 30)
        assert "refused instance" in log and "0xA700 Out of Resources" in log
        failed_line = next(line for line in log.splitlines() if "FAILED" in line)
        assert f"received {stored} instance(s)" in failed_line and "not denoised" in failed_line
        (failed,) = (spool / "failed").iterdir()
        assert str(failed) in failed_line and (failed / "reason.txt").exists()
        # the quiet-period thread lives on: with room again, the next series is forwarded
        filler.unlink()
        next_series = fresh_study(tmp_path / "next", n=3)
        assert store(node.port, map(pydicom.dcmread, next_series)) == [0x0000] * 3
        derived_in_orthanc(orthanc, pydicom.dcmread(next_series[0]).StudyInstanceUID, 3)
        # refused again, then killed before its quiet period ended: after the restart it is not forwarded
        again = fresh_study(tmp_path / "again", n=24)
        filler = _fill(small_disk, 16, instance_bytes)
        statuses = store(node.port, map(pydicom.dcmread, again))
        assert 0 < statuses.count(0x0000) < len(again) and 0xC211 not in statuses
    finally:
        node.kill()
    _fill_up(small_disk / "last-bytes")  # not even reason.txt fits now
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path)
    try:
        log = node.wait_for("FAILED", 30)
    finally:
        assert node.stop() == 0
    assert "resuming 0 queued and 1 incoming series" in log and "were refused (0xA700, spool full)" in log
    failed_line = next(line for line in log.splitlines() if "FAILED" in line)
    assert f"kept in {spool / 'failed'}" in failed_line and "could not write" in log
    assert derived_series_count(orthanc, pydicom.dcmread(big[0]).StudyInstanceUID) == []
    assert derived_series_count(orthanc, pydicom.dcmread(again[0]).StudyInstanceUID) == []
    assert len(list((spool / "failed").iterdir())) == 2


def test_refused_instances_sent_again_after_the_series_failed_complete_it(
    orthanc, tmp_path, small_disk
) -> None:
    """A PACS answered 0xA700 retries the refused instances only, often after the node's quiet
    period has failed the series. They re-open the failed series and complete it: one derived
    series with every slice is forwarded. (Before, the retried instances alone became a series of
    their own and were forwarded: a partial derived series in the PACS.)"""
    spool = small_disk / "spool"
    series = fresh_study(tmp_path / "retried", n=16)
    study = pydicom.dcmread(series[0]).StudyInstanceUID
    node = Node(spool, orthanc.node, quiet=2.0, log_dir=tmp_path)
    try:
        filler = _fill(small_disk, 10, series[0].stat().st_size)
        statuses = store(node.port, map(pydicom.dcmread, series))
        refused = [path for path, status in zip(series, statuses) if status == 0xA700]
        assert 0 < len(refused) < len(series) and set(statuses) == {0x0000, 0xA700}, statuses
        node.wait_for("FAILED", 30)
        assert len(list((spool / "failed").iterdir())) == 1
        filler.unlink()  # room again; the sender retries what was refused, and only that
        assert store(node.port, map(pydicom.dcmread, refused)) == [0x0000] * len(refused)
        derived = derived_in_orthanc(orthanc, study, len(series))
        log = node.wait_for(f"sent {len(series)} to", 60)
        assert f"{len(series) - len(refused)} instance(s) acknowledged, {len(refused)} refused" in log
    finally:
        assert node.stop() == 0
    assert derived_series_count(orthanc, study) == [len(series)]  # one derived series, whole
    assert len({ds.SeriesInstanceUID for ds in derived}) == 1
    assert list((spool / "failed").iterdir()) == [] and list((spool / "incoming").iterdir()) == []


def _store_until_killed(port: int, datasets) -> list[int]:
    """C-STORE one by one; stop at the first instance without an answer (the node was killed)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if "Status" not in status:
            break
        statuses.append(status.Status)
    if assoc.is_established:
        assoc.release()
    return statuses


@pytest.mark.slow
@pytest.mark.parametrize("step", ["received", "denoised", "sent", "cleanup"])
def test_a_kill_at_any_step_still_delivers_one_complete_derived_series(orthanc, tmp_path, step) -> None:
    spool = tmp_path / "spool"
    sources = fresh_study(tmp_path / "in", n=4)
    study_uid = pydicom.dcmread(sources[0]).StudyInstanceUID
    node = Node(spool, orthanc.node, quiet=1.0, env={KILL_AT_ENV: step})
    statuses = _store_until_killed(node.port, map(pydicom.dcmread, sources))
    assert node.wait_killed() == -9, node.text()
    if step == "received":  # killed before acknowledging the first instance: the sender sends again
        assert statuses == []
        assert len(list((spool / "incoming").iterdir())) == 1  # the unacknowledged file is there ...
    else:
        assert statuses == [0x0000] * len(sources)
    node = Node(spool, orthanc.node, quiet=1.0)
    try:
        if step == "received":
            assert store(node.port, map(pydicom.dcmread, sources)) == [0x0000] * len(sources)
        if step != "cleanup":
            log = node.wait_for("; noise ", 60)
        back = derived_in_orthanc(orthanc, study_uid, len(sources))
    finally:
        assert node.stop() == 0
    log = node.text()
    assert "FAILED" not in log
    assert derived_series_count(orthanc, study_uid) == [len(sources)]  # one series, complete, never a second
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in back} == {
        pydicom.dcmread(p).SOPInstanceUID for p in sources
    }
    assert not _leftovers(spool), log
    assert not list((spool / "tmp").iterdir())


def test_no_room_for_the_derived_series_is_retried_not_failed(orthanc, tmp_path, small_disk) -> None:
    spool = small_disk / "spool"
    sources = fresh_study(tmp_path / "in", n=4)
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path, extra=["--retry-seconds", "1"])
    try:
        filler = _fill(
            small_disk, 5, sources[0].stat().st_size
        )  # room for the series, not for its derived copy
        assert store(node.port, map(pydicom.dcmread, sources)) == [0x0000] * 4
        log = node.wait_for("will retry", 60)
        assert "no space left in the spool" in log and "FAILED" not in log
        filler.unlink()
        back = derived_in_orthanc(orthanc, pydicom.dcmread(sources[0]).StudyInstanceUID, 4)
        node.wait_for("; noise ", 30)
    finally:
        assert node.stop() == 0
    assert len(back) == 4 and not _leftovers(spool)


def _reason_of(spool: Path, log: str, number: int) -> str:
    """The ``reason.txt`` of the ``number``-th failed series (in order of failure), checked against
    its one log line, which names the folder it was moved to."""
    failed = sorted((spool / "failed").iterdir(), key=lambda f: int(f.name.rsplit(".", 1)[1]))[number]
    reason = (failed / "reason.txt").read_text().strip()
    line = next(line for line in log.splitlines() if f"kept in {failed})" in line)
    assert "FAILED" in line and reason in line and "\n" not in reason
    return reason


def test_late_instances_of_a_series_never_become_a_second_partial_derived_series(orthanc, tmp_path) -> None:
    """A sender cut off for longer than the quiet period, or one re-sending a few instances, used to
    get its late instances denoised and forwarded as a derived series of their own: a 2-slice
    "denoised" series in the PACS beside the 3-slice one, which a radiologist could take for the
    scan. Now a batch that lacks instances of an earlier batch of its series (queued, or forwarded:
    the node's record of it outlives kill -9) is failed with a reason saying what happened and what
    to do; the whole series sent again is denoised and forwarded as one complete derived series."""
    spool = tmp_path / "spool"
    series = fresh_study(tmp_path / "in", n=5)
    head = pydicom.dcmread(series[0])
    study, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    # the PACS is down: the first 3 instances are denoised and wait in ready/; 2 more arrive late
    down = f"127.0.0.1:{free_port()}:PACS"
    node = Node(spool, down, quiet=1.0, log_dir=tmp_path, extra=["--retry-seconds", "600"])
    try:
        assert store(node.port, map(pydicom.dcmread, series[:3])) == [0x0000] * 3
        node.wait_for("will retry", 60)
        assert store(node.port, map(pydicom.dcmread, series[3:])) == [0x0000] * 2
        log = node.wait_for("FAILED", 60)
    finally:
        node.kill()
    reason = _reason_of(spool, log, 0)
    assert reason.startswith(f"2 instance(s) arrived after series {series_uid} was complete at ")
    assert "with 3 instance(s), queued to be denoised; 2 of them are not in it" in reason
    assert "they were not forwarded as a partial series; send the whole series again" in reason
    # the PACS is back: the queued 3 go (a partial series, but forwarded before the late ones came)
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path)
    try:
        first = derived_in_orthanc(orthanc, study, 3)
        node.wait_for("sent 3 to", 60)
    finally:
        node.kill()  # kill -9 right after: the record of the forwarded series is on disk
    record = json.loads((spool / "forwarded" / f"{series_uid}.json").read_text())
    assert record["derived_series_uid"] == first[0].SeriesInstanceUID
    assert sorted(record["instances"]) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in series[:3])
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path)
    try:
        # the sender retries the late 2 again: still not a derived series of their own
        assert store(node.port, map(pydicom.dcmread, series[3:])) == [0x0000] * 2
        node.wait_for("FAILED", 60)
        # the whole series sent again: one complete derived series
        assert store(node.port, map(pydicom.dcmread, series)) == [0x0000] * 5
        whole = derived_in_orthanc(orthanc, study, 5)
        node.wait_for("sent 5 to", 60)
        # one instance of it sent once more: nothing missing, nothing forwarded
        assert store(node.port, [pydicom.dcmread(series[0])]) == [0x0000]
        log = node.wait_for("FAILED", 60, count=2)
    finally:
        assert node.stop() == 0
    assert sorted(derived_series_count(orthanc, study)) == [3, 5]  # never a 2- or 1-instance one
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in whole} == {
        pydicom.dcmread(p).SOPInstanceUID for p in series
    }
    reason = _reason_of(spool, log, 1)
    assert reason.startswith(
        f"2 instance(s) arrived after series {series_uid} was denoised and forwarded at "
    )
    derived = f"derived series number {first[0].SeriesNumber}"
    assert (
        f"as {derived} (UID {first[0].SeriesInstanceUID}, 3 instance(s)); 2 of them are not in it" in reason
    )
    assert f"send the whole series again to get one complete derived series (then delete {derived}" in reason
    assert f"series {series_uid}: sent again whole (5 instance(s)" in log
    reason = _reason_of(spool, log, 2)
    assert f"(UID {whole[0].SeriesInstanceUID}, 5 instance(s)); all of them are in it already" in reason
    assert not [p for d in ("incoming", "ready", "work") for p in (spool / d).iterdir()]


def test_failed_series_are_deleted_keep_failed_days_after_they_failed(orthanc, tmp_path) -> None:
    """failed/ holds patient data and was never emptied: a node running for months filled its disk.
    At start the node deletes the failed series older than --keep-failed-days (one log line each)
    and says how many it holds and their size; while it runs it deletes each in turn once its
    days are over, by when it failed (not when it arrived). A folder there that is not one of its
    series is the operator's and left alone; a forwarded series' record is forgotten after 7 days."""
    spool = tmp_path / "spool"
    failed = spool / "failed"

    def failed_earlier(name: str, days_ago: float) -> Path:
        """A failed series as a node leaves it: its instances and reason.txt, failed ``days_ago``."""
        paths = fresh_study(tmp_path / name, n=2)
        folder = failed / f"{pydicom.dcmread(paths[0]).SeriesInstanceUID}.{time.time_ns()}"
        folder.mkdir(parents=True)
        for path in paths:
            shutil.copy(path, folder / f"{pydicom.dcmread(path).SOPInstanceUID}.dcm")
        (folder / "reason.txt").write_text("a slice is missing\n")
        when = time.time() - days_ago * 86400
        for path in (folder / "reason.txt", folder):
            os.utime(path, (when, when))
        return folder

    old = failed_earlier("old", days_ago=40)
    recent = failed_earlier("recent", days_ago=0)
    operator = failed / "operator-notes"
    operator.mkdir()
    os.utime(operator, (time.time() - 90 * 86400,) * 2)
    record = spool / "forwarded" / "1.2.3.4.json"
    record.parent.mkdir()
    record.write_text("{}")
    os.utime(record, (time.time() - 8 * 86400,) * 2)
    recent_mb = f"{sum(f.stat().st_size for f in recent.iterdir()) / 2**20:.1f} MB"
    keep = 60 / 86400  # a minute, so that the test sees one go
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path, extra=["--keep-failed-days", f"{keep:.6g}"])
    try:
        log = node.text()
        deleted = next(line for line in log.splitlines() if "deleted the failed series" in line)
        assert f"deleted the failed series {old} (3 file(s), " in deleted
        assert f"more than {keep:.6g} day(s) ago (--keep-failed-days)" in deleted
        holds = next(line for line in log.splitlines() if f"{failed} holds" in line)
        assert (
            f"{failed} holds 1 failed series ({recent_mb}); each is deleted {keep:.6g} day(s) after it failed"
            in holds
        )
        assert log.index(deleted) < log.index(holds) < log.index("listening as")
        assert "forgot 1 series forwarded more than 7 day(s) ago" in log
        assert not old.exists() and recent.exists() and not record.exists()
        # a series the node fails now: deleted a minute after it failed, as the one planted before start
        fresh = [pydicom.dcmread(p) for p in fresh_study(tmp_path / "corrupt", n=2)]
        fresh[1].PixelData = fresh[1].PixelData[:100]
        assert store(node.port, fresh) == [0x0000, 0xC210]
        node.wait_for("FAILED", 30)
        (failed_now,) = [f for f in failed.iterdir() if f.name.startswith(str(fresh[0].SeriesInstanceUID))]
        node.wait_for(f"deleted the failed series {recent} ", 90)
        assert failed_now.exists()  # failed after the planted one: its days are not over yet
        log = node.wait_for(f"deleted the failed series {failed_now} ", 90)
    finally:
        assert node.stop() == 0
    assert list(failed.iterdir()) == [operator]
    assert "could not delete" not in log and "Traceback" not in log


def _line_of(log: str, needle: str) -> str:
    """The first log line holding ``needle``."""
    return next(line for line in log.splitlines() if needle in line)


def test_late_instances_of_a_failed_series_never_become_a_partial_derived_series(orthanc, tmp_path) -> None:
    """A series that failed (its first 3 instances mix two patients) and whose last 2 instances
    arrive after its quiet period: before, those 2 became a series of their own, denoised and
    forwarded, a 2-slice "denoised" series in the PACS. Now they fail as late instances of the
    failed series, as those of a forwarded one do, in one line saying to send the whole series
    again; the whole series sent again, mended, is forwarded as one complete derived series."""
    spool = tmp_path / "spool"
    paths = fresh_study(tmp_path / "in", n=5)
    head = pydicom.dcmread(paths[0])
    study, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    mixed = [pydicom.dcmread(p) for p in paths[:3]]
    mixed[2].PatientID = "SOMEONE-ELSE"
    late_line = f"series {series_uid}: received 2 instance(s)"
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path)
    try:
        assert store(node.port, mixed) == [0x0000] * 3
        node.wait_for("FAILED", 60)
        (first_failed,) = (spool / "failed").iterdir()
        assert store(node.port, map(pydicom.dcmread, paths[3:])) == [0x0000] * 2  # cut off, then the rest
        late = _line_of(node.wait_for(late_line, 60), late_line)
        assert "FAILED" in late, late  # not denoised and forwarded on their own
        assert store(node.port, map(pydicom.dcmread, paths)) == [0x0000] * 5  # the whole series, mended
        whole = derived_in_orthanc(orthanc, study, 5)
        log = node.wait_for("sent 5 to", 60)
    finally:
        assert node.stop() == 0
    assert derived_series_count(orthanc, study) == [5]  # never a 2-instance one
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in whole} == {
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    }
    assert "mixes two patients" in _reason_of(spool, log, 0)
    reason = _reason_of(spool, log, 1)
    assert reason.startswith(f"2 instance(s) arrived after series {series_uid} failed at ")
    assert (
        f"with 3 instance(s) (kept in {first_failed}, why in reason.txt); 2 of them are not in it" in reason
    )
    assert "they were not forwarded as a partial series; send the whole series again" in reason
    assert f"delete {first_failed} first" in reason
    assert f"series {series_uid}: sent again whole (5 instance(s)" in log
    assert not [p for d in ("incoming", "ready", "work") for p in (spool / d).iterdir()]


def test_a_failed_series_deleted_before_its_sender_retries_never_becomes_a_partial_series(
    orthanc, tmp_path
) -> None:
    """A series whose last 2 instances were refused (corrupt, 0xC210) fails; its sender sends them
    again, mended, minutes later. A --keep-failed-days shorter than that deleted the failed series
    first, and the retried instances became a series of their own, forwarded as a 2-slice derived
    series. Now pruning leaves a record of the deleted series' instances (its log line says it
    still awaited the refused ones): the retried instances fail in one line, and the whole series
    sent again is forwarded complete."""
    spool = tmp_path / "spool"
    paths = fresh_study(tmp_path / "in", n=5)
    head = pydicom.dcmread(paths[0])
    study, series_uid = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)
    sent = [pydicom.dcmread(p) for p in paths]
    for ds in sent[3:]:
        ds.PixelData = ds.PixelData[:100]
    keep = 3 / 86400  # 3 s: over long before a sender's retry
    late_line = f"series {series_uid}: received 2 instance(s)"
    extra = ["--keep-failed-days", f"{keep:.6g}"]
    node = Node(spool, orthanc.node, quiet=1.0, log_dir=tmp_path, extra=extra)
    try:
        assert store(node.port, sent) == [0x0000] * 3 + [0xC210] * 2
        node.wait_for("FAILED", 30)
        log = node.wait_for("deleted the failed series", 30)
        assert not list((spool / "failed").iterdir())
        assert store(node.port, map(pydicom.dcmread, paths[3:])) == [0x0000] * 2  # the sender's retry
        late = _line_of(node.wait_for(late_line, 60), late_line)
        assert "FAILED" in late, late  # not denoised and forwarded on their own
        assert store(node.port, map(pydicom.dcmread, paths)) == [0x0000] * 5  # the whole series
        whole = derived_in_orthanc(orthanc, study, 5)
        node.wait_for("sent 5 to", 60)
        log = node.wait_for("deleted the failed series", 30, count=2)  # the retried 2, failed
    finally:
        assert node.stop() == 0
    assert derived_series_count(orthanc, study) == [5]  # never a 2-instance one
    assert len(whole) == 5
    record = spool / "forwarded" / f"{series_uid}.failed.json"
    deleted = _line_of(log, "deleted the failed series")
    assert (
        f"more than {keep:.6g} day(s) ago (--keep-failed-days); it still awaited 2 refused instance(s)"
        in deleted
    )
    assert f"its instances are remembered 7 day(s) in {record}" in deleted and "WARNING" in deleted
    assert f"2 instance(s) arrived after series {series_uid} failed at " in late
    assert "with 3 instance(s) and was deleted at " in late and f"delete {record} first" in late
    assert f"series {series_uid}: sent again whole (5 instance(s)" in log
    # both failed batches are remembered: the first 3 and the retried 2
    assert sorted(json.loads(record.read_text())["instances"]) == sorted(ds.SOPInstanceUID for ds in sent)
