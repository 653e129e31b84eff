"""Denoising strength: the noise-aware networks' level map scaled by S, on a real CT slice with
inserted low-dose noise; 1 is today's output bit for bit, and the range is checked in one place."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.infer import Denoiser, run_slab, undeclared_padding_as_air
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels, noise_maps, with_noise_map
from IPv2DenoiseLib.denoiser.normalization import hu_to_net, net_to_hu
from IPv2DenoiseLib.denoiser.strength import check_strength
from IPv2DenoiseLib.denoiser.windows import window_indices
from IPv2DenoiseLib.physics.lowdose import insert_noise


@pytest.fixture(scope="module")
def low_dose_chest() -> tuple[np.ndarray, np.ndarray, float]:
    """pydicom's real GE chest slice (HU) at normal dose, the same at 2 % dose by projection-domain
    noise insertion (both ``[1, y, x]``), and its pixel size."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    normal = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    pixel_mm = float(ds.PixelSpacing[0])
    noisy = insert_noise(normal[None], dose=0.02, spacing_mm=pixel_mm, seed=0, device="cpu")
    return normal[None], noisy.astype(np.float32), pixel_mm


def todays_output(denoiser: Denoiser, hu: np.ndarray) -> np.ndarray:
    """The network's output on ``hu`` as inference computed it before the strength existed: the
    2.5D windows plus the noise channels as measured, one pass, no background removal."""
    k = denoiser.model.in_slices
    windows = torch.from_numpy(hu_to_net(hu[window_indices(0, len(hu), k, len(hu))]))
    batch = windows.unfold(0, k, 1).permute(0, 3, 1, 2)
    batch = with_noise_map(batch, undeclared_padding_as_air(hu), noise_channels(denoiser.model))
    return net_to_hu(run_slab(denoiser.model, batch, torch.device("cpu"))[:, 0].numpy())


@pytest.mark.parametrize("tier", ["fast", "quality"])
def test_strength_one_is_todays_output_bit_for_bit_on_a_real_ct_slice(low_dose_chest, tier: str) -> None:
    _, noisy, pixel_mm = low_dose_chest
    denoiser = Denoiser.from_registry(tier)
    kwargs = dict(device="cpu", remove_background=False, spacing=(pixel_mm, pixel_mm, 5.0))
    at_one = denoiser.denoise_array(noisy, strength=1.0, **kwargs)
    np.testing.assert_array_equal(at_one, todays_output(denoiser, noisy))
    np.testing.assert_array_equal(at_one, denoiser.denoise_array(noisy, **kwargs))  # the default is 1
    assert not np.array_equal(at_one, denoiser.denoise_array(noisy, strength=0.95, **kwargs))


def test_strength_scales_the_level_map_and_leaves_the_texture_channel(low_dose_chest) -> None:
    _, noisy, _ = low_dose_chest
    measured = noise_maps(noisy, 2)
    np.testing.assert_array_equal(noise_maps(noisy, 2, 1.0), measured)
    weaker = noise_maps(noisy, 2, 0.7)
    np.testing.assert_array_equal(weaker[:, 0], measured[:, 0] * np.float32(0.7))
    np.testing.assert_array_equal(weaker[:, 1], measured[:, 1])
    assert float(measured[:, 0].mean()) > 0.05  # a real level map (HU / 100), not zeros scaled
    np.testing.assert_array_equal(
        noise_maps(noisy, 1, 1.4)[:, 0], noise_maps(noisy, 1)[:, 0] * np.float32(1.4)
    )


@pytest.mark.parametrize("tier", ["fast", "quality"])
def test_a_stronger_setting_removes_more_of_the_input(low_dose_chest, tier: str) -> None:
    """SD of (output - input) on the 2 % dose slice grows strictly over 0.7, 1, 1.4 (measured: fast
    29.6, 31.7, 34.1 HU; quality 29.4, 31.1, 32.8 HU), and the weaker setting stays nearer the
    input's grain without leaving it (more than 20 HU removed even at 0.7)."""
    _, noisy, pixel_mm = low_dose_chest
    denoiser = Denoiser.from_registry(tier)
    kwargs = dict(device="cpu", remove_background=False, spacing=(pixel_mm, pixel_mm, 5.0))
    removed = [
        float((denoiser.denoise_array(noisy, strength=s, **kwargs) - noisy).std()) for s in (0.7, 1.0, 1.4)
    ]
    assert removed[0] < removed[1] < removed[2], removed
    assert removed[2] - removed[0] > 2.0 and removed[0] > 20.0, removed


@pytest.mark.parametrize("bad", [0.49, 2.01, float("nan"), float("inf"), True, "0.8", None])
def test_a_strength_outside_the_range_or_not_a_number_is_one_line(bad) -> None:
    with pytest.raises(UserError, match=r"^strength must be a number from 0.5 to 2, got ") as refused:
        check_strength(bad)
    assert "\n" not in str(refused.value)
    assert (
        check_strength(0.5) == 0.5 and check_strength(2) == 2.0 and check_strength(np.float32(1.25)) == 1.25
    )


def test_a_model_without_a_noise_map_takes_only_strength_one(low_dose_chest) -> None:
    """The plain U-Net a user may still pass (``--model unet-ipv2``) has no level map to scale."""
    _, noisy, _ = low_dose_chest
    plain = Denoiser.from_registry("unet-ipv2")
    assert plain.check_strength(1.0) == 1.0
    message = r"^strength 0.8: model unet-ipv2 takes no noise level map, so only strength 1 applies"
    with pytest.raises(UserError, match=message):
        plain.check_strength(0.8)
    with pytest.raises(UserError, match=message):
        plain.denoise_array(noisy, device="cpu", strength=0.8)
    with pytest.raises(UserError, match="strength must be a number from 0.5 to 2"):
        Denoiser.from_registry("fast").denoise_array(noisy, device="cpu", strength=3.0)
