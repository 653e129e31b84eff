"""The command line on real-world mistakes: one line, exit 2, nothing written, input unchanged.

Most tests call the CLI's ``main`` in this process (fast); a real terminal (pty), ``kill -9`` and
a live process need real subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from IPv2DenoiseLib.app.cli import build_parser
from IPv2DenoiseLib.app.cli import main as cli_main
from IPv2DenoiseLib.app.slicer_support.process import JobStatus
from IPv2DenoiseLib.core.atomic import STAGING_DIR, clean_stale_staging, clean_stale_staging_tree
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.models import UNet
from IPv2DenoiseLib.denoiser.weights import save_model
from IPv2DenoiseLib.io.dicom_export import export_derived_series
from IPv2DenoiseLib.io.volumes import write_volume

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "IPv2Denoise"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys):
    """``run(*args)``: the CLI in this process, as a user would call it; returns its exit and output."""

    def call(*args: str) -> Result:
        try:
            code = cli_main(list(args))
        except SystemExit as exc:  # argparse: --help, bad arguments
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return call


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    """A small chest-like volume and a tiny model's weights."""
    tmp = tmp_path_factory.mktemp("cli_inputs")
    yy, xx = np.mgrid[:40, :48]
    body = ((yy - 20) / 16.0) ** 2 + ((xx - 24) / 19.0) ** 2 < 1
    array = np.where(body, 40.0, -1000.0)[None].repeat(3, axis=0).astype(np.float32)
    write_volume(Volume(array, (0.8, 0.8, 2.0)), tmp / "in.nrrd")
    save_model(UNet(in_slices=3, base_channels=4, levels=2), tmp / "w.safetensors", {"strategy": "ipv2"})
    return tmp


@pytest.fixture
def denoise(run, case):
    def call(*args: str) -> Result:
        return run("denoise", *args, "--weights", str(case / "w.safetensors"), "--device", "cpu")

    return call


def one_line_exit_2(result: Result, expected: str, *, before_work: bool = True) -> None:
    """Exit 2, one error line (the last), no traceback; ``before_work``: nothing else printed at all."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and lines and "error: " in lines[-1], result.stderr
    assert sum("error" in line for line in lines) == 1, result.stderr
    assert re.search(expected, lines[-1]), lines[-1]
    if before_work:
        assert len(lines) == 1, result.stderr


def test_help_of_every_command_prints_without_a_traceback(run) -> None:
    result = run("--help")
    assert result.returncode == 0 and "make-dataset" in result.stdout and "2 %" in result.stdout
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert run(name, "--help").returncode == 0, name


def test_denoise_refuses_to_write_over_its_input(case, denoise, ct_series) -> None:
    source = case / "in.nrrd"
    before = (source.read_bytes(), source.stat().st_mtime_ns)
    one_line_exit_2(denoise(str(source), str(source), "--overwrite"), "is the input")
    assert (source.read_bytes(), source.stat().st_mtime_ns) == before
    folder = ct_series(3)
    listing = sorted(p.name for p in folder.iterdir())
    one_line_exit_2(denoise(str(folder), str(folder / "out.nrrd")), "lies inside it")
    assert sorted(p.name for p in folder.iterdir()) == listing


def test_existing_output_is_refused_unless_overwrite(case, denoise) -> None:
    out = case / "exists.nrrd"
    out.write_bytes(b"precious")
    one_line_exit_2(denoise(str(case / "in.nrrd"), str(out)), r"already exists; pass --overwrite")
    assert out.read_bytes() == b"precious"
    result = denoise(str(case / "in.nrrd"), str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize(
    "where, expected",
    [
        ("missing/out.nrrd", "does not exist"),
        ("a_file/out.nrrd", "is not a folder"),
        ("/proc/ipv2-denoise-out.nrrd", "cannot write into"),  # read-only even for root
    ],
)
def test_unwritable_output_is_refused_before_any_work(case, denoise, where, expected) -> None:
    (case / "a_file").write_text("x")
    out = where if where.startswith("/") else str(case / where)
    result = denoise(str(case / "in.nrrd"), out, "--json-progress")
    one_line_exit_2(result, expected)
    assert "progress" not in result.stdout  # refused before reading or denoising


def test_demo_out_that_cannot_be_made_is_one_line_before_any_work(case, run) -> None:
    (case / "blocker").write_text("x")
    result = run("demo", "--out", str(case / "blocker" / "sub"), "--weights", str(case / "w.safetensors"))
    one_line_exit_2(result, "blocker is not a folder")


def test_degenerate_shapes_are_refused(case, denoise) -> None:
    line = np.full((64, 1, 8), -1000.0, np.float32)  # 8 x 1 x 64 (x, y, z)
    sitk.WriteImage(sitk.GetImageFromArray(line), str(case / "line.nrrd"))
    one_line_exit_2(denoise(str(case / "line.nrrd"), str(case / "l.nrrd")), "degenerate", before_work=False)
    small = np.full((4, 8, 8), -1000.0, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(small), str(case / "small.nrrd"))
    one_line_exit_2(
        denoise(str(case / "small.nrrd"), str(case / "s.nrrd")), "too small to denoise", before_work=False
    )
    assert not (case / "l.nrrd").exists() and not (case / "s.nrrd").exists()


def test_hints_name_options_the_command_has(case, denoise) -> None:
    no_air = np.full((3, 32, 32), 40.0, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(no_air), str(case / "noair.nrrd"))
    refused = denoise(str(case / "noair.nrrd"), str(case / "na.nrrd"))
    one_line_exit_2(refused, "--force", before_work=False)
    forced = denoise(str(case / "noair.nrrd"), str(case / "na.nrrd"), "--force")
    assert forced.returncode == 0, forced.stderr  # the option named in the hint exists and works


def test_info_on_a_parent_folder_skips_hidden_folders(tmp_path, run, ct_series) -> None:
    venv = tmp_path / "project" / ".venv" / "lib"
    venv.mkdir(parents=True)
    (venv / "CT_small.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    one_line_exit_2(run("info", str(tmp_path / "project")), r"hidden folders such as \.venv are not searched")
    ct_series(3, name="project/scan")
    result = run("info", str(tmp_path / "project"))
    assert result.returncode == 0 and "128 x 128 x 3" in result.stdout, result.stderr


def test_piped_progress_prints_plain_lines_for_every_stage(case, denoise) -> None:
    result = denoise(str(case / "in.nrrd"), str(case / "piped.nrrd"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("running on: CPU")
    plain = [line for line in lines if line.startswith("denoise: ")]
    for stage in ("reading", "loading the model", "denoised", "writing"):
        assert any(stage in line for line in plain), (stage, lines)
    assert plain[-1].startswith("denoise: 100%") and "\r" not in result.stderr


def test_terminal_progress_bar_never_shares_the_running_on_line(case) -> None:
    primary, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120-column terminal
    env = {**os.environ, "PYTHONPATH": str(LIB), "OMP_NUM_THREADS": "2", "COLUMNS": "120"}
    args = [
        "denoise",
        str(case / "in.nrrd"),
        str(case / "tty.nrrd"),
        "--weights",
        str(case / "w.safetensors"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "IPv2DenoiseLib", *args, "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=replica,
        env=env,
    )
    os.close(replica)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    before = text[: text.index("running on:")]
    assert before.strip() == "", repr(text[:200])  # nothing drawn before it on that line
    assert "100%" in text


def _die_while_writing(script: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env)
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_while_writing_leaves_nothing_like_an_output_and_is_cleaned_later(tmp_path) -> None:
    _die_while_writing(
        """
        import os, signal
        from IPv2DenoiseLib.core.atomic import atomic_path
        with atomic_path("out.nrrd") as tmp:
            open(tmp, "wb").write(b"NRRD0004 half")
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    _die_while_writing(
        """
        import os, signal
        import numpy as np
        from IPv2DenoiseLib.core.volume import Volume
        from IPv2DenoiseLib.io.dicom_export import export_derived_series
        volume = Volume(np.full((6, 16, 16), -1000.0, np.float32))
        def die(done, total, message):
            if done == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        export_derived_series(volume, "series", progress=die)
        """,
        tmp_path,
    )
    visible = [p for p in tmp_path.rglob("*") if not p.relative_to(tmp_path).parts[0].startswith(".")]
    assert visible == []  # no out.nrrd, no series folder, nothing a user or a glob would pick up
    leftovers = list((tmp_path / STAGING_DIR).iterdir())
    assert len(leftovers) == 1  # the export's start already removed the first crash's leftovers
    assert (leftovers[0] / "series").is_dir()
    write_volume(Volume(np.full((2, 16, 16), -1000.0, np.float32)), tmp_path / "next.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next.nrrd"]  # the next run cleaned up
    assert clean_stale_staging(tmp_path) == []


def test_exported_dicom_folder_respects_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        export_derived_series(Volume(np.full((2, 16, 16), -1000.0, np.float32)), tmp_path / "series")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == 0o755
    assert stat.S_IMODE(next((tmp_path / "series").iterdir()).stat().st_mode) == 0o644


def test_json_progress_reports_warnings_and_monotone_stages(case, denoise) -> None:
    result = denoise(str(case / "in.nrrd"), str(case / "j.nrrd"), "--json-progress")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    fractions = [r["progress"] for r in records if "progress" in r]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = " ".join(r.get("message", "") for r in records)
    assert "reading" in messages and "loading the model" in messages and "writing" in messages


def test_slicer_help_links_nowhere_invented_and_setup_uses_pips_index() -> None:
    module = (REPO / "IPv2Denoise" / "IPv2Denoise.py").read_text()
    help_text = module[module.index("helpText") : module.index("acknowledgementText")]
    assert "http" not in help_text and "docs/slicer-module.md" in help_text
    setup = (REPO / "scripts" / "setup.sh").read_text()
    commands = [line for line in setup.splitlines() if not line.lstrip().startswith("#")]
    assert not any("--index-url" in line and "--extra-index-url" not in line for line in commands)
    assert "pypi.org" not in setup
    assert "torch==$TORCH_VERSION+cpu" in setup  # the CPU pin: never the CUDA build without a GPU


def test_read_only_output_folder_is_refused_for_a_normal_user(case, tmp_path) -> None:
    """Root writes into read-only folders, so root runs the command without that power (setpriv
    drops CAP_DAC_OVERRIDE), as a normal user would: one line, exit 2, nothing written."""
    locked = tmp_path / "locked"
    locked.mkdir()
    cli = [sys.executable, "-m", "IPv2DenoiseLib", "denoise", "--weights", str(case / "w.safetensors")]
    command = [*cli, "--device", "cpu", str(case / "in.nrrd"), str(locked / "o.nrrd")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to run without root's access to every folder")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]
    env = {**os.environ, "PYTHONPATH": str(LIB), "OMP_NUM_THREADS": "2"}
    locked.chmod(0o555)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        locked.chmod(0o755)
    one_line_exit_2(Result(result.returncode, result.stdout, result.stderr), "cannot write into")
    assert not list(locked.iterdir())


def test_stale_staging_of_a_live_process_is_kept(tmp_path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = socket.gethostname().replace("-", "_")
        entry = tmp_path / STAGING_DIR / f"{host}-{sleeper.pid}-abc"
        entry.mkdir(parents=True)
        assert clean_stale_staging(tmp_path) == [] and entry.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.1)
    assert clean_stale_staging(tmp_path) == [entry]


def test_a_batch_end_sweeps_staging_left_anywhere_in_its_tree(tmp_path) -> None:
    """A worker killed right after creating its entry (still empty) in a records folder: the
    retry writes elsewhere, so only the end-of-run sweep removes it; a live writer's entry stays."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = socket.gethostname().replace("-", "_")
        killed = tmp_path / ".ipv2-batch" / "records" / "site_a" / STAGING_DIR / f"{host}-{dead.pid}-abc"
        live = tmp_path / "site_b" / STAGING_DIR / f"{host}-{sleeper.pid}-def"
        killed.mkdir(parents=True)
        live.mkdir(parents=True)
        assert clean_stale_staging_tree(tmp_path) == [killed]
        assert not killed.parent.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_slicer_job_status_collects_warnings_for_the_module() -> None:
    status = JobStatus()
    status.apply({"warning": "the field of view is truncated: ..."})
    assert status.warnings == ["the field of view is truncated: ..."]
    assert status.log == ["warning: the field of view is truncated: ..."]  # the module's log shows it
