"""Real-anatomy benchmark: our denoiser against oracle-tuned classical filters on real CT slices.

One command::

    OMP_NUM_THREADS=2 python benchmarks/bench_real_anatomy.py [--model default | --weights FILE ...]

Images (real scans that ship in registry packages, nothing downloaded at run time):

* ``chest``: pydicom's ``CT_small.dcm`` (128² crop of a chest at 0.66 mm: spine, aorta, lung);
* ``head``, ``neck``, ``abdomen``: the CT slices of the ``pydicom-data`` package
  (``693_UNCR.dcm`` 0.48 mm, ``bad_sequence.dcm`` 0.29 mm, ``explicit_VR-UN.dcm`` 0.86 mm).

Each image is the *truth* (a normal-dose scan, with its own small noise). Two low-dose versions:

* ``projection``: 2 %-dose noise inserted in the projection domain by
  :func:`IPv2DenoiseLib.physics.lowdose.insert_noise` (fan beam, ramp filter). Body size is matched
  to each image: an image whose field of view cuts the body (chest, neck) is set into a water
  ellipse of that body part's size, so the rays cross a whole patient; pixels finer than 0.6 mm
  (a real detector's resolution) are simulated on a 0.6 mm grid and the noise is interpolated back
  (:func:`IPv2DenoiseLib.physics.lowdose.detector_grid_noise`).
* ``smooth-nps``: a different model, built in the image domain without our projector: Gaussian
  noise shaped by a smooth-kernel NPS (``f·exp(−2(f/0.45)²)``, f in 1/mm), its local SD following
  that of the projection noise × 0.6 (a smooth kernel at the same dose).

Methods: the network(s) given, and NLM, TV (``imaging.classical``) and BM3D (the ``bm3d`` package,
given the true noise PSD; benchmark-only, non-commercial licence: ``pip install -e .[bench]``),
each at its default and tuned per image against the truth (an *oracle*: the best of a strength
sweep). BM3D is slow (~20–50 s per 512² slice on a loaded core): its sweep runs on the central
192² crop, and the full image at the crop's best strength and its two neighbours in the grid.

**A dev set** (``--volume PATH[:FRACTION] ...``): the same protocol on slices of other real
normal-dose volumes, in place of the images above, e.g. the held-out validation volumes of
``scripts/chest_corpus.py`` (``runs/corpus/heldout_*.nrrd``, never in any leg's training) to choose
between networks or settings without looking at the test images, or a hospital's own scans. Each
volume gives its slice at ``FRACTION`` of its depth (default 0.5), values below -1024 HU (the
outside of a reconstruction circle) read as air; the whole body cross-section must be in the field
of view. ``--json`` and ``--figure`` are then required, so the test images' results are never
overwritten.

Metrics inside the body (docs/results.md, metrics): PSNR and SSIM in the lung window; noise SD and bias of
(output − truth) in soft tissue; LAA-950 error (pp) where there is lung; ``nps`` = NPS mean
frequency of (output − truth) over that of the truth's own noise (plane-detrended 32² ROIs of the
truth in homogeneous soft tissue), and ``nps_vs_input`` the same against the inserted noise (< 1 =
blotchier, "plastic"). Prints the table and each model's margin over the best oracle; writes
``benchmarks/results/bench_real_anatomy.json`` and ``docs/figures/real_anatomy.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))

from IPv2DenoiseLib.core.errors import UserError  # noqa: E402
from IPv2DenoiseLib.core.volume import Volume  # noqa: E402
from IPv2DenoiseLib.denoiser.ensemble import ENSEMBLE_SIZES  # noqa: E402
from IPv2DenoiseLib.denoiser.infer import remove_background_from  # noqa: E402
from IPv2DenoiseLib.denoiser.refine import refine_slices  # noqa: E402
from IPv2DenoiseLib.imaging.classical import denoise_classical  # noqa: E402
from IPv2DenoiseLib.imaging.masks import body_mask, lung_mask, soft_tissue_mask  # noqa: E402
from IPv2DenoiseLib.imaging.metrics import laa950, nps_2d, psnr, ssim  # noqa: E402
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu  # noqa: E402
from IPv2DenoiseLib.io.dicom_series import PADDING_HU  # noqa: E402
from IPv2DenoiseLib.io.volumes import read_volume  # noqa: E402
from IPv2DenoiseLib.physics.lowdose import detector_grid_noise  # noqa: E402
from IPv2DenoiseLib.training.adapt import AdaptConfig, adapt_denoiser  # noqa: E402

DOSE = 0.02
SOFT_WINDOW = (-160.0, 240.0)
LUNG_WINDOW = (-1350.0, 150.0)
#: Oracle strength grids (× the default strength). BM3D's is the best oracle on every image, so its
#: grid is fine (12 % steps) and wide: a grid of 0.6 / 1 / 1.6 left up to 0.51 dB on the table
#: (2026-12-05). A strength chosen at either end of a grid is reported (``at_grid_edge``).
NLM_TV_FACTORS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)
BM3D_FACTORS = (0.5, 0.56, 0.63, 0.71, 0.8, 0.9, 1.0, 1.12, 1.25, 1.4, 1.6, 1.8, 2.0, 2.24, 2.5, 2.8, 3.2)


@dataclass(frozen=True)
class RealImage:
    name: str
    source: str  # "pydicom:<file>" or "pydicom-data:<file>"
    #: Body ellipse (width, height) mm when the field of view cuts the body, and its mean HU.
    body_mm: tuple[float, float] | None
    body_hu: float = 0.0
    #: LAA-950 only where there is lung (elsewhere the low-attenuation voxels are bowel gas or air).
    has_lung: bool = False


IMAGES = (
    # a chest's mean density: lungs and tissue (the calibration phantom of docs/noise-calibration.md)
    RealImage("chest", "pydicom:CT_small.dcm", (330.0, 230.0), -350.0, has_lung=True),
    RealImage("head", "pydicom-data:693_UNCR.dcm", None),
    RealImage("neck", "pydicom-data:bad_sequence.dcm", (200.0, 160.0)),
    RealImage("abdomen", "pydicom-data:explicit_VR-UN.dcm", None),
)


def volume_image(spec: str) -> RealImage:
    """A dev-set image from ``PATH[:FRACTION]`` (``--volume``): the slice at ``FRACTION`` of the depth."""
    path, colon, tail = spec.rpartition(":")
    try:
        fraction = float(tail)
    except ValueError:  # no fraction given; any colon belongs to the path
        colon = ""
    if not colon:
        path, fraction = spec, 0.5
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"--volume {spec}: the slice fraction must lie in [0, 1]")
    if not Path(path).exists():
        raise UserError(f"--volume {spec}: {path} not found")
    # has_lung: the lung mask decides (regions_of keeps it only where it finds a lung)
    return RealImage(
        f"{Path(path).name.split('.')[0]}@{fraction:g}", f"volume:{fraction}:{path}", None, has_lung=True
    )


def load_image(image: RealImage) -> tuple[np.ndarray, float]:
    """The image's HU slice and pixel size (mm)."""
    kind, name = image.source.split(":", 1)
    if kind == "volume":
        fraction, path = name.split(":", 1)
        vol = read_volume(path)
        k = int(round(float(fraction) * (vol.array.shape[0] - 1)))
        # the outside of a reconstruction circle (LIDC: -2048 HU) is air, as in training
        return np.maximum(vol.array[k].astype(np.float32), PADDING_HU), float(vol.spacing[0])
    if kind == "pydicom":
        from pydicom.data import get_testdata_file

        path = get_testdata_file(name)
    else:
        try:
            import data_store  # the pydicom-data package
        except ImportError:
            raise UserError("the pydicom-data package is missing: pip install -e .[bench]") from None
        path = Path(data_store.__file__).parent / "data" / name
    vol = read_volume(path)
    return vol.array[0].astype(np.float32), float(vol.spacing[0])


# ------------------------------------------------------------------------------------------ noise


def _ellipse_canvas(
    image: np.ndarray, pixel_mm: float, body_mm: tuple[float, float], body_hu: float
) -> tuple[np.ndarray, tuple]:
    """``image`` set into the centre of an ellipse of ``body_mm`` at ``body_hu``, in air; returns canvas, crop."""
    ny, nx = image.shape
    n = int(math.ceil(max(max(body_mm) / pixel_mm + 16, ny + 16, nx + 16)))
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    inside = ((xx - c) * pixel_mm / (body_mm[0] / 2)) ** 2 + (
        (yy - c) * pixel_mm / (body_mm[1] / 2)
    ) ** 2 <= 1
    canvas = np.where(inside, body_hu, -1000.0).astype(np.float32)
    y0, x0 = (n - ny) // 2, (n - nx) // 2
    crop = (slice(y0, y0 + ny), slice(x0, x0 + nx))
    canvas[crop] = image
    return canvas, crop


def projection_noise(truth: np.ndarray, pixel_mm: float, body_mm, body_hu: float, *, seed: int) -> np.ndarray:
    """2 %-dose noise (HU, truth's grid) inserted in the projection domain, body size matched."""
    if body_mm is not None:
        canvas, crop = _ellipse_canvas(truth, pixel_mm, body_mm, body_hu)
    else:
        canvas, crop = truth, (slice(None), slice(None))
    return detector_grid_noise(canvas, dose=DOSE, spacing_mm=pixel_mm, seed=seed)[crop]


def smooth_nps_noise(reference_noise: np.ndarray, pixel_mm: float, *, seed: int) -> np.ndarray:
    """Image-domain noise with a smooth-kernel NPS and the local SD of ``reference_noise`` × 0.6."""
    rng = np.random.default_rng(seed)
    ny, nx = reference_noise.shape
    fy = np.fft.fftfreq(ny, pixel_mm)[:, None]
    fx = np.fft.fftfreq(nx, pixel_mm)[None, :]
    f = np.hypot(fy, fx)
    shape = np.sqrt(f * np.exp(-2.0 * (f / 0.45) ** 2))
    white = rng.standard_normal((ny, nx))
    field = np.real(np.fft.ifft2(np.fft.fft2(white) * shape))
    field /= field.std()
    local_sd = np.sqrt(ndi.gaussian_filter(reference_noise.astype(np.float64) ** 2, 10.0 / pixel_mm))
    return (0.6 * local_sd * field).astype(np.float32)


def noise_psd(noise: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The noise PSD BM3D wants (``E|FFT|²``, same shape as the image), from the known noise in ``mask``."""
    inside = np.where(mask, noise, 0.0)
    # E|FFT(n)|² = M·N·σ² for white noise σ² (bm3d's convention); correct for the masked share
    psd = np.abs(np.fft.fft2(inside)) ** 2 * (mask.size / max(1, int(mask.sum())))
    # smooth the periodogram (one realisation) over neighbouring frequencies
    return np.fft.ifftshift(ndi.gaussian_filter(np.fft.fftshift(psd), 2.0, mode="wrap"))


# ---------------------------------------------------------------------------------------- methods


def run_bm3d(noisy: np.ndarray, psd: np.ndarray, factor: float) -> np.ndarray:
    if not hasattr(np, "trapz"):  # bm4d 4.2.5 still calls np.trapz, removed in NumPy 2
        np.trapz = np.trapezoid
    import bm3d

    scale = 1000.0  # BM3D works on HU/1000 (its PSD in the same units)
    return (bm3d.bm3d(noisy.astype(np.float64) / scale, sigma_psd=psd * factor / scale**2) * scale).astype(
        np.float32
    )


def load_models(specs: list[str]):
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference

    models = []
    for spec in specs:
        weights = spec if spec.endswith(".safetensors") else None
        den = ModelReference.resolve(spec if weights is None else None, weights).load()
        label = spec if not spec.endswith(".safetensors") else Path(spec).stem
        models.append((f"model:{label}", den))
    return models


# ---------------------------------------------------------------------------------------- metrics


@dataclass
class Regions:
    body: np.ndarray
    soft: np.ndarray
    lungs: np.ndarray | None
    own_nps_freq: float


def regions_of(truth: np.ndarray, pixel_mm: float, *, truncated: bool, has_lung: bool) -> Regions:
    vol = truth[None]
    # a field of view that cuts the body lies entirely inside the patient
    body = np.ones(truth.shape, bool) if truncated else body_mask(vol)[0]
    soft = soft_tissue_mask(vol, body=body[None])[0]
    lungs = lung_mask(vol, body=body[None])[0]
    if lungs.sum() < 200:  # lungs cut by the field of view are border-connected: threshold instead
        lungs = (ndi.gaussian_filter(truth, 1.5) < -500) & body
    lungs = lungs if has_lung and lungs.sum() >= 200 else None
    flat = ndi.binary_erosion(soft, iterations=2)
    try:
        own = nps_2d(truth, pixel_spacing_mm=pixel_mm, roi_size=32, mask=flat, detrend="plane", stride=16)
        own_freq = own.mean_freq
    except UserError:
        own_freq = math.nan
    return Regions(body, soft, lungs, own_freq)


def measure(out: np.ndarray, truth: np.ndarray, noisy: np.ndarray, reg: Regions, pixel_mm: float) -> dict:
    err = out - truth
    rec = {
        "psnr": psnr(truth, out, mask=reg.body),
        "ssim": ssim(truth, out, mask=reg.body),
        "psnr_soft_window": psnr(truth, out, mask=reg.body, window=SOFT_WINDOW),
        "noise_sd_hu": float(err[reg.soft].std()) if reg.soft.any() else math.nan,
        "bias_hu": float(err[reg.soft].mean()) if reg.soft.any() else math.nan,
    }
    if reg.lungs is not None:
        rec["laa950_error_pp"] = laa950(out, reg.lungs) - laa950(truth, reg.lungs)
    roi = 32 if min(truth.shape) < 256 else 64
    try:
        f_out = nps_2d(err, pixel_spacing_mm=pixel_mm, roi_size=roi, mask=reg.body, stride=roi // 2).mean_freq
        f_in = nps_2d(
            noisy - truth, pixel_spacing_mm=pixel_mm, roi_size=roi, mask=reg.body, stride=roi // 2
        ).mean_freq
    except UserError:
        f_out = f_in = math.nan
    rec["nps_freq"] = f_out
    rec["nps"] = f_out / reg.own_nps_freq if reg.own_nps_freq > 0 else math.nan
    rec["nps_vs_input"] = f_out / f_in if f_in > 0 else math.nan
    return rec


# ------------------------------------------------------------------------------------------ driver


class OutputCache:
    """Classical outputs on disk (``--cache DIR``): they do not change between model versions, so a
    rerun that compares new weights recomputes only the networks. Keyed by image, noise, seed,
    method and strength; None = no cache."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, compute, *args, **kwargs) -> np.ndarray:
        """``compute(*args, **kwargs)``, or its stored result."""
        if self.folder is None:
            return compute(*args, **kwargs)
        path = self.folder / f"{key}.npy"
        if path.exists():
            return np.load(path)
        out = np.asarray(compute(*args, **kwargs), dtype=np.float32)
        tmp = path.with_suffix(".partial.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
        return out


def variant_label(name: str, ensemble: int, refine: bool = False) -> str:
    return (name if ensemble == 1 else f"{name}+ens{ensemble}") + ("+refine" if refine else "")


def model_labels(
    models, *, adapt: bool, ensembles: tuple[int, ...], refines: tuple[bool, ...] = (False,)
) -> list[str]:
    """Row labels of the networks: each model, then (``--adapt``) its adapted copy, each at every
    ensemble size, each without and (``--refine``) with the refinement."""
    names = [label for label, _ in models] + ([f"{label}+adapt" for label, _ in models] if adapt else [])
    return [variant_label(name, n, r) for name in names for n in ensembles for r in refines]


@dataclass
class Trial:
    """One noisy version of an image and what every method is scored and cached with."""

    truth: np.ndarray
    noisy: np.ndarray
    noise: np.ndarray
    reg: Regions
    pixel_mm: float
    est: float  # noise SD estimated from the noisy image (HU)
    tag: str  # cache key prefix: image, noise model and the noisy image's fingerprint
    cache: OutputCache

    def measure(self, out: np.ndarray) -> dict:
        """:func:`measure` of ``out`` against this trial's truth."""
        return measure(out, self.truth, self.noisy, self.reg, self.pixel_mm)


def classical_oracle(trial: Trial, method: str, rows: dict, outputs: dict) -> None:
    """NLM or TV at each strength of :data:`NLM_TV_FACTORS` × the estimated noise: rows for the
    default strength and for the best one by body PSNR (the oracle), whose output is kept."""
    best = None
    for factor in NLM_TV_FACTORS:
        out = trial.cache.get(
            f"{trial.tag}-{method}-{factor}",
            denoise_classical,
            trial.noisy,
            method,
            noise_hu=trial.est * factor,
        )
        score = psnr(trial.truth, out, mask=trial.reg.body)
        if factor == 1.0:
            rows[f"{method}_default"] = trial.measure(out)
        if best is None or score > best[0]:
            best = (score, factor, out)
    rows[f"{method}_oracle"] = oracle_row(trial, best[2], best[1], NLM_TV_FACTORS)
    outputs[f"{method}_oracle"] = best[2]


def oracle_row(trial: Trial, out: np.ndarray, factor: float, grid: tuple[float, ...]) -> dict:
    """The oracle's metrics, its strength, and whether that strength lies at an end of its grid
    (then the oracle may be better still beyond it; :func:`evaluate_image` says so in one line)."""
    return {**trial.measure(out), "factor": factor, "at_grid_edge": factor in (min(grid), max(grid))}


def bm3d_oracle(trial: Trial, rows: dict, outputs: dict, *, full_search: bool) -> None:
    """BM3D with the true noise PSD: a row at the default strength and one at the best of
    :data:`BM3D_FACTORS` on the whole image, searched there (``full_search`` or a small image) or
    near the best strength of the central 192² crop: the whole image is run at that strength and at
    its two neighbours in the grid (the crop's choice alone lost up to 0.15 dB on the neck)."""
    truth, noisy, body, tag, cache = trial.truth, trial.noisy, trial.reg.body, trial.tag, trial.cache
    psd = noise_psd(trial.noise, body)
    default = cache.get(f"{tag}-bm3d-1.0", run_bm3d, noisy, psd, 1.0)
    rows["bm3d_default"] = trial.measure(default)
    if full_search or min(truth.shape) <= 192:
        candidates = BM3D_FACTORS
    else:
        cy, cx = (s // 2 for s in truth.shape)
        crop = (slice(cy - 96, cy + 96), slice(cx - 96, cx + 96))
        sub_psd = noise_psd(trial.noise[crop], body[crop])
        scores = {
            f: psnr(
                truth[crop],
                cache.get(f"{tag}-bm3d-crop-{f}", run_bm3d, noisy[crop], sub_psd, f),
                mask=body[crop],
            )
            for f in BM3D_FACTORS
        }
        i = BM3D_FACTORS.index(max(scores, key=scores.get))
        candidates = BM3D_FACTORS[max(0, i - 1) : i + 2]
    scored = []
    for f in candidates:
        out = default if f == 1.0 else cache.get(f"{tag}-bm3d-{f}", run_bm3d, noisy, psd, f)
        scored.append((psnr(truth, out, mask=body), f, out))
    _, factor, best_out = max(scored, key=lambda s: s[0])
    rows["bm3d_oracle"] = oracle_row(trial, best_out, factor, BM3D_FACTORS)
    outputs["bm3d_oracle"] = best_out


def network_rows(
    trial: Trial,
    label: str,
    den,
    rows: dict,
    outputs: dict,
    *,
    adapt: AdaptConfig | None,
    ensembles: tuple[int, ...],
    remove_background: bool,
    refines: tuple[bool, ...] = (False,),
    strength: float = 1.0,
) -> None:
    """One network (and, with ``adapt``, its copy fine-tuned on this noisy image) at each ensemble
    size, without and (``refines``) with ``--refine``: a row each, with the seconds spent
    (fine-tuning included; a refined row reuses the unrefined network output and adds its own time)."""
    noisy, pixel_mm = trial.noisy, trial.pixel_mm
    variants = [(label, den, None, 0.0)]
    if adapt is not None:  # the same model fine-tuned on this noisy image alone (--adapt)
        t = time.monotonic()
        volume = Volume(noisy[None], (pixel_mm, pixel_mm, 1.0))
        tuned, record = adapt_denoiser(den, volume, adapt, device="cpu")
        variants.append((f"{label}+adapt", tuned, record, time.monotonic() - t))
    for name, model, record, spent in variants:
        for n in ensembles:
            t = time.monotonic()
            out = model.denoise_array(
                noisy[None], device="cpu", remove_background=False, ensemble=n, strength=strength
            )[0]
            seconds = spent + time.monotonic() - t
            for refine in refines:
                t = time.monotonic()
                final = refine_slices(noisy[None], out[None], pixel_mm=pixel_mm)[0] if refine else out
                if remove_background:  # as the product: after the network (and the refinement)
                    final = remove_background_from(noisy[None], final[None])[0]
                key = variant_label(name, n, refine)
                rows[key] = {**trial.measure(final), "seconds": seconds + time.monotonic() - t}
                if record is not None:
                    rows[key]["adapt"] = record.as_dict()
                outputs[key] = final


def evaluate_image(
    image: RealImage,
    models,
    *,
    seed: int,
    bm3d_mode: str,
    remove_background: bool,
    log,
    cache: OutputCache | None = None,
    adapt: AdaptConfig | None = None,
    ensembles: tuple[int, ...] = (1,),
    refines: tuple[bool, ...] = (False,),
    strength: float = 1.0,
) -> dict:
    cache = cache or OutputCache(None)
    labels = model_labels(models, adapt=adapt is not None, ensembles=ensembles, refines=refines)
    truth, pixel_mm = load_image(image)
    reg = regions_of(truth, pixel_mm, truncated=image.body_mm is not None, has_lung=image.has_lung)
    base = projection_noise(truth, pixel_mm, image.body_mm, image.body_hu, seed=seed)
    noises = {"projection": base, "smooth-nps": smooth_nps_noise(base, pixel_mm, seed=seed + 1)}
    result = {"pixel_mm": pixel_mm, "shape": list(truth.shape), "own_nps_freq": reg.own_nps_freq, "noise": {}}
    for noise_name, noise in noises.items():
        noisy = truth + noise
        est = estimate_noise_hu(noisy)
        # the noisy image's fingerprint: a change to the noise models never reuses stale outputs
        tag = f"{image.name}-{noise_name}-{hashlib.sha256(noisy.tobytes()).hexdigest()[:12]}"
        rows: dict[str, dict] = {"input": measure(noisy, truth, noisy, reg, pixel_mm)}
        outputs: dict[str, np.ndarray] = {"input": noisy}
        trial = Trial(truth, noisy, noise, reg, pixel_mm, est, tag, cache)
        for method in ("nlm", "tv"):
            t = time.monotonic()
            classical_oracle(trial, method, rows, outputs)
            log(f"  {image.name}/{noise_name} {method}: {time.monotonic() - t:.1f} s")
        if bm3d_mode != "off":
            t = time.monotonic()
            bm3d_oracle(trial, rows, outputs, full_search=bm3d_mode == "full")
            log(f"  {image.name}/{noise_name} bm3d: {time.monotonic() - t:.1f} s")
        for name in (k for k, row in rows.items() if row.get("at_grid_edge")):
            log(
                f"  {image.name}/{noise_name} {name}: its best strength ({rows[name]['factor']}) is at an end of its grid"
            )
        for label, den in models:
            network_rows(
                trial,
                label,
                den,
                rows,
                outputs,
                adapt=adapt,
                ensembles=ensembles,
                remove_background=remove_background,
                refines=refines,
                strength=strength,
            )
        oracle = max((k for k in rows if k.endswith("_oracle")), key=lambda k: rows[k]["psnr"])
        result["noise"][noise_name] = {
            "estimated_noise_hu": est,
            "rows": rows,
            "best_oracle": oracle,
            "margins_db": {label: rows[label]["psnr"] - rows[oracle]["psnr"] for label in labels},
        }
        if noise_name == "projection":
            result["_figure"] = {
                "truth": truth,
                **{k: outputs[k] for k in ("input", oracle)},
                "oracle": oracle,
            }
            result["_figure"].update({label: outputs[label] for label in labels})
    return result


def write_figure(results: dict, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = ["input", "oracle", *labels, "truth"]
    fig, axes = plt.subplots(len(names), 2 * len(cols), figsize=(2.2 * 2 * len(cols), 2.3 * len(names)))
    axes = np.atleast_2d(axes)
    for r, name in enumerate(names):
        fig_data = results[name]["_figure"]
        for w, (window, wname) in enumerate(((LUNG_WINDOW, "lung"), (SOFT_WINDOW, "soft tissue"))):
            for c, col in enumerate(cols):
                ax = axes[r, w * len(cols) + c]
                img = fig_data[fig_data["oracle"]] if col == "oracle" else fig_data[col]
                ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1])
                title = (
                    fig_data["oracle"].replace("_oracle", " (oracle)")
                    if col == "oracle"
                    else col.replace("model:", "")
                )
                ax.set_title(f"{name}: {title}\n{wname}", fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(results: dict, labels: list[str]) -> dict:
    summary: dict = {}
    for noise_name in ("projection", "smooth-nps"):
        print(f"\n### noise: {noise_name}\n")
        print(
            "| image | method | PSNR | SSIM | noise SD (HU) | bias (HU) | LAA-950 err (pp) | NPS f̄ / truth's | NPS f̄ / input's |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        margins: dict[str, list[float]] = {label: [] for label in labels}
        for name, res in results.items():
            block = res["noise"][noise_name]
            for method, row in block["rows"].items():
                laa = row.get("laa950_error_pp", math.nan)
                print(
                    f"| {name} | {method.replace('model:', '')} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                    f"{row['noise_sd_hu']:.1f} | {row['bias_hu']:+.1f} | {laa:+.2f} | {row['nps']:.2f} | "
                    f"{row['nps_vs_input']:.2f} |"
                )
            for label in labels:
                margins[label].append(block["margins_db"][label])
        for label in labels:
            m = margins[label]
            chest = (
                results.get("chest", {}).get("noise", {}).get(noise_name, {}).get("margins_db", {}).get(label)
            )
            print(
                f"\n{label.replace('model:', '')} vs best oracle ({noise_name}): "
                + ", ".join(f"{n} {v:+.2f} dB" for n, v in zip(results, m))
                + f"; mean {np.mean(m):+.2f} dB; loses on {sum(v < 0 for v in m)}"
            )
            summary.setdefault(label, {})[noise_name] = {
                "margins_db": dict(zip(results, m)),
                "mean_margin_db": float(np.mean(m)),
                "chest_margin_db": chest,
                "losses": int(sum(v < 0 for v in m)),
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="*", default=None, help="registry names (default: default)")
    parser.add_argument("--weights", nargs="*", default=[], help=".safetensors files to benchmark as well")
    parser.add_argument("--images", nargs="*", default=None, help="subset of images (default: all)")
    parser.add_argument("--bm3d", choices=["quick", "full", "off"], default="quick")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--cache", default=None, help="folder keeping the classical outputs between runs")
    parser.add_argument(
        "--remove-background",
        action="store_true",
        help="apply the product's background removal to the network output (default: raw network "
        "output; the chest and neck crops have no outside air, and their border-touching lung/dark "
        "regions would be erased)",
    )
    parser.add_argument(
        "--adapt",
        type=float,
        metavar="SECONDS",
        help="also run each model after scan-adaptive fine-tuning (denoise --adapt) on each noisy image, "
        "capped at this many seconds (the product's cap: 60); it runs the product's default step count",
    )
    parser.add_argument(
        "--adapt-steps",
        type=int,
        metavar="N",
        help="with --adapt: another step count than the product's (denoise --adapt-steps; give --adapt a "
        "long cap so that the steps end it)",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        choices=ENSEMBLE_SIZES,
        help="also run each network with this test-time flip ensemble (denoise --ensemble N)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="also run every network row with the collaborative Wiener refinement (denoise --refine)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="run every network at this denoising strength (denoise --strength; rows named MODEL@S)",
    )
    parser.add_argument(
        "--volume",
        nargs="+",
        default=[],
        metavar="PATH[:FRACTION]",
        help="a dev set in place of the test images: the slice at FRACTION (default 0.5) of the depth of "
        "each real normal-dose volume (e.g. runs/corpus/heldout_chest_lidc.nrrd:0.55); needs --json and --figure",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", default=None, help="default benchmarks/results/bench_real_anatomy.json")
    parser.add_argument("--figure", default=None, help="default docs/figures/real_anatomy.png")
    args = parser.parse_args(argv)
    if args.volume and not (args.json and args.figure):
        parser.error("--volume needs --json and --figure (the defaults hold the test images' results)")
    args.json = args.json or str(ROOT / "benchmarks/results/bench_real_anatomy.json")
    args.figure = args.figure or str(ROOT / "docs/figures/real_anatomy.png")
    try:
        images = [volume_image(spec) for spec in args.volume] or list(IMAGES)
    except UserError as exc:
        parser.exit(2, f"bench_real_anatomy: {exc}\n")
    if args.adapt_steps is not None and not (args.adapt and args.adapt_steps > 0):
        parser.error("--adapt-steps needs --adapt SECONDS and a positive number of steps")
    if args.bm3d != "off" and importlib.util.find_spec("bm3d") is None:
        parser.exit(
            2, "bench_real_anatomy: BM3D is not installed: pip install -e '.[bench]' (or --bm3d off)\n"
        )
    import torch

    torch.set_num_threads(args.threads)
    specs = (
        args.model if args.model is not None else (["default"] if not args.weights else [])
    ) + args.weights
    models = load_models(specs)
    if args.strength != 1.0:  # the rows say the strength they were run at
        models = [(f"{label}@{args.strength:g}", den) for label, den in models]
    steps = args.adapt_steps or AdaptConfig.max_iterations
    adapt = AdaptConfig(seconds=args.adapt, max_iterations=steps) if args.adapt else None
    ensembles = (1, args.ensemble) if args.ensemble > 1 else (1,)
    refines = (False, True) if args.refine else (False,)
    labels = model_labels(models, adapt=adapt is not None, ensembles=ensembles, refines=refines)
    began = time.monotonic()
    results = {}
    for image in images:
        if args.images is None or image.name in args.images:
            print(f"{image.name} ...", file=sys.stderr)
            results[image.name] = evaluate_image(
                image,
                models,
                seed=args.seed,
                bm3d_mode=args.bm3d,
                remove_background=args.remove_background,
                log=lambda s: print(s, file=sys.stderr),
                cache=OutputCache(args.cache),
                adapt=adapt,
                ensembles=ensembles,
                refines=refines,
                strength=args.strength,
            )
    summary = print_table(results, labels)
    write_figure(results, labels, Path(args.figure))
    seconds = time.monotonic() - began
    print(f"\n{seconds:.0f} s on {platform.processor() or platform.machine()}, {args.threads} threads")
    record = {
        "command": "python benchmarks/bench_real_anatomy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "dose": DOSE,
        "remove_background": args.remove_background,
        "seconds": round(seconds, 1),
        "models": {label: den.card.get("sha256") for label, den in models},
        "images": {k: {kk: vv for kk, vv in v.items() if kk != "_figure"} for k, v in results.items()},
        "summary": summary,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, out)
    print(f"wrote {out} and {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
