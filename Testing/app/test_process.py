"""Background subprocess runner: JSON-lines progress, tree kill on cancel, stderr of a dying child."""

from __future__ import annotations

import sys
import textwrap
import time
from dataclasses import replace

import psutil
import pytest

from IPv2DenoiseLib.app.pipeline import ADAPT_STEPS_SECONDS_CAP, DenoiseOptions
from IPv2DenoiseLib.app.slicer_support.process import (
    BackgroundProcess,
    JobStatus,
    denoise_command,
    parse_json_line,
)
from IPv2DenoiseLib.core.errors import ExitCode, UserError
from IPv2DenoiseLib.training.adapt import AdaptConfig

PROGRESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    print(json.dumps({"device": "CPU (1 threads)"}), flush=True)
    print("a plain log line", flush=True)
    for i in range(1, 5):
        time.sleep(0.05)
        print(json.dumps({"progress": i / 4, "eta_s": (4 - i) * 0.05, "message": f"slab {i}/4"}), flush=True)
    print(json.dumps({"result": "out.nrrd", "seconds": 0.2}), flush=True)
    """
)

# The child starts a grandchild (sleeping), prints both pids, then sleeps itself.
TREE_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"pids": [__import__("os").getpid(), grandchild.pid]}), flush=True)
    print(json.dumps({"progress": 0.1, "eta_s": 100, "message": "working"}), flush=True)
    time.sleep(120)
    """
)


def _wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_parse_json_line():
    assert parse_json_line('{"progress": 0.5}\n') == {"progress": 0.5}
    assert parse_json_line("warning: something") is None
    assert parse_json_line("{not json}") is None
    assert parse_json_line("[1, 2]") is None


def test_progress_records_are_parsed_while_running():
    proc = BackgroundProcess([sys.executable, "-c", PROGRESS_SCRIPT]).start()
    seen = []
    assert _wait_for(lambda: seen.extend(proc.poll()) or proc.finished())
    proc.poll()
    fractions = [r["progress"] for r in seen if isinstance(r, dict) and "progress" in r]
    assert fractions == [0.25, 0.5, 0.75, 1.0]
    assert proc.returncode == ExitCode.OK
    assert proc.status.device == "CPU (1 threads)"
    assert proc.status.result == "out.nrrd" and proc.status.seconds == pytest.approx(0.2)
    assert proc.status.fraction == 1.0
    assert proc.status.log == ["a plain log line"]


def test_cancel_kills_child_and_grandchild_and_is_sticky():
    proc = BackgroundProcess([sys.executable, "-c", TREE_SCRIPT]).start()
    records = []
    assert _wait_for(
        lambda: any("pids" in r for r in (records.extend(proc.poll()) or records) if isinstance(r, dict))
    )
    pids = next(r["pids"] for r in records if isinstance(r, dict) and "pids" in r)
    assert all(psutil.pid_exists(p) for p in pids)
    proc.cancel()
    assert proc.wait(timeout=10) == ExitCode.CANCELLED
    assert proc.cancel_requested

    def gone(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert _wait_for(lambda: all(gone(p) for p in pids), timeout=10)


def test_dying_child_stderr_is_captured():
    script = (
        'import sys; print(\'{"progress": 0.3, "eta_s": 1}\', flush=True); '
        "sys.stderr.write('ipv2-denoise denoise: error: input: not a CT volume\\n'); sys.exit(2)"
    )
    proc = BackgroundProcess([sys.executable, "-c", script]).start()
    assert proc.wait(timeout=20) == ExitCode.USER_ERROR
    assert proc.error_message() == "ipv2-denoise denoise: error: input: not a CT volume"
    assert proc.status.result is None and proc.status.fraction == pytest.approx(0.3)


def test_status_fraction_never_decreases():
    status = JobStatus()
    status.apply({"progress": 0.6, "eta_s": 2})
    status.apply({"progress": 0.4, "eta_s": 3})
    assert status.fraction == 0.6 and status.eta_s == 3


def test_denoise_command():
    options = DenoiseOptions(model="unet-ipv2", device="cpu", remove_background=False)
    cmd = denoise_command("in.nrrd", "out.nrrd", options, python="PythonSlicer")
    assert cmd[:4] == ["PythonSlicer", "-m", "IPv2DenoiseLib", "denoise"]
    assert cmd[cmd.index("--device") + 1] == "cpu" and "--no-remove-background" in cmd
    assert "--json-progress" in cmd and "--adapt" not in cmd
    assert "--adapt" in denoise_command("in.nrrd", "out.nrrd", DenoiseOptions(model="unet-ipv2", adapt=True))
    assert "--ensemble" not in cmd
    best = denoise_command("in.nrrd", "out.nrrd", DenoiseOptions(model="unet-ipv2", ensemble=8))
    assert best[best.index("--ensemble") + 1] == "8"
    with pytest.raises(UserError, match="--device .gpu. is not one of auto, cpu, cuda, mps"):
        DenoiseOptions(model="m", device="gpu")
    # the command the Slicer job runs parses back into the same options
    from IPv2DenoiseLib.app.cli import build_parser

    adapted = DenoiseOptions(model="unet-ipv2", device="cuda:1", ensemble=4, adapt=True, adapt_seconds=20)
    args = build_parser().parse_args(denoise_command("in.nrrd", "out.nrrd", adapted)[3:])
    assert DenoiseOptions.from_args(args) == adapted
    stepped = replace(adapted, adapt_steps=150)
    args = build_parser().parse_args(denoise_command("in.nrrd", "out.nrrd", stepped)[3:])
    assert DenoiseOptions.from_args(args) == stepped
    # steps alone: the clock only stops a runaway, so the steps end the fine-tuning on any machine
    args = build_parser().parse_args(["denoise", "in.nrrd", "out.nrrd", "--adapt", "--adapt-steps", "150"])
    alone = DenoiseOptions.from_args(args)
    assert alone.adapt_steps == 150 and alone.adapt_seconds == ADAPT_STEPS_SECONDS_CAP
    config = alone.adapt_config()
    assert config.max_iterations == 150 and config.seconds == ADAPT_STEPS_SECONDS_CAP
    assert DenoiseOptions(adapt=True).adapt_config().max_iterations == AdaptConfig().max_iterations
    with pytest.raises(UserError, match="adapt steps"):
        DenoiseOptions(adapt=True, adapt_steps=0)


def test_progress_shares_follow_the_models_cost():
    """The denoise stage's share of the bar grows with the network's FLOPs (read from the shipped
    cards), the ensemble and --refine, so the ETA of a refined fast run is not 3× too short."""
    fast = DenoiseOptions(model="fast").stage_weights()
    quality = DenoiseOptions(model="quality").stage_weights()
    assert quality["denoise"] / fast["denoise"] == pytest.approx(195_456 / 49_600, rel=0.01)  # the cards
    assert DenoiseOptions(model="fast", ensemble=8).stage_weights()["denoise"] == pytest.approx(
        8 * fast["denoise"]
    )
    fast_refined = DenoiseOptions(model="fast", refine=True).stage_weights()["denoise"]
    assert fast_refined / fast["denoise"] == pytest.approx(12.0)  # 1 network pass + 11 for refining
    best = DenoiseOptions(model="quality", ensemble=8, refine=True).stage_weights()["denoise"]
    assert 1.2 < best / (8 * quality["denoise"]) < 1.5  # refining adds a third to 8 quality passes
    assert fast["read"] + fast["write"] < fast["denoise"]
