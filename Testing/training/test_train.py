"""Training loop: a tiny U-Net learns on a noisy/clean pair, exports weights + card, resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from IPv2DenoiseLib.denoiser.infer import FLOAT32_ENV, cpu_has_amx
from IPv2DenoiseLib.purification.regions import BACKGROUND, BODY, LUNGS
from IPv2DenoiseLib.training.trainer import (
    CasePairs,
    PatchSampler,
    TrainConfig,
    train,
)


def toy_case(seed: int) -> CasePairs:
    """Disk 'body' at 40 HU with two 'lungs' at -850 in -1000 air; input = label + 60 HU noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:6, 0:64, 0:64]
    r = np.hypot(y - 32, x - 32)
    clean = np.where(r < 20, 40.0, -1000.0).astype(np.float32)
    lungs = (np.hypot(y - 32, x - 23) < 6) | (np.hypot(y - 32, x - 41) < 6)
    clean[lungs] = -850.0
    noisy = clean + rng.normal(0, 60, clean.shape).astype(np.float32)
    regions = np.full(clean.shape, BACKGROUND, np.uint8)
    regions[r < 20] = BODY
    regions[lungs] = LUNGS
    return CasePairs(f"toy{seed}", noisy, clean, regions, test_input=noisy, test_label=clean, truth=clean)


def tiny_config(tmp_path, *, iterations: int, val_every: int) -> TrainConfig:
    """A 2-level, 8-channel U-Net on 32² patches: trains on the CPU in seconds."""
    return TrainConfig(
        cases=[],
        out=str(tmp_path / "run"),
        model_kwargs={"in_slices": 3, "base_channels": 8, "levels": 2},
        patch=32,
        batch=8,
        iterations=iterations,
        val_every=val_every,
        lr=3e-3,
        device="cpu",
        name="tiny",
    )


def test_patch_sampler_respects_region_shares() -> None:
    case = toy_case(0)
    sampler = PatchSampler([case], patch=16, in_slices=3, shares=(0.5, 0.5, 0.0), seed=1)
    x, y = sampler.batch(64)
    assert x.shape == (64, 3, 16, 16) and y.shape == (64, 1, 16, 16)
    # no background-centred patch was asked for: every centre pixel is inside the body disk
    # (a left-right flip moves the centre from column 8 to 7)
    centre = torch.maximum(y[:, 0, 8, 8], y[:, 0, 8, 7])
    assert float(centre.min()) > 0.1  # network units: -850 HU -> 0.15, air -> 0
    sampler_bg = PatchSampler([case], patch=16, in_slices=3, shares=(0.0, 0.0, 1.0), seed=1)
    _, y_bg = sampler_bg.batch(32)
    assert all(float(p.min()) == pytest.approx(0.0, abs=1e-6) for p in y_bg)  # each patch holds air


@pytest.mark.slow
def test_train_loss_falls_exports_and_resumes(tmp_path) -> None:
    torch.set_num_threads(2)
    cfg = tiny_config(tmp_path, iterations=100, val_every=50)
    prepared = ([toy_case(0), toy_case(1)], [toy_case(2)])
    card = train(cfg, prepared=prepared)
    hist = card["history"]
    # the default Huber loss is L1 minus half its knee (10 HU) on large residuals, so its ratio
    # reads a little higher than L1's for the same fit; the validation noise below is the real test
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
    assert card["parameters"] > 0 and card["flops_per_voxel"] > 0
    assert card["validation"]["noise_body_hu"] < 0.8 * 60  # input noise is 60 HU
    # a CPU with AMX trains the U-Net under bf16 autocast, as it infers (float32 master weights)
    assert card["precision"] == ("bf16 autocast" if cpu_has_amx() else "float32")
    weights = tmp_path / "run" / "tiny.safetensors"
    assert weights.exists() and (tmp_path / "run" / "training_curves.png").stat().st_size > 1000
    saved_card = json.loads((tmp_path / "run" / "tiny.json").read_text())
    assert saved_card["strategy"] == "ipv2" and len(saved_card["sha256"]) == 64

    # the same config resumes from the checkpoint (nothing left to do); a changed one starts afresh
    resumed = train(TrainConfig(**cfg.__dict__), prepared=prepared)
    assert resumed["history"] == hist
    cfg.iterations = 50
    fresh = train(cfg, prepared=prepared)
    assert fresh["history"]["iteration"] == [50]


def test_train_cli_on_made_dataset(made_dataset, tmp_path) -> None:
    """End to end: make-dataset -> train (IPv2 pairs from purify) -> weights loadable by the Denoiser."""
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.denoiser.infer import Denoiser

    data = made_dataset
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
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
                "--iterations",
                "6",
                "--val-every",
                "3",
                "--batch",
                "4",
                "--patch",
                "32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    card = json.loads((out / "tiny.json").read_text())
    assert card["strategy"] == "ipv2" and card["data"]["training_cases"] == ["case_000"]
    assert "psnr_truth_lungs" in card["validation"] and "psnr_label" in card["validation"]
    denoiser = Denoiser.from_file(out / "tiny.safetensors", expected_sha256=card["sha256"])
    assert denoiser.denoise_array(np.full((2, 40, 40), -1000.0, np.float32), device="cpu").shape == (
        2,
        40,
        40,
    )


def test_fine_tune_starts_from_given_weights(tmp_path) -> None:
    from IPv2DenoiseLib import UserError
    from IPv2DenoiseLib.denoiser.models import UNet
    from IPv2DenoiseLib.denoiser.weights import load_model, save_model

    start = tmp_path / "start.safetensors"
    trained = UNet(in_slices=3, base_channels=4, levels=2)
    torch.nn.init.normal_(trained.head.weight, std=0.1)  # not the identity start of a fresh net
    save_model(trained, start, {})
    cfg = TrainConfig(
        cases=[],
        out=str(tmp_path / "ft"),
        model_kwargs={"in_slices": 3, "base_channels": 4, "levels": 2},
        patch=32,
        batch=2,
        iterations=1,
        val_every=1,
        lr=1e-9,
        device="cpu",
        name="ft",
        init_weights=str(start),
    )
    card = train(cfg, prepared=([toy_case(0)], []))
    assert card["initialised_from"] == "start.safetensors"
    tuned, _ = load_model(tmp_path / "ft" / "ft.safetensors")
    torch.testing.assert_close(tuned.head.weight, trained.head.weight, atol=1e-6, rtol=0)
    # another layout, or a narrower network, cannot start from these weights (a wider one, of any
    # width, is widened: test_real_anatomy_training, UNet.widened)
    for n, kwargs in enumerate(({"levels": 3}, {"base_channels": 2})):
        cfg.out = str(tmp_path / f"bad{n}")
        cfg.model_kwargs = {"in_slices": 3, "base_channels": 4, "levels": 2, **kwargs}
        with pytest.raises(UserError, match="does not match|cannot widen"):
            train(cfg, prepared=([toy_case(0)], []))


def test_float32_switch_trains_in_float32(tmp_path, monkeypatch) -> None:
    """``IPV2_DENOISE_FLOAT32=1`` also keeps training in float32; the loss still falls."""
    monkeypatch.setenv(FLOAT32_ENV, "1")
    torch.set_num_threads(2)
    cfg = tiny_config(tmp_path, iterations=40, val_every=20)
    card = train(cfg, prepared=([toy_case(0), toy_case(1)], [toy_case(2)]))
    assert card["precision"] == "float32"
    assert card["history"]["loss"][-1] < card["history"]["loss"][0]


def _anatomy_volume(path) -> str:
    """A small chest-like normal-dose CT (5 x 96 x 96) written as NRRD, for ``train --anatomy``."""
    from conftest import chest_like_volume

    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import write_volume

    write_volume(Volume(chest_like_volume(3, (5, 96, 96)), spacing=(0.8, 0.8, 2.5)), path)
    return str(path)


def test_a_diverging_run_stops_in_one_line_and_writes_no_weights(tmp_path, capsys) -> None:
    """A loss that is no longer a finite number ends the run (exit 2, the iteration and --lr named):
    no all-NaN weights, no model card holding a bare NaN."""
    from IPv2DenoiseLib.app.cli import main

    anatomy = _anatomy_volume(tmp_path / "A.nrrd")
    out = tmp_path / "run"
    command = ["train", "--noise", "scanner", "--anatomy", anatomy, "--iterations", "6", "--batch", "2"]
    command += ["--patch", "32", "--noise-pool", "1", "--schedule", "constant", "--device", "cpu"]
    command += ["--model-kwargs", json.dumps({"in_slices": 3, "base_channels": 4, "levels": 2})]
    assert main([*command, "--out", str(out), "--lr", "1e8"]) == 2
    err = capsys.readouterr().err
    assert err.count("ipv2-denoise train: error:") == 1 and "Traceback" not in err
    assert "training diverged at iteration" in err and "lower --lr (now 1e+08)" in err
    assert not (out / "model.safetensors").exists() and not (out / "model.json").exists()


def test_ema_exports_the_moving_average_and_a_resume_keeps_it(tmp_path) -> None:
    """``--ema``: the exported weights and the card's validation are the moving average of the
    weights, not the last step's; the checkpoint carries the average, so a resume goes on from it."""
    from IPv2DenoiseLib import UserError
    from IPv2DenoiseLib.denoiser.weights import load_model
    from IPv2DenoiseLib.training.trainer import validate

    torch.set_num_threads(2)
    prepared = ([toy_case(0), toy_case(1)], [toy_case(2)])
    cfg = tiny_config(tmp_path, iterations=30, val_every=15)
    cfg.ema = 0.9
    card = train(cfg, prepared=prepared)
    assert card["schedule"]["ema"] == 0.9 and card["legs"][-1]["ema"] == 0.9
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    exported, _ = load_model(tmp_path / "run" / "tiny.safetensors")
    averaged = {k.removeprefix("module."): v for k, v in state["averaged"].items() if k.startswith("module.")}
    assert int(state["averaged"]["n_averaged"]) == 30
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, averaged[name])
    last_step = state["model"]["head.weight"]
    assert not torch.allclose(exported.state_dict()["head.weight"], last_step)  # not the last step's
    # the card's validation is the exported network's
    again = validate(exported, prepared[1], torch.device("cpu"), exported.in_slices)
    assert again["psnr_truth"] == pytest.approx(card["validation"]["psnr_truth"], abs=1e-3)

    resumed = train(TrainConfig(**cfg.__dict__), prepared=prepared)  # nothing left: the same weights
    assert resumed["history"] == card["history"]
    reloaded, _ = load_model(tmp_path / "run" / "tiny.safetensors")
    torch.testing.assert_close(reloaded.state_dict()["head.weight"], exported.state_dict()["head.weight"])

    cfg.ema = 1.0
    with pytest.raises(UserError, match="--ema 1.0: need a decay between 0 and 1"):
        train(cfg, prepared=prepared)


def test_train_reads_a_real_series_with_a_gap_only_with_resample_gaps(tmp_path, capsys) -> None:
    """A real archive series with a missing slice is refused as training anatomy in one line whose
    hint (``--resample-gaps``) is an option of ``train`` itself; with it the series is interpolated
    and the leg's card says so (``train`` had no such option: the hint named one of ``denoise``)."""
    from conftest import write_ct_series

    from IPv2DenoiseLib.app.cli import main

    series = tmp_path / "series"
    files = sorted(write_ct_series(series, 6, shuffle=False))
    import pydicom

    gone = [f for f in files if int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) == 3]
    gone[0].unlink()  # a missing slice in the middle
    command = ["train", "--noise", "scanner", "--anatomy", str(series), "--iterations", "2", "--batch", "2"]
    command += ["--patch", "32", "--noise-pool", "1", "--schedule", "constant", "--device", "cpu"]
    command += ["--model-kwargs", json.dumps({"in_slices": 3, "base_channels": 4, "levels": 2})]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("ipv2-denoise train: error:") == 1 and "--resample-gaps" in err and "Traceback" not in err
    )
    assert main([*command, "--out", str(tmp_path / "run"), "--resample-gaps"]) == 0
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["legs"][-1]["data"]["resample_gaps"] is True
    from IPv2DenoiseLib import UserError
    from IPv2DenoiseLib.training.trainer import check_config

    with pytest.raises(UserError, match="--resample-gaps applies to the real series"):
        check_config(
            TrainConfig(cases=["case"], out=str(tmp_path / "x"), noise="scanner", resample_gaps=True)
        )
