"""IPv1/IPv2 pair construction region by region, the PNG dataset layout and the ``purify`` command."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from purify_phantom import SPACING, misaligned_pair
from scipy import ndimage as ndi

from IPv2DenoiseLib import masks
from IPv2DenoiseLib.errors import UserError
from IPv2DenoiseLib.purify import (
    Strategy,
    build_pairs,
    estimate_noise_hu,
    make_weak_denoiser,
    remove_background,
)


class RecordingSimulator:
    """A test ``Sim``: NDCT + seeded Gaussian noise scaled like 1/sqrt(dose); keeps its last output."""

    def __init__(self):
        self.calls = []

    def __call__(self, n, dose, seed):
        out = n + np.random.default_rng(seed).normal(0, 12.0 / np.sqrt(dose), n.shape).astype(np.float32)
        self.calls.append((dose, seed))
        self.last = out.copy()
        return out


def slice_wd(s):
    return ndi.gaussian_filter(s, 1.0)


@pytest.fixture(scope="module")
def pair():
    u, n, _, _ = misaligned_pair(shape=(6, 96, 112))
    return u, n


ALL_COMBOS = [
    Strategy(remove_background=rb, add_noise=an, remove_noise=rn)
    for rb, an, rn in itertools.product([False, True], repeat=3)
] + [Strategy.from_name("naive")]


@pytest.mark.parametrize("strategy", ALL_COMBOS, ids=lambda s: s.name)
def test_every_region_comes_from_the_table_source(pair, strategy):
    u, n = pair
    u0, n0 = u.copy(), n.copy()
    sim = RecordingSimulator()
    out = build_pairs(u, n, strategy, simulate=sim, weak_denoiser=slice_wd, dose=0.05, seed=7)
    np.testing.assert_array_equal(u, u0)  # inputs untouched
    np.testing.assert_array_equal(n, n0)
    dark, bg, lungs = out.dark, out.background, out.lungs
    np.testing.assert_array_equal(dark, masks.common_dark_mask(u, n))
    np.testing.assert_array_equal(bg | lungs, dark)
    body = ~dark
    assert bg.any() and lungs.any() and body.any()
    for arr in (out.train_input, out.train_label, out.test_label):
        assert arr.dtype == np.float32 and arr.shape == u.shape

    # training label is N everywhere, in every strategy
    np.testing.assert_array_equal(out.train_label, n)
    # body: U -> N, test label N, in every strategy
    np.testing.assert_array_equal(out.train_input[body], u[body])
    np.testing.assert_array_equal(out.test_label[body], n[body])

    wd = np.stack([slice_wd(s) for s in u])
    if not strategy.purify:  # naive
        assert strategy.name == "naive"
        np.testing.assert_array_equal(out.train_input, u)
        np.testing.assert_array_equal(out.test_label, n)
        assert not out.purified.any() and sim.calls == []
        return
    purified_source_in = sim.last if strategy.add_noise else n
    purified_test = wd if strategy.remove_noise else u
    # lungs L are always purified
    np.testing.assert_array_equal(out.train_input[lungs], purified_source_in[lungs])
    np.testing.assert_array_equal(out.test_label[lungs], purified_test[lungs])
    # background B: like the body with remove_background, else like the rest of D
    if strategy.remove_background:
        np.testing.assert_array_equal(out.purified, lungs)
        np.testing.assert_array_equal(out.train_input[bg], u[bg])
        np.testing.assert_array_equal(out.test_label[bg], n[bg])
    else:
        np.testing.assert_array_equal(out.purified, dark)
        np.testing.assert_array_equal(out.train_input[bg], purified_source_in[bg])
        np.testing.assert_array_equal(out.test_label[bg], purified_test[bg])
    assert sim.calls == ([(0.05, 7)] if strategy.add_noise else [])


def test_presets_and_parser():
    p = Strategy.presets()
    assert p["ipv2"] == Strategy(True, True, True)
    assert p["ipv1"] == Strategy()
    assert p["naive"] == Strategy(purify=False)
    assert Strategy.from_name("Remove-Background+add_noise") == Strategy(True, True, False)
    assert Strategy.from_name("rb,rn").name == "rb+rn"
    assert Strategy.from_name("ipv1+an") == Strategy(add_noise=True)
    for name, strategy in p.items():
        assert Strategy.from_name(strategy.name) == strategy, name
    with pytest.raises(UserError, match="'foo'"):
        Strategy.from_name("rb+foo")
    with pytest.raises(UserError, match="naive"):
        Strategy(remove_background=True, purify=False)


def test_shape_mismatch_and_bad_dose(pair):
    u, n = pair
    with pytest.raises(UserError, match=r"\(6, 96, 112\).*\(6, 96, 100\)"):
        build_pairs(u, n[..., :100], "ipv1")
    for dose in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="dose"):
            build_pairs(u, n, "ipv1", dose=dose)
    with pytest.raises(UserError, match="weak denoiser"):
        build_pairs(u, n, "rn", weak_denoiser="bm4d")
    bad = u.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        build_pairs(bad, n, "ipv1")


def test_default_simulator_needs_spacing_or_lowdose(pair):
    import importlib.util

    u, n = pair
    with pytest.raises(UserError, match="spacing|lowdose"):
        build_pairs(u, n, "an", spacing=None)
    if importlib.util.find_spec("IPv2DenoiseLib.lowdose") is None:
        with pytest.raises(UserError, match="lowdose"):
            build_pairs(u, n, "an", spacing=SPACING)


def test_all_air_and_all_tissue_slices(pair):
    u, n = pair
    u2, n2 = u.copy(), n.copy()
    rng = np.random.default_rng(3)
    u2[0] = -1000 + rng.normal(0, 60, u2[0].shape)
    n2[0] = -1000 + rng.normal(0, 8, n2[0].shape)
    u2[1] = 40 + rng.normal(0, 60, u2[1].shape)
    n2[1] = 40 + rng.normal(0, 8, n2[1].shape)
    sim = RecordingSimulator()
    out = build_pairs(u2, n2, "ipv2", simulate=sim, weak_denoiser=slice_wd)
    assert out.background[0].all() and not out.lungs[0].any()  # all air = background
    np.testing.assert_array_equal(out.train_input[0], u2[0])
    np.testing.assert_array_equal(out.test_label[0], n2[0])
    assert not out.dark[1].any()  # all tissue = body
    np.testing.assert_array_equal(out.train_input[1], u2[1])
    for arr in (out.train_input, out.test_label):
        assert np.isfinite(arr).all()
    # 2-D slices work too and equal the volume's slice
    out2d = build_pairs(u2[3], n2[3], "ipv1")
    np.testing.assert_array_equal(out2d.train_input, build_pairs(u2, n2, "ipv1").train_input[3])


@pytest.mark.parametrize("method", ["gaussian", "median", "bilateral", "nlm"])
def test_weak_denoisers_reduce_noise_and_keep_mean(method):
    rng = np.random.default_rng(0)
    clean = np.full((48, 48), -850.0, dtype=np.float32)
    clean[:, 24:] = 40.0
    noisy = (clean + rng.normal(0, 60, clean.shape)).astype(np.float32)
    sigma = estimate_noise_hu(noisy, region=np.abs(np.arange(48) - 12)[None, :].repeat(48, 0) < 10)
    assert 50 < sigma < 70
    wd = make_weak_denoiser(method, spacing=(0.7, 0.7), noise_hu=sigma)
    out = wd(noisy)
    flat = (slice(8, 40), slice(4, 20))
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert out[flat].std() < 0.7 * noisy[flat].std()
    assert abs(out[flat].mean() - (-850.0)) < 10.0


def test_remove_noise_with_builtin_nlm_uses_measured_noise(pair):
    u, n = pair
    out = build_pairs(u, n, "rn", weak_denoiser="nlm", spacing=SPACING)
    assert out.noise_hu is not None and 40 < out.noise_hu < 75  # U has 60 HU white noise
    lungs = out.lungs
    assert out.test_label[lungs].std() < u[lungs].std()
    np.testing.assert_array_equal(out.test_label[~out.dark], n[~out.dark])


def test_remove_background_helper(pair):
    u, n = pair
    bg = masks.background_mask(u)
    out = remove_background(u, bg)
    assert (out[bg] == -1000.0).all()
    np.testing.assert_array_equal(out[~bg], u[~bg])
    assert not np.shares_memory(out, u)
    with pytest.raises(UserError, match="shape"):
        remove_background(u, bg[0])


def test_progress_and_cancel(pair):
    from IPv2DenoiseLib.progress import Cancelled, CancelToken

    u, n = pair
    seen = []
    build_pairs(u, n, "rb+rn", weak_denoiser=slice_wd, progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == 2 * u.shape[0]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        build_pairs(u, n, "ipv1", cancel=token)
