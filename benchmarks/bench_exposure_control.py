"""Exposure control of real training slabs: the predicted dose (``exposure_controlled_scan``) against
the search a doubling at a time (the baseline, run here on the same slabs with the same seeds).

A real slab whose inserted noise exceeds 150 HU is scanned again at a higher dose (docs/training.md,
"Exposure control"). Each scan is a trip through the projector, the largest cost of a training
slab; the first scan predicts how many doublings are needed, instead of trying each. This prints
both ways' scans and seconds, the ratio, and whether every slab ends at the same dose with the
same noise (it must: each dose has its own seed).

    python benchmarks/bench_exposure_control.py --slabs 14 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu  # noqa: E402
from IPv2DenoiseLib.physics.scanner_noise import ProtocolRanges, draw_protocol, scanner_noise  # noqa: E402
from IPv2DenoiseLib.purification.regions import BODY  # noqa: E402
from IPv2DenoiseLib.training import scanner_data  # noqa: E402
from IPv2DenoiseLib.training.scanner_data import (  # noqa: E402
    AEC_MAX_DOUBLINGS,
    AEC_MAX_NOISE_HU,
    exposure_controlled_scan,
    load_anatomy_volumes,
)

#: The real normal-dose corpus beside the checkout (../shared/data/real-ct/README.md).
ABDOMEN = ROOT.parent / "shared" / "data" / "real-ct" / "abdomen-series"


def search_a_doubling_at_a_time(vol, hu, regions, protocol, *, spacing_mm: float, seed: int):
    """The baseline: scan, and double the dose while the inserted noise exceeds the limit (the
    exposure control before 2026-12-06, with the same seed for each dose). (noisy, protocol, scans)."""
    tissue = regions == BODY
    stream = np.random.default_rng([seed, 2]).integers(2**62, size=AEC_MAX_DOUBLINGS)
    level_seeds = [seed, *(int(s) for s in stream)]
    for level in range(AEC_MAX_DOUBLINGS + 1):
        scanned = replace(protocol, dose=min(1.0, protocol.dose * 2**level))
        noisy = scanner_noise(
            np.ascontiguousarray(hu),
            scanned,
            spacing_mm=spacing_mm,
            seed=level_seeds[level],
            clean=vol.clean,
            device="cpu",
            flux_scale=vol.flux_scale,
        )
        if vol.clean or scanned.dose >= 0.5 or tissue.sum() < 200 or level == AEC_MAX_DOUBLINGS:
            break
        if estimate_noise_hu(noisy - hu, region=tissue) <= AEC_MAX_NOISE_HU:
            break
    return noisy, scanned, level + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--anatomy", nargs="*", type=Path, help="real volumes or series (default: the shared abdomen)"
    )
    parser.add_argument("--slabs", type=int, default=14, help="real slabs, drawn in turn from the volumes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    volumes = load_anatomy_volumes(args.anatomy or [ABDOMEN])
    scans = [0]
    scan = scanner_data.scanner_noise

    def counted(*a, **k):
        scans[0] += 1
        return scan(*a, **k)

    rng = np.random.default_rng(1)
    slabs = []
    for i in range(args.slabs):
        vol = volumes[i % len(volumes)]
        nz = vol.hu.shape[0]
        z = int(rng.integers(nz))
        zs = np.clip(np.arange(z - 2, z + 3), 0, nz - 1)
        slabs.append((vol, vol.hu[zs], vol.regions[zs], draw_protocol(rng, ProtocolRanges()), 100 + i))
    began = time.perf_counter()
    baseline = [
        search_a_doubling_at_a_time(v, hu, r, p, spacing_mm=float(v.spacing[0]), seed=s)
        for v, hu, r, p, s in slabs
    ]
    baseline_seconds = time.perf_counter() - began
    scanner_data.scanner_noise = counted  # count the scans of the code under test
    try:
        began = time.perf_counter()
        predicted = [
            exposure_controlled_scan(v, hu, r, p, spacing_mm=float(v.spacing[0]), seed=s)
            for v, hu, r, p, s in slabs
        ]
        seconds = time.perf_counter() - began
    finally:
        scanner_data.scanner_noise = scan
    same_dose = all(a[1].dose == b[1].dose for a, b in zip(baseline, predicted))
    largest = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(baseline, predicted))
    baseline_scans = sum(b[2] for b in baseline)
    raised = [round(b[1].dose / s[3].dose) for b, s in zip(predicted, slabs)]
    print(f"real slabs: {len(slabs)} from {len(volumes)} volume(s); dose raised x {raised}")
    print(f"a doubling at a time (baseline): {baseline_scans} scans, {baseline_seconds:.1f} s")
    print(f"predicted (exposure_controlled_scan): {scans[0]} scans, {seconds:.1f} s")
    print(
        f"ratio: {baseline_scans / max(scans[0], 1):.2f}x fewer scans, {baseline_seconds / seconds:.2f}x faster; "
        f"same final dose on every slab: {same_dose}; largest difference of a slab {largest:.4f} HU"
    )
    return 0 if same_dose else 1


if __name__ == "__main__":
    sys.exit(main())
