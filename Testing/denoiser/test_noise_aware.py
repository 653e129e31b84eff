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
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import NOISE_MAP_SCALE_HU, NoiseAwareUNet, with_noise_map
from IPv2DenoiseLib.imaging.noise_map import noise_level_map
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


@pytest.mark.parametrize("base_channels", [8, 12])
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
    head = wide.head.weight[0, :, 0, 0]
    assert not torch.allclose(head[:4], head[4:8])
    assert torch.allclose(
        head.reshape(-1, 4).sum(0), narrow.head.weight[0, :, 0, 0]
    )  # copy k of c: k * 4 + c


def test_widening_to_a_width_that_is_not_a_multiple_is_refused() -> None:
    with pytest.raises(UserError, match="cannot widen a 16-channel network to 24 channels"):
        NoiseAwareUNet().widened(24)


def test_noise_aware_model_trains_and_denoises_through_the_library_and_the_cli(
    tmp_path, made_dataset
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
        "unet-nm",
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
    assert card["architecture"] == "unet-nm" and card["iterations"] == 3
    assert "scanner_psnr_truth" in card["validation"]  # validation fed the map too
    weights = out / "tiny-nm.safetensors"
    denoiser = Denoiser.from_file(weights, expected_sha256=card["sha256"])
    assert isinstance(denoiser.model, NoiseAwareUNet)
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


def test_scan_adaptation_feeds_the_noise_map_to_a_noise_aware_model(chest_slice) -> None:
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.training.adapt import AdaptConfig, adapt_denoiser

    hu, _ = chest_slice
    truth = np.repeat(hu[:, ::2, ::2], 4, axis=0)  # 4 slices of 192², 1.8 mm pixels
    protocol = ScannerProtocol(dose=0.02, kernel="ramp", bowtie=False, tcm=0.0, geometry="parallel")
    scan = scanner_noise(truth, protocol, spacing_mm=1.8, seed=4, device="cpu")
    base = Denoiser(NoiseAwareUNet(in_slices=3, base_channels=4, levels=2))
    adapted, report = adapt_denoiser(
        base,
        Volume(scan, (1.8, 1.8, 1.25)),
        AdaptConfig(seconds=600, max_iterations=3, batch=2),
        device="cpu",
    )
    assert report.iterations == 3 and isinstance(adapted.model, NoiseAwareUNet)
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
