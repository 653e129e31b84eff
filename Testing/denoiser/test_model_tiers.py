"""Model tiers (issue #24 item 3): ``--model fast|quality`` picks the catalogue's model of that tier;
the shipped quality model runs from the CLI; without one the user gets one line saying how to make one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue, ModelReference
from IPv2DenoiseLib.denoiser.models import NoiseAwareUNet
from IPv2DenoiseLib.denoiser.weights import save_model


def test_quality_is_the_shipped_default_and_fast_the_shipped_narrow_model() -> None:
    catalogue = ModelCatalogue.read()
    assert catalogue.entry("quality") == catalogue.entry("default")
    fast = ModelReference.resolve("fast")
    assert fast.name == "unet-nm-ipv2" and fast.load().model.config["base_channels"] == 16
    quality = ModelReference.resolve("quality")
    assert quality.name == "unet-nm-quality-ipv2" and quality.registered
    model = quality.load().model
    assert isinstance(model, NoiseAwareUNet) and model.config["base_channels"] == 32
    # trained from scratch (since 2026-12-06): its first leg started from no weights, every leg is logged
    legs = quality.load().card["legs"]
    assert legs[0]["initialised_from"] is None and len(legs) >= 10
    assert not any(leg.get("widened_from_channels") for leg in legs)
    # model lists (the Slicer panel, the web page) show the two tiers first, each saying its tier
    assert catalogue.names()[:2] == ["unet-nm-quality-ipv2", "unet-nm-ipv2"]
    for name, tier in (("unet-nm-quality-ipv2", "quality"), ("unet-nm-ipv2", "fast")):
        description = catalogue.entries[name].description
        assert description.startswith(f"{tier} tier: ") and description.count("tier") == 1


def test_without_a_quality_model_the_user_is_told_in_one_line_how_to_get_one(tmp_path) -> None:
    weights = tmp_path / "fast.safetensors"
    save_model(NoiseAwareUNet(in_slices=3, base_channels=4, levels=2), weights, {"name": "f"})
    catalogue = tmp_path / "models.json"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    catalogue.write_text(json.dumps({"default": "f", "models": {"f": {"file": weights.name, "sha256": sha}}}))
    with pytest.raises(
        UserError, match=r"^no quality-tier model is installed yet; train one with .*gpu_train_job"
    ):
        ModelCatalogue.read(catalogue).entry("quality")


def test_cli_denoise_with_model_quality_runs_the_quality_model(tmp_path, capsys) -> None:
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.resources import resources_dir
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import read_volume, write_volume

    sample = read_volume(resources_dir() / "SampleData" / "sample_uldct.nrrd")
    source = tmp_path / "crop.nrrd"
    write_volume(Volume(sample.array[8:11].copy(), spacing=sample.spacing, origin=sample.origin), source)
    out = tmp_path / "out.nrrd"
    assert main(["denoise", str(source), str(out), "--model", "quality", "--device", "cpu"]) == 0
    assert "with unet-nm-quality-ipv2" in capsys.readouterr().err
    fast = tmp_path / "fast.nrrd"
    assert main(["denoise", str(source), str(fast), "--model", "fast", "--device", "cpu"]) == 0
    quality, default = read_volume(out).array, read_volume(fast).array
    assert quality.std() < sample.array[8:11].std()
    # another network ran: its output is the fast one's to within a few HU, not the same
    assert 0.5 < np.abs(quality - default).mean() < 15.0


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


def test_a_kept_model_name_an_upgrade_removed_selects_the_default_and_says_so(tmp_path) -> None:
    """A scene saved with a model that is no longer installed: the front end selects the default
    and shows one line (the Slicer panel showed the first model while Apply ran the stale name)."""
    catalogue = ModelCatalogue.read()
    default = catalogue.entry().name
    assert catalogue.installed(default) == (default, None)
    assert catalogue.installed("") == (default, None)  # nothing kept yet: the default, silently
    assert catalogue.installed("quality") == (catalogue.entry("quality").name, None)  # a tier
    chosen, message = catalogue.installed("unet-ipv2-2025")
    assert chosen == default
    assert message == (
        f"model 'unet-ipv2-2025' is not installed (models: {', '.join(catalogue.names())}); {default!r} is selected"
    )
    empty = tmp_path / "models.json"
    empty.write_text(json.dumps({"default": None, "models": {}}))
    assert ModelCatalogue.read(empty).installed("unet-ipv2-2025") == (None, None)
