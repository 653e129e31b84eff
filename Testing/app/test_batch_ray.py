"""``ipv2-denoise batch --engine ray`` on a real local Ray cluster (two CPU workers): the same
outputs and summary as the local engine, and a worker killed mid-run whose cases are retried."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import SimpleITK as sitk
from conftest import chest_like_volume
from test_batch import nearly_full_tmpfs

from IPv2DenoiseLib.app.batch.ray_watchdog import descendants, stop
from IPv2DenoiseLib.app.batch.records import hash_output, read_record
from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.core.atomic import STAGING_DIR
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume

#: Each test here takes more than ~20 s on 2 CPU cores (a real Ray cluster).
pytestmark = pytest.mark.slow

#: Columns that must agree between engines (timing, device and worker naturally differ).
SAME_COLUMNS = ("status", "input", "output", "series_uid", "shape", "error")


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """One local Ray cluster (2 CPUs) for all Ray tests, its address for ``--address``; shut down
    after this file, so its processes do not idle through the rest of the suite."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        object_store_memory=128 * 2**20,  # the tests pass only small objects
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def summary_rows(out: Path) -> dict[str, dict]:
    with open(out / "batch-summary.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_ray_engine_matches_local_engine(ray_cluster, batch_archive, tmp_path) -> None:
    archive, expected = batch_archive
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["batch", str(archive), str(local)]) == 1
    assert main(["batch", str(archive), str(distributed), "--engine", "ray", "--cpus-per-worker", "1"]) == 1

    rows_local, rows_ray = summary_rows(local), summary_rows(distributed)
    assert set(rows_local) == set(rows_ray) == set(expected)
    workers = {row["worker"] for row in rows_ray.values() if row["status"] == "done"}
    assert len(workers) == 2 and all(w != rows_local["site_a/p01"]["worker"] for w in workers)
    for case, row in rows_local.items():
        other = rows_ray[case]
        assert {k: row[k] for k in SAME_COLUMNS} == {k: other[k] for k in SAME_COLUMNS}
        if row["status"] != "done":
            continue
        for key in ("noise_before_hu", "noise_after_hu"):
            # the CSV rounds to 0.001 HU and the workers' thread counts differ, so the same value
            # may land either side of a rounding step
            assert float(other[key]) == pytest.approx(float(row[key]), abs=2e-3)
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(local / row["output"])))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(distributed / row["output"])))
        assert np.abs(a - b).max() <= 1e-3  # HU; threads per worker differ, so not always bit-equal


def test_worker_killed_mid_run_has_its_cases_retried(ray_cluster, batch_archive, tmp_path) -> None:
    archive, expected = batch_archive
    out = tmp_path / "out"
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(out), "--json-progress"]
    command += ["--engine", "ray", "--address", ray_cluster, "--cpus-per-worker", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events, pids, killed = [], {}, None
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        # the workers the run started with (Ray's restart of the victim reports itself too, when
        # its probe answers: before or after the run ends, a race the count must not see)
        if "worker_index" in event and not event.get("restarted"):
            pids[event["worker"]] = int(event["worker"].rsplit(":", 1)[1])
        if killed is None and event.get("status") == "done":
            victim = next(w for w in pids if w != event.get("worker"))  # the other one is mid-case
            os.kill(pids[victim], signal.SIGKILL)
            killed = victim
    proc.wait(timeout=300)
    assert proc.returncode == 1, proc.stderr.read()  # only the corrupt study failed
    assert killed is not None and len(pids) == 2

    retried = {e["retry"] for e in events if "retry" in e}
    assert retried, "the killed worker held no case"
    rows = summary_rows(out)
    assert set(rows) == set(expected)  # every case exactly once
    for case, kind in expected.items():
        row = rows[case]
        if kind == "corrupt":
            assert row["status"] == "failed"
            continue
        # the error in full (a dict is cut short in the report), with the retries that came before
        assert row["status"] == "done", (case, row["error"], [e for e in events if "retry" in e])
        assert hash_output(out / row["output"])[0] == read_record(out, case)["output_sha256"]
    assert all(int(rows[c]["attempts"]) == 2 for c in retried)
    assert not [p for p in out.rglob("*") if STAGING_DIR in p.parts]


def test_a_full_disk_stops_the_ray_run_too(ray_cluster, batch_archive, tmp_path, capsys) -> None:
    """As on the local engine: the first case that cannot be written because OUT is full stops the
    run (no more cases submitted), the summary says why, one line, exit 2 (until 2026-12-08 every
    case was denoised on the workers and failed to write)."""
    archive = tmp_path / "archive"
    shutil.copytree(batch_archive[0], archive)
    (archive / "extra").mkdir()
    for k in range(8):  # more cases than the two workers hold at once
        write_volume(Volume(chest_like_volume(20 + k), (5.0, 5.0, 5.0)), archive / "extra" / f"e{k}.nrrd")
    with nearly_full_tmpfs(tmp_path / "disk") as disk:
        out = disk / "out"
        assert main(["batch", str(archive), str(out), "--engine", "ray", "--cpus-per-worker", "1"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        document = json.loads((out / "batch-summary.json").read_text())
    assert last.startswith("ipv2-denoise batch: error: stopped: ") and "No space left on device" in last, last
    assert document["interrupted"] is True and "No space left on device" in document["stopped"]
    assert document["totals"]["done"] == 0 and len(document["pending"]) >= 4, document
    assert len(document["cases"]) + len(document["pending"]) == 14


def test_workers_that_do_not_fit_the_cluster_are_refused(
    ray_cluster, batch_archive, tmp_path, capsys
) -> None:
    archive, _ = batch_archive
    args = ["batch", str(archive), str(tmp_path / "out"), "--engine", "ray", "--cpus-per-worker", "3"]
    assert main(args) == 2
    assert "one worker needs 3 CPUs" in capsys.readouterr().err


def test_unreachable_cluster_is_a_one_line_error_in_seconds(batch_archive, tmp_path) -> None:
    """``ray.init`` alone retries a dead head node for minutes; the batch says so at once."""
    archive, _ = batch_archive
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(  # Ray's own retries would run past the timeout
        [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(tmp_path / "out")]
        + ["--engine", "ray", "--address", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{port}" in last and "ray start --head" in last


def test_kill_9_of_the_driver_stops_the_local_cluster_it_started(batch_archive, tmp_path) -> None:
    """Without --address the run starts Ray here; killed with SIGKILL, it leaves no Ray process
    behind (Ray's own fate sharing misses the raylet's agents), and Ray's token notice never
    reaches the terminal."""
    archive, _ = batch_archive
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(tmp_path / "out")]
    command += ["--engine", "ray", "--workers", "1", "--cpus-per-worker", "1", "--json-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started: set = set()
    try:
        for line in proc.stdout:
            if "worker_index" in json.loads(line):  # the cluster is up and a worker holds the model
                started = descendants(proc.pid)
                break
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in started}
        assert {"raylet", "gcs_server"} <= names and any(n.startswith("ray::Dashboard") for n in names), names
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # the watchdog's grace is 5 s
        while (
            left := {(pid, start) for pid, start in started if _alive(pid, start)}
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [Path(f"/proc/{pid}/comm").read_text().strip() for pid, _ in left]
        assert "Token authentication" not in proc.stderr.read()
    finally:
        proc.kill()
        stop(started, grace=1.0)  # what this test started, should the run not have stopped it


def _alive(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (not reused, not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X") and int(fields[19]) == start
