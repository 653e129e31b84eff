"""``weights.takes_noise_map``: whether a weights file's network takes a noise level map, from its card
or header alone (``batch --strength`` asks it before any work instead of loading the network)."""

from __future__ import annotations

import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.model_reference import card_path
from IPv2DenoiseLib.denoiser.models import MODEL_CLASSES, build_model
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import wants_noise_map
from IPv2DenoiseLib.denoiser.weights import load_model, save_model, takes_noise_map

#: Each architecture at its smallest (the constructors' keywords differ).
TINY = {
    "unet": {"in_slices": 3, "base_channels": 4, "levels": 2},
    "unet-nm": {"in_slices": 3, "base_channels": 4, "levels": 2},
    "unet-nmt": {"in_slices": 3, "base_channels": 4, "levels": 2},
    "redcnn": {"in_slices": 3, "channels": 4},
    "dncnn": {"in_slices": 3, "width": 4, "depth": 3},
}


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
def test_the_card_or_the_header_says_what_the_loaded_network_does(tmp_path, arch) -> None:
    model = build_model(arch, **TINY[arch])
    weights = tmp_path / f"{arch}.safetensors"
    save_model(model, weights)
    assert takes_noise_map(weights) is wants_noise_map(model) is (arch in ("unet-nm", "unet-nmt"))
    card_path(weights).unlink()  # a bare weights file: its header names the architecture
    assert takes_noise_map(weights) is wants_noise_map(load_model(weights)[0])


def test_it_reads_no_tensor(tmp_path) -> None:
    """Tensors cut short: loading refuses the file, the card alone still answers."""
    weights = tmp_path / "nm.safetensors"
    save_model(build_model("unet-nm", **TINY["unet-nm"]), weights)
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(UserError):
        load_model(weights)
    assert takes_noise_map(weights) is True


def test_no_file_or_no_known_architecture_is_one_line(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        takes_noise_map(tmp_path / "missing.safetensors")
    weights = tmp_path / "odd.safetensors"
    save_model(build_model("unet", **TINY["unet"]), weights)
    card_path(weights).write_text('{"architecture": "transformer"}', encoding="utf-8")
    with pytest.raises(UserError, match="unknown architecture 'transformer'"):
        takes_noise_map(weights)
    card_path(weights).unlink()
    weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        takes_noise_map(weights)
