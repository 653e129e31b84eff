"""Realism report for the synthetic NDCT/ULDCT pairs (docs/synthetic-data.md, issue #5).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/make_synthetic_report.py [--data DIR | --out DIR]
        [--cases 2] [--slices 24] [--size 512] [--seed 0] [--figures docs/figures]

Without ``--data`` it makes ``--cases`` cases with :func:`IPv2DenoiseLib.synthetic.dataset.make_dataset`
(in ``--out``, or a temporary folder that is removed afterwards); with ``--data`` it reads existing
case folders. It prints, as Markdown tables ready to paste into docs/synthetic-data.md:

* tissue HU per phantom label: nominal range, noise-free median/mean, NDCT and ULDCT mean ± SD;
* noise per dose: SD of (scan − noise-free anatomy) per region for NDCT (100 %) and ULDCT (2 %),
  and on one slice re-simulated at 100/25/10/2 % (two realisations);
* NPS (TG-233 style, :func:`IPv2DenoiseLib.imaging.metrics.nps_2d`) of the ULDCT and NDCT noise in
  soft-tissue ROIs against white Gaussian noise of the same SD on the same ROI layout;
* breathing-motion statistics per case (``case.json``);
* seconds per case (``case.json`` ``timings_s``) with the thread count and machine load;

and writes ``synthetic_axial.png``, ``synthetic_coronal.png``, ``synthetic_nps.png`` and
``synthetic_motion.png`` into ``--figures``. The motion figure rebuilds case 0's anatomy and
motion over the whole chest at 2 mm (the cases themselves are thin slabs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from IPv2DenoiseLib.imaging.metrics import LUNG_DISPLAY, MEDIASTINAL_DISPLAY, nps_2d  # noqa: E402
from IPv2DenoiseLib.physics.lowdose import I0_FULL_DOSE, simulate_low_dose  # noqa: E402
from IPv2DenoiseLib.synthetic.breathing import breathing_motion  # noqa: E402
from IPv2DenoiseLib.synthetic.dataset import CASE_FILES, make_dataset  # noqa: E402
from IPv2DenoiseLib.synthetic.phantom import HU_RANGES, LABELS, make_chest_phantom  # noqa: E402

#: Regions of the noise tables (label names pooled into each).
NOISE_REGIONS = {
    "muscle": ("muscle",),
    "heart + great vessels": ("heart", "great_vessels"),
    "mediastinal fat": ("mediastinum",),
    "subcutaneous fat": ("fat",),
    "lung parenchyma": ("lung",),
    "background air": ("air",),
}
#: Where the NPS ROIs may lie: homogeneous-ish soft tissue.
NPS_LABELS = ("muscle", "fat", "heart", "great_vessels", "mediastinum", "abdomen")
LUNG_LABELS = ("lung", "lung_vessel", "emphysema", "nodule_solid", "nodule_ggo")
DIFF_HU = 300.0


def ids(names) -> list[int]:
    return [LABELS[n] for n in names]


def load_case(folder: Path) -> dict:
    """Arrays of one case folder (HU as float32, labels uint8) and its case.json."""
    case = {"record": json.loads((folder / "case.json").read_text()), "name": folder.name}
    for name in CASE_FILES:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}.nrrd")))
        case[name] = array if name.startswith("labels") else array.astype(np.float32)
    return case


def window(display: tuple[float, float]) -> tuple[float, float]:
    level, width = display
    return level - width / 2, level + width / 2


# ---------------------------------------------------------------------------------------------- tables


def tissue_table(cases: list[dict]) -> list[str]:
    rows = [
        "| label | nominal HU | clean median | clean mean ± SD | NDCT mean ± SD | clean ULDCT mean | "
        "ULDCT mean ± SD | voxels (NDCT) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, lid in LABELS.items():
        lo, hi = HU_RANGES[name]
        clean = np.concatenate([c["ndct_clean"][c["labels_ndct"] == lid] for c in cases])
        if clean.size == 0:
            rows.append(f"| {name} | {lo:g} … {hi:g} | — | — | — | — | — | 0 |")
            continue
        nd = np.concatenate([c["ndct"][c["labels_ndct"] == lid] for c in cases])
        ul = np.concatenate([c["uldct"][c["labels_uldct"] == lid] for c in cases])
        ul_clean = np.concatenate([c["uldct_clean"][c["labels_uldct"] == lid] for c in cases])
        med = float(np.median(clean))
        flag = "" if lo <= med <= hi else " ✗"
        ul_txt = f"{ul_clean.mean():.0f} | {ul.mean():.0f} ± {ul.std():.0f}" if ul.size else "— | —"
        rows.append(
            f"| {name} | {lo:g} … {hi:g} | {med:.0f}{flag} | {clean.mean():.0f} ± {clean.std():.0f} | "
            f"{nd.mean():.0f} ± {nd.std():.0f} | {ul_txt} | {clean.size} |"
        )
    return rows


def noise_table(cases: list[dict], dose: float) -> list[str]:
    rows = [
        f"| region | NDCT 100 % SD | NDCT bias | ULDCT {dose:.0%} SD | ULDCT bias | ratio | ULDCT SD·√dose |",
        "|---|---|---|---|---|---|---|",
    ]
    for region, names in NOISE_REGIONS.items():
        nd = np.concatenate(
            [(c["ndct"] - c["ndct_clean"])[np.isin(c["labels_ndct"], ids(names))] for c in cases]
        )
        ul = np.concatenate(
            [(c["uldct"] - c["uldct_clean"])[np.isin(c["labels_uldct"], ids(names))] for c in cases]
        )
        rows.append(
            f"| {region} | {nd.std():.1f} | {nd.mean():+.1f} | {ul.std():.1f} | {ul.mean():+.1f} | "
            f"{ul.std() / nd.std():.1f} | {ul.std() * np.sqrt(dose):.1f} |"
        )
    return rows


def dose_sweep(case: dict, *, spacing_mm: float, geometry: str, doses=(1.0, 0.25, 0.1, 0.02)) -> list[str]:
    """Re-simulate one noise-free slice at several doses (two realisations each)."""
    lung = np.isin(case["labels_ndct"], ids(LUNG_LABELS))
    k = int(np.argmax(lung.reshape(lung.shape[0], -1).sum(1)))
    clean, labels = case["ndct_clean"][k], case["labels_ndct"][k]
    head = "| dose | " + " | ".join(NOISE_REGIONS) + " | soft-tissue SD·√dose |"
    rows = [
        f"slice {k} of {case['name']} ({geometry}, two realisations, SD of scan − clean in HU)",
        "",
        head,
        "|---" * (len(NOISE_REGIONS) + 2) + "|",
    ]
    for dose in doses:
        rec = simulate_low_dose(
            np.stack([clean, clean]),
            dose=dose,
            spacing_mm=spacing_mm,
            geometry=geometry,
            seed=12345,
            device="cpu",
        )
        noise = rec - clean[None]
        sds = [float(noise[:, np.isin(labels, ids(names))].std()) for names in NOISE_REGIONS.values()]
        soft = float(noise[:, np.isin(labels, ids(("muscle", "heart", "great_vessels")))].std())
        rows.append(
            f"| {dose:.0%} | " + " | ".join(f"{s:.1f}" for s in sds) + f" | {soft * np.sqrt(dose):.1f} |"
        )
    return rows


def nps_report(cases: list[dict], *, spacing_mm: float, path: Path) -> list[str]:
    """Radial NPS of ULDCT and NDCT noise vs white noise of the ULDCT SD, same ROIs; writes the plot."""
    roi, stride = 32, 16
    mask = np.concatenate([np.isin(c["labels_uldct"], ids(NPS_LABELS)) for c in cases])
    ul = np.concatenate([c["uldct"] - c["uldct_clean"] for c in cases])
    nd = np.concatenate([c["ndct"] - c["ndct_clean"] for c in cases])
    sd = float(ul[mask].std())
    white = np.random.default_rng(0).normal(0.0, sd, ul.shape).astype(np.float32)
    results = {}
    for label, noise in (("ULDCT 2 %", ul), ("NDCT 100 %", nd), (f"white Gaussian, SD {sd:.0f} HU", white)):
        results[label] = nps_2d(noise, pixel_spacing_mm=spacing_mm, roi_size=roi, stride=stride, mask=mask)
    nyq = 0.5 / spacing_mm
    rows = [
        f"{roi}×{roi} px ROIs (stride {stride}) entirely inside {', '.join(NPS_LABELS)}; Nyquist "
        f"{nyq:.2f} /mm",
        "",
        "| noise | ROIs | SD from NPS (HU) | mean freq (/mm) | peak freq (/mm) | NPS at 0.1 /mm ÷ peak |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        low = float(np.interp(0.1, r.freq, r.radial) / r.radial.max())
        rows.append(
            f"| {label} | {r.n_rois} | {np.sqrt(r.variance):.1f} | {r.mean_freq:.3f} | "
            f"{r.peak_freq:.3f} | {low:.2f} |"
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ("tab:red", "tab:blue", "0.4")
    for (label, r), color in zip(results.items(), colors):
        axes[0].semilogy(r.freq[1:], r.radial[1:], color=color, label=label)  # the DC bin is 0 (mean removed)
        axes[1].plot(
            r.freq[1:], r.radial[1:] / r.variance, color=color, label=f"{label} (mean f {r.mean_freq:.2f})"
        )
        axes[1].axvline(r.mean_freq, color=color, ls=":", lw=1)
    axes[0].set_ylabel("radial NPS (HU² mm²)")
    axes[0].set_title("noise power spectrum")
    axes[1].set_ylabel("NPS / variance (mm²)")
    axes[1].set_title("shape (normalised to unit variance); dotted: mean frequency")
    for ax in axes:
        ax.set_xlabel("spatial frequency (1/mm)")
        ax.set_xlim(0, nyq)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def motion_table(cases: list[dict]) -> list[str]:
    keys = ("max_mm", "mean_mm", "lung_mean_mm", "lung_p95_mm", "max_si_mm", "max_ap_mm", "bone_max_mm")
    rows = [
        "| case | seed | slab centre z (mm) | amplitude (mm) | emphysema | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 5) + "|",
    ]
    for c in cases:
        r, m = c["record"], c["record"]["motion_mm"]
        rows.append(
            f"| {c['name']} | {r['seed']} | {r['z_center_mm']:.0f} | {r['amplitude_mm']:.1f} | "
            f"{r['emphysema']} | " + " | ".join(f"{m.get(k, float('nan')):.1f}" for k in keys) + " |"
        )
    return rows


def timing_table(cases: list[dict]) -> list[str]:
    keys = ("phantom_s", "motion_s", "scans_s", "total_s")
    rows = ["| case | shape (z, y, x) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for c in cases:
        t = c["record"]["timings_s"]
        rows.append(
            f"| {c['name']} | {tuple(c['record']['shape_zyx'])} | "
            + " | ".join(f"{t[k]:.1f}" for k in keys)
            + " |"
        )
    total = np.mean([c["record"]["timings_s"]["total_s"] for c in cases])
    slices = np.mean([c["record"]["shape_zyx"][0] for c in cases])
    rows += [
        "",
        f"mean {total:.1f} s per case = {total / slices:.2f} s per slice (NDCT + ULDCT scans, phantom, "
        "motion, writing)",
    ]
    return rows


# --------------------------------------------------------------------------------------------- figures


def _show(ax, image, kind, aspect):
    if kind == "diff":
        im = ax.imshow(image, cmap="RdBu_r", vmin=-DIFF_HU, vmax=DIFF_HU, aspect=aspect)
    else:
        vmin, vmax = window(LUNG_DISPLAY if kind == "lung" else MEDIASTINAL_DISPLAY)
        im = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _panels(case: dict, view: np.s_) -> list[tuple[str, np.ndarray, str]]:
    nd, ul = case["ndct"][view], case["uldct"][view]
    mis = case["uldct_clean"][view] - case["ndct_clean"][view]
    lw = "L {} W {}"
    return [
        (f"NDCT 100 %  ({lw.format(*LUNG_DISPLAY)})", nd, "lung"),
        (f"ULDCT 2 %  ({lw.format(*LUNG_DISPLAY)})", ul, "lung"),
        (f"ULDCT − NDCT (±{DIFF_HU:.0f} HU): noise + misalignment", ul - nd, "diff"),
        (f"NDCT 100 %  ({lw.format(*MEDIASTINAL_DISPLAY)})", nd, "mediastinal"),
        (f"ULDCT 2 %  ({lw.format(*MEDIASTINAL_DISPLAY)})", ul, "mediastinal"),
        (f"noise-free ULDCT − NDCT anatomy (±{DIFF_HU:.0f} HU): misalignment only", mis, "diff"),
    ]


def axial_figure(case: dict, spacing: tuple[float, float, float], path: Path) -> int:
    lung = np.isin(case["labels_ndct"], ids(LUNG_LABELS))
    k = int(np.argmax(lung.reshape(lung.shape[0], -1).sum(1)))
    fig, axes = plt.subplots(2, 3, figsize=(13, 9.2))
    for ax, (title, image, kind) in zip(axes.ravel(), _panels(case, np.s_[k])):
        im = _show(ax, image, kind, spacing[1] / spacing[0])
        ax.set_title(title, fontsize=9)
        if kind == "diff":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="HU")
    z = case["record"]["origin_xyz_mm"][2] + k * spacing[2]
    fig.suptitle(f"{case['name']}: axial slice {k} (z = {z:.0f} mm), 512² at {spacing[0]} mm", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return k


def coronal_figure(case: dict, spacing: tuple[float, float, float], path: Path) -> int:
    lung = np.isin(case["labels_ndct"], ids(LUNG_LABELS))
    j = int(np.argmax(lung.sum(axis=(0, 2))))
    body = np.flatnonzero((case["labels_ndct"][:, j] > LABELS["pad"]).any(0))
    x0, x1 = max(int(body[0]) - 8, 0), min(int(body[-1]) + 9, lung.shape[2])
    panels = _panels(case, np.s_[::-1, j, x0:x1])  # superior at the top
    aspect = spacing[2] / spacing[0]
    nz, nx = lung.shape[0], x1 - x0
    height = 11.0 * nz * aspect / nx
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, len(panels) * (height + 0.35) + 0.5))
    for ax, (title, image, kind) in zip(axes, panels):
        _show(ax, image, kind, aspect)
        ax.set_title(title, fontsize=9)
    y = case["record"]["origin_xyz_mm"][1] + j * spacing[1]
    fig.suptitle(
        f"{case['name']}: coronal row {j} (y = {y:.0f} mm), {nz} slices × {spacing[2]} mm; superior up, "
        "patient's right on the left",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return j


def motion_figure(case: dict, path: Path) -> dict[str, float]:
    """Case 0's anatomy and motion over the whole chest at 2 mm; displacement magnitude overlaid."""
    r = case["record"]
    sp = (2.0, 2.0, 2.5)
    n, nz, zc = 180, 132, -45.0
    ref = make_chest_phantom(
        shape=(nz, n, n), spacing=sp, seed=r["seed"], z_center_mm=zc, emphysema=r["emphysema"]
    )
    moved, disp = breathing_motion(ref, amplitude_mm=r["amplitude_mm"], seed=r["seed"] + 1)
    mag = np.sqrt((disp**2).sum(0))
    lung = np.isin(ref.labels, ids(LUNG_LABELS))
    j = int(np.argmax(lung.sum(axis=(0, 2))))
    i = int(np.argmax(lung[:, :, : n // 2].sum(axis=(0, 1))))  # sagittal through the right lung
    z = ref.origin[2] + np.arange(nz) * sp[2]
    vmin, vmax = window(LUNG_DISPLAY)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    views = [
        ("coronal", np.s_[:, j, :], 2, ref.origin[0], sp[0]),
        ("sagittal (right lung)", np.s_[:, :, i], 1, ref.origin[1], sp[1]),
    ]
    slab = (r["origin_xyz_mm"][2], r["origin_xyz_mm"][2] + (r["shape_zyx"][0] - 1) * r["spacing_xyz_mm"][2])
    for ax, (name, view, axis, o, s) in zip(axes, views):
        hu, m, d_in, d_si = ref.hu[view], mag[view], disp[axis][view], disp[0][view]
        still = m < 0.5  # no arrows where nothing moves
        d_in, d_si = np.where(still, np.nan, d_in), np.where(still, np.nan, d_si)
        extent = (o, o + hu.shape[1] * s, z[0], z[-1])
        ax.imshow(hu, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=extent, aspect="equal")
        im = ax.imshow(
            np.ma.masked_less(m, 0.5),
            cmap="inferno",
            vmin=0,
            vmax=r["amplitude_mm"],
            alpha=0.6,
            origin="lower",
            extent=extent,
            aspect="equal",
        )
        step = 10
        yy, xx = np.mgrid[0 : hu.shape[0] : step, 0 : hu.shape[1] : step]
        ax.quiver(
            o + xx * s,
            z[yy],
            d_in[::step, ::step],
            d_si[::step, ::step],
            angles="xy",
            scale_units="xy",
            scale=0.5,
            color="cyan",
            width=0.003,
        )
        for zz in slab:
            ax.axhline(zz, color="lime", ls="--", lw=1)
        ax.set_title(f"{name}: |displacement| (mm), arrows ×2", fontsize=10)
        ax.set_ylabel("z (mm, superior up)")
        ax.set_xlabel("x (mm, patient's left →)" if name == "coronal" else "y (mm, posterior →)")
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="mm")
    diff = moved.hu[:, j, :] - ref.hu[:, j, :]
    extent = (ref.origin[0], ref.origin[0] + n * sp[0], z[0], z[-1])
    im = axes[2].imshow(
        diff, cmap="RdBu_r", vmin=-DIFF_HU * 2, vmax=DIFF_HU * 2, origin="lower", extent=extent
    )
    axes[2].set_title("coronal: moved − reference anatomy (HU)", fontsize=10)
    axes[2].set_xlabel("x (mm)")
    fig.colorbar(im, ax=axes[2], fraction=0.04, pad=0.02, label="HU")
    fig.suptitle(
        f"{case['name']} anatomy (seed {r['seed']}) and breathing motion (amplitude {r['amplitude_mm']:.1f} mm) "
        f"rebuilt over the whole chest at 2 mm; green dashes: the case's {r['shape_zyx'][0]}-slice slab",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    stats = moved.params["motion"]
    return {k: v for k, v in stats.items() if k.endswith("_mm") and k != "amplitude_mm"}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="read existing case folders (case_*/case.json) from DIR")
    src.add_argument(
        "--out", type=Path, help="make the cases in DIR and keep them (default: a temporary folder)"
    )
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (case i uses seed*1000+i)")
    ap.add_argument("--figures", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures")
    args = ap.parse_args()

    began = time.monotonic()
    print(f"# synthetic-data report ({time.strftime('%Y-%m-%d %H:%M')})")
    print(
        f"cpu_count {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start"
    )
    tmp = None
    if args.data is not None:
        root = args.data
    else:
        root = args.out or Path(tempfile.mkdtemp(prefix="ipv2-synthetic-"))
        tmp = None if args.out else root
        t = time.monotonic()
        make_dataset(root, cases=args.cases, seed=args.seed, device="cpu", size=args.size, slices=args.slices)
        print(
            f"made {args.cases} cases of {args.slices}×{args.size}² in {time.monotonic() - t:.0f} s "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
    try:
        folders = sorted(p.parent for p in root.glob("case_*/case.json"))
        cases = [load_case(f) for f in folders]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if not cases:
        raise SystemExit(f"no case folders (case_*/case.json) in {root}")
    rec = cases[0]["record"]
    spacing = tuple(rec["spacing_xyz_mm"])
    dose, geometry = rec["dose"], rec["geometry"]
    print(
        f"{len(cases)} cases from {root}: shape {tuple(rec['shape_zyx'])}, spacing {spacing} mm, {geometry} "
        f"geometry, ULDCT dose {dose:.0%} (I0 {rec['i0_full_dose']:.3g} → {rec['incident_photons_per_ray']:.3g} "
        "photons per ray)"
    )
    args.figures.mkdir(parents=True, exist_ok=True)

    sections = [
        (
            "Tissue HU (all cases pooled; ULDCT uses the ULDCT labels; ✗ = clean median outside nominal)",
            lambda: tissue_table(cases),
        ),
        ("Noise: SD of (scan − noise-free anatomy), HU; bias = mean of it", lambda: noise_table(cases, dose)),
        (
            "Noise vs dose on one slice",
            lambda: dose_sweep(cases[0], spacing_mm=spacing[0], geometry=geometry),
        ),
        (
            "NPS (soft tissue)",
            lambda: nps_report(cases, spacing_mm=spacing[0], path=args.figures / "synthetic_nps.png"),
        ),
        ("Breathing motion (mm, case.json)", lambda: motion_table(cases)),
        ("Seconds per case (case.json timings_s)", lambda: timing_table(cases)),
    ]
    for title, make in sections:
        t = time.monotonic()
        rows = make()
        print(f"\n## {title}   [{time.monotonic() - t:.1f} s]\n")
        print("\n".join(rows))

    t = time.monotonic()
    k = axial_figure(cases[0], spacing, args.figures / "synthetic_axial.png")
    j = coronal_figure(cases[0], spacing, args.figures / "synthetic_coronal.png")
    print(
        f"\n## Figures   [{time.monotonic() - t:.1f} s]\n\naxial slice {k}, coronal row {j} of {cases[0]['name']}"
    )
    t = time.monotonic()
    stats = motion_figure(cases[0], args.figures / "synthetic_motion.png")
    print(
        f"whole-chest motion of {cases[0]['name']} at 2 mm [{time.monotonic() - t:.1f} s]: "
        + ", ".join(f"{k} {v:.1f}" for k, v in stats.items())
    )
    print(
        f"figures in {args.figures}: synthetic_axial.png, synthetic_coronal.png, synthetic_nps.png, "
        "synthetic_motion.png"
    )
    print(
        f"\nreport done in {time.monotonic() - began:.0f} s (load average {os.getloadavg()[0]:.1f}); "
        f"I0 full dose {I0_FULL_DOSE}"
    )


if __name__ == "__main__":
    main()
