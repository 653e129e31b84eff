"""Reduced precision on the CPU: bf16 autocast where the CPU has AMX, float32 input and output layers,
and the switch that forces float32 everywhere."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from IPv2DenoiseLib.denoiser.infer import FLOAT32_ENV, Denoiser, autocast_dtype, cpu_has_amx
from IPv2DenoiseLib.denoiser.models.dncnn import DnCNN
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels, wants_noise_map, with_noise_map
from IPv2DenoiseLib.denoiser.normalization import hu_to_net, net_to_hu
from IPv2DenoiseLib.imaging.masks import soft_tissue_mask
from IPv2DenoiseLib.imaging.metrics import psnr
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose


def _net_output(den: Denoiser, hu: np.ndarray, dtype: torch.dtype | None) -> np.ndarray:
    """The network's HU output on one slice, in float32 or under CPU autocast to ``dtype``."""
    x = torch.from_numpy(hu_to_net(np.repeat(hu[None], 3, axis=0)))[None]
    if wants_noise_map(den.model):
        x = with_noise_map(x, hu[None], noise_channels(den.model))
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        return net_to_hu(den.model(x).float()[0, 0].numpy())


@pytest.mark.parametrize("model", ["fast", "quality"])
def test_bf16_on_the_cpu_keeps_the_image_of_a_real_ct_slice(model):
    """pydicom's real CT slice at 5 % dose: the shipped networks under CPU bf16 autocast (emulated
    where there is no AMX: the same arithmetic) score as in float32 and keep soft tissue's HU."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    truth = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    noisy = simulate_low_dose(
        truth[None], dose=0.05, spacing_mm=float(ds.PixelSpacing[0]), seed=3, device="cpu"
    )[0]
    den = Denoiser.from_registry(model)
    full = _net_output(den, noisy, None)
    half = _net_output(den, noisy, torch.bfloat16)
    soft = soft_tissue_mask(truth[None])[0]
    assert abs(psnr(truth, half) - psnr(truth, full)) < 0.05
    assert abs(float((half - full)[soft].mean())) < 0.5  # HU
    assert float(np.abs(half - full).mean()) < 1.5  # HU


def test_the_input_layer_keeps_hu_steps_that_bf16_would_round_away():
    """A water slab rising 1 HU per row: bf16 holds network units near 1.0 ((HU + 1000) / 1000) in
    steps of 7.8 HU, so a network reading its input in bf16 sees a staircase. The input layer runs in
    float32: the bf16 output stays within about 1 HU of float32's and has no staircase. (Read in
    bf16, the same network gave 1.57 HU mean and a row-to-row drop of 5.9 HU.)"""
    rows = np.arange(64, dtype=np.float32)[:, None] * np.ones((1, 64), np.float32)
    ramp = rows - 32.0  # −32 … +31 HU
    den = Denoiser.from_registry("fast")
    full = _net_output(den, ramp, None)
    half = _net_output(den, ramp, torch.bfloat16)
    inner = (slice(8, -8), slice(8, -8))
    assert float(np.abs(half - full)[inner].mean()) < 1.25  # HU (measured 0.95)
    assert np.diff(half[inner].mean(axis=1)).min() > -3.0  # HU per row (measured −1.7)


def test_reduced_precision_where_and_the_float32_switch(monkeypatch):
    unet = Denoiser.from_registry("fast").model
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(FLOAT32_ENV, raising=False)
    # bf16 on a CPU only with AMX (emulated bf16 is slower than float32), and only for networks that
    # keep their input layer in float32
    assert autocast_dtype(cpu, unet) == (torch.bfloat16 if cpu_has_amx() else None)
    assert autocast_dtype(cpu, DnCNN(in_slices=3)) is None
    assert autocast_dtype(cpu) is None
    monkeypatch.setenv(FLOAT32_ENV, "1")
    assert autocast_dtype(cpu, unet) is None
    assert autocast_dtype(cuda, unet) is None  # decided before asking CUDA anything
    monkeypatch.setenv(FLOAT32_ENV, "0")
    assert autocast_dtype(cpu, unet) == (torch.bfloat16 if cpu_has_amx() else None)


def test_the_float32_switch_gives_float32_output(monkeypatch):
    """With ``IPV2_DENOISE_FLOAT32=1`` the product path returns exactly the float32 network output."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    den = Denoiser.from_registry("fast")
    monkeypatch.setenv(FLOAT32_ENV, "1")
    out = den.denoise_array(np.repeat(hu[None], 3, axis=0), device="cpu", remove_background=False)[1]
    np.testing.assert_allclose(out, _net_output(den, hu, None), atol=0.05)
