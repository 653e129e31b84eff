"""The one-line warning when a scan lies outside the model's training range (issue #14)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.applicability import TrainingRange, applicability_warning
from IPv2DenoiseLib.io.volumes import write_volume
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

CARD = {
    "data": {
        "training_range": {"input_noise_hu": [80.0, 120.0], "pixel_mm": [0.6, 0.9], "slice_mm": [1.0, 1.5]}
    }
}


def _chest(noise_hu: float, *, pixel: float = 0.7, slice_mm: float = 1.25, seed: int = 0) -> Volume:
    ph = make_chest_phantom(shape=(4, 160, 160), spacing=(pixel * 3, pixel * 3, slice_mm), seed=1)
    hu = ph.hu + np.random.default_rng(seed).normal(0.0, noise_hu, ph.hu.shape).astype(np.float32)
    return Volume(hu, (pixel, pixel, slice_mm), (0.0, 0.0, 0.0))


def test_in_range_scan_gives_no_warning() -> None:
    assert applicability_warning(_chest(100.0), CARD) is None


def test_normal_dose_scan_is_flagged_as_over_smoothed() -> None:
    warning = applicability_warning(_chest(12.0), CARD)
    assert warning is not None and "over-smoothed" in warning and "\n" not in warning


def test_photon_starved_scan_is_flagged() -> None:
    """Noise far above the training range (a large patient at a very low dose) gets one line."""
    warning = applicability_warning(_chest(400.0), CARD)
    assert warning is not None and "far above" in warning and "\n" not in warning
    assert applicability_warning(_chest(200.0), CARD) is None  # under 2x the highest: in range


def test_pixel_size_and_slice_thickness_outside_the_range() -> None:
    warning = applicability_warning(_chest(100.0, pixel=0.3, slice_mm=5.0), CARD)
    assert "pixel size (0.30 mm)" in warning and "slice thickness (5.00 mm)" in warning


def test_card_without_range_says_nothing() -> None:
    assert TrainingRange.from_card({"data": {}}) is None
    assert applicability_warning(_chest(5.0), {"data": {}}) is None


def test_shipped_card_has_a_training_range() -> None:
    from IPv2DenoiseLib.denoiser.infer import Denoiser

    rng = TrainingRange.from_card(Denoiser.from_registry("default").card)
    assert rng is not None and rng.pixel_mm is not None
    low, high = rng.input_noise_hu  # measured on low-dose inputs: above normal-dose noise (~10 HU)
    assert 12 < low < 40 and 150 < high < 1000


@pytest.mark.slow
def test_denoise_cli_warns_in_one_line(tmp_path) -> None:
    from IPv2DenoiseLib.denoiser.models import UNet
    from IPv2DenoiseLib.denoiser.weights import save_model

    weights = tmp_path / "tiny.safetensors"
    save_model(UNet(in_slices=3, base_channels=4, levels=2), weights, {"strategy": "ipv2", **CARD})
    write_volume(_chest(10.0), tmp_path / "ndct.nrrd")
    cmd = [sys.executable, "-m", "IPv2DenoiseLib", "denoise", str(tmp_path / "ndct.nrrd")]
    plain = subprocess.run(
        [*cmd, str(tmp_path / "a.nrrd"), "--weights", str(weights), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stderr
    lines = [ln for ln in plain.stderr.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "over-smoothed" in lines[0]
    piped = subprocess.run(
        [*cmd, str(tmp_path / "b.nrrd"), "--weights", str(weights), "--device", "cpu", "--json-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr
    records = [json.loads(ln) for ln in piped.stdout.splitlines() if ln.startswith("{")]
    assert any("over-smoothed" in r.get("warning", "") for r in records)
