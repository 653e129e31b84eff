"""Classical baselines on a simulated low-dose chest slice: less noise, same mean HU, better PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.classical import CLASSICAL_METHODS, available_methods, denoise_classical
from IPv2DenoiseLib.imaging.metrics import psnr
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu


@pytest.fixture(scope="module")
def scan():
    from IPv2DenoiseLib.imaging.masks import body_mask, soft_tissue_mask
    from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
    from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

    phantom = make_chest_phantom(shape=(2, 128, 128), spacing=(3.0, 3.0, 3.0), seed=0)
    truth = phantom.hu
    noisy = simulate_low_dose(truth, dose=0.005, spacing_mm=3.0, seed=3)
    return truth, noisy, soft_tissue_mask(truth), body_mask(truth)


def test_noise_estimate_close_to_true_noise(scan):
    truth, noisy, soft, _ = scan
    true_sd = float((noisy - truth)[soft].std())
    assert 0.6 * true_sd < estimate_noise_hu(noisy) < 1.4 * true_sd


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_classical_reduces_noise_keeps_mean(scan, method):
    truth, noisy, soft, body = scan
    before = noisy.copy()
    out = denoise_classical(noisy, method, spacing=(3.0, 3.0, 3.0))
    assert out.shape == noisy.shape and out.dtype == np.float32
    np.testing.assert_array_equal(noisy, before)  # input untouched
    err_in, err_out = (noisy - truth)[soft], (out - truth)[soft]
    assert err_out.std() < 0.75 * err_in.std()
    # mean HU of soft tissue preserved (the simulation itself has a small bias; the denoiser adds little)
    assert abs(float(out[soft].mean()) - float(noisy[soft].mean())) < 8.0
    assert psnr(truth, out, mask=body) > psnr(truth, noisy, mask=body)


def test_single_slice_and_explicit_noise(scan):
    truth, noisy, soft, _ = scan
    out = denoise_classical(noisy[0], "tv", noise_hu=60.0)
    assert out.shape == noisy[0].shape
    assert (out - truth[0])[soft[0]].std() < (noisy[0] - truth[0])[soft[0]].std()


def test_bad_inputs_raise_user_error(scan):
    _, noisy, _, _ = scan
    with pytest.raises(UserError, match="classical method"):
        denoise_classical(noisy, "wiener")
    if "bm3d" not in available_methods():
        with pytest.raises(UserError, match="bm3d"):
            denoise_classical(noisy, "bm3d")
    with pytest.raises(UserError, match="noise_hu"):
        denoise_classical(noisy, "nlm", noise_hu=-1.0)
    bad = noisy.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        denoise_classical(bad, "tv")


def test_nlm_strengths_pinned_to_scikit_image(scan):
    """One NLM kernel: the baseline uses h = 0.9σ, the purification's weak denoiser h = 0.8σ."""
    from skimage.restoration import denoise_nl_means

    from IPv2DenoiseLib.purification.pairs import make_weak_denoiser

    s = scan[1][0]
    sigma = estimate_noise_hu(scan[1])
    expected = {
        factor: denoise_nl_means(
            s.astype(np.float64),
            patch_size=5,
            patch_distance=6,
            h=factor * sigma,
            sigma=sigma,
            fast_mode=True,
        ).astype(np.float32)
        for factor in (0.8, 0.9)
    }
    np.testing.assert_array_equal(denoise_classical(s, "nlm", noise_hu=sigma), expected[0.9])
    np.testing.assert_array_equal(
        make_weak_denoiser("nlm", spacing=(3.0, 3.0), noise_hu=sigma)(s), expected[0.8]
    )
    assert not np.array_equal(expected[0.8], expected[0.9])
