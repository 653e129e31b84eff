"""IPv1/IPv2 pair construction region by region, the PNG dataset layout and the ``purify`` command."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from purify_phantom import SPACING, misaligned_pair
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging import masks
from IPv2DenoiseLib.purification.pairs import (
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


def test_default_simulator_needs_spacing(pair):
    u, n = pair
    with pytest.raises(UserError, match="spacing"):
        build_pairs(u, n, "an", spacing=None)


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
    from IPv2DenoiseLib.core.progress import Cancelled, CancelToken

    u, n = pair
    seen = []
    build_pairs(u, n, "rb+rn", weak_denoiser=slice_wd, progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == 2 * u.shape[0]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        build_pairs(u, n, "ipv1", cancel=token)


# --------------------------------------------------------------------------------------- PNG dataset

WINDOW = (-600.0, 1500.0)


def _write_png_dataset(root, u, n, *, names=("a.png", "b.png"), rgb_lq=True):
    from skimage import io

    from IPv2DenoiseLib.purification.png_dataset import hu_to_grey

    for split, idx in (("train", [0, 1]), ("test", [2])):
        (root / split / "lq").mkdir(parents=True)
        (root / split / "gt").mkdir(parents=True)
        for i in idx:
            name = names[i % len(names)] if split == "train" else "c.png"
            g_lq, g_gt = hu_to_grey(u[2 + i], WINDOW), hu_to_grey(n[2 + i], WINDOW)
            io.imsave(
                root / split / "lq" / name, np.stack([g_lq] * 3, -1) if rgb_lq else g_lq, check_contrast=False
            )
            io.imsave(root / split / "gt" / name, g_gt, check_contrast=False)


@pytest.mark.parametrize("strategy", ["ipv1", "ipv2"])
def test_png_dataset_round_trip(tmp_path, pair, strategy):
    from skimage import io

    from IPv2DenoiseLib.purification.png_dataset import grey_to_hu, purify_png_dataset, read_grey_png

    u, n = pair
    root, out = tmp_path / "ds", tmp_path / "out"
    _write_png_dataset(root, u, n)
    sim = RecordingSimulator()
    counts = purify_png_dataset(
        root, out, window=WINDOW, strategy=strategy, simulate=sim, weak_denoiser=slice_wd, seed=5
    )
    assert counts == {"train": 2, "test": 1}
    if strategy == "ipv2":
        assert [s for _, s in sim.calls] == [5, 6, 7]  # one seed per slice
    for split, name in (("train", "a.png"), ("train", "b.png"), ("test", "c.png")):
        lq = read_grey_png(root / split / "lq" / name)
        gt = read_grey_png(root / split / "gt" / name)
        lq_bar = io.imread(out / split / "lq_bar" / name)
        gt_bar = io.imread(out / split / "gt_bar" / name)
        assert lq_bar.dtype == np.uint8 and lq_bar.shape == lq.shape and gt_bar.shape == gt.shape
        expected = build_pairs(
            grey_to_hu(lq, WINDOW),
            grey_to_hu(gt, WINDOW),
            strategy,
            simulate=RecordingSimulator(),
            weak_denoiser=slice_wd,
            seed=0,
        )
        body, lungs, bg = ~expected.dark, expected.lungs, expected.background
        assert lungs.any() and body.any()
        np.testing.assert_array_equal(lq_bar[body], lq[body])  # grey -> HU -> grey is exact
        np.testing.assert_array_equal(gt_bar[body], gt[body])
        if strategy == "ipv1":
            np.testing.assert_array_equal(lq_bar[lungs | bg], gt[lungs | bg])
            np.testing.assert_array_equal(gt_bar[lungs | bg], lq[lungs | bg])
        else:
            np.testing.assert_array_equal(lq_bar[bg], lq[bg])
            np.testing.assert_array_equal(gt_bar[bg], gt[bg])
            assert np.abs(lq_bar[lungs].astype(int) - gt[lungs]).mean() > 2  # simulated noise in the lungs
            wd = np.clip(np.rint((slice_wd(grey_to_hu(lq, WINDOW)) + 1350.0) * 255 / 1500), 0, 255)
            np.testing.assert_array_equal(gt_bar[lungs], wd[lungs])


def test_png_dataset_unmatched_names(tmp_path, pair):
    from IPv2DenoiseLib.purification.png_dataset import purify_png_dataset

    u, n = pair
    root = tmp_path / "ds"
    _write_png_dataset(root, u, n)
    (root / "train" / "gt" / "b.png").rename(root / "train" / "gt" / "b2.png")
    with pytest.raises(UserError, match=r"train/lq/b\.png has no train/gt/ partner"):
        purify_png_dataset(root, tmp_path / "out", window=WINDOW, strategy="ipv1")
    with pytest.raises(UserError, match="window"):
        purify_png_dataset(root, tmp_path / "out", window=(0, 0), strategy="ipv1")


# --------------------------------------------------------------------------------------- command line


def _write_pair_nrrd(folder, u, n, *, n_spacing=SPACING):
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    write_volume(Volume(u, SPACING, (1.0, 2.0, 3.0)), folder / "u.nrrd")
    write_volume(Volume(n, n_spacing, (1.0, 2.0, 3.0)), folder / "n.nrrd")
    return folder / "u.nrrd", folder / "n.nrrd"


def test_cli_purify_volumes_with_real_simulator(tmp_path, pair, capsys):
    import json

    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.io.volumes import read_volume

    u, n = pair
    u3, n3 = u[2:4], n[2:4]  # two slices keep the real dose simulation short
    pu, pn = _write_pair_nrrd(tmp_path / "in", u3, n3)
    out = tmp_path / "out"
    rc = main(
        [
            "purify",
            "--uldct",
            str(pu),
            "--ndct",
            str(pn),
            "--out",
            str(out),
            "--strategy",
            "ipv2",
            "--weak-denoiser",
            "gaussian",
            "--dose",
            "0.02",
            "--json-progress",
        ]
    )
    assert rc == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert lines[-1]["strategy"] == "ipv2" and any("progress" in r for r in lines)
    # the whole-volume dose simulation reports inside its steps (one record per 8 slices on a CPU;
    # before, nothing between its start and its end)
    assert any(r.get("message") == "simulating the dose" for r in lines)
    vols = {
        k: read_volume(out / f"{k}.nrrd", force=True) for k in ("train_input", "train_label", "test_label")
    }
    maskv = {
        k: read_volume(out / f"mask_{k}.nrrd", force=True).array > 0.5
        for k in ("dark", "background", "lungs")
    }
    for v in vols.values():
        assert v.spacing == pytest.approx(SPACING) and v.origin == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_allclose(vols["train_label"].array, n3, atol=1e-3)
    body = ~maskv["dark"]
    np.testing.assert_allclose(vols["train_input"].array[body], u3[body], atol=1e-3)
    np.testing.assert_allclose(vols["test_label"].array[body], n3[body], atol=1e-3)
    bg = maskv["background"]
    np.testing.assert_allclose(vols["train_input"].array[bg], u3[bg], atol=1e-3)
    lungs = maskv["lungs"]
    sim_lungs = vols["train_input"].array[lungs]
    diff = sim_lungs - n3[lungs]  # Sim(N) - N: the simulated dose noise, no offset or rescale
    assert abs(float(diff.mean())) < 15 and diff.std() > 10
    record = json.loads((out / "purify.json").read_text())
    assert record["strategy"] == "ipv2" and record["voxels"]["lungs"] == int(lungs.sum())


def test_cli_purify_user_errors(tmp_path, pair, capsys):
    from IPv2DenoiseLib.app.cli import main

    u, n = pair
    pu, pn = _write_pair_nrrd(tmp_path / "in", u, n, n_spacing=(1.0, 1.0, 2.5))
    assert main(["purify", "--uldct", str(pu), "--ndct", str(pn), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "spacing" in err and "(1.5, 1.5, 2.5)" in err and "(1.0, 1.0, 2.5)" in err
    assert (
        main(["purify", "--uldct", str(pu), "--ndct", str(pu), "--out", str(tmp_path / "o"), "--dose", "2"])
        == 2
    )
    assert "dose" in capsys.readouterr().err
    assert main(["purify", "--png-dataset", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--window" in capsys.readouterr().err
    assert (
        main(
            [
                "purify",
                "--uldct",
                str(pu),
                "--ndct",
                str(pu),
                "--out",
                str(tmp_path / "o"),
                "--strategy",
                "xyz",
            ]
        )
        == 2
    )
    assert "xyz" in capsys.readouterr().err
    # the output is checked before the work: never a folder holding other files or the inputs
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out in (tmp_path / "full", tmp_path / "in"):
        assert main(["purify", "--uldct", str(pu), "--ndct", str(pu), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and pu.is_file()


def test_cli_purify_png_dataset(tmp_path, pair, capsys):
    from IPv2DenoiseLib.app.cli import main

    u, n = pair
    root = tmp_path / "ds"
    _write_png_dataset(root, u, n)
    rc = main(
        [
            "purify",
            "--png-dataset",
            str(root),
            "--window",
            "-600",
            "1500",
            "--out",
            str(tmp_path / "o"),
            "--strategy",
            "rb+rn",
            "--weak-denoiser",
            "median",
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o" / "train" / "lq_bar").iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "o" / "test" / "gt_bar" / "c.png").is_file()


def test_sim_only_control_is_sim_of_ndct_everywhere(pair):
    u, n = pair
    sim = RecordingSimulator()
    out = build_pairs(u, n, "sim", simulate=sim, weak_denoiser=slice_wd, dose=0.05, seed=3)
    assert out.strategy.name == "sim" and sim.calls == [(0.05, 3)]
    np.testing.assert_array_equal(out.train_input, sim.last)  # Sim(N) in body, lungs and background
    np.testing.assert_array_equal(out.train_label, n)
    np.testing.assert_array_equal(out.test_label, n)
    assert out.purified.all()
    assert not np.array_equal(out.train_input[~out.dark], u[~out.dark])  # no real ULDCT in training


@pytest.mark.parametrize("name, t, base", [("ipv1+tb", 0.1, "ipv1"), ("ipv2+tb0.3", 0.3, "ipv2")])
def test_texture_blend_formula(pair, name, t, base):
    """IPv1 HEAD: lq_bar = CM·N + (1−CM)·((1−T)·U + T·N); the purified region follows the switches."""
    u, n = pair
    sim = RecordingSimulator()
    out = build_pairs(u, n, name, simulate=sim, weak_denoiser=slice_wd, dose=0.05, seed=1)
    plain = build_pairs(u, n, base, simulate=RecordingSimulator(), weak_denoiser=slice_wd, dose=0.05, seed=1)
    assert out.strategy.texture_blend == t and Strategy.from_name(out.strategy.name) == out.strategy
    outside = ~out.purified
    np.testing.assert_allclose(out.train_input[outside], (1 - t) * u[outside] + t * n[outside], atol=1e-3)
    np.testing.assert_array_equal(out.train_input[out.purified], plain.train_input[out.purified])
    np.testing.assert_array_equal(out.test_label, plain.test_label)  # the blend changes training only
    np.testing.assert_array_equal(out.train_label, n)


def test_new_strategy_parts_refuse_bad_combinations():
    assert Strategy.from_name("ipv1+tb") == Strategy(texture_blend=0.1)
    assert Strategy.from_name("texture_blend0.2").name == "ipv1+tb0.2"
    for bad, match in (("sim+rb", "sim"), ("tb1.5", "texture blend"), ("tbx", "texture blend")):
        with pytest.raises(UserError, match=match):
            Strategy.from_name(bad)
    with pytest.raises(UserError, match="naive"):
        Strategy(purify=False, texture_blend=0.1)
