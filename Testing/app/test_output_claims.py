"""Two writers, one output (issue #21 item 7), and ``--overwrite`` of a derived DICOM series.

The first writer of an output wins; a second run to the same output gets one line and exit 2 before
any work. The claim is held by a real second process here (a subprocess that takes it and waits), so
the race is deterministic, and a ``kill -9`` of the holder must release it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from IPv2DenoiseLib.app.cli import main as cli_main
from IPv2DenoiseLib.core.atomic import STAGING_DIR, atomic_dir, atomic_path, claim_output
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.models import UNet
from IPv2DenoiseLib.denoiser.weights import save_model
from IPv2DenoiseLib.io.volumes import write_volume

LIB = Path(__file__).resolve().parents[2] / "IPv2Denoise"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small chest-like NRRD and a tiny model (fast enough to denoise in a second)."""
    from conftest import chest_like_volume

    tmp = tmp_path_factory.mktemp("claims")
    write_volume(Volume(chest_like_volume(3, (4, 48, 48)), (0.7, 0.7, 1.25)), tmp / "in.nrrd")
    save_model(UNet(in_slices=3, base_channels=4, levels=2), tmp / "w.safetensors", card={"name": "tiny"})
    return tmp


def _cli(capsys, *args: str) -> tuple[int, str]:
    try:
        code = cli_main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


class Holder:
    """Another process that holds the claim on ``path`` until it is killed."""

    def __init__(self, path: Path) -> None:
        script = f"""
            import sys, time
            from IPv2DenoiseLib.core.atomic import claim_output
            with claim_output({str(path)!r}):
                print("held", flush=True)
                time.sleep(120)
        """
        env = {**os.environ, "PYTHONPATH": str(LIB)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("dicom", [False, True], ids=["nrrd", "dicom"])
def test_second_writer_of_one_output_gets_one_line_and_exit_2(tiny, tmp_path, capsys, dicom) -> None:
    out = tmp_path / ("series" if dicom else "out.nrrd")
    holder = Holder(out)
    try:
        args = ["denoise", str(tiny / "in.nrrd"), str(out), "--weights", str(tiny / "w.safetensors")]
        code, err = _cli(capsys, *args, *(["--dicom"] if dicom else []), "--device", "cpu")
        assert code == 2
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and "being written by another run" in lines[0], err
        assert f"pid {holder.proc.pid}" in lines[0]
        assert "Traceback" not in err
        assert not out.exists()  # the loser wrote nothing
    finally:
        holder.kill()
    # the kernel released the claim of the killed holder: the next run works
    code, err = _cli(capsys, *args, *(["--dicom"] if dicom else []), "--device", "cpu")
    assert code == 0, err
    assert out.exists()
    assert not list((out.parent / STAGING_DIR).glob("*")) if (out.parent / STAGING_DIR).exists() else True


def test_a_claim_cannot_be_taken_twice_and_is_released_after_the_block(tmp_path) -> None:
    target = tmp_path / "out.nrrd"
    with claim_output(target):
        holder_check = subprocess.run(
            [
                sys.executable,
                "-c",
                "from IPv2DenoiseLib.core.atomic import claim_output\n"
                f"with claim_output({str(target)!r}): pass",
            ],
            env={**os.environ, "PYTHONPATH": str(LIB)},
            capture_output=True,
            text=True,
        )
        assert holder_check.returncode != 0 and "being written by another run" in holder_check.stderr
    with claim_output(target):  # released: taken again at once
        pass
    assert not (tmp_path / STAGING_DIR).exists()  # the lock file and staging folder are gone


def test_a_waiting_claim_is_taken_when_its_holder_dies(tmp_path) -> None:
    """``wait=True`` (a retried batch case): no error while another process holds the claim, and
    the claim once the holder is gone, also after ``kill -9``."""
    import threading

    target = tmp_path / "out.nrrd"
    holder = Holder(target)
    taken = threading.Event()

    def claim_and_note() -> None:
        with claim_output(target, wait=True):
            taken.set()

    waiter = threading.Thread(target=claim_and_note)
    try:
        waiter.start()
        assert not taken.wait(timeout=1.0), "claimed while another process held it"
    finally:
        holder.kill()
    assert taken.wait(timeout=30), "the claim of a killed holder was never taken"
    waiter.join(timeout=30)
    assert not (tmp_path / STAGING_DIR).exists()


def test_a_lock_file_left_by_a_killed_holder_is_cleaned_and_a_held_one_kept(tmp_path) -> None:
    """A holder killed inside its claim leaves its lock file (the kernel only releases the lock).
    The staging clean-up removes that file, and never the file of a claim that is still held."""
    from IPv2DenoiseLib.core.atomic import clean_stale_staging

    dead, alive = tmp_path / "dead.nrrd", tmp_path / "alive.nrrd"
    Holder(dead).kill()
    holder = Holder(alive)
    try:
        staging = tmp_path / STAGING_DIR
        assert {p.name for p in staging.iterdir()} == {"dead.nrrd.lock", "alive.nrrd.lock"}
        assert clean_stale_staging(tmp_path) == []  # lock files only when asked (a batch's end)
        removed = clean_stale_staging(tmp_path, locks=True)
        assert [p.name for p in removed] == ["dead.nrrd.lock"]
        assert [p.name for p in staging.iterdir()] == ["alive.nrrd.lock"]
        with pytest.raises(UserError, match="being written by another run"):  # still held
            with claim_output(alive):
                pass
    finally:
        holder.kill()
    assert [p.name for p in clean_stale_staging(tmp_path, locks=True)] == ["alive.nrrd.lock"]
    assert not (tmp_path / STAGING_DIR).exists()


def test_a_batch_ends_without_the_lock_of_a_worker_killed_after_its_record(batch_archive, tmp_path) -> None:
    """The race behind a red CI run: a Ray worker killed after it recorded a case but before it
    removed the case's lock file. Its retry finds the record and never claims the case, so the
    lock file stayed in OUT; the batch's final clean-up now removes it."""
    archive, _ = batch_archive
    source = tmp_path / "archive"
    shutil.copytree(archive / "site_a", source / "site_a")
    out = tmp_path / "out"
    assert cli_main(["batch", str(source), str(out), "--prefetch", "0"]) == 1  # site_a has a corrupt study
    Holder(out / "site_a" / "p01.nrrd").kill()  # the killed worker's leftover
    assert (out / "site_a" / STAGING_DIR / "p01.nrrd.lock").is_file()
    assert cli_main(["batch", str(source), str(out)]) == 1
    assert "site_a/p01,skipped" in (out / "batch-summary.csv").read_text()  # verified from its record
    assert not [p for p in out.rglob("*") if STAGING_DIR in p.parts]


def test_no_clobber_writes_never_replace_what_another_writer_made_meanwhile(tmp_path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(UserError, match="first writer wins"):
        with atomic_path(target, replace=False) as tmp:
            Path(tmp).write_text("ours")
            target.write_text("theirs")  # another writer finished first
    assert target.read_text() == "theirs"
    folder = tmp_path / "series"
    with pytest.raises(UserError, match="first writer wins"):
        with atomic_dir(folder) as tmp:
            (tmp / "IM000001.dcm").write_text("ours")
            folder.mkdir()
            (folder / "IM000001.dcm").write_text("theirs")
    assert (folder / "IM000001.dcm").read_text() == "theirs"


def test_overwrite_replaces_a_derived_series_and_nothing_else(tiny, tmp_path, capsys, ct_series) -> None:
    source = ct_series(3)
    out = tmp_path / "derived"
    args = ["denoise", str(source), str(out), "--dicom", "--weights", str(tiny / "w.safetensors")]
    assert _cli(capsys, *args, "--device", "cpu")[0] == 0
    first = {pydicom.dcmread(f).SeriesInstanceUID for f in out.iterdir()}
    code, err = _cli(capsys, *args, "--device", "cpu")
    assert code == 2 and "--overwrite" in err  # the refusal names the option that helps
    code, err = _cli(capsys, *args, "--overwrite", "--device", "cpu")
    assert code == 0, err
    second = {pydicom.dcmread(f).SeriesInstanceUID for f in out.iterdir()}
    assert len(second) == 1 and second != first and len(list(out.iterdir())) == 3
    # a folder that is not a series is never replaced, even with --overwrite
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, err = _cli(capsys, *args[:2], str(precious), *args[3:], "--overwrite", "--device", "cpu")
    assert code == 2 and "notes.txt" in err
    assert (precious / "notes.txt").read_text() == "keep me"
    # nor an original series named OUT by mistake, though it holds only *.dcm files (it was deleted)
    original = tmp_path / "original_scan"
    original.mkdir()
    for k, f in enumerate(sorted(ct_series(3, name="scanner").iterdir())):
        (original / f"IM{k:04d}.dcm").write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in original.iterdir()}
    code, err = _cli(capsys, *args[:2], str(original), *args[3:], "--overwrite", "--device", "cpu")
    assert code == 2 and "not a series derived by IPv2 Denoise" in err
    assert {f.name: f.read_bytes() for f in original.iterdir()} == before


def test_send_to_an_unreachable_pacs_names_the_written_series_and_the_command(
    tiny, tmp_path, capsys, ct_series
) -> None:
    import socket

    with socket.socket() as sock:  # a free loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "derived"
    code, err = _cli(
        capsys,
        "denoise",
        str(ct_series(2)),
        str(out),
        "--dicom",
        "--send",
        f"127.0.0.1:{port}:NOBODY",
        "--timeout",
        "2",
        "--retries",
        "0",
        "--weights",
        str(tiny / "w.safetensors"),
        "--device",
        "cpu",
    )
    assert code == 2
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1
    assert (
        f"complete in {out}" in error[0]
        and f"ipv2-denoise send {out} --to 127.0.0.1:{port}:NOBODY" in error[0]
    )
    assert len(list(out.glob("*.dcm"))) == 2
    assert np.isfinite(pydicom.dcmread(next(out.glob("*.dcm"))).pixel_array).all()


def test_writers_sharing_a_folder_never_remove_each_others_staging(tmp_path: Path) -> None:
    """Two Ray workers writing into one case folder once lost a file: one removed the emptied staging
    folder between the other's ``mkdir`` and ``mkdtemp`` (CI, FileNotFoundError). Real processes
    hammer one folder here; every file must arrive and the staging folder must be gone afterwards."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(LIB)!r})
        from IPv2DenoiseLib.core.atomic import atomic_path
        folder, prefix = Path(sys.argv[1]), sys.argv[2]
        for index in range(300):
            with atomic_path(folder / f"{{prefix}}-{{index}}.txt") as tmp:
                Path(tmp).write_text("x")
        """
    )
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), f"w{n}"], stderr=subprocess.PIPE, text=True
        )
        for n in range(4)
    ]
    failures = [w.communicate()[1] for w in writers if w.wait() != 0]
    assert failures == []
    assert len(list(tmp_path.glob("w*-*.txt"))) == 4 * 300
    assert not (tmp_path / STAGING_DIR).exists()


def test_cleaning_a_case_and_claiming_an_output_beside_a_writer_never_fails(tmp_path: Path) -> None:
    """The same race in the other two steps that look into a shared staging folder: a batch worker
    clears its own case's leftovers (``remove_stale_partials``) and a run claims its output
    (``claim_output``) while another process's writes in that folder create and remove the staging
    folder. Both once failed with FileNotFoundError when it vanished between two steps (CI, a Ray
    worker's case marked failed); here each runs 1,500 times beside two real writers."""
    writer = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(LIB)!r})
        from IPv2DenoiseLib.core.atomic import atomic_path
        folder, prefix = Path(sys.argv[1]), sys.argv[2]
        while not (folder / "stop").exists():
            with atomic_path(folder / f"{{prefix}}.txt") as tmp:
                Path(tmp).write_text("x")
        """
    )
    cleaner = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(LIB)!r})
        from IPv2DenoiseLib.core.atomic import claim_output, remove_stale_partials
        folder = Path(sys.argv[1])
        try:
            for index in range(1500):
                remove_stale_partials(folder / "case.nrrd")
                with claim_output(folder / "claimed.nrrd"):
                    assert (folder / ".ipv2-denoise-tmp" / "claimed.nrrd.lock").is_file()
        finally:
            (folder / "stop").touch()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), f"w{n}"]) for n in range(2)]
    result = subprocess.run([sys.executable, "-c", cleaner, str(tmp_path)], capture_output=True, text=True)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("w*.txt")) == ["w0.txt", "w1.txt"]
    assert not (tmp_path / STAGING_DIR).exists()


def test_replacing_a_folder_never_leaves_the_output_name_empty(tmp_path: Path) -> None:
    """``atomic_dir(replace=True)`` swaps the two folders in one step; where it must take two, a
    writer killed between them left the old output only inside its staging entry, and the next
    clean-up deleted it (``denoise --dicom --overwrite``, ``demo``): now the clean-up puts it back."""
    import socket

    from IPv2DenoiseLib.core.atomic import REPLACED_SUFFIX, clean_stale_staging

    out = tmp_path / "series"
    out.mkdir()
    (out / "IM1.dcm").write_bytes(b"old")
    with atomic_dir(out, replace=True) as new:
        (new / "IM1.dcm").write_bytes(b"new")
        assert (out / "IM1.dcm").read_bytes() == b"old"  # the old one stays until the new is complete
    assert (out / "IM1.dcm").read_bytes() == b"new"
    assert not (tmp_path / STAGING_DIR).exists()  # nothing left aside
    # the state a kill between the two renames leaves: the old folder aside, the name free
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    entry = (
        tmp_path
        / STAGING_DIR
        / f"{socket.gethostname().replace('-', '_') or 'host'}-{dead.stdout.strip()}-x1"
    )
    (entry / f"series{REPLACED_SUFFIX}").mkdir(parents=True)
    (out / "IM1.dcm").rename(entry / f"series{REPLACED_SUFFIX}" / "IM1.dcm")
    out.rmdir()
    clean_stale_staging(tmp_path)
    assert (out / "IM1.dcm").read_bytes() == b"new"  # the old code deleted the only copy
    assert not (tmp_path / STAGING_DIR).exists()


def test_a_figure_is_never_half_written_under_its_name(tmp_path: Path) -> None:
    """``savefig`` wrote straight to the name: a kill mid-write left a truncated image, and a rerun
    truncated the previous one while drawing. ``save_figure`` goes through a staging file."""
    from matplotlib.figure import Figure

    from IPv2DenoiseLib.core.atomic import save_figure

    path = tmp_path / "curves.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    save_figure(fig, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def broken(target, **kwargs) -> None:
        Path(target).write_bytes(b"\x89PNG half")  # a writer cut off mid-way
        raise OSError(28, "No space left on device")

    fig.savefig = broken
    with pytest.raises(OSError):
        save_figure(fig, path)
    assert path.read_bytes() == before and not (tmp_path / STAGING_DIR).exists()
