"""Synthetic validation across pixel sizes: each model against ``unet-ipv2`` on held-out phantoms.

The trainer validates at the phantoms' own pixels (0.7 mm). Patients come at 0.2-1.3 mm, and a neck
or head reconstructed on a small field of view has pixels finer than any training volume. This
benchmark scores models on three synthetic sets made from the held-out cases of ``bench_infer.py``
(``make_dataset`` seed 9000, never used for training; central 8 slices), nothing real:

* ``own``: each case's own 2 % ULDCT against its noise-free anatomy;
* ``scanner``: the anatomy under the trainer's ``VALIDATION_PROTOCOL`` (Shepp-Logan, bowtie, TCM,
  slice-correlated noise);
* ``fine``: the anatomy zoomed 2x about the centre on pixels 2x finer (0.35 mm: a small field of
  view), under the same protocol; the noise is a 0.6 mm detector's, interpolated
  (``physics.scanner_noise``).

PSNR over a 2000 HU range, mean of the cases; printed with each model's difference to the baseline
``unet-ipv2`` measured in the same run. This is how issue #24 chose between its legs 4 and 5.

    python benchmarks/bench_fine_pixels.py --models default runs/leg4/unet_nm_ipv2.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infer import add_held_out_case_arguments, held_out_cases  # noqa: E402  (the same held-out cases)

BASELINE = "unet-ipv2"
SLICES = 8
HU_RANGE = 2000.0


def make_sets(cases: list[Path]) -> list[dict]:
    """Per case: {set name: (noisy, truth, spacing)}."""
    from IPv2DenoiseLib.io.case_folder import read_case
    from IPv2DenoiseLib.physics.scanner_noise import scanner_noise
    from IPv2DenoiseLib.training.scanner_data import zoom_in_plane
    from IPv2DenoiseLib.training.trainer import VALIDATION_PROTOCOL

    sets = []
    for i, case in enumerate(cases):
        vols = read_case(case)
        anatomy = vols["uldct_clean"]
        z0 = max(0, (anatomy.shape[0] - SLICES) // 2)
        truth = anatomy.array[z0 : z0 + SLICES].astype(np.float32)
        sx, sy, sz = anatomy.spacing
        own = vols["uldct"].array[z0 : z0 + SLICES].astype(np.float32)
        scanner = scanner_noise(truth, VALIDATION_PROTOCOL, spacing_mm=float(sx), seed=20_000 + i)
        fine_truth = zoom_in_plane(truth, 2.0, -1000.0, 1)  # a 2x smaller field of view
        fine = scanner_noise(fine_truth, VALIDATION_PROTOCOL, spacing_mm=float(sx) / 2, seed=30_000 + i)
        sets.append(
            {
                "own": (own, truth, anatomy.spacing),
                "scanner": (scanner, truth, anatomy.spacing),
                "fine": (fine, fine_truth, (sx / 2, sy / 2, sz)),
            }
        )
    return sets


def score(model: str, sets: list[dict]) -> dict[str, float]:
    """Mean PSNR per set of ``model`` (a registry name or a .safetensors file)."""
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.infer import Denoiser

    denoiser = Denoiser.from_file(model) if model.endswith(".safetensors") else Denoiser.from_registry(model)
    psnrs: dict[str, list[float]] = {}
    for case in sets:
        for name, (noisy, truth, spacing) in case.items():
            out = denoiser.denoise(
                Volume(noisy, spacing=spacing), remove_background=False, device="cpu"
            ).array
            psnrs.setdefault(name, []).append(10 * np.log10(HU_RANGE**2 / float(np.mean((out - truth) ** 2))))
    return {name: float(np.mean(v)) for name, v in psnrs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["default"], help="registry names or .safetensors files"
    )
    add_held_out_case_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sets = make_sets(held_out_cases(args))
    rows = {name: score(name, sets) for name in [BASELINE, *args.models]}
    base = rows[BASELINE]
    print("| model | own (dB) | scanner (dB) | fine 0.35 mm (dB) | mean | mean − unet-ipv2 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        mean = float(np.mean(list(row.values())))
        gain = mean - float(np.mean(list(base.values())))
        cells = " | ".join(f"{row[k]:.2f}" for k in ("own", "scanner", "fine"))
        print(f"| {name} | {cells} | {mean:.2f} | {gain:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
