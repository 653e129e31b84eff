"""``train --legs N``: a campaign of legs run back to back, continued by running it again (issue #24)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from IPv2DenoiseLib.core.progress import Cancelled, CancelToken, StopRequest
from IPv2DenoiseLib.denoiser.weights import sha256_file
from IPv2DenoiseLib.training.campaign import (
    CAMPAIGN_FILE,
    campaign_table,
    check_campaign,
    finished_legs,
    held_out_sets,
    leg_folder,
    plot_campaign,
    run_campaign,
)
from IPv2DenoiseLib.training.trainer import TrainConfig, train

#: A tiny network and batch: the campaign's bookkeeping is under test, not the learning.
TINY_KWARGS = {"in_slices": 3, "base_channels": 4, "levels": 2}


def _command(phantom: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--noise",
        "scanner",
        "--data",
        str(phantom),
        "--schedule",
        "constant",
        "--noise-pool",
        "2",
        "--device",
        "cpu",
        "--model-kwargs",
        json.dumps(TINY_KWARGS),
        "--batch",
        "4",
        "--patch",
        "32",
        "--iterations",
        "2",
        "--val-every",
        "2",
        "--val-slices",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_a_campaign_runs_its_legs_in_turn_and_goes_on_where_it_stopped(
    made_dataset, tmp_path, capsys
) -> None:
    from IPv2DenoiseLib.app.cli import main

    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    command = _command(phantom, out, "--val", str(val))
    assert main([*command, "--legs", "2"]) == 0
    first, second = leg_folder(out, 1) / "model.safetensors", leg_folder(out, 2) / "model.safetensors"
    cards = finished_legs(out, "model")
    assert len(cards) == 2
    # leg 2 started from leg 1's exported weights; its card carries both legs
    assert cards[1]["initialised_from"] == "model.safetensors" and [g["leg"] for g in cards[1]["legs"]] == [
        1,
        2,
    ]
    assert cards[1]["legs"][0] == cards[0]["legs"][0]
    # the campaign's weights are the last leg's, with its card; campaign.json lists both legs
    assert sha256_file(out / "model.safetensors") == sha256_file(second) == cards[1]["sha256"]
    assert json.loads((out / "model.json").read_text())["sha256"] == cards[1]["sha256"]
    record = json.loads((out / CAMPAIGN_FILE).read_text())
    assert [g["leg"] for g in record["legs"]] == [1, 2]
    assert record["legs"][1]["weights"] == "leg_002/model.safetensors"
    assert record["legs"][1]["sha256"] == cards[1]["sha256"] and record["legs"][1]["iterations"] == [0, 2]
    assert record["legs"][1]["validation"]["psnr_label"] == pytest.approx(
        cards[1]["validation"]["psnr_label"]
    )
    assert record["plan"]["seed"] == 0 and "iterations" not in record["plan"]  # a leg's length may change
    assert record["plan"]["cases"] == ["case_000"]  # by name: the campaign may move to another machine
    assert (out / "campaign.png").stat().st_size > 10_000
    # leg k trains with seed + k - 1, so the legs draw different slabs and patches
    seeds = [
        torch.load(leg_folder(out, k) / "checkpoint.pt", weights_only=True)["config"]["seed"] for k in (1, 2)
    ]
    assert seeds == [0, 1]
    stamp = first.stat().st_mtime_ns

    # the same command again: nothing to do, nothing rewritten
    capsys.readouterr()
    assert main([*command, "--legs", "2"]) == 0
    assert "2 leg(s) already finished" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == stamp and len(finished_legs(out, "model")) == 2

    # one more leg: from leg 2, legs 1 and 2 untouched; on another machine the data may lie elsewhere
    moved = tmp_path / "elsewhere" / "case_000"
    moved.parent.mkdir()
    moved.symlink_to(phantom, target_is_directory=True)
    command = [str(moved) if arg == str(phantom) else arg for arg in command]
    assert main([*command, "--legs", "3", "--device", "cpu"]) == 0
    third = finished_legs(out, "model")[2]
    assert [g["leg"] for g in third["legs"]] == [1, 2, 3] and first.stat().st_mtime_ns == stamp
    assert sha256_file(out / "model.safetensors") == third["sha256"]

    # other options than a leg's length: refused in one line, before any work
    capsys.readouterr()
    assert main([*command, "--legs", "4", "--lr", "5e-4"]) == 2
    assert main([*_command(phantom, out), "--legs", "4"]) == 2  # no --val: validation cases differ
    assert main([*command, "--legs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("ipv2-denoise train: error:") == 3 and "Traceback" not in err
    assert "other options (lr differ)" in err and "val_cases" in err
    assert not leg_folder(out, 4).exists()
    # a folder of legs without the campaign's record is not taken for a campaign
    (out / CAMPAIGN_FILE).rename(tmp_path / "aside.json")
    assert main([*command, "--legs", "4"]) == 2
    assert "holds legs but no campaign.json" in capsys.readouterr().err
    (tmp_path / "aside.json").rename(out / CAMPAIGN_FILE)
    # the held-out volumes may change between runs (they change nothing in the training; a
    # "held-out" volume found in the training must be dropped), on a record written before too
    changed = replace(_tiny_config(phantom, val, out, iterations=4, val_every=2), val_anatomy=[str(phantom)])
    assert len(check_campaign(changed, 4)["legs"]) == 3
    record = json.loads((out / CAMPAIGN_FILE).read_text())
    record["plan"]["val_anatomy"] = ["old_heldout.nrrd"]
    (out / CAMPAIGN_FILE).write_text(json.dumps(record))
    assert len(check_campaign(changed, 4)["legs"]) == 3

    # a leg cut short (here cancelled after its first round; kill -9 leaves the same checkpoint)
    # resumes from its checkpoint when the campaign is run again, not from the leg's start
    config = _tiny_config(phantom, val, out, iterations=4, val_every=2)
    cancel = CancelToken()

    def cancel_after_first_round(done: int, total: int, message: str = "") -> None:
        if done >= 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_campaign(config, 4, progress_for_leg=lambda leg: cancel_after_first_round, cancel=cancel)
    assert (leg_folder(out, 4) / "checkpoint.pt").is_file() and len(finished_legs(out, "model")) == 3
    assert len(json.loads((out / CAMPAIGN_FILE).read_text())["legs"]) == 3
    card = run_campaign(config, 4)
    assert card["legs"][-1]["iterations"] == [2, 4] and card["legs"][-1]["leg"] == 4
    assert card["legs"][-1]["initialised_from"] == "model.safetensors"
    assert first.stat().st_mtime_ns == stamp and len(finished_legs(out, "model")) == 4


def _tiny_config(phantom: Path, val: Path, out: Path, iterations: int, val_every: int = 100) -> TrainConfig:
    """One leg of the tiny network on the phantom (the API's view of ``_command``)."""
    config = TrainConfig(
        cases=[str(phantom)],
        val_cases=[str(val)],
        out=str(out),
        name="model",
        noise="scanner",
        schedule="constant",
        noise_pool=2,
        device="cpu",
        batch=4,
        patch=32,
        iterations=iterations,
        val_every=val_every,
        val_slices=2,
    )
    config.model_kwargs = dict(TINY_KWARGS)
    return config


def test_a_stop_request_ends_the_running_leg_as_a_finished_leg_and_the_campaign_after_it(
    made_dataset, tmp_path
) -> None:
    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    config = _tiny_config(phantom, val, out, iterations=6)
    stop = StopRequest()
    seen_listening = []

    def stop_leg_2_after_3_steps(leg: int):
        def progress(done: int, total: int, message: str = "") -> None:
            seen_listening.append(stop.listening)
            if leg == 2 and done == 3:
                stop.request("SIGTERM")

        return progress

    notices: list[str] = []
    card = run_campaign(
        config, 3, progress_for_leg=stop_leg_2_after_3_steps, stop=stop, notice=notices.append
    )
    assert all(seen_listening) and not stop.listening  # it listens while steps run, and only then
    # leg 2 ended after its third step, validated (a round at 3, not only at 6) and exported
    assert card["legs"][-1]["leg"] == 2 and card["legs"][-1]["iterations"] == [0, 3]
    assert card["legs"][-1]["stopped_by"] == "SIGTERM" and card["history"]["iteration"] == [3]
    assert card["validation"]["psnr_label"] > 0
    cards = finished_legs(out, "model")
    assert len(cards) == 2 and not leg_folder(out, 3).exists()  # the campaign stopped after it
    assert sha256_file(out / "model.safetensors") == cards[1]["sha256"]
    record = json.loads((out / CAMPAIGN_FILE).read_text())
    assert [g["stopped_by"] for g in record["legs"]] == ["iterations", "SIGTERM"]
    assert "(stopped by SIGTERM)" in record["legs"][1]["summary"]
    assert any("stopped after leg 2 (SIGTERM)" in line for line in notices)
    # the same command again goes on with leg 3, from the stopped leg's weights
    card = run_campaign(config, 3)
    assert card["legs"][-1]["leg"] == 3 and card["legs"][-1]["iterations"] == [0, 6]
    assert card["legs"][-1]["initialised_from"] == "model.safetensors"
    assert card["legs"][1]["stopped_by"] == "SIGTERM" and len(finished_legs(out, "model")) == 3


def test_a_stop_before_the_first_step_keeps_nothing(made_dataset, tmp_path) -> None:
    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    stop = StopRequest()
    stop.request("SIGTERM")
    with pytest.raises(Cancelled, match="before the first step"):
        train(_tiny_config(phantom, val, tmp_path / "leg", iterations=4), stop=stop)
    assert not (tmp_path / "leg" / "model.safetensors").exists()
    assert not (tmp_path / "leg" / "checkpoint.pt").exists()


def test_the_train_command_turns_the_first_signal_into_a_stop_and_a_second_into_an_abort() -> None:
    from IPv2DenoiseLib.app.commands.train import stop_on_signals

    stop = StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop):
        # nothing trains yet (reading data, filling the pool): nothing to keep, so it aborts at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert not stop.requested
        stop.listening = True
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a leg trains: a stop, not an abort
        time.sleep(0.1)
        assert stop.requested and stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second one aborts
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_sigterm_to_a_training_campaign_keeps_the_leg_and_a_rerun_goes_on(made_dataset, tmp_path) -> None:
    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    command = _command(phantom, out, "--val", str(val), "--legs", "2", "--json-progress")
    command[command.index("--iterations") + 1] = "100000"  # only the signal ends this leg
    command[command.index("--val-every") + 1] = "100000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "IPv2DenoiseLib", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        steps = 0
        for line in proc.stdout:  # a JSON progress line per step: signal once the leg made a few
            steps += '"progress"' in line
            if steps == 3:
                break
        assert steps == 3, "the leg never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
    assert "SIGTERM: ending the leg at its next step" in err and "stopped after leg 1 (SIGTERM)" in err
    cards = finished_legs(out, "model")
    assert len(cards) == 1 and not leg_folder(out, 2).exists()
    leg = cards[0]["legs"][-1]
    assert leg["stopped_by"] == "SIGTERM" and steps <= leg["iterations"][1] < 100000
    assert cards[0]["history"]["iteration"] == [leg["iterations"][1]]  # validated at the stop
    checkpoint = torch.load(leg_folder(out, 1) / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == leg["iterations"][1]
    assert sha256_file(out / "model.safetensors") == cards[0]["sha256"]


def test_a_baseline_is_validated_beside_every_leg_on_the_same_sets(made_dataset, tmp_path, capsys) -> None:
    from IPv2DenoiseLib.app.cli import main

    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    config = _tiny_config(phantom, val, out, iterations=2)
    first = run_campaign(config, 1)
    # leg 2 with leg 1's weights as the baseline: the baseline's figures are leg 1's own (to float
    # rounding: in training the network runs channels-last)
    reference = leg_folder(out, 1) / "model.safetensors"
    card = run_campaign(config, 2, baseline=reference)
    base = card["validation_baseline"]
    assert base["weights"] == "model" and base["sha256"] == first["sha256"]
    assert {k: base[k] for k in first["validation"]} == pytest.approx(first["validation"], rel=1e-8)
    assert card["legs"][-1]["validation_baseline"] == base and "validation_baseline" not in card["legs"][0]
    record = json.loads((out / CAMPAIGN_FILE).read_text())
    difference = card["validation"]["psnr_label"] - first["validation"]["psnr_label"]
    assert (
        f"own 2 % scans {card['validation']['psnr_label']:.2f} dB ({difference:+.2f} against model)"
        in (record["legs"][1]["summary"])
    )
    assert "against" not in record["legs"][0]["summary"]
    # a missing baseline is refused in one line, before any work
    capsys.readouterr()
    command = _command(
        phantom, tmp_path / "other", "--val", str(val), "--baseline", str(tmp_path / "no.safetensors")
    )
    assert main(command) == 2
    assert "--baseline" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_second_process_on_the_same_training_folder_is_refused(made_dataset, tmp_path, capsys) -> None:
    """Two trainers on one folder would resume one checkpoint and overwrite each other's weights
    (two ``train --legs`` on one campaign run the same leg): the second is refused in one line."""
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.locks import open_lock_file, record_holder, try_lock
    from IPv2DenoiseLib.training.trainer import TRAIN_LOCK

    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    command = _command(phantom, out, "--val", str(val))
    assert main([*command, "--legs", "1"]) == 0
    held = subprocess.Popen(  # another process holds leg 2's folder, as a running train would
        [
            sys.executable,
            "-c",
            "import sys, time; from IPv2DenoiseLib.core.locks import open_lock_file, record_holder, try_lock; "
            "fd = open_lock_file(sys.argv[1]); assert try_lock(fd); record_holder(fd); print('held', flush=True); "
            "time.sleep(120)",
            str(leg_folder(out, 2) / TRAIN_LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([*command, "--legs", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("ipv2-denoise train: error:") == 1 and "Traceback" not in err
        assert f"is being trained by another process (pid {held.pid} on host" in err
        assert not (leg_folder(out, 2) / "checkpoint.pt").exists() and len(finished_legs(out, "model")) == 1
    finally:
        held.kill()
        held.wait()
    # once that process is gone (even killed), the folder is free: the same command trains
    assert main([*command, "--legs", "2"]) == 0
    assert len(finished_legs(out, "model")) == 2
    fd = open_lock_file(leg_folder(out, 2) / TRAIN_LOCK)  # and released at the end of the run
    assert try_lock(fd)
    record_holder(fd)
    os.close(fd)


def test_a_change_of_held_out_volumes_starts_a_new_set_in_the_plot_and_the_table(tmp_path) -> None:
    """A leg validated on other held-out volumes than the leg before (a "held-out" scan found in the
    training and dropped) starts a new set: the table says which, the plot breaks the line there;
    a leg naming none (a soup without ``--val-anatomy``: no list, or the empty one ``scripts/soup.py``
    writes) keeps the set before it, and names are
    compared by file name (an old card without the ``real/`` prefix is the same volume)."""

    def leg(hours: float, psnr: float, volumes: list[str] | None) -> dict:
        data = {} if volumes is None else {"validation_real": volumes}
        validation = {"psnr_label": psnr, "real_projection_psnr_label_body": psnr - 5}
        return {"wall_seconds": hours * 3600, "data": data, "validation": validation}

    card = {
        "legs": [
            leg(1, 30.0, ["heldout_chest.nrrd", "heldout_abdomen.nrrd"]),
            leg(1, 31.0, ["real/heldout_abdomen.nrrd", "real/heldout_chest.nrrd"]),
            leg(1, 32.0, ["real/heldout_chest.nrrd", "real/heldout_lidc.nrrd"]),
            leg(0, 32.1, None),
            leg(0, 32.2, []),
            leg(1, 32.5, ["real/heldout_chest.nrrd", "real/heldout_lidc.nrrd"]),
        ]
    }
    assert held_out_sets(card) == [1, 1, 2, 2, 2, 2]
    assert held_out_sets({"legs": [leg(1, 30.0, None)]}) == [1]
    rows = campaign_table([("net", card)])
    assert rows[0].endswith("| held-out set |")
    assert [row.split("|")[-2].strip() for row in rows[2:]] == ["1", "1", "2", "2", "2", "2"]
    out = tmp_path / "campaign.png"
    plot_campaign([("net", card)], out)
    assert out.stat().st_size > 10_000


def test_a_campaign_killed_while_publishing_its_last_leg_is_repaired_by_a_rerun(
    made_dataset, tmp_path, capsys
) -> None:
    """Killed after the last leg's weights were copied to OUT but before its card and campaign.json:
    the rerun makes OUT's pair and campaign.json the last finished leg's again (loadable)."""
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.errors import UserError
    from IPv2DenoiseLib.denoiser.weights import load_model

    phantom, val = made_dataset / "case_000", made_dataset / "case_001"
    out = tmp_path / "campaign"
    config = _tiny_config(phantom, val, out, iterations=2, val_every=2)
    run_campaign(config, 2)
    cards = finished_legs(out, "model")
    # the state of a kill between the two copies of leg 2: its weights, leg 1's card and record
    (out / "model.json").write_text((leg_folder(out, 1) / "model.json").read_text())
    record = json.loads((out / CAMPAIGN_FILE).read_text())
    record["legs"] = record["legs"][:1]
    (out / CAMPAIGN_FILE).write_text(json.dumps(record))
    card = run_campaign(config, 2, notice=print)
    assert card["sha256"] == cards[1]["sha256"] and "brought up to leg 2" in capsys.readouterr().out
    assert json.loads((out / "model.json").read_text())["sha256"] == cards[1]["sha256"]
    assert [g["sha256"] for g in json.loads((out / CAMPAIGN_FILE).read_text())["legs"]] == [
        c["sha256"] for c in cards
    ]
    load_model(out / "model.safetensors")  # the pair matches: no sha256 refusal

    # a plain training folder is not taken for a campaign: its model would be overwritten
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="holds a training run"):
        run_campaign(replace(config, out=str(plain)), 1)
    # a leg's card that is not JSON: one line, not a traceback
    (leg_folder(out, 2) / "model.json").write_text('{"name": "model", "sha')
    capsys.readouterr()
    assert main([*_command(phantom, out, "--val", str(val)), "--legs", "2"]) == 2
    err = capsys.readouterr().err
    assert "leg_002/model.json is not a readable model card" in err and "Traceback" not in err


def test_train_json_progress_is_only_json_records(made_dataset, tmp_path, capsys) -> None:
    """``train --json-progress``: the result is one JSON record like the progress; before, a plain
    "weights: …" line and an indented validation object followed them on stdout."""
    from IPv2DenoiseLib.app.cli import main

    out = tmp_path / "run"
    command = _command(
        made_dataset / "case_000", out, "--val", str(made_dataset / "case_001"), "--json-progress"
    )
    assert main(command) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[-1]["result"] == str(out / "model.safetensors") and records[-1]["validation"]
