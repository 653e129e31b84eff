"""``train --noise scanner``: clean anatomy with fresh scanner-like noise, constant LR, resumable (issue #14)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from IPv2DenoiseLib.training.trainer import constant_then_decay, same_run


def test_constant_schedule_then_cosine_decay() -> None:
    f = constant_then_decay(200, 0.25)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == 1.0 and f(149) == 1.0
    assert 0.0 < f(175) < 1.0 and f(199) < 0.01


def test_resume_may_change_iterations_only_for_the_constant_schedule() -> None:
    base = {"iterations": 100, "schedule": "constant", "lr": 1e-3}
    assert same_run(base, {**base, "iterations": 300})
    assert not same_run(base, {**base, "lr": 2e-3})
    one = {**base, "schedule": "onecycle"}
    assert not same_run(one, {**one, "iterations": 300}) and same_run(one, dict(one))


@pytest.mark.slow
def test_scanner_noise_training_end_to_end(tmp_path) -> None:
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.denoiser.infer import Denoiser

    data = tmp_path / "ds"
    args = ["--size", "96", "--slices", "5", "--spacing", "3.6", "--slice-thickness", "5", "--device", "cpu"]
    assert main(["make-dataset", "--cases", "2", "--out", str(data), *args]) == 0
    out = tmp_path / "run"
    train = [
        "train",
        "--noise",
        "scanner",
        "--schedule",
        "constant",
        "--data",
        str(data / "case_000"),
        "--val",
        str(data / "case_001"),
        "--out",
        str(out),
        "--name",
        "tiny",
        "--model-kwargs",
        '{"in_slices": 3, "base_channels": 4, "levels": 2}',
        "--val-every",
        "2",
        "--batch",
        "4",
        "--patch",
        "32",
        "--noise-pool",
        "3",
        "--device",
        "cpu",
    ]
    assert main([*train, "--iterations", "2"]) == 0
    first = json.loads((out / "tiny.json").read_text())
    assert main([*train, "--iterations", "4"]) == 0  # resumes from the checkpoint and extends the run
    card = json.loads((out / "tiny.json").read_text())
    assert card["history"]["iteration"][: len(first["history"]["iteration"])] == first["history"]["iteration"]
    assert card["history"]["iteration"][-1] == 4
    data_card = card["data"]
    # the sampler statistics (training range) cover both parts of the resumed run
    assert (
        data_card["noise"] == "scanner"
        and data_card["slabs_simulated"] > first["data"]["slabs_simulated"] + 3
    )
    assert data_card["training_volumes"] == ["case_000/ndct_clean", "case_000/uldct_clean"]
    rng = data_card["training_range"]
    assert 0 < rng["input_noise_hu"][0] < rng["input_noise_hu"][1]
    assert rng["pixel_mm"][0] < 3.6 < rng["pixel_mm"][1] and rng["slice_mm"] == [5.0, 5.0]
    assert "scanner_psnr_truth" in card["validation"] and "psnr_truth" in card["validation"]
    denoiser = Denoiser.from_file(out / "tiny.safetensors", expected_sha256=card["sha256"])
    assert denoiser.denoise_array(np.full((2, 40, 40), -1000.0, np.float32), device="cpu").shape == (
        2,
        40,
        40,
    )
