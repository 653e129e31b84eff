"""``train --legs N``: a campaign of legs run back to back, continued by running it again (issue #24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from IPv2DenoiseLib.core.progress import Cancelled, CancelToken
from IPv2DenoiseLib.denoiser.weights import sha256_file
from IPv2DenoiseLib.training.campaign import CAMPAIGN_FILE, finished_legs, leg_folder, run_campaign
from IPv2DenoiseLib.training.trainer import TrainConfig

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

    # a leg cut short (here cancelled after its first round; kill -9 leaves the same checkpoint)
    # resumes from its checkpoint when the campaign is run again, not from the leg's start
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
        iterations=4,
        val_every=2,
        val_slices=2,
    )
    config.model_kwargs = dict(TINY_KWARGS)
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
