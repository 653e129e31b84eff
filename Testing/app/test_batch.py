"""``ipv2-denoise batch`` on one machine: a tree with a corrupt study, resume after kill -9,
manifests, shards, DICOM output, verified done records."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import chest_like_volume, write_ct_series

from IPv2DenoiseLib.app.batch.cases import discover_tree, parse_shard, shard_cases
from IPv2DenoiseLib.app.batch.pipeline import BatchSettings, CaseProcessor, Loaded, run_local
from IPv2DenoiseLib.app.batch.records import hash_output, read_record, record_path, write_summary
from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.core.atomic import STAGING_DIR, claim_output
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume


def summary_rows(out: Path, stem: str = "batch-summary") -> dict[str, dict]:
    with open(out / f"{stem}.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def partial_files(root: Path) -> list[Path]:
    """What an interrupted write may leave: staging folders (core.atomic) and old-style partial files."""
    return [p for p in root.rglob("*") if STAGING_DIR in p.parts or ".partial" in p.name]


def test_tree_denoised_into_mirror_with_failures_isolated(batch_archive, tmp_path, capsys) -> None:
    archive, expected = batch_archive
    source = tmp_path / "archive"
    shutil.copytree(archive, source)
    write_ct_series(source / "site_c" / "mr", 3, modality="MR")  # a non-CT study in the archive
    write_volume(
        Volume(np.full((8, 1, 64), -1000.0, np.float32)), source / "site_c" / "tiny.nrrd"
    )  # too small
    before = tree_digest(source)
    out = tmp_path / "out"

    assert main(["batch", str(source), str(out)]) == 1  # finished, with failures
    rows = summary_rows(out)
    assert set(rows) == set(expected) | {"site_c/mr", "site_c/tiny"}  # hidden folders are not searched
    for case, kind in expected.items():
        row = rows[case]
        if kind == "corrupt":
            assert row["status"] == "failed" and "p06.nrrd" in row["error"] and "\n" not in row["error"]
            assert not (out / f"{case}.nrrd").exists() and read_record(out, case) is None
            continue
        assert row["status"] == "done", row
        assert row["output"] == f"{case}.nrrd" and row["error"] == ""
        assert float(row["noise_after_hu"]) < float(row["noise_before_hu"])
        assert row["device"].startswith("CPU") and float(row["seconds"]) > 0
        record = read_record(out, case)
        assert record["output_sha256"] == row["output_sha256"] == hash_output(out / row["output"])[0]
    assert rows["site_c/mr"]["status"] == "failed" and "MR" in rows["site_c/mr"]["error"]
    assert rows["site_c/tiny"]["status"] == "failed" and "degenerate" in rows["site_c/tiny"]["error"]
    assert "5 done, 0 already done, 3 failed of 8 cases" in capsys.readouterr().err

    denoised = sitk.ReadImage(str(out / "site_b/p03.nrrd"))
    original = sitk.ReadImage(str(source / "site_b/p03.mha"))
    assert denoised.GetSize() == original.GetSize()
    assert np.allclose(denoised.GetOrigin(), original.GetOrigin()) and np.allclose(
        denoised.GetSpacing(), original.GetSpacing()
    )
    dicom_out = sitk.ReadImage(str(out / "site_b/dicom/p05.nrrd"))
    assert dicom_out.GetSize() == (128, 128, 4)

    document = json.loads((out / "batch-summary.json").read_text())
    assert document["totals"] == {"done": 5, "skipped": 0, "failed": 3, "cases": 8}
    assert {row["case"] for row in document["cases"]} == set(rows)
    assert tree_digest(source) == before  # the input is never modified
    assert partial_files(out) == []

    # Rerun: everything done is verified and skipped, outputs untouched; failures are tried again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.nrrd")}
    assert main(["batch", str(source), str(out)]) == 1
    again = summary_rows(out)
    assert {c for c, r in again.items() if r["status"] == "skipped"} == {
        c for c, k in expected.items() if k == "ok"
    }
    assert {c for c, r in again.items() if r["status"] == "failed"} == {
        "site_a/p06",
        "site_c/mr",
        "site_c/tiny",
    }
    assert again["site_a/p01"]["noise_after_hu"] == rows["site_a/p01"]["noise_after_hu"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nrrd")} == stamps


def test_rerun_redoes_what_it_cannot_verify(batch_archive, tmp_path) -> None:
    archive, _ = batch_archive
    source = tmp_path / "archive"
    shutil.copytree(archive, source)
    shutil.rmtree(source / "site_b")  # three cases are enough here
    out = tmp_path / "out"
    assert main(["batch", str(source), str(out), "--prefetch", "0"]) == 1

    # p01: output cut short after the fact; p02: output in place but its record lost (kill between
    # the two); site_b... gone. An edited input must be redone too.
    (out / "site_a/p01.nrrd").write_bytes((out / "site_a/p01.nrrd").read_bytes()[:200])
    (out / ".ipv2-batch/records/site_a/p02.json").unlink()
    staged = out / "site_a" / STAGING_DIR / "otherhost-1-abc" / "p02.nrrd"  # what a kill -9 mid-write leaves
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"half")
    assert main(["batch", str(source), str(out)]) == 1
    rows = summary_rows(out)
    assert rows["site_a/p01"]["status"] == "done" and rows["site_a/p02"]["status"] == "done"
    assert hash_output(out / "site_a/p01.nrrd")[0] == read_record(out, "site_a/p01")["output_sha256"]
    assert partial_files(out) == []

    os.utime(source / "site_a/p02.nrrd", ns=(time.time_ns(), time.time_ns()))  # the study was re-exported
    assert main(["batch", str(source), str(out)]) == 1
    rows = summary_rows(out)
    assert rows["site_a/p02"]["status"] == "done" and rows["site_a/p01"]["status"] == "skipped"

    # Another model (here: no background removal) is a different result: nothing counts as done.
    assert main(["batch", str(source), str(out), "--no-remove-background"]) == 1
    assert {r["status"] for r in summary_rows(out).values()} == {"done", "failed"}
    # So is the refinement (denoise --refine): redone once, then verified and skipped.
    refined = ["batch", str(source), str(out), "--no-remove-background", "--refine"]
    assert main(refined) == 1
    assert {r["status"] for r in summary_rows(out).values()} == {"done", "failed"}
    assert read_record(out, "site_a/p01")["settings"].get("refine") is True
    assert main(refined) == 1
    assert {r["status"] for r in summary_rows(out).values()} == {"skipped", "failed"}


@pytest.mark.slow
def test_resume_after_kill_finishes_only_what_was_left(batch_archive, tmp_path) -> None:
    archive, expected = batch_archive
    out = tmp_path / "out"
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(out), "--json-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    finished_before_kill = []
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("status") == "done":
            finished_before_kill.append(event["case"])
            os.kill(proc.pid, signal.SIGKILL)  # mid-run: the next cases are being read/denoised/written
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    recorded = {c for c in expected if read_record(out, c) is not None}
    assert set(finished_before_kill) <= recorded
    assert len(recorded) < sum(k == "ok" for k in expected.values())  # the kill really cut the run short
    for case in recorded:  # a record always stands for a complete output
        assert hash_output(out / f"{case}.nrrd")[0] == read_record(out, case)["output_sha256"]
    stamps = {c: (out / f"{c}.nrrd").stat().st_mtime_ns for c in recorded}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # the corrupt study
    rows = summary_rows(out)
    assert {c for c, r in rows.items() if r["status"] == "skipped"} == recorded
    assert {c for c, r in rows.items() if r["status"] == "done"} == {
        c for c, k in expected.items() if k == "ok"
    } - recorded
    assert {c: (out / f"{c}.nrrd").stat().st_mtime_ns for c in recorded} == stamps  # not written twice
    assert partial_files(out) == []


def test_manifest_of_paths_and_series_uids(batch_archive, tmp_path) -> None:
    archive, _ = batch_archive
    series_uid = pydicom.dcmread(next((archive / "site_b/dicom/p05").iterdir())).SeriesInstanceUID
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,series_uid,case\n"
        f"{archive / 'site_a/p01.nii.gz'},,\n"
        f"{archive / 'site_b/p03.mha'},,renamed/p03\n"
        f",{series_uid},\n"
        "missing/scan.nrrd,,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert main(["batch", str(manifest), str(out), "--search-root", str(archive)]) == 1
    rows = summary_rows(out)
    assert rows["renamed/p03"]["status"] == "done" and (out / "renamed/p03.nrrd").is_file()
    assert (
        rows["site_b/dicom/p05"]["status"] == "done" and rows["site_b/dicom/p05"]["series_uid"] == series_uid
    )
    assert any(r["status"] == "done" and r["input"].endswith("p01.nii.gz") for r in rows.values())
    missing = rows["missing/scan"]
    assert missing["status"] == "failed" and "not found" in missing["error"]
    assert all(Path(out, r["output"]).resolve().is_relative_to(out.resolve()) for r in rows.values())


def test_manifest_never_writes_outside_out_or_over_its_input(batch_archive, tmp_path, capsys) -> None:
    archive, _ = batch_archive
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(archive / "site_a/p02.nrrd", tmp_path / "p02.nrrd")
    (lists / "up.csv").write_text("path\n../p02.nrrd\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(lists / "up.csv"), str(out)]) == 0
    (row,) = summary_rows(out).values()
    assert Path(out, row["output"]).resolve().is_relative_to(out.resolve())  # no "../" case names

    (lists / "evil.csv").write_text("path,case\n../p02.nrrd,../../escaped\n", encoding="utf-8")
    assert main(["batch", str(lists / "evil.csv"), str(out)]) == 2
    assert "without '..'" in capsys.readouterr().err

    # OUT chosen so that the case's output name is its own input file: refused for that case.
    (tmp_path / "same.csv").write_text("path,case\np02.nrrd,p02\n", encoding="utf-8")
    before = (tmp_path / "p02.nrrd").read_bytes()
    assert main(["batch", str(tmp_path / "same.csv"), str(tmp_path / "sub" / "..")]) == 2  # OUT is its folder
    (tmp_path / "inner.csv").write_text("path,case\np02.nrrd,../p02\n", encoding="utf-8")
    assert main(["batch", str(tmp_path / "inner.csv"), str(tmp_path / "sub")]) == 2
    assert (tmp_path / "p02.nrrd").read_bytes() == before


def test_no_output_lands_on_another_cases_input(batch_archive, tmp_path) -> None:
    """A manifest naming files inside OUT, and an INPUT tree inside OUT: a case whose output would be
    another case's input file fails with one line, and every input keeps its bytes."""
    archive, _ = batch_archive
    data = tmp_path / "data"
    data.mkdir()
    for name in ("x.nrrd", "b.nrrd"):
        shutil.copy(archive / "site_a/p02.nrrd", data / name)
    (tmp_path / "m.csv").write_text("path,case\ndata/x.nrrd,b\ndata/b.nrrd,c\n", encoding="utf-8")
    before = tree_digest(data)
    assert main(["batch", str(tmp_path / "m.csv"), str(data)]) == 1  # finished, with a failure
    rows = summary_rows(data)
    assert rows["b"]["status"] == "failed", rows
    assert "would overwrite the input of case c" in rows["b"]["error"]
    assert rows["c"]["status"] == "done" and (data / "c.nrrd").is_file()
    assert {k: v for k, v in tree_digest(data).items() if k in before} == before  # x.nrrd, b.nrrd untouched

    tree = tmp_path / "t"  # batch t/in t: case "in/a" would be written to t/in/a.nrrd, case "a"'s input
    (tree / "in" / "in").mkdir(parents=True)
    shutil.copy(archive / "site_a/p02.nrrd", tree / "in" / "a.nrrd")
    shutil.copy(archive / "site_b/p03.mha", tree / "in" / "in" / "a.mha")
    before = tree_digest(tree / "in")
    assert main(["batch", str(tree / "in"), str(tree)]) == 1
    rows = summary_rows(tree)
    assert rows["in/a"]["status"] == "failed" and "the input of case a" in rows["in/a"]["error"], rows
    assert rows["a"]["status"] == "done"
    assert tree_digest(tree / "in") == before


def test_shards_cover_every_case_exactly_once(batch_archive, tmp_path) -> None:
    archive, expected = batch_archive
    cases = discover_tree(archive)
    for n in (1, 2, 4, 7):
        ids = [c.case_id for k in range(n) for c in shard_cases(cases, k, n)]
        assert sorted(ids) == sorted(expected)
    with pytest.raises(UserError):
        parse_shard("3/3")

    out = tmp_path / "out"
    for k in range(3):
        assert main(["batch", str(archive), str(out), "--shard", f"{k}/3"]) in (0, 1)
        if k == 1:
            assert main(["batch-summary", str(out)]) == 2  # shard 2 has not run yet
    per_shard = [summary_rows(out, f"batch-summary.shard-{k}-of-3") for k in range(3)]
    assert sorted(c for rows in per_shard for c in rows) == sorted(expected)
    assert main(["batch-summary", str(out)]) == 1  # combined; the corrupt study failed
    combined = summary_rows(out)
    assert set(combined) == set(expected)
    assert combined["site_a/p06"]["status"] == "failed"
    assert all(combined[c]["status"] == "done" for c, k in expected.items() if k == "ok")


def test_dicom_output_is_a_derived_series_of_the_source(batch_archive, tmp_path) -> None:
    archive, _ = batch_archive
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path\n{archive / 'site_b/dicom/p05'}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["batch", str(manifest), str(out), "--dicom"]) == 0
    (row,) = summary_rows(out).values()
    folder = out / row["output"]
    files = sorted(folder.iterdir())
    assert len(files) == 4
    source = pydicom.dcmread(next((archive / "site_b/dicom/p05").iterdir()))
    derived = pydicom.dcmread(files[0])
    assert derived.StudyInstanceUID == source.StudyInstanceUID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert "DERIVED" in derived.ImageType and len(derived.SourceImageSequence) == 1
    assert hash_output(folder)[0] == read_record(out, row["case"])["output_sha256"]
    assert main(["batch", str(manifest), str(out), "--dicom"]) == 0  # verified folder: skipped
    assert summary_rows(out)[row["case"]]["status"] == "skipped"
    # an unrecorded earlier series of ours is replaced whole; a folder of other things is never deleted
    record_path(out, row["case"]).unlink()
    assert main(["batch", str(manifest), str(out), "--dicom"]) == 0
    assert summary_rows(out)[row["case"]]["status"] == "done" and len(list(folder.iterdir())) == 4
    record_path(out, row["case"]).unlink()
    (folder / "notes.txt").write_text("a radiologist's notes")
    assert main(["batch", str(manifest), str(out), "--dicom"]) == 1
    failed = summary_rows(out)[row["case"]]
    assert failed["status"] == "failed" and "'notes.txt', which is not a DICOM file" in failed["error"], (
        failed
    )
    assert (folder / "notes.txt").read_text() == "a radiologist's notes" and len(list(folder.iterdir())) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "does not exist"),
        (["{archive}", "{archive}"], "input folder"),
        (["{archive}", "{archive}/site_a/out"], "lies inside it"),
        (["{archive}", "{out}", "--shard", "2/2"], "0 <= K < N"),
        (["{empty}", "{out}"], "no DICOM series"),
        # a symbolic link to itself as OUT (until 2026-12-08 a RuntimeError traceback)
        (["{archive}", "{loop}"], "cannot follow it"),
    ],
)
def test_user_errors_are_one_line_exit_2(batch_archive, tmp_path, capsys, args, message) -> None:
    archive, _ = batch_archive
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    paths = {
        "missing": tmp_path / "nope",
        "out": tmp_path / "out",
        "archive": archive,
        "empty": tmp_path / "empty",
        "loop": tmp_path / "loop",
    }
    assert main(["batch", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_negative_gpu_count_is_refused_by_the_parser(batch_archive, tmp_path, capsys, value) -> None:
    """``--gpus-per-worker -1`` reached Ray and failed there after half a minute, with a traceback."""
    archive, _ = batch_archive
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", str(archive), str(tmp_path / "out"), "--gpus-per-worker", value])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--gpus-per-worker: expected a number >= 0" in line, line
    assert not (tmp_path / "out").exists()


def test_only_the_ray_engine_imports_ray() -> None:
    """Ray is the optional [cluster] extra: no module but app/batch/ray_engine.py imports it (any
    import statement, function-level ones included), so the core, the CLI and Slicer never need it."""
    package = Path(__file__).resolve().parents[2] / "IPv2Denoise"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"IPv2DenoiseLib/app/batch/ray_engine.py"}


@pytest.mark.slow
def test_ctrl_c_keeps_finished_cases_and_says_how_to_continue(batch_archive, tmp_path) -> None:
    # sixteen more cases than the shared archive, each ~10 times the voxels of the tiny ones, so the
    # signal lands while cases remain even when the test process is descheduled for seconds on a
    # loaded machine (with tiny cases the run once finished before SIGINT arrived: exit 1, not 130)
    archive, expected = tmp_path / "archive", dict(batch_archive[1])
    shutil.copytree(batch_archive[0], archive)
    (archive / "extra").mkdir()
    for k in range(16):
        write_volume(
            Volume(chest_like_volume(100 + k, (16, 128, 128)), (2.5, 2.5, 2.5)),
            archive / "extra" / f"e{k:02d}.nrrd",
        )
        expected[f"extra/e{k:02d}"] = "ok"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(out), "--json-progress"]
    # a test run started in the background of a shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child gets the default disposition back
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stdout:
        if json.loads(line).get("status") == "done":
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert "rerun the same command" in proc.stderr.read()
    document = json.loads((out / "batch-summary.json").read_text())
    assert document["interrupted"] is True
    finished = {row["case"] for row in document["cases"] if row["status"] == "done"}
    assert finished and finished < {c for c, k in expected.items() if k == "ok"}
    assert {c for c in expected if read_record(out, c) is not None} == finished
    assert partial_files(out) == []


# --------------------------------------------------------------- hostile archives (issue #21)


def hostile_series_archive(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding two real CT series, one with a SeriesInstanceUID that climbs to ``victim``."""
    source, victim = tmp_path / "archive", tmp_path / "victim"
    write_ct_series(source / "site", 3, series_number=1)
    for path in write_ct_series(tmp_path / "second", 3, series_number=2):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "../" * 30 + str(victim).lstrip("/")
        ds.save_as(source / "site" / f"B{path.name}")
    shutil.rmtree(tmp_path / "second")
    victim.mkdir()
    (victim / "keep.txt").write_text("precious", encoding="utf-8")
    (tmp_path / "victim.nrrd").write_text("not yours", encoding="utf-8")
    (tmp_path / "victim.json").write_text("not yours", encoding="utf-8")
    return source, victim


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--dicom"], []], ids=["dicom", "nrrd"])
def test_series_uid_never_becomes_a_path_outside_out(tmp_path, mode) -> None:
    source, victim = hostile_series_archive(tmp_path)
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(source), str(out), *mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (victim / "keep.txt").read_text(encoding="utf-8") == "precious"
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before  # nothing outside OUT
    rows = summary_rows(out)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows.values())
    for row in rows.values():
        assert ".." not in row["case"].split("/") and ".." not in row["output"].split("/")
        assert (out / row["output"]).resolve().is_relative_to(out.resolve())
        assert read_record(out, row["case"]) is not None


@pytest.mark.slow
def test_second_run_on_one_out_is_refused_and_a_killed_one_does_not_block(batch_archive, tmp_path) -> None:
    archive, expected = batch_archive
    out = tmp_path / "out"
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(archive), str(out), "--json-progress"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "cases" in json.loads(first.stdout.readline())  # the first run holds OUT now
        first.send_signal(signal.SIGSTOP)  # and keeps holding it, however fast this machine is
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stdout == ""
        (line,) = second.stderr.strip().splitlines()
        assert f"is in use by another batch run (pid {first.pid} on host " in line, line
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.wait(timeout=60)
    third = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert third.returncode == 1, third.stderr  # ran (the corrupt study failed), not blocked
    assert set(summary_rows(out)) == set(expected)


def test_shards_share_out_but_each_shard_runs_once(batch_archive, tmp_path, capsys) -> None:
    from IPv2DenoiseLib.app.batch.lock import batch_lock

    archive, _ = batch_archive
    out = tmp_path / "out"
    out.mkdir()
    with batch_lock(out, (0, 2)):  # shard 0/2 of the job is running (a real flock, another file description)
        assert main(["batch", str(archive), str(out), "--shard", "0/2"]) == 2
        assert "in use by another batch run (shard 0/2: pid" in capsys.readouterr().err
        assert main(["batch", str(archive), str(out)]) == 2  # an unsharded run would redo the shard's cases
        assert "shard-0-of-2: pid" in capsys.readouterr().err
        assert main(["batch", str(archive), str(out), "--shard", "1/3"]) == 2  # another job's split overlaps
        assert "shard-0-of-2: pid" in capsys.readouterr().err
        assert main(["batch", str(archive), str(out), "--shard", "1/2"]) in (0, 1)  # the other shard runs
    assert main(["batch", str(archive), str(out), "--shard", "0/2"]) in (0, 1)  # released


def test_stray_corrupt_copy_in_another_folder_fails_alone(tmp_path) -> None:
    source = tmp_path / "archive"
    files = write_ct_series(source / "patient" / "ct", 4)
    stray = source / "old_copy" / files[1].name  # an old, cut-short copy of one slice elsewhere
    stray.parent.mkdir()
    stray.write_bytes(files[1].read_bytes()[:-3000])
    out = tmp_path / "out"
    assert main(["batch", str(source), str(out)]) == 1
    rows = summary_rows(out)
    assert rows["patient/ct"]["status"] == "done"  # the healthy series is not taken down with it
    assert rows["patient/ct"]["shape"] == "4x128x128"
    bad = rows["old_copy"]
    assert bad["status"] == "failed" and bad["input"] == str(stray.parent) and "old_copy" in bad["error"]

    uid = pydicom.dcmread(files[0]).SeriesInstanceUID  # a manifest naming only the UID cannot pick one
    (tmp_path / "by_uid.csv").write_text(f"series_uid\n{uid}\n", encoding="utf-8")
    assert (
        main(["batch", str(tmp_path / "by_uid.csv"), str(tmp_path / "out2"), "--search-root", str(source)])
        == 1
    )
    (row,) = summary_rows(tmp_path / "out2").values()
    assert (
        row["status"] == "failed"
        and "old_copy" in row["error"]
        and str(source / "patient/ct") in row["error"]
    )


def test_a_series_split_over_overlapping_partial_copies_is_never_shortened(tmp_path) -> None:
    """A transfer stopped after slice 6 in one folder, a resend of slices 5-10 landed in another:
    each part alone looks like a whole regular stack. Neither is denoised as a shortened series;
    both fail with one line naming the folders. (Before, both were "done": two derived series of 6.)"""
    files = write_ct_series(tmp_path / "whole", 10, shuffle=False)
    source = tmp_path / "archive"
    for folder, part in (("first", files[:6]), ("resend", files[4:])):
        (source / folder).mkdir(parents=True)
        for f in part:
            shutil.copy(f, source / folder / f.name)
    out = tmp_path / "out"
    assert main(["batch", str(source), str(out)]) == 1
    rows = summary_rows(out)
    assert set(rows) == {"first", "resend"}, rows
    for row in rows.values():
        assert row["status"] == "failed", row
        assert "split over folders that overlap (2 instance(s)" in row["error"] and "all 10" in row["error"]
        assert "first (6 files)" in row["error"] and "resend (6 files)" in row["error"]
    assert not list(out.glob("*.nrrd"))


def test_nested_series_folders_never_nest_their_dicom_outputs(tmp_path) -> None:
    """A series in ``p/`` and one in ``p/sub/``: the first one's derived-series folder must not hold
    the second's, or redoing it would delete the other's output (a rerun used to say "skipped"
    for a case whose output it had just removed)."""
    source, out = tmp_path / "archive", tmp_path / "out"
    write_ct_series(source / "p", 3, series_number=1)
    write_ct_series(source / "p" / "sub", 3, series_number=2)
    assert main(["batch", str(source), str(out), "--dicom"]) == 0
    rows = summary_rows(out)
    outputs = [Path(row["output"]) for row in rows.values()]
    assert not any(a != b and a in b.parents for a in outputs for b in outputs), outputs

    def outputs_only() -> dict[str, str]:
        return {k: v for k, v in tree_digest(out).items() if not k.startswith("batch-summary")}

    before = outputs_only()
    assert main(["batch", str(source), str(out), "--dicom"]) == 0
    assert {row["status"] for row in summary_rows(out).values()} == {"skipped"}
    assert outputs_only() == before  # nothing redone, nothing removed
    for case, row in summary_rows(out).items():
        assert hash_output(out / row["output"])[0] == read_record(out, case)["output_sha256"]


def test_resample_gaps_reads_a_series_with_a_missing_slice(tmp_path) -> None:
    """A DICOM study with a slice missing fails, naming the gap; ``--resample-gaps`` reads it onto an
    even grid with a warning in the summary, and its done record remembers how it was read."""
    files = sorted(write_ct_series(tmp_path / "archive" / "gappy", 6, shuffle=False))
    files[2].unlink()  # the third of six slices
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "archive"), str(out), "--device", "cpu"]) == 1
    row = summary_rows(out)["gappy"]
    assert row["status"] == "failed" and "--resample-gaps" in row["error"], row

    assert main(["batch", str(tmp_path / "archive"), str(out), "--device", "cpu", "--resample-gaps"]) == 0
    row = summary_rows(out)["gappy"]
    assert row["status"] == "done" and row["shape"] == "6x128x128", row  # the gap filled on the 2.5 mm grid
    assert "gap" in row["warnings"] or "resampl" in row["warnings"], row
    assert read_record(out, "gappy")["settings"]["resample_gaps"] is True


def test_two_attempts_of_one_case_at_once_write_it_once(batch_archive, tmp_path) -> None:
    """A Ray retry can start while the first attempt still runs (its worker only stopped answering):
    the later attempt waits for the case's output claim, then reports the first one's result; the
    network runs once and the output and its record are the first attempt's."""
    import threading

    from IPv2DenoiseLib.app.batch.pipeline import BatchSettings, CaseProcessor

    archive, _ = batch_archive
    out = tmp_path / "out"
    processor = CaseProcessor(BatchSettings(out_root=str(out), run_id="run-1"), threads=1)
    (case,) = [c for c in discover_tree(archive) if c.case_id == "site_a/p02"]
    both_read = threading.Barrier(2)
    load, denoise = processor.load, processor.pipeline.denoise
    network_runs: list[int] = []

    def load_then_meet(case, *, attempts=1):  # both attempts have read the case, neither has written
        item = load(case, attempts=attempts)
        both_read.wait(timeout=60)
        return item

    def counted_denoise(volume):
        network_runs.append(threading.get_ident())
        return denoise(volume)

    processor.load, processor.pipeline.denoise = load_then_meet, counted_denoise
    rows: dict[int, dict] = {}
    attempts = [
        threading.Thread(target=lambda n=n: rows.__setitem__(n, processor.process(case, attempts=n)))
        for n in (1, 2)
    ]
    for thread in attempts:
        thread.start()
    for thread in attempts:
        thread.join(timeout=300)
    assert sorted(rows) == [1, 2], rows
    assert [rows[n]["status"] for n in (1, 2)] == ["done", "done"], rows
    assert len(network_runs) == 1, f"the case was denoised {len(network_runs)} times"
    record = read_record(out, "site_a/p02")
    sha256, _ = hash_output(out / "site_a" / "p02.nrrd")
    assert record["output_sha256"] == sha256 == rows[1]["output_sha256"] == rows[2]["output_sha256"]
    assert not (out / "site_a" / STAGING_DIR).exists()  # the claim's lock file went with its holder


# ------------------------------------------------------------- review of 2026-12-08 (batch faults)


def shard_document(out: Path, k: int, n: int) -> Path:
    return out / f"batch-summary.shard-{k}-of-{n}.json"


def test_batch_summary_combines_only_finished_shards_of_one_run(batch_archive, tmp_path, capsys) -> None:
    """batch-summary checked only that every shard had a summary: an interrupted shard, old
    summaries, shards of another input or of an archive that changed between their starts were
    merged into a summary that looked complete (exit 0 or 1). Now refused in one line, exit 2."""
    archive, expected = batch_archive
    source, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(archive, source)
    for k in range(2):
        assert main(["batch", str(source), str(out), "--shard", f"{k}/2"]) in (0, 1)
    assert main(["batch-summary", str(out)]) == 1  # one run, finished: combined (the corrupt study failed)
    assert set(summary_rows(out)) == set(expected)
    capsys.readouterr()

    def refused() -> str:
        capsys.readouterr()  # what the batch runs said
        assert main(["batch-summary", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line

    # the larger shard stopped by Ctrl-C (or a killed job) with one of its cases left
    k = max(range(2), key=lambda k: len(json.loads(shard_document(out, k, 2).read_text())["cases"]))
    finished = shard_document(out, k, 2).read_text()
    document = json.loads(finished)
    lost = document["cases"].pop()["case"]
    document.update(interrupted=True, pending=[lost])
    shard_document(out, k, 2).write_text(json.dumps(document))
    line = refused()
    assert f"shard {k}/2 has not finished (interrupted)" in line and lost in line, line
    shard_document(out, k, 2).write_text(finished)

    # shard 1 of another input written into the same OUT
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "site_b" / "p03.mha").unlink()
    assert main(["batch", str(other), str(out), "--shard", "1/2"]) in (0, 1)
    line = refused()
    assert "shard 1/2 and shard 0/2 are not from one run: input" in line and str(other) in line, line

    # the archive changed between the starts of the shards: a study added after shard 0 started
    assert main(["batch", str(source), str(out), "--shard", "1/2"]) in (0, 1)
    (source / "site_c").mkdir()
    write_volume(Volume(chest_like_volume(11), (5.0, 5.0, 5.0)), source / "site_c" / "p07.nrrd")
    assert main(["batch", str(source), str(out), "--shard", "1/2"]) in (0, 1)
    line = refused()
    assert "found different cases (7 and 6" in line and "rerun every shard" in line, line
    assert main(["batch", str(source), str(out), "--shard", "0/2"]) in (0, 1)  # what the line says
    assert main(["batch-summary", str(out)]) == 1
    assert set(summary_rows(out)) == set(expected) | {"site_c/p07"}

    # what the review wrote: summaries without a run identity, shard 1/2 interrupted with 1 of 3 cases
    old = tmp_path / "old"
    old.mkdir()
    rows = [{"case": f"c{i}", "status": "done"} for i in range(4)]
    for k, part in ((0, rows[:3]), (1, rows[3:])):
        info = {"shard": f"{k}/2", "cases_found": 6, "interrupted": k == 1}
        write_summary(old, part, info, stem=f"batch-summary.shard-{k}-of-2")
    assert main(["batch-summary", str(old)]) == 2
    assert "shard 1/2 has not finished (interrupted)" in capsys.readouterr().err


def test_a_case_keeps_its_shard_when_the_archive_changes(batch_archive, tmp_path) -> None:
    """Shards were every N-th case of the sorted list: a study added before shard 1 started moved
    every later case to another shard, so cases ran twice or not at all. Now by a hash of the id."""
    archive, _ = batch_archive
    source = tmp_path / "archive"
    shutil.copytree(archive, source)

    def shard_by_case() -> dict[str, int]:
        cases = discover_tree(source)
        return {c.case_id: k for k in range(3) for c in shard_cases(cases, k, 3)}

    before = shard_by_case()
    write_volume(Volume(chest_like_volume(12), (5.0, 5.0, 5.0)), source / "a_first.nrrd")  # sorts first
    after = shard_by_case()
    assert set(after) == set(before) | {"a_first"}
    assert {case: after[case] for case in before} == before


def write_detached(image: sitk.Image, header: Path) -> Path:
    """``header`` (``.mhd`` or ``.nhdr``) and the ``.raw`` data file ITK writes beside it."""
    header.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(header))
    return header.with_suffix(".raw")


def test_a_changed_data_file_beside_its_header_makes_the_case_run_again(tmp_path, capsys) -> None:
    """The fingerprint covered the .mhd / .nhdr header only: a re-exported .raw beside it was
    "skipped" and its old output kept. A data file outside the header's folder fails its case."""
    source, out = tmp_path / "archive", tmp_path / "out"
    image = sitk.GetImageFromArray(chest_like_volume(3))
    image.SetSpacing((5.0, 5.0, 5.0))
    raws = [write_detached(image, source / "meta.mhd"), write_detached(image, source / "nrrd.nhdr")]
    assert main(["batch", str(source), str(out)]) == 0
    before = {case: row["output_sha256"] for case, row in summary_rows(out).items()}
    assert set(before) == {"meta", "nrrd"}

    other = sitk.GetArrayFromImage(image)[::-1].copy()  # the study re-exported: other voxels, same size
    for raw in raws:
        raw.write_bytes(other.tobytes())
    secret = tmp_path / "secret.raw"  # a header naming a file outside its folder
    secret.write_bytes(raws[0].read_bytes())
    (source / "evil.mhd").write_text(
        (source / "meta.mhd").read_text().replace("ElementDataFile = meta.raw", f"ElementDataFile = {secret}")
    )
    assert main(["batch", str(source), str(out)]) == 1
    rows = summary_rows(out)
    for case in ("meta", "nrrd"):
        assert rows[case]["status"] == "done", rows[case]
        assert rows[case]["output_sha256"] != before[case]
    assert rows["evil"]["status"] == "failed" and "outside the header's folder" in rows["evil"]["error"]
    assert not (out / "evil.nrrd").exists()
    assert main(["batch", str(source), str(out)]) == 1  # unchanged now: verified and skipped
    assert summary_rows(out)["meta"]["status"] == "skipped"

    # a case whose output would land on the data file of a case (here its own): refused, data kept
    data = tmp_path / "data"
    raw = write_detached(image, data / "x.mhd")
    raw.rename(data / "z.nrrd")
    header = data / "x.mhd"
    header.write_text(header.read_text().replace("ElementDataFile = x.raw", "ElementDataFile = z.nrrd"))
    kept = (data / "z.nrrd").read_bytes()
    (tmp_path / "m.csv").write_text("path,case\ndata/x.mhd,z\n", encoding="utf-8")
    assert main(["batch", str(tmp_path / "m.csv"), str(data)]) == 1
    row = summary_rows(data)["z"]
    assert row["status"] == "failed" and "would overwrite its own input" in row["error"], row
    assert (data / "z.nrrd").read_bytes() == kept


@contextmanager
def nearly_full_tmpfs(folder: Path, *, free: int = 40 << 10) -> Iterator[Path]:
    """A real tmpfs mounted at ``folder`` with about ``free`` bytes left: a denoised case (about 80 kB
    here) no longer fits, its summary does. Mounting needs root; skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (folder / "filler").write_bytes(bytes(shutil.disk_usage(folder).free - free))
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_stops_the_run_at_the_first_case_it_cannot_write(batch_archive, tmp_path, capsys) -> None:
    """Every write failure was one failed row: on a full OUT every remaining case was read,
    denoised and then failed to write (thousands of rows, hours of compute). Now the first case
    that cannot be written stops the run: summary written (interrupted, why), one line, exit 2."""
    archive, expected = batch_archive
    with nearly_full_tmpfs(tmp_path / "disk") as disk:
        out = disk / "out"
        assert main(["batch", str(archive), str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        document = json.loads((out / "batch-summary.json").read_text())
    assert not any("Traceback" in line for line in err), err
    assert err[-1].startswith("ipv2-denoise batch: error: stopped: cannot write "), err[-1]
    assert "No space left on device" in err[-1] and "rerun the same command" in err[-1], err[-1]
    assert document["interrupted"] is True and "No space left on device" in document["stopped"]
    unwritten = [row for row in document["cases"] if "No space left on device" in row["error"]]
    assert len(unwritten) == 1, document["cases"]  # not one failed row per remaining case
    assert document["totals"]["done"] == 0 and document["pending"]
    assert len(document["cases"]) + len(document["pending"]) == len(expected)


def test_a_folder_that_cannot_be_listed_is_a_failed_case(batch_archive, tmp_path) -> None:
    """A folder of INPUT without read permission was skipped without a word: its studies were
    missing from the summary and the run said 0. Now a failed row naming the folder (exit 1), and
    the next run lists it again. Root reads every folder, so root runs the batch without that power."""
    archive, _ = batch_archive
    source, out = tmp_path / "archive", tmp_path / "out"
    locked = source / "site_b"
    locked.mkdir(parents=True)
    (source / "site_a").mkdir()
    shutil.copy(archive / "site_a" / "p02.nrrd", source / "site_a" / "p02.nrrd")
    shutil.copy(archive / "site_b" / "p03.mha", locked / "p03.mha")
    command = [sys.executable, "-m", "IPv2DenoiseLib", "batch", str(source), str(out)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to run without root's access to every folder")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    locked.chmod(0)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    rows = summary_rows(out)
    assert rows["site_a/p02"]["status"] == "done"
    assert rows["site_b"]["status"] == "failed", rows
    assert rows["site_b"]["error"] == f"cannot list {locked}: Permission denied"


def test_a_manifest_naming_one_study_twice_is_refused(batch_archive, tmp_path, capsys) -> None:
    """Three identical rows gave two cases one id (the suffix was a hash of the same file), so two
    shards wrote one output and batch-summary refused forever. Now one line before any work."""
    archive, _ = batch_archive
    manifest = tmp_path / "m.csv"
    row = f"{archive / 'site_a' / 'p02.nrrd'},,\n"
    manifest.write_text("path,series_uid,case\n" + row * 3, encoding="utf-8")
    assert main(["batch", str(manifest), str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lines 2 and 3 name the same study" in line, line


def test_a_case_another_run_is_writing_is_reported_not_written_again(batch_archive, tmp_path) -> None:
    """The local engine's writer took no output claim (Ray's workers did): a case that another
    shard was writing (it saw another case list) was written a second time. Now the writer waits
    for the claim and reports the other run's verified output."""
    archive, _ = batch_archive
    out, aside = tmp_path / "out", tmp_path / "aside"
    cases = {c.case_id: c for c in discover_tree(archive)}
    first, second = cases["site_a/p01"], cases["site_a/p02"]
    other = CaseProcessor(BatchSettings(out_root=str(out), run_id="other-run"), threads=1)
    assert run_local([second], other, prefetch=0)[0]["status"] == "done"
    output, record = out / "site_a" / "p02.nrrd", record_path(out, "site_a/p02")
    aside.mkdir()
    for path in (output, record):
        shutil.move(path, aside / path.name)
    this = CaseProcessor(BatchSettings(out_root=str(out), run_id="this-run"), threads=1)
    rows: list[dict] = []
    first_row = threading.Event()
    with claim_output(output, what="the other run"):  # the other run writes site_a/p02 now
        worker = threading.Thread(
            target=lambda: rows.extend(run_local([first, second], this, on_row=lambda row: first_row.set()))
        )
        worker.start()
        assert first_row.wait(timeout=300)
        time.sleep(1.0)  # this run's writer has reached site_a/p02 (and waits for the claim)
        shutil.copy2(aside / output.name, output)
        shutil.copy2(aside / record.name, record)
    worker.join(timeout=300)
    row = {r["case"]: r for r in rows}["site_a/p02"]
    assert row["status"] == "skipped", row  # the other run's output, verified, not written again
    assert read_record(out, "site_a/p02")["run_id"] == "other-run"
    assert hash_output(output)[0] == read_record(out, "site_a/p02")["output_sha256"]


def spanned_bytes(array: np.ndarray) -> int:
    """Bytes of memory an array's elements span (a zero-stride view of one value spans 4)."""
    byte_bounds = getattr(np.lib, "array_utils", np).byte_bounds
    low, high = byte_bounds(array)
    return high - low


def test_a_denoised_case_waits_for_the_writer_without_its_source_array(batch_archive, tmp_path) -> None:
    """docs/batch.md promised at most prefetch + 3 volumes in memory; each denoised case held its
    source beside its result until written (about prefetch + 7 arrays). Now the source is dropped
    before the case is queued for the writer, and the noise measured against it is kept."""
    archive, _ = batch_archive
    processor = CaseProcessor(BatchSettings(out_root=str(tmp_path / "out")), threads=1)
    held: list[tuple[int, int, int]] = []
    store = processor.store

    def measure_then_store(item: Loaded) -> dict:
        outcome = item.outcome
        held.append(
            (
                spanned_bytes(outcome.source.array),
                spanned_bytes(item.volume.array),
                outcome.denoised.array.nbytes,
            )
        )
        return store(item)

    processor.store = measure_then_store
    cases = [c for c in discover_tree(archive) if c.case_id in ("site_a/p01", "site_a/p02", "site_b/p03")]
    rows = run_local(cases, processor, prefetch=2)
    assert [row["status"] for row in rows] == ["done"] * 3, rows
    assert all(float(row["noise_after_hu"]) < float(row["noise_before_hu"]) for row in rows)
    assert len(held) == 3 and all(
        source <= 4 and volume <= 4 and result > 100_000 for source, volume, result in held
    ), held
