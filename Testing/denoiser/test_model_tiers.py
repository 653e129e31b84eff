"""Model tiers (issue #24 item 3): ``--model fast|quality`` picks the catalogue's model of that tier;
without a quality model the user gets one line saying how to make one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue, ModelReference
from IPv2DenoiseLib.denoiser.models import NoiseAwareUNet
from IPv2DenoiseLib.denoiser.weights import save_model


def test_fast_is_the_shipped_default_and_quality_is_not_installed_yet() -> None:
    catalogue = ModelCatalogue.read()
    assert catalogue.entry("fast") == catalogue.entry("default")
    with pytest.raises(
        UserError, match=r"^no quality-tier model is installed yet; train one with .*gpu_train_job"
    ):
        catalogue.entry("quality")


def test_cli_denoise_with_model_quality_says_in_one_line_how_to_get_one(tmp_path, capsys) -> None:
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.resources import resources_dir

    source = resources_dir() / "SampleData" / "sample_uldct.nrrd"
    out = tmp_path / "out.nrrd"
    assert main(["denoise", str(source), str(out), "--model", "quality", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no quality-tier model is installed yet" in err[0]
    assert not out.exists()


def test_a_catalogue_entry_of_the_quality_tier_is_found_loaded_and_run(tmp_path) -> None:
    weights = tmp_path / "quality.safetensors"
    save_model(NoiseAwareUNet(in_slices=3, base_channels=4, levels=2), weights, {"name": "q"})
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    catalogue = tmp_path / "models.json"
    catalogue.write_text(
        json.dumps(
            {
                "default": "small",
                "models": {
                    "small": {"file": "quality.safetensors", "sha256": sha, "tier": "fast"},
                    "big-nm": {"file": "quality.safetensors", "sha256": sha, "tier": "quality"},
                },
            }
        )
    )
    reference = ModelReference.resolve("quality", models_json=catalogue)
    assert reference.name == "big-nm" and reference.registered
    assert ModelReference.resolve("fast", models_json=catalogue).name == "small"
    denoiser = reference.load()
    out = denoiser.denoise_array(np.full((3, 32, 32), 40.0, dtype=np.float32), device="cpu")
    assert out.shape == (3, 32, 32)


def test_a_tier_the_product_does_not_know_is_refused(tmp_path) -> None:
    catalogue = tmp_path / "models.json"
    catalogue.write_text(json.dumps({"models": {"m": {"file": "m.safetensors", "tier": "turbo"}}}))
    with pytest.raises(UserError, match="has tier 'turbo'; tiers: fast, quality"):
        ModelCatalogue.read(catalogue)
