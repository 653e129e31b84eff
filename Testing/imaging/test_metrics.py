"""Tests for IPv2DenoiseLib.imaging.metrics and metrics_table against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy.ndimage import binary_erosion, gaussian_filter
from skimage.metrics import structural_similarity

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.imaging import metrics as M
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable


@pytest.fixture(scope="module")
def ct_small() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)


def test_constants():
    level, width = M.LUNG_DISPLAY
    assert M.LUNG_WINDOW == (level - width / 2, level + width / 2) == (-1350.0, 150.0)
    assert M.MEDIASTINAL_DISPLAY == (40, 400)


# ---------------------------------------------------------------- ROI statistics, noise, CNR, LAA


def test_roi_stats_hand_values():
    img = np.full((12, 12), 5000.0, np.float32)  # outside the mask: must be ignored
    img[1:11, 1:11] = np.arange(100).reshape(10, 10)
    mask = np.zeros(img.shape, bool)
    mask[1:11, 1:11] = True
    s = M.roi_stats(img, mask)
    # 0..99: mean 49.5; sample variance n(n+1)/12 = 841.67; percentile rank q/100·99 → 4.95, 94.05
    assert s.count == 100
    assert s.mean == pytest.approx(49.5)
    assert s.std == pytest.approx(math.sqrt(100 * 101 / 12))
    assert s.p5 == pytest.approx(4.95)
    assert s.p95 == pytest.approx(94.05)
    assert M.noise_std(Volume(img[None]), mask[None]) == pytest.approx(s.std)


def test_empty_mask_gives_nan_not_crash():
    img = np.arange(16.0).reshape(4, 4)
    empty = np.zeros((4, 4), bool)
    s = M.roi_stats(img, empty)
    assert s.count == 0 and all(math.isnan(v) for v in (s.mean, s.std, s.p5, s.p95))
    assert math.isnan(M.laa950(img, empty))
    assert math.isnan(M.cnr(img, empty, ~empty))
    assert math.isnan(M.psnr(img, img + 1, mask=empty))
    assert math.isnan(M.rmse(img, img + 1, mask=empty))


def test_cnr_hand_value():
    img = np.zeros((3, 4))
    img[0] = 100.0  # region A: mean 100
    img[1] = [-10, 10, -10, 10]  # region B: mean 0, sample std sqrt(400/3)
    img[2, :2] = [0, 6]  # noise ROI: sample std sqrt(18)
    a, b, c = (np.zeros((3, 4), bool) for _ in range(3))
    a[0], b[1], c[2, :2] = True, True, True
    assert M.cnr(img, a, b) == pytest.approx(100 / math.sqrt(400 / 3))
    assert math.isnan(M.cnr(img, b, a))  # zero noise in the background: undefined, not inf
    assert M.cnr(img, a, b, noise_mask=c) == pytest.approx(100 / math.sqrt(18))


def test_laa950_hand_value():
    lung = np.array([-1000, -980, -950, -949, -900] + [-850] * 15, np.float32).reshape(4, 5)
    mask = np.ones(lung.shape, bool)
    # strictly below −950: −1000 and −980 → 2 of 20 = 10 %; −950 itself does not count
    assert M.laa950(lung, mask) == pytest.approx(10.0)
    assert M.laa950(lung, mask, threshold=-900) == pytest.approx(20.0)
    mask[0, 0] = False  # drop −1000: 1 of 19
    assert M.laa950(lung, mask) == pytest.approx(100 / 19)


def test_noise_from_realisations_cancels_structure():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:96]
    truth = np.where((yy - 48) ** 2 + (xx - 48) ** 2 < 30**2, 40.0, -850.0) + 2.0 * xx
    a = truth + rng.normal(0, 20, truth.shape)
    b = truth + rng.normal(0, 20, truth.shape)
    mask = np.ones(truth.shape, bool)
    assert M.noise_from_realisations(a, b, mask) == pytest.approx(20, rel=0.03)
    assert M.noise_std(a, mask) > 100  # the structure dominates a single-image std
    with pytest.raises(UserError, match=r"\(96, 96\).*\(96, 95\)"):
        M.noise_from_realisations(a, b[:, :95], mask)


# ---------------------------------------------------------------- PSNR / RMSE / SSIM


@pytest.mark.parametrize("offset", [15.0, 150.0, 300.0])
def test_psnr_rmse_constant_offset_inside_window(offset):
    ref = np.linspace(-1300, -400, 32 * 32).reshape(32, 32)
    test = ref + offset  # stays inside [−1350, 150]
    assert M.psnr(ref, test) == pytest.approx(20 * math.log10(1 / (offset / 1500)))
    assert M.rmse(ref, test) == pytest.approx(offset)
    assert math.isinf(M.psnr(ref, ref.copy()))


def test_window_clipping():
    ref = np.full((16, 16), -2000.0)
    test = np.full((16, 16), -1400.0)  # both below the window: identical after clipping
    assert M.rmse(ref, test) == 0 and math.isinf(M.psnr(ref, test))
    ref = np.full((16, 16), 100.0)
    test = np.full((16, 16), 500.0)  # only the 50 HU up to 150 count
    assert M.rmse(ref, test) == pytest.approx(50.0)
    assert M.psnr(ref, test) == pytest.approx(20 * math.log10(1500 / 50))
    assert M.rmse(ref, test, window=(-1000, 1000)) == pytest.approx(400.0)
    with pytest.raises(UserError, match="window"):
        M.psnr(ref, test, window=(150, -1350))


def test_masked_metrics_ignore_outside(ct_small):
    rng = np.random.default_rng(2)
    test = ct_small + rng.normal(0, 200, ct_small.shape).astype(np.float32)
    mask = np.zeros(ct_small.shape, bool)
    mask[40:90, 40:90] = True
    far = np.ones(ct_small.shape, bool)
    far[36:94, 36:94] = False  # ≥ 4 px from the mask: outside every 7×7 SSIM window over it
    test_far = np.where(far, test, ct_small)
    assert math.isinf(M.psnr(ct_small, test_far, mask=mask))
    assert M.rmse(ct_small, test_far, mask=mask) == 0
    assert M.ssim(ct_small, test_far, mask=mask) == pytest.approx(1.0)
    assert M.ssim(ct_small, test_far) < 0.9
    assert M.psnr(ct_small, test) < M.psnr(ct_small, test_far)
    # a constant offset inside the mask only: masked PSNR sees exactly that offset
    shifted = np.where(mask, ct_small + 30, ct_small + 500)
    inside = np.clip(ct_small[mask], -1350, 150)
    mse = np.mean((np.clip(ct_small[mask] + 30, -1350, 150) - inside) ** 2) / 1500**2
    assert M.psnr(ct_small, shifted, mask=mask) == pytest.approx(10 * math.log10(1 / mse))


def test_ssim_identity_noise_and_slices(ct_small):
    assert M.ssim(ct_small, ct_small.copy()) == pytest.approx(1.0)
    rng = np.random.default_rng(3)
    noisy = ct_small + rng.normal(0, 100, ct_small.shape)
    very = ct_small + rng.normal(0, 300, ct_small.shape)
    s1, s2 = M.ssim(ct_small, noisy), M.ssim(ct_small, very)
    assert 0 < s2 < s1 < 1
    # with no mask a 2D SSIM is skimage's mean SSIM of the windowed images
    scale = lambda x: (np.clip(x, -1350, 150) + 1350) / 1500  # noqa: E731
    assert s1 == pytest.approx(structural_similarity(scale(ct_small), scale(noisy), data_range=1.0))
    # 3D: per-slice maps pooled over the mask; a slice with no mask voxel is skipped
    ref3 = np.stack([ct_small, ct_small])
    test3 = np.stack([noisy, very])
    mask3 = np.zeros(ref3.shape, bool)
    mask3[0] = True
    assert M.ssim(ref3, test3, mask=mask3) == pytest.approx(s1)
    assert s2 < M.ssim(ref3, test3) < s1
    assert M.ssim(Volume(ref3), Volume(ref3)) == pytest.approx(1.0)


def test_shape_mismatch_errors():
    a, b = np.zeros((2, 16, 16)), np.zeros((2, 16, 15))
    for f in (M.psnr, M.ssim, M.rmse):
        with pytest.raises(UserError, match=r"reference shape \(2, 16, 16\) and test shape \(2, 16, 15\)"):
            f(a, b)
    with pytest.raises(UserError, match=r"mask shape \(16, 16\)"):
        M.psnr(a, a, mask=np.ones((16, 16), bool))
    with pytest.raises(UserError, match="7"):
        M.ssim(np.zeros((5, 5)), np.zeros((5, 5)))


# ---------------------------------------------------------------- NPS


def test_nps_white_noise_flat_and_variance():
    rng = np.random.default_rng(4)
    sigma, dx = 10.0, 0.5
    noise = rng.normal(0, sigma, (6, 128, 128))
    nps = M.nps_2d(noise, pixel_spacing_mm=dx, roi_size=64)
    assert nps.n_rois == 6 * 4
    assert nps.nps2d.shape == (64, 64) and nps.freq[-1] == pytest.approx(0.5 / dx)
    assert nps.variance == pytest.approx(sigma**2, rel=0.03)  # ∫NPS = σ²
    # flat at σ²·dx·dy, within the scatter of 24 ROIs
    assert np.mean(nps.radial[1:]) == pytest.approx(sigma**2 * dx * dx, rel=0.03)
    assert np.std(nps.radial[1:]) / np.mean(nps.radial[1:]) < 0.1
    # mean |f| of a flat spectrum on the square [−fN, fN]²: fN·(√2 + ln(1+√2))/3
    f_nyq = 0.5 / dx
    assert nps.mean_freq == pytest.approx(f_nyq * (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 3, rel=0.02)
    smooth = M.nps_2d(gaussian_filter(noise, (0, 1.0, 1.0)), pixel_spacing_mm=(dx, dx))
    assert smooth.mean_freq < 0.6 * nps.mean_freq
    assert smooth.peak_freq < nps.mean_freq
    assert smooth.variance < 0.2 * nps.variance


def test_nps_detrend_mask_and_errors():
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 5, (128, 128))
    yy, xx = np.mgrid[0:128, 0:128]
    trended = noise + 0.8 * xx - 0.5 * yy  # a slow ramp (e.g. cupping) on top of the noise
    assert M.nps_2d(trended, pixel_spacing_mm=0.7, roi_size=32, detrend="plane").variance == pytest.approx(
        25, rel=0.06
    )
    assert M.nps_2d(trended, pixel_spacing_mm=0.7, roi_size=32).variance > 50
    # only ROIs entirely inside the mask: the noisier right half is never used
    mixed = noise.copy()
    mixed[:, 64:] *= 10
    mask = np.zeros(mixed.shape, bool)
    mask[:, :70] = True
    nps = M.nps_2d(mixed, pixel_spacing_mm=0.7, roi_size=32, mask=mask)
    assert nps.n_rois == 4 * 2
    assert nps.variance == pytest.approx(25, rel=0.1)
    with pytest.raises(UserError, match="no 32×32 ROI"):
        M.nps_2d(mixed, pixel_spacing_mm=0.7, roi_size=32, mask=np.zeros_like(mask))
    with pytest.raises(UserError, match="detrend"):
        M.nps_2d(noise, pixel_spacing_mm=0.7, detrend="quadratic")


# ---------------------------------------------------------------- tables


def test_metrics_table_renders_exactly(tmp_path):
    t = MetricsTable()
    t.add_row("lung std", 80.0, 20.5, -59.5, "HU")
    t.add_row(metric="lung noise reduction", change=74.375, unit="%")
    csv_text = t.to_csv(tmp_path / "t.csv")
    assert csv_text == (
        "metric,before,after,change,unit\nlung std,80,20.5,-59.5,HU\nlung noise reduction,,,74.375,%\n"
    )
    assert (tmp_path / "t.csv").read_text() == csv_text
    assert t.to_markdown() == (
        "| metric | before | after | change | unit |\n"
        "|---|---|---|---|---|\n"
        "| lung std | 80.00 | 20.50 | -59.50 | HU |\n"
        "| lung noise reduction |  |  | 74.38 | % |\n"
    )
    assert t.as_dict() == {
        "metric": ["lung std", "lung noise reduction"],
        "before": [80.0, None],
        "after": [20.5, None],
        "change": [-59.5, 74.375],
        "unit": ["HU", "%"],
    }
    with pytest.raises(UserError, match="columns"):
        t.add_row("x", 1.0)
    with pytest.raises(UserError, match="unknown"):
        t.add_row(metric="x", delta=1.0)
    general = MetricsTable(columns=["model", "PSNR [dB]"], rows=[["unet", math.nan]])
    assert general.to_csv() == "model,PSNR [dB]\nunet,nan\n"
    assert general.to_markdown().endswith("| unet | n/a |\n")


def test_roi_comparison_table_on_ct_small(ct_small):
    rng = np.random.default_rng(6)
    before = ct_small + rng.normal(0, 60, ct_small.shape).astype(np.float32)  # a noisier scan
    after = gaussian_filter(before, 1.5)
    lung = binary_erosion(ct_small < -600, iterations=2)
    soft = binary_erosion((ct_small > -100) & (ct_small < 100), iterations=3)
    assert lung.sum() > 500 and soft.sum() > 500
    table = M.roi_comparison_table(
        Volume(before[None]), after[None], {"lung": lung[None], "soft_tissue": soft[None]}
    )
    d = dict(zip(table.as_dict()["metric"], table.rows))
    assert len(table.rows) == 2 * 5 + 2
    b, a = M.roi_stats(before, soft), M.roi_stats(after, soft)
    assert d["soft_tissue std"][1:4] == pytest.approx([b.std, a.std, a.std - b.std])
    assert d["soft_tissue std"][4] == "HU"
    assert d["soft_tissue noise reduction"][3] == pytest.approx(100 * (1 - a.std / b.std))
    assert d["lung noise reduction"][3] > 50 and d["soft_tissue noise reduction"][3] > 50
    cnr_b, cnr_a = d["CNR lung vs soft_tissue"][1:3]
    assert cnr_b == pytest.approx(M.cnr(before, lung, soft)) and cnr_a > 2 * cnr_b
    laa_b, laa_a, laa_change, unit = d["LAA-950"][1:]
    assert unit == "%" and laa_b > laa_a and laa_change == pytest.approx(laa_a - laa_b)
    assert "| LAA-950 |" in table.to_markdown()
    only_soft = M.roi_comparison_table(before, after, {"soft_tissue": soft})
    assert [r[0] for r in only_soft.rows][-1] == "soft_tissue noise reduction"


def test_roi_table_laa_over_given_lung_mask() -> None:
    from IPv2DenoiseLib.imaging.metrics import roi_comparison_table

    before = np.full((1, 4, 5), -900.0)
    before[0, 0, :] = -1000.0  # 5 of 20 voxels below -950 in the whole "lung"
    after = np.full((1, 4, 5), -900.0)
    whole = np.ones((1, 4, 5), bool)
    parenchyma = np.zeros((1, 4, 5), bool)
    parenchyma[0, 1:, :] = True  # no voxel below -950 here
    table = roi_comparison_table(before, after, {"lung": parenchyma}, laa_mask=whole).as_dict()
    row = table["metric"].index("LAA-950")
    assert table["before"][row] == 25.0 and table["after"][row] == 0.0
