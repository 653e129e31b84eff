"""The noise-aware U-Net and its noise level map (issue #24 item 2): the map is in HU and reads the
noise it is given; a tiny noise-aware model trains and denoises through the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models import ARCH_PRESETS, build_model, count_parameters, flops_per_voxel
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import (
    FINENESS_CENTRE,
    FINENESS_SCALE,
    NOISE_MAP_SCALE_HU,
    NoiseAwareUNet,
    TextureAwareUNet,
    noise_channels,
    noise_maps,
    with_noise_map,
)
from IPv2DenoiseLib.denoiser.weights import load_model
from IPv2DenoiseLib.imaging.noise_map import noise_fineness, noise_level_map
from IPv2DenoiseLib.physics.scanner_noise import ScannerProtocol, scanner_noise
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

NOISE_HU = 60.0


@pytest.fixture(scope="module")
def chest_slice() -> tuple[np.ndarray, np.ndarray]:
    """A noise-free phantom chest slice (HU, textured tissue, vessels) and its inner soft tissue."""
    hu = make_chest_phantom(shape=(1, 384, 384), spacing=(0.9, 0.9, 1.25), seed=3, nodules=False).hu
    smooth = ndi.gaussian_filter(hu[0], 2)
    tissue = ndi.binary_erosion((smooth > -200) & (smooth < 200), iterations=4)
    assert tissue.sum() > 2000
    return hu.astype(np.float32), tissue


def test_noise_map_has_the_shape_of_its_input_and_is_zero_without_noise() -> None:
    rng = np.random.default_rng(0)
    assert noise_level_map(rng.normal(0, 30, (100, 130))).shape == (100, 130)
    maps = noise_level_map(rng.normal(0, 30, (3, 100, 130)))
    assert maps.shape == (3, 100, 130) and maps.dtype == np.float32
    assert np.all(noise_level_map(np.full((64, 64), 40.0)) == 0.0)
    # each slice is measured on its own: a noisier slice does not raise its neighbour's map
    two = np.stack([rng.normal(0, 20, (96, 96)), rng.normal(0, 80, (96, 96))])
    assert np.median(noise_level_map(two)[0]) == pytest.approx(20.0, rel=0.1)
    assert np.median(noise_level_map(two)[1]) == pytest.approx(80.0, rel=0.1)


@pytest.mark.parametrize("smoothing_px", [0.0, 1.0])
def test_noise_map_reads_white_and_smooth_noise_in_hu(chest_slice, smoothing_px: float) -> None:
    """Gaussian noise, white or smoothed over 1 pixel (lag-1 correlation 0.78), 60 HU SD."""
    hu, tissue = chest_slice
    noise = np.random.default_rng(1).standard_normal(hu.shape).astype(np.float32)
    if smoothing_px:
        noise = ndi.gaussian_filter(noise, (0, smoothing_px, smoothing_px))
    noise *= NOISE_HU / noise[0][tissue].std()
    read = float(np.median(noise_level_map(hu + noise)[0][tissue]))
    assert read == pytest.approx(NOISE_HU, rel=0.25)


@pytest.mark.parametrize(("kernel", "dose"), [("ramp", 0.02), ("hann", 0.005)])
def test_noise_map_reads_projection_noise_of_sharp_and_smooth_kernels(
    chest_slice, kernel: str, dose: float
) -> None:
    """Ultra-low-dose noise levels (30-120 HU); the map also reads the phantom's own fine texture
    (about 10 HU), which matters little at these levels."""
    hu, tissue = chest_slice
    protocol = ScannerProtocol(dose=dose, kernel=kernel, bowtie=False, tcm=0.0, geometry="parallel")
    noisy = scanner_noise(hu, protocol, spacing_mm=0.9, seed=2, clean=True)
    true_sd = float((noisy - hu)[0][tissue].std())
    assert 30.0 < true_sd < 120.0
    read = float(np.median(noise_level_map(noisy)[0][tissue]))
    assert read == pytest.approx(true_sd, rel=0.25)


def test_noise_aware_unet_takes_the_map_as_a_last_channel() -> None:
    net = NoiseAwareUNet(in_slices=3, base_channels=4, levels=2)
    assert net(torch.zeros(2, 4, 33, 35)).shape == (2, 1, 33, 35)
    with pytest.raises(ValueError):
        net(torch.zeros(2, 3, 32, 32))  # the map channel is missing
    hu = np.random.default_rng(0).normal(0, 50, (2, 40, 40)).astype(np.float32)
    batch = with_noise_map(torch.zeros(2, 3, 40, 40), hu)
    assert batch.shape == (2, 4, 40, 40)
    assert float(batch[:, 3].median()) * NOISE_MAP_SCALE_HU == pytest.approx(50.0, rel=0.15)
    # it starts as the identity, like the U-Net: the centre slice comes out unchanged
    x = torch.rand(1, 4, 32, 32)
    assert torch.equal(net(x), x[:, 1:2])


def test_quality_preset_is_the_fast_network_at_twice_the_width() -> None:
    arch, kwargs = ARCH_PRESETS["quality"]
    quality = build_model(arch, **kwargs)
    fast = build_model(*ARCH_PRESETS["fast"][:1], **ARCH_PRESETS["fast"][1])
    assert isinstance(quality, NoiseAwareUNet)
    assert count_parameters(quality) == 466_817
    assert count_parameters(fast) == 117_185  # the shipped default: unet-nm, 16 channels, 3 levels
    assert flops_per_voxel(quality) > 3.9 * flops_per_voxel(fast)
    assert {**fast.config, "base_channels": 32} == quality.config  # so it can start from the fast weights


@pytest.mark.parametrize("base_channels", [6, 8, 12])
def test_a_widened_network_computes_what_the_narrow_one_computes(base_channels) -> None:
    torch.manual_seed(0)
    narrow = NoiseAwareUNet(in_slices=3, base_channels=4, levels=3)
    for weight in narrow.parameters():  # a trained-looking network (the head starts at zero)
        torch.nn.init.normal_(weight, std=0.3)
    wide = narrow.widened(base_channels, seed=5)
    assert isinstance(wide, NoiseAwareUNet) and wide.config["base_channels"] == base_channels
    x = torch.randn(2, 4, 37, 30)
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow(x), rtol=1e-4, atol=1e-3)  # outputs up to ~100
    # the copies of one channel are split apart in what reads them, so training can tell them apart
    # (new channel k copies old channel k mod 4; at 6 channels, old channels 0 and 1 have two copies)
    head = wide.head.weight[0, :, 0, 0]
    assert not torch.allclose(head[:2], head[4:6])
    copies = torch.zeros(4).index_add_(0, torch.arange(base_channels) % 4, head)
    assert torch.allclose(copies, narrow.head.weight[0, :, 0, 0])


def test_widening_to_a_width_that_is_not_wider_is_refused() -> None:
    with pytest.raises(UserError, match="cannot widen a 16-channel network to 16 channels; use more than 16"):
        NoiseAwareUNet().widened(16)


@pytest.mark.parametrize(("arch", "cls"), [("unet-nm", NoiseAwareUNet), ("unet-nmt", TextureAwareUNet)])
def test_noise_aware_model_trains_and_denoises_through_the_library_and_the_cli(
    tmp_path, made_dataset, arch: str, cls: type
) -> None:
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.io.volumes import read_volume

    out = tmp_path / "run"
    train = [
        "train",
        "--noise",
        "scanner",
        "--schedule",
        "constant",
        "--data",
        str(made_dataset / "case_000"),
        "--val",
        str(made_dataset / "case_001"),
        "--out",
        str(out),
        "--name",
        "tiny-nm",
        "--arch",
        arch,
        "--model-kwargs",
        '{"in_slices": 3, "base_channels": 4, "levels": 2}',
        "--iterations",
        "3",
        "--val-every",
        "3",
        "--batch",
        "4",
        "--patch",
        "32",
        "--noise-pool",
        "3",
        "--device",
        "cpu",
    ]
    assert main(train) == 0
    card = json.loads((out / "tiny-nm.json").read_text())
    assert card["architecture"] == arch and card["iterations"] == 3
    assert "scanner_psnr_truth" in card["validation"]  # validation fed the map too
    weights = out / "tiny-nm.safetensors"
    denoiser = Denoiser.from_file(weights, expected_sha256=card["sha256"])
    assert type(denoiser.model) is cls
    uldct = read_volume(next((made_dataset / "case_001").glob("uldct.*")))
    result = denoiser.denoise(Volume(uldct.array, spacing=uldct.spacing), device="cpu")
    assert result.shape == uldct.shape and np.isfinite(result.array).all()
    assert not np.array_equal(result.array, uldct.array)
    written = tmp_path / "denoised.nrrd"
    source = next((made_dataset / "case_001").glob("uldct.*"))
    assert main(["denoise", str(source), str(written), "--weights", str(weights), "--device", "cpu"]) == 0
    cli = read_volume(written)
    assert cli.shape == uldct.shape
    np.testing.assert_allclose(cli.array, result.array, atol=1e-3)


@pytest.mark.parametrize("cls", [NoiseAwareUNet, TextureAwareUNet])
def test_scan_adaptation_feeds_the_noise_map_to_a_noise_aware_model(chest_slice, cls: type) -> None:
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.training.adapt import AdaptConfig, adapt_denoiser

    hu, _ = chest_slice
    truth = np.repeat(hu[:, ::2, ::2], 4, axis=0)  # 4 slices of 192², 1.8 mm pixels
    protocol = ScannerProtocol(dose=0.02, kernel="ramp", bowtie=False, tcm=0.0, geometry="parallel")
    scan = scanner_noise(truth, protocol, spacing_mm=1.8, seed=4, device="cpu")
    base = Denoiser(cls(in_slices=3, base_channels=4, levels=2))
    adapted, report = adapt_denoiser(
        base,
        Volume(scan, (1.8, 1.8, 1.25)),
        AdaptConfig(seconds=600, max_iterations=3, batch=2),
        device="cpu",
    )
    assert report.iterations == 3 and type(adapted.model) is cls
    assert adapted.denoise_array(scan, device="cpu").shape == scan.shape


def test_a_noise_aware_unet_widened_from_a_unet_computes_the_same_whatever_the_map() -> None:
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference

    unet = ModelReference.resolve("unet-ipv2").load().model
    widened = NoiseAwareUNet.from_unet(unet).eval()
    x = torch.rand(2, 3, 40, 44)
    maps = 3.0 * torch.rand(2, 1, 40, 44)
    with torch.no_grad():
        torch.testing.assert_close(widened(torch.cat([x, maps], dim=1)), unet(x), rtol=0, atol=1e-6)


def test_train_unet_nm_may_start_from_the_shipped_unet(tmp_path, made_dataset) -> None:
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference

    shipped = ModelReference.resolve("unet-ipv2").weights
    out = tmp_path / "run"
    args = [
        "train", "--noise", "scanner", "--schedule", "constant", "--data", str(made_dataset / "case_000"),
        "--out", str(out), "--name", "nm", "--arch", "unet-nm", "--init", str(shipped), "--iterations", "1",
        "--batch", "2", "--patch", "32", "--noise-pool", "2", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    card = json.loads((out / "nm.json").read_text())
    assert card["architecture"] == "unet-nm" and card["initialised_from"] == shipped.name


# ------------------------------------------------------------------ the noise's texture (issue #24)


@pytest.mark.parametrize("level_hu", [30.0, 90.0])
def test_noise_fineness_orders_noise_textures_on_a_chest_slice_at_any_level(chest_slice, level_hu) -> None:
    """White noise reads about 0.9, a sharp kernel's (ramp) about the same, a smooth kernel's (Hann) lower,
    Gaussian-smoothed noise lowest, whatever the level; the noise-free slice (edges, phantom
    texture) reads apart from white noise."""
    hu, tissue = chest_slice
    rng = np.random.default_rng(7)
    white = rng.standard_normal(hu.shape).astype(np.float32)
    smooth = ndi.gaussian_filter(rng.standard_normal(hu.shape), (0, 1.0, 1.0)).astype(np.float32)

    def scaled(noise: np.ndarray) -> np.ndarray:
        return hu + noise * np.float32(level_hu / noise[0][tissue].std())

    def scanned(kernel: str) -> np.ndarray:
        protocol = ScannerProtocol(dose=0.02, kernel=kernel, bowtie=False, tcm=0.0, geometry="parallel")
        noisy = scanner_noise(hu, protocol, spacing_mm=0.9, seed=3, clean=True)
        return scaled(noisy - hu)

    read = {
        "white": float(noise_fineness(scaled(white))[0]),
        "ramp": float(noise_fineness(scanned("ramp"))[0]),
        "hann": float(noise_fineness(scanned("hann"))[0]),
        "gaussian 1 px": float(noise_fineness(scaled(smooth))[0]),
    }
    assert read["white"] > 0.85  # measured 0.90 / 0.96
    # measured: ramp 0.87 / 0.93, Hann 0.53 / 0.58, Gaussian 0.41 / 0.44; the noise-free slice 0.10
    assert read["white"] > read["ramp"] - 0.02 > read["hann"] + 0.2 > read["gaussian 1 px"] + 0.25
    assert noise_fineness(hu)[0] < 0.3


def test_noise_fineness_is_one_value_per_slice_and_zero_without_noise() -> None:
    rng = np.random.default_rng(0)
    two = np.stack([rng.normal(0, 40, (96, 96)), ndi.gaussian_filter(rng.normal(0, 40, (96, 96)), 1.5)])
    values = noise_fineness(two)
    assert values.shape == (2,) and values.dtype == np.float32
    assert values[0] > 0.9 > 0.5 > values[1]  # each slice on its own
    assert noise_fineness(two[0]).shape == ()
    assert noise_fineness(np.full((64, 64), -1000.0)) == 0.0  # padding: no block has noise


def test_noise_maps_give_the_level_map_then_a_texture_channel_constant_over_each_slice() -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(0, 50, (2, 48, 40)).astype(np.float32)
    one, two = noise_maps(hu, 1), noise_maps(hu, 2)
    assert one.shape == (2, 1, 48, 40) and two.shape == (2, 2, 48, 40)
    np.testing.assert_array_equal(two[:, 0], one[:, 0])
    texture = two[:, 1]
    assert np.all(texture == texture[:, :1, :1])
    np.testing.assert_allclose(
        texture[:, 0, 0], (noise_fineness(hu) - FINENESS_CENTRE) / FINENESS_SCALE, rtol=1e-6
    )
    batch = with_noise_map(torch.zeros(2, 3, 48, 40), hu, 2)
    assert batch.shape == (2, 5, 48, 40)
    with pytest.raises(ValueError, match="1 or 2"):
        noise_maps(hu, 3)


def test_a_texture_aware_unet_started_from_a_noise_aware_one_computes_the_same_whatever_the_texture(
    noise_aware_weights,
) -> None:
    nm = load_model(noise_aware_weights)[0]
    texture = TextureAwareUNet.from_noise_aware(nm).eval()
    assert noise_channels(texture) == 2 and noise_channels(nm) == 1
    assert texture.config == nm.config and count_parameters(texture) == count_parameters(nm) + 16 * 9
    x = torch.rand(2, 4, 40, 44)
    with torch.no_grad():
        for value in (-2.0, 0.0, 1.5):
            texture_channel = torch.full((2, 1, 40, 44), value)
            torch.testing.assert_close(
                texture(torch.cat([x, texture_channel], dim=1)), nm(x), rtol=0, atol=1e-6
            )
    with pytest.raises(ValueError):
        texture(x)  # the texture channel is missing


def test_train_quality_texture_starts_from_noise_aware_weights_and_says_so(
    tmp_path, made_dataset, noise_aware_weights
) -> None:
    """``--arch fast-texture --init <unet-nm weights>``: the card records the new architecture and
    where it started; the network then denoises through ``denoise --weights``."""
    from IPv2DenoiseLib.app.cli import main

    shipped = noise_aware_weights
    out = tmp_path / "run"
    args = [
        "train", "--noise", "scanner", "--schedule", "constant", "--data", str(made_dataset / "case_000"),
        "--out", str(out), "--name", "nmt", "--arch", "fast-texture", "--init", str(shipped),
        "--iterations", "1", "--batch", "2", "--patch", "32", "--noise-pool", "2", "--device", "cpu",
        "--image-texture-share", "0.5",
    ]  # fmt: skip
    assert main(args) == 0
    card = json.loads((out / "nmt.json").read_text())
    assert card["architecture"] == "unet-nmt" and card["initialised_from"] == shipped.name
    assert card["kwargs"] == {"in_slices": 3, "base_channels": 16, "levels": 3}


def test_padding_below_air_does_not_change_the_noise_channels_at_inference() -> None:
    """The outside of the reconstruction circle stored at -2048 HU (many archives, no
    PixelPaddingValue) gave the noise maps a ring of a thousand HU and moved the texture channel,
    which is one value per slice, so the whole slice was denoised differently; training saw air
    there. Padded at -2048 or at -1024, the shipped texture-aware default now denoises alike."""
    from conftest import chest_like_volume

    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.infer import Denoiser, undeclared_padding_as_air
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference

    hu = chest_like_volume(4, (5, 96, 96))
    yy, xx = np.mgrid[:96, :96]
    outside = np.hypot(yy - 47.5, xx - 47.5) > 46  # the corners: outside the reconstruction circle
    air, padded = hu.copy(), hu.copy()
    air[:, outside], padded[:, outside] = -1024.0, -2048.0
    denoiser: Denoiser = ModelReference.resolve("default").load()
    assert noise_channels(denoiser.model) == 2  # level map and texture: the texture is per slice
    torch.set_num_threads(2)
    outputs = [denoiser.denoise(Volume(v, (0.7, 0.7, 1.25)), device="cpu").array for v in (air, padded)]
    inside = np.hypot(yy - 47.5, xx - 47.5) < 40  # a few pixels in from the circle (88 HU apart before)
    np.testing.assert_allclose(outputs[1][:, inside], outputs[0][:, inside], atol=0.5)
    # noisy air swinging below -1024 HU is no padding: it reaches the noise channels as it is
    noisy_air = air + np.random.default_rng(0).normal(0, 300, air.shape).astype(np.float32)
    assert undeclared_padding_as_air(noisy_air) is noisy_air
