"""The node's spool under a full disk and kills: never a partial series forwarded, never an acknowledged one lost.

A real ``ipv2-denoise serve`` child process, a real Orthanc, a real 2 MB tmpfs for the full disk
(root only; skipped with the reason otherwise) and SIGKILL at each step of a series' life (the
node's fault injection, ``IPV2DENOISE_NODE_KILL_AT``, makes the kill land exactly there).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
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
