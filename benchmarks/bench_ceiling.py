"""The ceiling of the real-anatomy benchmark: how far above the best oracle any denoiser could score.

One command::

    OMP_NUM_THREADS=2 python benchmarks/bench_ceiling.py [--model quality] [--realisations 8]

Each truth of ``bench_real_anatomy.py`` is a normal-dose scan with its own noise, and PSNR is
measured against it. The inserted 2 %-dose noise hides that own noise, so no denoiser can restore
it: the error of even a perfect one (a *genie* that knows the noise-free anatomy and both noise
spectra and keeps of the own noise only what the Wiener gain ``S_own / (S_own + S_ins)`` allows)
is ``∫ S_own·S_ins / (S_own + S_ins)``. That floor caps the PSNR any method can reach, and so caps
the margin over the oracle a target may ask for.

How the own noise is measured (no noise-free truth exists): the network denoises ``K`` independent
noisy versions of the truth (the first is the benchmark's own noisy image, same seeds); the mean of
its errors is the part no noise realisation changes. In flat soft tissue there is no edge to blur,
so that part is the truth's own noise the network removed; its NPS (plane-detrended ROIs, the
within-realisation scatter / K subtracted) is ``S_own``. ``S_ins`` is the NPS of the inserted noise
in the same ROIs. Where the network *kept* some own noise, and below the ROIs' lowest frequency,
``S_own`` is underestimated, so the floor is too and the ceiling is an upper estimate. The floor is
carried from soft tissue to the whole body assuming stationary own noise, with clipped pixels (out
of the lung window, where PSNR is measured) contributing no error.

A check in the same run: the same estimator on a chest with *known* own noise (a smooth chest, the
mean network output, plus ramp-filtered Gaussian noise of a set SD) must find that SD and that floor.

Reads the real-anatomy benchmark's results (``--reference``, same seed) for the best oracle and the
best network row, and prints per image and noise model: the ceiling, its margin over the best
oracle (the most any target can ask), the best row's margin, and the share of the way it has come.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "IPv2Denoise"))

# the same images, noise models, seeds, regions and window as the real-anatomy benchmark
from bench_real_anatomy import (  # noqa: E402
    IMAGES,
    LUNG_WINDOW,
    RealImage,
    load_image,
    load_models,
    projection_noise,
    regions_of,
    smooth_nps_noise,
)

from IPv2DenoiseLib.core.atomic import atomic_path  # noqa: E402
from IPv2DenoiseLib.core.errors import UserError  # noqa: E402
from IPv2DenoiseLib.imaging.metrics import nps_2d, psnr  # noqa: E402

NOISE_MODELS = ("projection", "smooth-nps")
#: the issue's chest targets (margin over the best oracle, dB): the fast default and the quality tier
CHEST_TARGETS = {"fast": 0.5, "quality": 1.5}


@dataclass
class Ceiling:
    """The floor of the error against a truth with its own noise, and the PSNR ceiling it sets."""

    own_sd_hu: float  # own noise the network removed, flat soft tissue
    floor_sd_hu: float  # genie's error there
    kept_share: float  # share of the own-noise variance the genie keeps
    in_window: float  # share of body pixels inside the lung window (the rest are clipped: no error)
    body_floor_hu: float
    ceiling_psnr: float
    network_psnr: float  # the network on the benchmark's noisy image (realisation 0)
    rois: int


def flat_roi_size(flat: np.ndarray) -> int:
    """The largest NPS ROI (64, 32 or 16 px) of which at least four fit in the flat soft tissue."""
    for roi in (64, 32, 16):
        try:
            if (
                nps_2d(
                    np.zeros(flat.shape), pixel_spacing_mm=1.0, roi_size=roi, mask=flat, stride=roi // 2
                ).n_rois
                >= 4
            ):
                return roi
        except UserError:
            continue
    raise UserError("no flat soft tissue to measure the own noise in")


def flat_nps_settings(flat: np.ndarray, pixel_mm: float) -> dict:
    """The keywords of every NPS this benchmark takes: plane-detrended, half-overlapping ROIs of
    :func:`flat_roi_size` in the flat soft tissue ``flat``."""
    roi = flat_roi_size(flat)
    return {
        "pixel_spacing_mm": pixel_mm,
        "roi_size": roi,
        "mask": flat,
        "detrend": "plane",
        "stride": roi // 2,
    }


def noise_realisation(
    truth: np.ndarray, pixel_mm: float, image: RealImage, model: str, seed: int
) -> np.ndarray:
    """The benchmark's noise of ``model`` at ``seed`` (its smooth noise follows the projection noise's SD)."""
    base = projection_noise(truth, pixel_mm, image.body_mm, image.body_hu, seed=seed)
    return base if model == "projection" else smooth_nps_noise(base, pixel_mm, seed=seed + 1)


def genie_ceiling(
    truth: np.ndarray,
    noises: list[np.ndarray],
    outputs: list[np.ndarray],
    *,
    body: np.ndarray,
    flat: np.ndarray,
    pixel_mm: float,
) -> Ceiling:
    """Own-noise NPS from the outputs' systematic error in ``flat``, the genie floor against the
    noises' NPS, and the PSNR ceiling in the body (lung window). ``outputs[0]`` is the one scored."""
    k = len(outputs)
    nps = flat_nps_settings(flat, pixel_mm)
    roi = nps["roi_size"]
    errors = np.stack([o - truth for o in outputs]).astype(np.float64)
    systematic = errors.mean(0)
    s_sys = nps_2d(systematic, **nps)
    s_scatter = np.mean([nps_2d(e - systematic, **nps).nps2d for e in errors], 0) * k / (k - 1)
    s_own = np.clip(s_sys.nps2d - s_scatter / k, 0.0, None)
    s_ins = np.mean([nps_2d(n, **nps).nps2d for n in noises], 0)
    d_f = 1.0 / (roi * pixel_mm) ** 2
    own_var = float(s_own.sum() * d_f)
    floor_var = float((s_own * s_ins / np.maximum(s_own + s_ins, 1e-12)).sum() * d_f)
    lo, hi = LUNG_WINDOW
    in_window = float(((truth[body] > lo) & (truth[body] < hi)).mean())
    body_floor = math.sqrt(floor_var * in_window)
    return Ceiling(
        own_sd_hu=math.sqrt(own_var),
        floor_sd_hu=math.sqrt(floor_var),
        kept_share=1.0 - floor_var / own_var if own_var > 0 else math.nan,
        in_window=in_window,
        body_floor_hu=body_floor,
        ceiling_psnr=20 * math.log10((hi - lo) / body_floor),
        network_psnr=psnr(truth, outputs[0], mask=body),
        rois=s_sys.n_rois,
    )


def denoise_all(den, truth: np.ndarray, noises: list[np.ndarray]) -> list[np.ndarray]:
    return [den.denoise_array((truth + n)[None], device="cpu", remove_background=False)[0] for n in noises]


def ramp_noise(shape: tuple[int, int], sd_hu: float, *, seed: int) -> np.ndarray:
    """Gaussian noise with a ramp × Hann NPS (a sharp reconstruction kernel's), scaled to ``sd_hu``."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    f = np.hypot(fy, fx) / 0.5  # 1 at Nyquist
    amplitude = np.sqrt(f * np.where(f < 1, 0.5 + 0.5 * np.cos(np.pi * np.minimum(f, 1)), 0.0))
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amplitude))
    return (field * sd_hu / field.std()).astype(np.float32)


def estimator_check(den, image: RealImage, *, realisations: int, seed: int, own_sd: float) -> dict:
    """The estimator on a chest whose own noise is known: a smooth chest (the network's mean output
    over 4 × the realisations) plus ramp-filtered noise of ``own_sd``; the true floor from the true spectra."""
    truth, pixel_mm = load_image(image)
    reg = regions_of(truth, pixel_mm, truncated=image.body_mm is not None, has_lung=image.has_lung)
    flat = ndi.binary_erosion(reg.soft, iterations=2)
    # the smooth chest: the mean output over 4 × K realisations (its leftover blotches are own noise too)
    noises = [
        noise_realisation(truth, pixel_mm, image, "projection", seed + 1000 * i)
        for i in range(4 * realisations)
    ]
    clean = np.mean(denoise_all(den, truth, noises), 0).astype(np.float32)
    own = ramp_noise(truth.shape, own_sd, seed=seed + 7)
    made = clean + own
    noises = [
        noise_realisation(made, pixel_mm, image, "projection", seed + 1000 * i + 3)
        for i in range(realisations)
    ]
    est = genie_ceiling(
        made, noises, denoise_all(den, made, noises), body=reg.body, flat=flat, pixel_mm=pixel_mm
    )
    nps = flat_nps_settings(flat, pixel_mm)
    roi = nps["roi_size"]
    s_own = nps_2d(own, **nps).nps2d
    s_ins = np.mean([nps_2d(n, **nps).nps2d for n in noises], 0)
    d_f = 1.0 / (roi * pixel_mm) ** 2
    true_floor = math.sqrt(float((s_own * s_ins / (s_own + s_ins)).sum() * d_f))
    true_own = math.sqrt(float(s_own.sum() * d_f))
    return {
        "own_sd_set_hu": own_sd,
        "own_sd_true_hu": true_own,
        "own_sd_estimated_hu": est.own_sd_hu,
        "floor_true_hu": true_floor,
        "floor_estimated_hu": est.floor_sd_hu,
    }


def best_rows(reference: dict, image: str, model: str) -> tuple[str, float, str, float] | None:
    """The best oracle and the best network row of the real-anatomy benchmark's run, with their PSNR."""
    try:
        rows = reference["images"][image]["noise"][model]["rows"]
    except KeyError:
        return None
    oracle = max((k for k in rows if k.endswith("_oracle")), key=lambda k: rows[k]["psnr"])
    best = max((k for k in rows if k.startswith("model:")), key=lambda k: rows[k]["psnr"], default=None)
    if best is None:
        return None
    return oracle, rows[oracle]["psnr"], best, rows[best]["psnr"]


def write_figure(results: dict, path: Path) -> None:
    """Per image and noise model: the best setting's margin over the best oracle, against the
    ceiling's (as measured … check-corrected), and the chest targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [
        (image, noise, row)
        for image, rows in results.items()
        for noise, row in rows.items()
        if "ceiling_margin_db" in row
    ]
    fig, ax = plt.subplots(figsize=(1.1 * len(cells) + 2, 4.2))
    x = np.arange(len(cells))
    low = np.array([min(r["ceiling_margin_db"], r["ceiling_margin_corrected_db"]) for _, _, r in cells])
    high = np.array([max(r["ceiling_margin_db"], r["ceiling_margin_corrected_db"]) for _, _, r in cells])
    best = np.array([r["best_margin_db"] for _, _, r in cells])
    ax.bar(x, high, width=0.6, color="#dddddd", label="ceiling: a perfect denoiser (check-corrected)")
    ax.bar(x, low, width=0.6, color="#bbbbbb", label="ceiling, as measured")
    ax.bar(x, best, width=0.3, color="#2b6cb0", label="best setting so far")
    ax.axhline(0.0, color="black", linewidth=0.8)
    for tier, target in CHEST_TARGETS.items():
        ax.axhline(target, color="#c05621", linewidth=0.8, linestyle="--" if tier == "quality" else ":")
        ax.text(
            len(cells) - 0.5,
            target,
            f" chest target, {tier}",
            va="bottom",
            ha="right",
            fontsize=7,
            color="#c05621",
        )
    ax.set_xticks(x, [f"{image}\n{noise}" for image, noise, _ in cells], fontsize=7)
    ax.set_ylabel("margin over the best oracle (dB)")
    ax.set_title("Real slices: how far above BM3D / NLM / TV any denoiser could score", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def share_range(gain: float, low: float, high: float) -> str:
    """``gain`` as a share of the way to a ceiling between ``low`` and ``high`` dB (both > 0)."""
    a, b = sorted((gain / high, gain / low))
    return f"{a:.0%}" if round(a, 2) == round(b, 2) else f"{a:.0%}–{b:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="quality", help="the network that separates the own noise")
    parser.add_argument("--realisations", type=int, default=8, help="independent noisy versions per image")
    parser.add_argument("--images", nargs="*", default=[i.name for i in IMAGES])
    parser.add_argument("--seed", type=int, default=14, help="the real-anatomy benchmark's seed")
    parser.add_argument(
        "--check-sd", type=float, default=25.0, help="own noise SD of the estimator check (HU)"
    )
    parser.add_argument(
        "--reference",
        default=str(ROOT / "results/bench_real_anatomy_default.json"),
        help="bench_real_anatomy.py results at the same seed: the oracles and network rows to compare",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", default=str(ROOT / "results/bench_ceiling.json"))
    parser.add_argument("--figure", default=str(ROOT.parent / "docs/figures/real_anatomy_ceiling.png"))
    args = parser.parse_args(argv)
    if args.realisations < 3:
        parser.error("--realisations must be at least 3")
    import torch

    torch.set_num_threads(args.threads)
    began = time.monotonic()
    ((_, den),) = load_models([args.model])
    reference = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else {}
    chest = next(i for i in IMAGES if i.name == "chest")
    check = estimator_check(den, chest, realisations=args.realisations, seed=args.seed, own_sd=args.check_sd)
    print(
        f"estimator check (chest, own noise set to {check['own_sd_true_hu']:.1f} HU in flat tissue): "
        f"estimated {check['own_sd_estimated_hu']:.1f} HU; genie floor {check['floor_true_hu']:.1f} HU, "
        f"estimated {check['floor_estimated_hu']:.1f} HU",
        flush=True,
    )
    correction_db = 20 * math.log10(check["floor_estimated_hu"] / check["floor_true_hu"])
    print(
        "\n| image | noise | own noise (HU) | genie floor (HU) | kept | ceiling PSNR | network PSNR | best oracle "
        "| ceiling − oracle (dB), as measured … check-corrected | best row | best − oracle (dB) | of the way |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    results: dict = {}
    for image in IMAGES:
        if image.name not in args.images:
            continue
        truth, pixel_mm = load_image(image)
        reg = regions_of(truth, pixel_mm, truncated=image.body_mm is not None, has_lung=image.has_lung)
        flat = ndi.binary_erosion(reg.soft, iterations=2)
        for model in NOISE_MODELS:
            seeds = [args.seed] + [args.seed + 1000 * i for i in range(1, args.realisations)]
            noises = [noise_realisation(truth, pixel_mm, image, model, s) for s in seeds]
            c = genie_ceiling(
                truth, noises, denoise_all(den, truth, noises), body=reg.body, flat=flat, pixel_mm=pixel_mm
            )
            row = {**asdict(c)}
            ref = best_rows(reference, image.name, model)
            cells = ["–"] * 5
            if ref is not None:
                oracle, oracle_psnr, best, best_psnr = ref
                head, best_gain = c.ceiling_psnr - oracle_psnr, best_psnr - oracle_psnr
                # the check's error (its estimated floor over the true one) moves the ceiling by this much
                head_corrected = head + correction_db
                row.update(
                    best_oracle=oracle,
                    oracle_psnr=oracle_psnr,
                    best_row=best,
                    best_psnr=best_psnr,
                    ceiling_margin_db=head,
                    ceiling_margin_corrected_db=head_corrected,
                    best_margin_db=best_gain,
                )
                share = f"{best_gain / head:.0%}" if head > 0 else "–"
                cells = [
                    f"{oracle} {oracle_psnr:.2f}",
                    f"{head:+.2f} … {head_corrected:+.2f}",
                    best.replace("model:", ""),
                    f"{best_gain:+.2f}",
                    share,
                ]
            results.setdefault(image.name, {})[model] = row
            print(
                f"| {image.name} | {model} | {c.own_sd_hu:.1f} | {c.floor_sd_hu:.1f} | {c.kept_share:.0%} | "
                f"{c.ceiling_psnr:.2f} | {c.network_psnr:.2f} | " + " | ".join(cells) + " |",
                flush=True,
            )
    if "chest" in results:
        for model, row in results["chest"].items():
            if "ceiling_margin_db" in row:
                for tier, target in CHEST_TARGETS.items():
                    low, high = sorted((row["ceiling_margin_db"], row["ceiling_margin_corrected_db"]))
                    come = share_range(row["best_margin_db"], low, high)
                    print(
                        f"chest, {model}: the {tier} target (+{target} dB over the best oracle) asks for "
                        f"{share_range(target, low, high)} of the way to the ceiling (+{low:.2f} … "
                        f"+{high:.2f} dB); the best row has come {come}"
                    )
    seconds = time.monotonic() - began
    print(f"\n{seconds:.0f} s on {platform.processor() or platform.machine()}, {args.threads} threads")
    record = {
        "command": "python benchmarks/bench_ceiling.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "model_sha256": den.card.get("sha256"),
        "realisations": args.realisations,
        "reference": args.reference,
        "seconds": round(seconds, 1),
        "check": check,
        "images": results,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1, default=float))
    if any("ceiling_margin_db" in row for rows in results.values() for row in rows.values()):
        write_figure(results, Path(args.figure))
        print(f"wrote {out} and {args.figure}")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
