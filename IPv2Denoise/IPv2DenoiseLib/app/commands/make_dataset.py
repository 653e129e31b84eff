"""``ipv2-denoise make-dataset``: synthetic real-world-like ULDCT/NDCT pairs (see :mod:`IPv2DenoiseLib.synthetic.dataset`)."""

from __future__ import annotations

import argparse
import json
import time

from IPv2DenoiseLib.app.arguments import add_device_argument
from IPv2DenoiseLib.core.progress import TqdmProgress, make_progress

NAME = "make-dataset"
HELP = (
    "Make synthetic chest CT cases: NDCT (full dose) and a breathing-misaligned ULDCT (2 % dose), with truth."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, required=True, help="number of cases")
    parser.add_argument(
        "--out", required=True, help="dataset folder (case_000, case_001, ...; existing cases kept)"
    )
    parser.add_argument("--dose", type=float, default=0.02, help="ULDCT dose fraction (default 0.02 = 2 %%)")
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix size (default 512)")
    parser.add_argument("--slices", type=int, default=32, help="slices per case (default 32)")
    parser.add_argument("--spacing", type=float, default=0.7, help="in-plane pixel size in mm (default 0.7)")
    parser.add_argument(
        "--slice-thickness", type=float, default=1.25, help="slice spacing in mm (default 1.25)"
    )
    parser.add_argument(
        "--amplitude",
        type=float,
        default=None,
        help="breathing amplitude at the diaphragm in mm (default: drawn per case in 8..20)",
    )
    parser.add_argument(
        "--geometry",
        choices=["fan", "parallel"],
        default="fan",
        help="scanner geometry of the simulated ULDCT (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (case i uses seed*1000+i)")
    add_device_argument(parser, runs="projector")
    parser.add_argument("--json-progress", action="store_true", help="JSON-lines progress on stdout")


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.synthetic.dataset import make_dataset

    overrides = {
        "dose": args.dose,
        "size": args.size,
        "slices": args.slices,
        "spacing_mm": args.spacing,
        "slice_thickness_mm": args.slice_thickness,
        "geometry": args.geometry,
    }
    if args.amplitude is not None:
        overrides["amplitude_mm"] = args.amplitude
    progress = make_progress(args.json_progress, desc="make-dataset", unit="case")
    began = time.monotonic()
    try:
        records = make_dataset(
            args.out, cases=args.cases, seed=args.seed, device=args.device, progress=progress, **overrides
        )
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    seconds = time.monotonic() - began
    made = [r["timings_s"]["total_s"] for r in records]
    if args.json_progress:  # every stdout line a JSON record, the result one of them
        print(json.dumps({"result": str(args.out), "cases": len(records), "seconds": round(seconds, 1)}))
        return 0
    print(
        f"{len(records)} cases in {args.out} ({seconds:.0f} s this run; {sum(made) / len(made):.1f} s per case to make)"
    )
    for r in records:
        motion = r["motion_mm"]
        # slices below or above the lungs (a small --slices) have none
        lungs = f"lungs mean {motion['lung_mean_mm']:.1f} mm" if "lung_mean_mm" in motion else "no lungs"
        print(
            f"  seed {r['seed']}: motion max {motion['max_mm']:.1f} mm, {lungs}, emphysema {r['emphysema']}"
        )
    return 0
