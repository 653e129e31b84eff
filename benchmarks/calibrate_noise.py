"""Noise calibration table for the Add-noise simulator (docs/noise-calibration.md).

Usage: ``python benchmarks/calibrate_noise.py [--size 512] [--spacing 0.7] [--i0 1e6]``

A chest-like phantom (body ellipse 320 × 230 mm of soft tissue, two lungs at −850 HU, spine at
700 HU) and a 300 mm water cylinder are scanned at 100, 25, 10 and 2 % dose in the fan and the
parallel geometry. Noise = SD of (r1 − r2)/√2 over two realisations in a 24 × 24 px mediastinum
ROI (cylinder: centre ROI); bias = mean(r − phantom) in the same ROI.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from IPv2DenoiseLib.physics.lowdose import I0_FULL_DOSE, simulate_low_dose


def chest_phantom(n: int, spacing: float) -> tuple[np.ndarray, tuple[slice, slice], tuple[slice, slice]]:
    """Chest-like HU slice and its mediastinum and right-lung ROIs (24 × 24 px)."""
    c = (n - 1) / 2
    y, x = (np.mgrid[0:n, 0:n] - c) * spacing
    img = np.full((n, n), -1000.0, np.float32)
    img[(x / 160) ** 2 + (y / 115) ** 2 <= 1] = 40.0
    for sx in (-75.0, 75.0):
        img[((x - sx) / 55) ** 2 + ((y + 5) / 85) ** 2 <= 1] = -850.0
    img[x**2 + (y - 85) ** 2 <= 15**2] = 700.0
    h = 12
    med = (slice(int(c) - h, int(c) + h), slice(int(c) - h, int(c) + h))
    lx = int(c + 75 / spacing)
    lung = (slice(int(c) - h, int(c) + h), slice(lx - h, lx + h))
    return img, med, lung


def water_cylinder(n: int, spacing: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    c = (n - 1) / 2
    y, x = (np.mgrid[0:n, 0:n] - c) * spacing
    img = np.where(x**2 + y**2 <= 150.0**2, 0.0, -1000.0).astype(np.float32)
    h = 12
    return img, (slice(int(c) - h, int(c) + h), slice(int(c) - h, int(c) + h))


def measure(img, rois, *, dose, spacing, geometry, i0, filter="ramp"):
    two = np.stack([img, img])  # per-slice seeds → two independent realisations in one call
    rec = simulate_low_dose(
        two, dose=dose, spacing_mm=spacing, geometry=geometry, i0=i0, seed=1, filter=filter, device="cpu"
    )
    out = []
    for roi in rois:
        d = (rec[0][roi] - rec[1][roi]) / np.sqrt(2)
        out.append((float(d.std()), float((rec[:, roi[0], roi[1]] - img[roi]).mean())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, default=0.7)
    ap.add_argument("--i0", type=float, default=None, help="full-dose photons/ray (default: calibrated)")
    ap.add_argument("--filter", default="ramp")
    ap.add_argument("--doses", default="1,0.25,0.1,0.02")
    args = ap.parse_args()
    chest, med, lung = chest_phantom(args.size, args.spacing)
    water, centre = water_cylinder(args.size, args.spacing)
    doses = [float(d) for d in args.doses.split(",")]
    print(f"{args.size}² px at {args.spacing} mm, filter {args.filter}")
    print(
        "| geometry | I0 (100 %) | dose | mediastinum SD | bias | lung SD | lung bias | water-300 SD | bias | "
        "SD·√dose |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for geometry in ("fan", "parallel"):
        i0 = args.i0 or I0_FULL_DOSE[geometry]
        for dose in doses:
            t = time.perf_counter()
            (sm, bm), (sl, bl) = measure(
                chest,
                [med, lung],
                dose=dose,
                spacing=args.spacing,
                geometry=geometry,
                i0=i0,
                filter=args.filter,
            )
            ((sw, bw),) = measure(
                water, [centre], dose=dose, spacing=args.spacing, geometry=geometry, i0=i0, filter=args.filter
            )
            print(
                f"| {geometry} | {i0:.3g} | {dose:g} | {sm:.1f} | {bm:+.1f} | {sl:.1f} | {bl:+.1f} | "
                f"{sw:.1f} | {bw:+.1f} | {sm * np.sqrt(dose):.1f} |  ({time.perf_counter() - t:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
