"""Tests for the projector (parallel/fan, FBP) and the low-dose simulation (Add noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.metrics import nps_2d
from IPv2DenoiseLib.physics.lowdose import detector_grid_noise, insert_noise, simulate_low_dose
from IPv2DenoiseLib.physics.projector import FanGeometry, FanRebinner, ParallelProjector

N = 96
SPACING = 2.0  # mm: a 192 mm field, like a small chest
VIEWS = {"parallel": 90, "fan": 144}  # same 720 : 1152 ratio as the calibrated defaults


def disk(n: int, r: float, cx: float, cy: float, ss: int = 6) -> np.ndarray:
    """Anti-aliased disk (supersampled) centred (cx, cy) pixels off the image centre."""
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    off = (np.arange(ss) + 0.5) / ss - 0.5
    img = np.zeros((n, n))
    for a in off:
        for b in off:
            img += (xx + a - cx) ** 2 + (yy + b - cy) ** 2 < r * r
    return (img / ss**2).astype(np.float32)


def body(n: int = N) -> np.ndarray:
    """Soft-tissue ellipse with a lung and a bone insert, in HU."""
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    img = np.full((n, n), -1000.0, np.float32)
    img[(xx / (0.42 * n)) ** 2 + (yy / (0.32 * n)) ** 2 <= 1] = 40.0
    img[((xx + 0.2 * n) / (0.1 * n)) ** 2 + (yy / (0.15 * n)) ** 2 <= 1] = -850.0
    img[(xx - 0.25 * n) ** 2 + yy**2 <= (0.05 * n) ** 2] = 800.0
    return img


ROI = (slice(N // 2 - 8, N // 2 + 8), slice(N // 2 - 8, N // 2 + 8))  # soft tissue, centre


def noise_sd(rec: np.ndarray) -> float:
    """SD of (r1 − r2)/√2 in the ROI from two realisations (slices 0 and 1)."""
    return float(((rec[0][ROI] - rec[1][ROI]) / np.sqrt(2)).std())


@pytest.mark.parametrize("backend", ["finufft", "torch"])
def test_projection_matches_analytic_disk(backend):
    n, r, cx, cy = 64, 20.0, 6.0, -4.0
    proj = ParallelProjector(n, 60, backend=backend)
    sino = proj.forward(torch.from_numpy(disk(n, r, cx, cy))[None])[0].numpy()
    s = np.arange(proj.n_det) - (proj.n_det - 1) / 2
    d = s[None, :] - (cx * np.cos(proj.theta)[:, None] + cy * np.sin(proj.theta)[:, None])
    exact = 2 * np.sqrt(np.clip(r * r - d * d, 0, None))
    inner = np.abs(d) < r - 2
    assert np.abs(sino - exact)[inner].max() < 0.02 * exact.max()
    assert np.abs(sino - exact).max() < 0.1 * exact.max()  # band-limited edge ringing only
    assert np.abs(sino[:, np.abs(s) > 40]).max() < 0.05  # nothing outside the object's shadow


@pytest.mark.parametrize("flt", ["ramp", "shepp-logan", "hann"])
def test_fbp_of_clean_sinogram_reproduces_phantom(flt):
    n = 64
    img = disk(n, 20.0, 5.0, 3.0) + 0.5 * disk(n, 6.0, -12.0, 0.0)
    proj = ParallelProjector(n, 120)
    rec = proj.fbp(proj.forward(torch.from_numpy(img)[None]), filter=flt)[0].numpy()
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    fov = xx**2 + yy**2 < (n / 2 - 2) ** 2
    rmse = np.sqrt(((rec - img)[fov] ** 2).mean())
    assert rmse < {"ramp": 0.03, "shepp-logan": 0.05, "hann": 0.08}[flt]  # Hann blurs edges
    inside = (disk(n, 14.0, 5.0, 3.0) > 0.99) & (disk(n, 8.0, -12.0, 0.0) == 0)
    assert abs(rec[inside].mean() - 1.0) < 0.01


def test_torch_backend_matches_finufft():
    """The torch gridding back end (the CUDA path) gives the same projector as finufft."""
    img = torch.from_numpy(np.stack([body(64) / 1000.0 + 1, disk(64, 15.0, 3.0, 2.0)]))
    a = ParallelProjector(64, 45, backend="finufft")
    b = ParallelProjector(64, 45, backend="torch")
    sa, sb = a.forward(img), b.forward(img)
    assert torch.allclose(sa, sb, atol=1e-3 * sa.abs().max().item())
    ra, rb = a.fbp(sa, filter="hann"), b.fbp(sa, filter="hann")
    assert torch.allclose(ra, rb, atol=1e-3 * ra.abs().max().item())


def test_fan_rebinning_round_trip():
    n = 64
    proj = ParallelProjector(n, 72)
    fan = FanGeometry(views=144, channels=121, dgamma=1.0 / 595.0)
    rb = FanRebinner(fan, n_det=proj.n_det, ds_mm=1.0, device=torch.device("cpu"))
    par = proj.forward(torch.from_numpy(disk(n, 20.0, 4.0, -3.0))[None])
    fan_sino = rb.to_fan(par)
    assert fan_sino.shape == (1, 144, 121)
    # the central channel of fan view β is the parallel ray θ = β, s = 0
    assert torch.allclose(
        fan_sino[0, :72, 60], par[0, :, (proj.n_det - 1) // 2 : (proj.n_det + 2) // 2].mean(1), atol=0.5
    )
    back = rb.to_parallel(fan_sino)
    inner = slice(proj.n_det // 2 - 25, proj.n_det // 2 + 25)
    err = (back - par)[..., inner].abs().max() / par.abs().max()
    assert err < 0.05


def test_noise_scales_with_inverse_sqrt_dose_and_mean_is_kept():
    img = np.stack([body(), body()])
    sds = {}
    for dose in (1.0, 0.25, 0.1):
        rec = simulate_low_dose(
            img,
            dose=dose,
            spacing_mm=SPACING,
            geometry="parallel",
            views=VIEWS["parallel"],
            seed=3,
            device="cpu",
        )
        sds[dose] = noise_sd(rec)
        bias = float((rec[:, ROI[0], ROI[1]] - img[:, ROI[0], ROI[1]]).mean())
        assert abs(bias) < 0.15 * sds[dose]  # mean HU kept (no starvation here)
    for dose in (0.25, 0.1):
        ratio = sds[dose] / sds[1.0]
        assert abs(ratio / np.sqrt(1.0 / dose) - 1) < 0.15, (dose, ratio)


def test_seed_reproducible_and_batch_independent():
    img = np.stack([body()] * 3)
    a = simulate_low_dose(img, dose=0.1, spacing_mm=SPACING, geometry="parallel", views=60, seed=7, batch=3)
    b = simulate_low_dose(img, dose=0.1, spacing_mm=SPACING, geometry="parallel", views=60, seed=7, batch=1)
    c = simulate_low_dose(img, dose=0.1, spacing_mm=SPACING, geometry="parallel", views=60, seed=8)
    one = simulate_low_dose(img[0], dose=0.1, spacing_mm=SPACING, geometry="parallel", views=60, seed=7)
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(one, a[0], atol=1e-3)
    assert a.dtype == np.float32 and one.shape == img[0].shape
    assert np.abs(a - c)[0][ROI].std() > 5.0  # another seed, another noise
    assert np.abs(a[0] - a[1])[ROI].std() > 5.0  # slices get independent noise
    gen = np.random.default_rng(5)
    d = simulate_low_dose(img[0], dose=0.1, spacing_mm=SPACING, geometry="parallel", views=60, seed=gen)
    assert d.shape == img[0].shape


def test_fan_and_parallel_give_similar_noise():
    img = np.stack([body(), body()])
    sd = {}
    for geometry in ("fan", "parallel"):
        rec = simulate_low_dose(
            img, dose=0.25, spacing_mm=SPACING, geometry=geometry, views=VIEWS[geometry], seed=1
        )
        sd[geometry] = noise_sd(rec)
        assert abs(float((rec[:, ROI[0], ROI[1]] - img[:, ROI[0], ROI[1]]).mean())) < 0.2 * sd[geometry]
    assert 0.7 < sd["fan"] / sd["parallel"] < 1.4, sd


def test_filters_trade_noise_for_resolution():
    img = np.stack([body(), body()])
    sd = {
        f: noise_sd(
            simulate_low_dose(
                img, dose=0.25, spacing_mm=SPACING, geometry="parallel", views=60, seed=2, filter=f
            )
        )
        for f in ("ramp", "shepp-logan", "hann")
    }
    assert sd["hann"] < sd["shepp-logan"] < sd["ramp"]


def test_insert_noise_variance_ratio_and_resolution():
    clean = body()
    kw = dict(spacing_mm=SPACING, geometry="parallel", views=VIEWS["parallel"])
    nd = simulate_low_dose(np.stack([clean] * 2), dose=1.0, seed=11, **kw)
    sd_nd = noise_sd(nd)
    ld = insert_noise(nd, dose=0.25, seed=12, **kw)
    sd_direct = noise_sd(simulate_low_dose(np.stack([clean] * 2), dose=0.25, seed=13, **kw))
    assert abs(noise_sd(ld) / sd_nd - 2.0) < 0.3  # variance × 1/a
    assert abs(noise_sd(ld) / sd_direct - 1.0) < 0.15
    # resolution: the inserted noise is zero-mean and nothing is blurred, even at 1000 HU edges
    k = 8
    many = insert_noise(np.stack([clean] * k), dose=0.25, seed=1, **kw)
    mean_err = many.mean(0) - clean
    sd = noise_sd(many)
    assert np.abs(mean_err).max() < 6 * sd / np.sqrt(k)
    assert abs(float(mean_err[ROI].mean())) < sd / np.sqrt(k)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        (dict(dose=0.0), "dose"),
        (dict(dose=1.5), "dose"),
        (dict(dose=-0.1), "dose"),
        (dict(dose=0.1, geometry="cone"), "geometry"),
        (dict(dose=0.1, filter="lanczos"), "filter"),
        (dict(dose=0.1, spacing_mm=0.0), "spacing_mm"),
        (dict(dose=0.1, views=3), "views"),
        (dict(dose=0.1, geometry="fan", views=101), "views"),
    ],
)
def test_bad_options_raise_user_error(kwargs, word):
    args = dict(spacing_mm=SPACING, geometry="parallel")
    args.update(kwargs)
    with pytest.raises(UserError, match=word):
        simulate_low_dose(body(32), **args)
    with pytest.raises(UserError, match=word):
        insert_noise(body(32), **args)


def test_bad_arrays_raise_user_error():
    img = body(32)
    img[3, 4] = np.nan
    with pytest.raises(UserError, match="NaN"):
        simulate_low_dose(img, dose=0.1, spacing_mm=1.0)
    with pytest.raises(UserError, match="shape"):
        simulate_low_dose(np.zeros(10, np.float32), dose=0.1, spacing_mm=1.0)
    with pytest.raises(UserError, match="shape"):
        simulate_low_dose(np.zeros((2, 3, 4, 5), np.float32), dose=0.1, spacing_mm=1.0)


def test_non_square_slices_and_starvation_are_handled():
    """Rectangular input keeps its shape; a dense path at 1 % dose gives finite, biased-up streaks."""
    img = body(N)[8:-8]  # 80 × 96
    img[:, :10] = 1500.0  # dense bone-like slab along one side
    out = simulate_low_dose(img, dose=0.01, spacing_mm=SPACING, geometry="parallel", views=60, seed=0)
    assert out.shape == img.shape and np.isfinite(out).all()


def test_progress_and_cancel():
    from IPv2DenoiseLib.core.progress import Cancelled, CancelToken

    seen = []
    simulate_low_dose(
        np.stack([body(32)] * 3),
        dose=0.5,
        spacing_mm=4.0,
        geometry="parallel",
        views=30,
        batch=2,
        progress=lambda d, t, m: seen.append((d, t)),
    )
    assert seen == [(2, 3), (3, 3)]
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        simulate_low_dose(body(32), dose=0.5, spacing_mm=4.0, cancel=tok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu_noise_level():
    img = np.stack([body(), body()])
    kw = dict(dose=0.25, spacing_mm=SPACING, geometry="fan", views=VIEWS["fan"], seed=4)
    gpu = simulate_low_dose(img, device="cuda", **kw)
    cpu = simulate_low_dose(img, device="cpu", **kw)
    assert abs(noise_sd(gpu) / noise_sd(cpu) - 1) < 0.15
    clean = ParallelProjector(64, 45, device="cuda").forward(
        torch.from_numpy(disk(64, 15, 0, 0))[None].cuda()
    )
    ref = ParallelProjector(64, 45).forward(torch.from_numpy(disk(64, 15, 0, 0))[None])
    assert torch.allclose(clean.cpu(), ref, atol=1e-2)


def test_cli_simulate_writes_noisier_volume_with_same_geometry(tmp_path):
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import read_volume, write_volume

    vol = Volume(np.stack([body(64)] * 2), spacing=(3.0, 3.0, 5.0), origin=(1.0, 2.0, 3.0))
    src, dst = tmp_path / "in.nrrd", tmp_path / "out.nrrd"
    write_volume(vol, src)
    rc = main(
        [
            "simulate",
            str(src),
            str(dst),
            "--dose",
            "0.1",
            "--geometry",
            "parallel",
            "--views",
            "60",
            "--json-progress",
        ]
    )
    assert rc == 0
    out = read_volume(dst)
    assert out.same_geometry(vol)
    diff = out.array - vol.array
    assert 3.0 < float(diff[:, 24:40, 24:40].std()) < 300.0
    assert main(["simulate", str(src), str(tmp_path / "x.nrrd"), "--dose", "1.5"]) == 2
    assert not (tmp_path / "x.nrrd").exists()


def test_detector_grid_noise_has_a_detectors_grain_on_fine_pixels():
    """A 0.3 mm reconstruction gets noise of 0.6 mm grain (as from a real detector), not 0.3 mm grain."""
    fine = np.repeat(np.repeat(body(64), 3, axis=0), 3, axis=1)  # 192² of 0.3 mm pixels
    native = insert_noise(fine, dose=0.05, spacing_mm=0.3, seed=1) - fine
    grid = detector_grid_noise(fine, dose=0.05, spacing_mm=0.3, seed=1)
    assert grid.shape == fine.shape and grid.dtype == np.float32
    tissue = np.zeros(fine.shape, bool)
    tissue[70:122, 70:122] = True

    def mean_freq(noise: np.ndarray) -> float:
        return nps_2d(noise, pixel_spacing_mm=0.3, roi_size=32, mask=tissue, stride=16).mean_freq

    assert mean_freq(grid) < 0.75 * mean_freq(native)
    # one slice as [1, y, x] works (insert_noise accepts one-slice volumes), pixels at or above the pitch
    # are passed through unchanged
    coarse = body(48)
    np.testing.assert_allclose(  # float32 sums may differ in the last bits with the thread count
        detector_grid_noise(coarse[None], dose=0.1, spacing_mm=1.0, seed=2)[0],
        insert_noise(coarse, dose=0.1, spacing_mm=1.0, seed=2) - coarse,
        atol=1e-3,
    )


def test_cli_simulate_checks_out_and_views_before_reading(tmp_path, capsys):
    """OUT == IN is refused (the input is never modified), as are a format it cannot write and more
    views than a scan can use: one line each, exit 2, before the input is read or simulated."""
    from IPv2DenoiseLib.app.cli import main
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import write_volume

    src = tmp_path / "in.nrrd"
    write_volume(Volume(np.stack([body(64)] * 2), spacing=(3.0, 3.0, 5.0)), src)
    before = src.read_bytes()
    assert main(["simulate", str(src), str(src), "--dose", "0.1", "--views", "60"]) == 2
    assert src.read_bytes() == before
    missing = str(tmp_path / "missing.nrrd")  # never read: OUT and --views are refused first
    assert main(["simulate", missing, str(tmp_path / "out.png"), "--dose", "0.1"]) == 2
    assert (
        main(["simulate", missing, str(tmp_path / "out.nrrd"), "--dose", "0.1", "--views", "100000000"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("ipv2-denoise simulate: error:") == 3 and "Traceback" not in err
    assert "is the input" in err and "unsupported output format" in err and "views=100000000" in err
    assert "missing.nrrd" not in err


@pytest.mark.parametrize("backend", ["finufft", "torch"])
def test_a_seed_gives_the_same_noise_under_any_thread_count(backend) -> None:
    """finufft spread with ``OMP_NUM_THREADS`` threads: another summation order, and a Poisson
    draw on the rounded mean then drew another stream, so a fixed validation set changed with the
    machine's threads. Each count runs in its own process, as finufft reads the variable once; the
    torch back end (no finufft, or a GPU) is held to the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import hashlib, sys, numpy as np\n"
        "from IPv2DenoiseLib.physics.lowdose import simulate_low_dose\n"
        "hu = np.full((4, 192, 192), -1000, np.float32); hu[:, 40:150, 30:165] = 40; hu[:, 70:120, 50:90] = -850\n"
        "for geometry in ('parallel', 'fan'):\n"
        "    out = simulate_low_dose(hu, dose=0.02, spacing_mm=0.8, geometry=geometry, seed=5, device='cpu', backend=sys.argv[1])\n"
        "    print(hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest())\n"
    )
    lib = Path(__file__).resolve().parents[2] / "IPv2Denoise"
    digests = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(lib)}
        run = subprocess.run(
            [sys.executable, "-c", script, backend], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
        digests.append(run.stdout.split())
    assert len(set(digests[0])) == 2 and digests[0] == digests[1]
