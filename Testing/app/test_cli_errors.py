"""Errors of the machine and the shell are one line, never a traceback (issue #21, friction).

A bad option value, a reader that closes the pipe (``info --json | head``), a full disk and a loop
of symbolic links: one line on stderr and a fixed exit status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from IPv2DenoiseLib.core.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "SampleData" / "sample_uldct.nrrd"


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "IPv2Denoise"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "IPv2DenoiseLib", *args], capture_output=True, text=True, env=env, **kwargs
    )


def test_a_bad_option_value_is_one_line_not_the_whole_usage(tmp_path) -> None:
    result = _cli("denoise", str(SAMPLE), str(tmp_path / "o.nrrd"), "--ensemble", "3")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--ensemble" in lines[0] and "1, 2, 4, 8" in lines[0] and "usage:" not in result.stderr


#: The options each command needs before it reads --strength (serve's node; files that need not exist).
STRENGTH_COMMANDS = {
    "denoise": ["denoise", str(SAMPLE), "{tmp}/o.nrrd"],
    "batch": ["batch", str(SAMPLE), "{tmp}/out"],
    "serve": [
        "serve",
        "--port",
        "11112",
        "--aet",
        "NODE",
        "--forward",
        "127.0.0.1:104:PACS",
        "--spool",
        "{tmp}/spool",
    ],
}


@pytest.mark.parametrize("value", ["0.3", "2.5", "strong", "nan"])
@pytest.mark.parametrize("command", sorted(STRENGTH_COMMANDS))
def test_a_strength_out_of_range_or_not_a_number_is_one_line(tmp_path, command, value) -> None:
    args = [a.format(tmp=tmp_path) for a in STRENGTH_COMMANDS[command]]
    result = _cli(*args, "--strength", value)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "argument --strength: must be a number from 0.5 to 2, got " in line, line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("command", sorted(STRENGTH_COMMANDS))
def test_a_strength_on_a_model_without_a_noise_map_is_one_line(tmp_path, capsys, command) -> None:
    """``--model unet-ipv2`` (the plain U-Net, still shipped) has no noise level map to scale."""
    from IPv2DenoiseLib.app.cli import main

    args = [a.format(tmp=tmp_path) for a in STRENGTH_COMMANDS[command]]
    assert main([*args, "--model", "unet-ipv2", "--strength", "0.8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "strength 0.8: model unet-ipv2 takes no noise level map, so only strength 1 applies" in errors[0]
    assert list(tmp_path.iterdir()) == []  # no output, OUT folder or spool


def test_a_reader_that_closes_the_pipe_ends_quietly() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "IPv2Denoise"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "IPv2DenoiseLib", "info", str(SAMPLE), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # as `| head -0` does: nobody reads what info prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == ExitCode.BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_self_referencing_symlink_as_output_folder_is_one_line(tmp_path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = _cli("denoise", str(SAMPLE), str(loop / "out.nrrd"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 kB tmpfs: too small for the sample's denoised volume (root only; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk) -> None:
    out = tiny_disk / "denoised.nrrd"
    result = _cli("denoise", str(SAMPLE), str(out), "--device", "cpu")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tiny_disk.iterdir()) == []  # no half-written output, no staging left behind


@pytest.mark.parametrize(
    "command", ["denoise", "batch", "serve", "demo", "simulate", "make-dataset", "evaluate"]
)
def test_device_cuda_n_reaches_the_device_module(command) -> None:
    """``--device cuda:1`` is one definition for every command and is checked by core.device, not
    refused by argparse's ``choices``; an unknown device is one line."""
    from IPv2DenoiseLib.app.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse has no public accessor
    (device,) = [a for a in sub._actions if "--device" in a.option_strings]  # noqa: SLF001
    assert device.type("cuda:1") == "cuda:1" and device.type("CPU") == "cpu"
    assert device.choices is None
    result = _cli(command, "--device", "tpu")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'tpu' is not one of auto, cpu, cuda, mps" in result.stderr


def test_every_option_of_every_command_has_help() -> None:
    from IPv2DenoiseLib.app.cli import build_parser

    parser = build_parser()
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in parser._subparsers._group_actions[0].choices.items()  # noqa: SLF001
        for action in sub._actions  # noqa: SLF001
        if not action.help and not isinstance(action, argparse._HelpAction)  # noqa: SLF001
    ]
    assert not missing, missing


def test_batch_with_an_unknown_model_touches_nothing(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    result = _cli("batch", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "no-such-model")
    assert result.returncode == 2 and "no-such-model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys) -> None:
    """``--out`` naming an existing file: one line, exit 2, before data is read (the --anatomy
    volume does not even exist) and the file is left as it was."""
    from IPv2DenoiseLib.app.cli import main

    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    missing = str(tmp_path / "missing.nrrd")
    train = ["train", "--noise", "scanner", "--anatomy", missing, "--device", "cpu", "--out", str(plain)]
    commands = [
        train,
        [*train, "--legs", "2"],
        ["make-dataset", "--cases", "1", "--size", "32", "--slices", "2", "--out", str(plain)],
        ["evaluate", "--out", str(plain), "--device", "cpu"],
    ]
    for command in commands:
        assert main(command) == ExitCode.USER_ERROR, command
    err = capsys.readouterr().err
    assert "Traceback" not in err and "FileExistsError" not in err and "missing.nrrd" not in err
    assert err.count(f"error: --out: cannot create folder {plain}") == len(commands), err
    assert plain.read_text() == "not a folder"


@pytest.mark.parametrize("dicom", [False, True], ids=["volume", "dicom"])
def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path, dicom) -> None:
    """A service manager or scheduler stops with SIGTERM: before, Python's default ended the run at
    once (exit 143, nothing said, the output's lock and staging folder left beside it)."""
    import json
    import signal

    from IPv2DenoiseLib.core.atomic import STAGING_DIR

    out = tmp_path / ("series" if dicom else "out.nrrd")
    env = {**os.environ, "PYTHONPATH": str(REPO / "IPv2Denoise"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "IPv2DenoiseLib", "denoise", str(SAMPLE), str(out), "--model", "fast"]
    command += ["--ensemble", "8", "--json-progress"] + (["--dicom"] if dicom else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if json.loads(line).get("message", "").startswith(("denois", "slab")):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == ExitCode.CANCELLED
    assert proc.stderr.read().strip().endswith("denoise: cancelled (SIGTERM)")
    assert not out.exists() and not (tmp_path / STAGING_DIR).exists()
