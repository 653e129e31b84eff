"""Denoiser networks, registry, parameter/FLOP counts, safetensors weights + model cards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models import (
    MODEL_CLASSES,
    REDCNN,
    DnCNN,
    UNet,
    build_model,
    count_parameters,
    flops_per_voxel,
)
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels
from IPv2DenoiseLib.denoiser.normalization import hu_to_net, net_to_hu
from IPv2DenoiseLib.denoiser.weights import card_path, load_model, save_model, sha256_file

#: Small configurations of every architecture (fast on 2 cores).
TINY = {
    "unet": {"base_channels": 4, "levels": 3},
    "unet-nm": {"base_channels": 4, "levels": 3},
    "unet-nmt": {"base_channels": 4, "levels": 3},
    "redcnn": {"channels": 6},
    "dncnn": {"depth": 4, "width": 6},
}


def _last_layer(model):
    if isinstance(model, UNet):
        return model.head
    if isinstance(model, REDCNN):
        return model.tconvs[-1]
    return model.body[-1]


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
@pytest.mark.parametrize("in_slices", [1, 3, 5])
@pytest.mark.parametrize("hw", [(33, 35), (64, 64), (21, 40)])
def test_output_shape_for_odd_sizes(arch, in_slices, hw):
    model = build_model(arch, in_slices=in_slices, **TINY[arch]).eval()
    x = torch.rand(2, in_slices + noise_channels(model), *hw)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, *hw)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
def test_residual_output_is_the_centre_slice_when_noise_branch_is_zero(arch):
    torch.manual_seed(0)
    model = build_model(arch, in_slices=5, **TINY[arch]).eval()
    last = _last_layer(model)
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.rand(3, 5 + noise_channels(model), 33, 35)
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, x[:, 2:3], rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
def test_neighbour_slices_influence_the_output(arch):
    torch.manual_seed(1)
    model = build_model(arch, in_slices=3, **TINY[arch]).eval()
    torch.nn.init.normal_(_last_layer(model).weight)  # the U-Net starts as the identity (zero head)
    x = torch.rand(1, 3 + noise_channels(model), 33, 35)
    x2 = x.clone()
    x2[:, 0] += 1.0  # change only the slice above
    with torch.no_grad():
        assert not torch.equal(model(x), model(x2))


def test_unet_pads_to_a_multiple_of_the_coarsest_level():
    model = UNet(in_slices=1, base_channels=4, levels=4).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 9, 13)).shape == (1, 1, 9, 13)


def test_redcnn_matches_the_reference_parameter_count():
    # 1,848,865 parameters: ldct-benchmark's RED-CNN (96 ch, 5x5, 1 slice) (docs/models.md).
    assert count_parameters(REDCNN()) == 1_848_865


def test_default_unet_size_and_cost_match_design_measurement():
    # docs/models.md: a 3-level U-Net with 16 base channels, 3 slices: 117 k parameters, 49 kFLOP/px.
    model = UNet()
    assert abs(count_parameters(model) - 117_000) < 1_000
    assert abs(flops_per_voxel(model, 3) - 49_000) < 1_000


def test_flops_per_voxel_counts_two_flops_per_mac():
    # Same-padded 3x3 convs at full resolution: MACs per pixel = number of conv weights.
    model = DnCNN(in_slices=3, depth=5, width=8, batch_norm=False)
    macs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert flops_per_voxel(model, 3, size=32) == pytest.approx(2 * macs)
    assert model.training and next(model.parameters()).device.type == "cpu"  # model untouched


def test_redcnn_cost_matches_the_reference_at_512():
    # 3.50 MFLOP per pixel for a 512x512 slice (docs/models.md) (917 GFLOP per slice).
    assert flops_per_voxel(REDCNN(), 1, size=512) == pytest.approx(3.50e6, rel=0.01)


def test_build_model_refuses_unknown_architecture_and_bad_keywords():
    with pytest.raises(UserError, match="unknown architecture 'vit'.*dncnn, redcnn, unet"):
        build_model("vit")
    with pytest.raises(UserError, match="bad keywords"):
        build_model("unet", width=3)
    with pytest.raises(UserError, match="`in_slices` must be odd"):
        build_model("dncnn", in_slices=2)
    with pytest.raises(UserError, match="`levels` must be an integer >= 1"):
        build_model("unet", levels=0)


def test_normalization_round_trip_and_clipping():
    hu = np.array([-3000.0, -1024.0, -1000.0, 0.0, 40.0, 3071.0, 5000.0])
    x = hu_to_net(hu)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[[2, 3]], [0.0, 1.0])
    np.testing.assert_allclose(net_to_hu(x), np.clip(hu, -1024, 3071), atol=1e-3)
    t = hu_to_net(torch.tensor(hu, dtype=torch.float32))
    np.testing.assert_allclose(t.numpy(), x)
    np.testing.assert_allclose(net_to_hu(t).numpy(), net_to_hu(x))


def test_tiny_model_learns_a_denoising_task():
    """A few Adam steps on noisy/clean toy slices lower the loss: the models train."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    clean = torch.stack(
        [1.0 + 0.5 * torch.sin(xx / (3 + i) + i) * torch.cos(yy / (4 + i)) for i in range(8)]
    ).unsqueeze(1)
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=gen)
    model = UNet(in_slices=1, base_channels=8, levels=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(noisy), clean)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])


# ------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("arch", sorted(MODEL_CLASSES))
def test_save_load_round_trip_gives_identical_outputs(tmp_path, arch):
    torch.manual_seed(2)
    model = build_model(arch, in_slices=3, **TINY[arch]).eval()
    torch.nn.init.normal_(_last_layer(model).weight, std=0.1)  # non-trivial noise branch
    path = tmp_path / f"{arch}.safetensors"
    card = save_model(model, path, {"strategy": "ipv2", "iterations": 5, "validation": {"ssim": 0.5}})
    assert card["architecture"] == arch and card["kwargs"]["in_slices"] == 3
    assert card["parameters"] == count_parameters(model)
    assert card["sha256"] == sha256_file(path)
    on_disk = json.loads(card_path(path).read_text())
    assert on_disk == card
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header_len])["__metadata__"]["architecture"] == arch

    loaded, loaded_card = load_model(path, expected_sha256=card["sha256"])
    assert loaded_card["strategy"] == "ipv2" and not loaded.training
    x = torch.rand(2, 3 + noise_channels(model), 33, 35)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_without_card_uses_the_safetensors_header(tmp_path):
    model = UNet(in_slices=1, base_channels=4, levels=2)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    card_path(path).unlink()
    loaded, card = load_model(path)
    assert card["architecture"] == "unet" and loaded.config == model.config


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(UNet(base_channels=4), path)
    with pytest.raises(UserError, match="checksum mismatch .* expected sha256 0{64}"):
        load_model(path, expected_sha256="0" * 64)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # flip one weight byte: the card's sha256 no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch .* model card sha256"):
        load_model(path)


def test_wrong_architecture_is_refused_in_one_line(tmp_path):
    path = tmp_path / "m.safetensors"
    card = save_model(UNet(base_channels=4), path)
    for arch, kwargs, pattern in [
        ("dncnn", {"depth": 4, "width": 4}, "do not fit architecture 'dncnn'.*missing tensors"),
        ("unet", {"base_channels": 8}, "do not fit architecture 'unet'.*has shape .* the network needs"),
        ("segformer", {}, "unknown architecture 'segformer'"),
    ]:
        edited = {**card, "architecture": arch, "kwargs": kwargs}
        edited.pop("sha256")
        card_path(path).write_text(json.dumps(edited))
        with pytest.raises(UserError, match=pattern) as info:
            load_model(path)
        assert "\n" not in str(info.value)


def test_a_card_asking_for_a_huge_network_is_refused_before_it_takes_memory(tmp_path):
    """The card is hostile too: its keywords are checked against the file's tensors on the meta device."""
    path = tmp_path / "m.safetensors"
    card = save_model(UNet(in_slices=1, base_channels=4, levels=1), path)
    card.pop("sha256")
    for kwargs in (
        {"in_slices": 1, "base_channels": 200_000, "levels": 1},
        {"in_slices": 200_001, "base_channels": 4, "levels": 1},
        {"in_slices": 1, "base_channels": 4, "levels": 40},
    ):
        card_path(path).write_text(json.dumps({**card, "kwargs": kwargs}))
        with pytest.raises(UserError, match="does not describe a network|do not fit architecture") as info:
            load_model(path)  # the old loader built the network first: 1.4 TB for the first card
        assert "\n" not in str(info.value)


def test_hostile_checksums_header_keywords_and_non_finite_weights_are_one_line(tmp_path):
    from safetensors.torch import save_file

    model = UNet(in_slices=1, base_channels=4, levels=2)
    path = tmp_path / "m.safetensors"
    card = save_model(model, path)
    card_path(path).write_text(json.dumps({**card, "sha256": 12345}))
    with pytest.raises(UserError, match="not a text checksum"):
        load_model(path)
    card_path(path).unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"architecture": "unet", "kwargs": "{not json"})
    with pytest.raises(UserError, match="header's kwargs are not JSON"):
        load_model(path)
    state[next(iter(state))] = torch.full_like(state[next(iter(state))], float("nan"))
    save_file(state, str(path), metadata={"architecture": "unet", "kwargs": json.dumps(model.config)})
    with pytest.raises(UserError, match="non-finite values"):
        load_model(path)  # the old loader returned it, and every image came out NaN


def test_corrupt_or_missing_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(bad)
    with pytest.raises(UserError, match="must end in .safetensors"):
        save_model(UNet(base_channels=4), tmp_path / "m.pt")
