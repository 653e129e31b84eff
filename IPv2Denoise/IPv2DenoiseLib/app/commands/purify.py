"""``ipv2-denoise purify``: IPv1/IPv2 training pairs and test labels from a misaligned ULDCT/NDCT pair.

Volumes: ``--uldct U --ndct N --out DIR`` writes train_input, train_label, test_label and the dark,
background and lung masks as NRRD with U's geometry, plus purify.json. PNG dataset (the authors'
layout): ``--png-dataset ROOT --window L W --out DIR`` writes ``{split}/lq_bar`` and ``gt_bar``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_dir, check_output_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import make_progress
from IPv2DenoiseLib.purification.weak_denoisers import DEFAULT_WEAK_DENOISER, WEAK_DENOISERS

NAME = "purify"
HELP = (
    "Build IPv1/IPv2 training pairs and test labels from a misaligned ULDCT/NDCT pair "
    "(volumes or the authors' PNG dataset layout)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (either a volume pair or a PNG dataset)")
    src.add_argument("--uldct", help="ultra-low-dose CT: DICOM folder/file, NRRD, NIfTI or MHA")
    src.add_argument("--ndct", help="normal-dose CT of the same patient, same grid as --uldct")
    src.add_argument("--png-dataset", metavar="ROOT", help="folder with {train,val,test}/{lq,gt}/*.png")
    src.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("L", "W"),
        help="HU level and width the PNGs were made with (needed with --png-dataset)",
    )
    src.add_argument(
        "--pixel-spacing",
        type=float,
        default=0.7,
        metavar="MM",
        help="pixel size assumed for PNG slices (default 0.7 mm)",
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--strategy",
        default="ipv2",
        help="naive, sim, ipv1, ipv2 or switches rb/an/rn/tb joined by '+' (default ipv2)",
    )
    parser.add_argument(
        "--dose", type=float, default=0.02, help="simulated dose fraction for add-noise (default 0.02)"
    )
    parser.add_argument(
        "--weak-denoiser",
        default=DEFAULT_WEAK_DENOISER,
        choices=WEAK_DENOISERS,
        help=f"weak denoiser for the remove-noise test label (default {DEFAULT_WEAK_DENOISER})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the dose simulation (default 0)")
    parser.add_argument(
        "--ignore-origin",
        action="store_true",
        help="accept different origins of ULDCT and NDCT (same size, spacing, direction)",
    )
    parser.add_argument("--json-progress", action="store_true", help="print progress as JSON lines")


def _check_geometry(u, n, *, ignore_origin: bool) -> None:
    if u.shape != n.shape:
        raise UserError(
            f"ULDCT shape {u.shape} (z, y, x) and NDCT shape {n.shape} differ; resample one onto the other"
        )
    if not np.allclose(u.spacing, n.spacing, atol=1e-3):
        raise UserError(
            f"ULDCT spacing {u.spacing} mm and NDCT spacing {n.spacing} mm differ; they must match"
        )
    if not np.allclose(u.direction, n.direction, atol=1e-3):
        raise UserError(
            f"ULDCT direction {u.direction} and NDCT direction {n.direction} differ; they must match"
        )
    if not ignore_origin and not np.allclose(u.origin, n.origin, atol=1e-2):
        raise UserError(
            f"ULDCT origin {u.origin} mm and NDCT origin {n.origin} mm differ; "
            "pass --ignore-origin to pair them slice by slice anyway"
        )


def _check_out(out: Path, inputs: list[str]) -> None:
    """Before any work: ``--out`` is a new or empty folder holding no input (it is written whole,
    under a staging name, so a kill leaves no half set of files)."""
    check_output_path(out, inputs=inputs, folder=True, what="--out", overwrite_hint="a new --out folder")


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.purification.pairs import Strategy

    strategy = Strategy.from_name(args.strategy)
    out = Path(args.out)
    inputs = [p for p in (args.png_dataset, args.uldct, args.ndct) if p]
    if args.png_dataset:
        if args.uldct or args.ndct:
            raise UserError("give either --png-dataset or --uldct/--ndct, not both")
        if not args.window:
            raise UserError("--png-dataset needs --window L W (the HU level and width of the PNGs)")
        _check_out(out, inputs)
        # lazy: the CLI imports every command to build --help; torch & co. load on use
        from IPv2DenoiseLib.purification.png_dataset import purify_png_dataset

        progress = make_progress(args.json_progress, desc="purify", unit="slice")
        try:
            with atomic_dir(out) as staging:
                counts = purify_png_dataset(
                    args.png_dataset,
                    staging,
                    window=tuple(args.window),
                    strategy=strategy,
                    dose=args.dose,
                    weak_denoiser=args.weak_denoiser,
                    pixel_spacing_mm=args.pixel_spacing,
                    seed=args.seed,
                    progress=progress,
                )
        finally:
            progress.close()
        print(json.dumps({"result": str(out), "strategy": strategy.name, "slices": counts}))
        return 0

    if not (args.uldct and args.ndct):
        raise UserError("give --uldct and --ndct (or --png-dataset with --window)")
    _check_out(out, inputs)
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.io.volumes import read_volume, write_mask, write_volume
    from IPv2DenoiseLib.purification.pairs import build_pairs

    u = read_volume(args.uldct)
    n = read_volume(args.ndct)
    _check_geometry(u, n, ignore_origin=args.ignore_origin)
    progress = make_progress(args.json_progress, desc="purify", unit="slice")
    try:
        pair = build_pairs(
            u.array,
            n.array,
            strategy,
            weak_denoiser=args.weak_denoiser,
            dose=args.dose,
            spacing=u.spacing,
            seed=args.seed,
            progress=progress,
        )
    finally:
        progress.close()
    written = {}
    with atomic_dir(out) as staging:  # all files, or none (a kill leaves only a staging folder)
        for name, arr in (
            ("train_input", pair.train_input),
            ("train_label", pair.train_label),
            ("test_label", pair.test_label),
        ):
            write_volume(u.with_array(arr, purify_output=name), staging / f"{name}.nrrd")
            written[name] = str(out / f"{name}.nrrd")
        for name, mask in (("dark", pair.dark), ("background", pair.background), ("lungs", pair.lungs)):
            write_mask(mask, u, staging / f"mask_{name}.nrrd")
            written[f"mask_{name}"] = str(out / f"mask_{name}.nrrd")
        record = {
            "strategy": strategy.name,
            "dose": args.dose,
            "weak_denoiser": args.weak_denoiser,
            "seed": args.seed,
            "noise_hu_uldct": pair.noise_hu,
            "uldct": str(args.uldct),
            "ndct": str(args.ndct),
            "voxels": {
                "dark": int(pair.dark.sum()),
                "background": int(pair.background.sum()),
                "lungs": int(pair.lungs.sum()),
                "purified": int(pair.purified.sum()),
            },
            "files": written,
        }
        (staging / "purify.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"result": str(out), "strategy": strategy.name}))
    return 0
