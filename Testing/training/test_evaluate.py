"""The evaluation grid end to end at micro size: structure, finiteness, caching, the CLI contract."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.masks import evaluation_rois
from IPv2DenoiseLib.training.evaluation import (
    REFERENCES,
    REGIONS,
    EvalConfig,
    preset,
    run_grid,
    score,
)

#: Each test here builds a small evaluation grid (more than ~20 s on 2 CPU cores).
pytestmark = pytest.mark.slow

MICRO = EvalConfig(
    name="micro",
    shape=(4, 64, 64),
    spacing=(6.0, 6.0, 6.0),
    dose=0.003,
    n_train=1,
    n_test=1,
    strategies=("naive", "ipv2"),
    models={"unet": {"in_slices": 3, "base_channels": 4, "levels": 2}},
    classical=("tv",),
    iterations=40,
    batch=4,
    patch=32,
    device="cpu",
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    lines: list[str] = []
    calls: list[tuple[int, int]] = []
    result = run_grid(MICRO, out, seeds=[0], progress=lambda d, t, m: calls.append((d, t)), log=lines.append)
    return out, result, lines, calls


def test_grid_structure_and_files(grid):
    out, result, lines, calls = grid
    methods = {(s["strategy"], s["model"]) for s in result.summary}
    assert methods == {("input", "-"), ("classical", "tv"), ("naive", "unet"), ("ipv2", "unet")}
    assert {s["reference"] for s in result.summary} == set(REFERENCES)
    assert calls[-1][0] == calls[-1][1]  # progress reached its total
    assert len(lines) == calls[-1][1]
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == len(result.records) == 4 * len(REFERENCES)  # 4 methods x 1 case
    md = (out / "results.md").read_text()
    for heading in (
        "Quality against the noise-free truth",
        "Noise against the IPv2 refined test label",
        "Claims",
    ):
        assert heading in md
    assert (out / "results_grid.png").stat().st_size > 10_000
    assert (out / "models" / "ipv2" / "unet" / "seed0" / "model.safetensors").exists()


def test_grid_metrics_finite_and_sane(grid):
    _, result, _, _ = grid
    for s in result.summary:
        for region in REGIONS:
            for key in ("psnr", "ssim", "noise", "bias"):
                mean, sd = s["metrics"][f"{region}_{key}"]
                assert math.isfinite(mean), (s["strategy"], s["model"], region, key)
                assert sd == 0.0  # one seed
        assert 0.0 < s["metrics"]["ssim"][0] <= 1.0
        assert math.isfinite(s["metrics"]["laa950_error"][0])
    by = {(s["strategy"], s["reference"]): s["metrics"] for s in result.summary}
    # the identity has no bias of its own against itself; a trained network's output is a real image
    assert by[("input", "truth")]["psnr"][0] > 15.0
    assert all(c["holds"] in (True, False) for c in result.claims)


def test_rerun_resumes_from_cached_weights(grid, tmp_path):
    out, result, _, _ = grid
    again = run_grid(MICRO, out, seeds=[0])
    first = {(r["method"], r["reference"]): r["metrics"]["psnr"] for r in result.records}
    second = {(r["method"], r["reference"]): r["metrics"]["psnr"] for r in again.records}
    assert first == pytest.approx(second)
    assert again.seconds < result.seconds


def test_grid_reports_mismatch_and_training_checks(grid):
    out, result, _, _ = grid
    assert result.config["noise"] == "mismatched"
    # the scanner's slice-correlated noise against the simulator's independent slices
    assert result.mismatch["real"]["z_correlation"] > result.mismatch["sim"]["z_correlation"]
    assert {(c["strategy"], c["seed"]) for c in result.training} == {("naive", 0), ("ipv2", 0)}
    for c in result.training:
        assert isinstance(c["trained"], bool) and np.isfinite(c["change"])
    assert all(c["verdict"] == "cannot tell" for c in result.claims)  # one seed: no spread
    md = (out / "results.md").read_text()
    assert "Noise of the ULDCT vs Sim(N)" in md and "Did every run train?" in md


def test_out_of_another_noise_condition_is_refused(grid):
    out, _, _, _ = grid
    with pytest.raises(UserError, match="noise"):
        run_grid(replace(MICRO, noise="matched"), out, seeds=[0])


def test_a_run_killed_between_its_weights_and_its_card_is_trained_again(grid):
    """Weights without their model card are a run killed while exporting: a rerun trains it again
    (the card is the sign a run finished), it does not fail on the missing card."""
    out, result, _, _ = grid
    card = sorted(out.rglob("model.json"))[0]
    card.unlink()
    again = run_grid(MICRO, out, seeds=[0])
    assert card.is_file() and len(again.records) == len(result.records)


def test_score_identity_and_denoiser():
    from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

    truth = make_chest_phantom(shape=(2, 96, 96), spacing=(4.0, 4.0, 4.0), seed=3).hu
    masks = evaluation_rois(truth)
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 60, truth.shape).astype(np.float32)
    from IPv2DenoiseLib.imaging.classical import denoise_classical

    m_noisy = score(noisy, truth, masks, (4.0, 4.0, 4.0))
    m_tv = score(denoise_classical(noisy, "tv", noise_hu=60.0), truth, masks, (4.0, 4.0, 4.0))
    assert m_noisy["background_noise"] == pytest.approx(60.0, rel=0.1)
    assert abs(m_noisy["soft_tissue_bias"]) < 5.0
    assert m_tv["psnr"] > m_noisy["psnr"]
    assert m_tv["background_noise"] < m_noisy["background_noise"]


def test_presets_and_bad_names():
    assert preset("reduced").iterations < preset("full").iterations
    with pytest.raises(UserError, match="config"):
        preset("huge")


def test_cli_bad_arguments(tmp_path):
    from IPv2DenoiseLib.app.cli import main

    assert main(["evaluate", "--out", str(tmp_path), "--models", "vgg"]) == 2
    assert main(["evaluate", "--out", str(tmp_path), "--iterations", "5"]) == 2
