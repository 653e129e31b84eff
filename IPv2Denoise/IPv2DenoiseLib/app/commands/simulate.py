"""``ipv2-denoise simulate``: physically simulated low-dose scan of a CT volume (Add noise)."""

from __future__ import annotations

import argparse

from IPv2DenoiseLib.app.arguments import add_device_argument, check_volume_output
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import JsonLinesProgress, make_progress

NAME = "simulate"
HELP = "Simulate a low-dose scan of a CT volume (Poisson + electronic noise in projections, FBP)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="CT volume (DICOM folder/file, NRRD, NIfTI, MHA)")
    parser.add_argument("output", metavar="OUT", help="output volume (.nrrd, .nii, .nii.gz, .mha)")
    parser.add_argument("--dose", type=float, required=True, help="dose fraction in (0, 1], e.g. 0.02 = 2 %%")
    parser.add_argument(
        "--mode",
        choices=("simulate", "insert"),
        default="simulate",
        help="simulate: treat IN as noise-free; insert: IN is a real normal-dose scan, "
        "add only the extra noise (Yu 2012 / Zeng 2015)",
    )
    parser.add_argument(
        "--geometry",
        choices=("fan", "parallel"),
        default="fan",
        help="scanner geometry: fan (a clinical CT's fan beam) or parallel beam (default: %(default)s)",
    )
    parser.add_argument("--views", type=int, default=None, help="views (default 1152 fan / 720 parallel)")
    parser.add_argument(
        "--filter",
        choices=("ramp", "shepp-logan", "cosine", "hann"),
        default="ramp",
        help="FBP reconstruction filter, sharp (ramp) to smooth (hann) (default: %(default)s)",
    )
    parser.add_argument(
        "--i0", type=float, default=None, help="full-dose photons per ray (default calibrated)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the noise: same seed, same scan (default: %(default)s)",
    )
    add_device_argument(parser, runs="projector")
    parser.add_argument(
        "--batch", type=int, default=None, help="slices per projector call (default: from free memory)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--json-progress", action="store_true", help="print JSON-lines progress")


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.io.volumes import read_volume, write_volume
    from IPv2DenoiseLib.physics.lowdose import check_views, insert_noise, simulate_low_dose

    # before reading or simulating: OUT (never IN) and the views, each refused in one line
    check_volume_output(args.output, source=args.input, overwrite=args.overwrite)
    check_views(args.views, args.geometry)
    vol = read_volume(args.input)
    sx, sy, _ = vol.spacing
    if abs(sx - sy) > 1e-3 * max(sx, sy):
        raise UserError(f"pixel spacing ({sx}, {sy}) mm is not square; resample the volume in-plane first")
    progress = make_progress(args.json_progress, desc="simulate", unit="slice")
    fn = simulate_low_dose if args.mode == "simulate" else insert_noise
    try:
        out = fn(
            vol.array,
            dose=args.dose,
            spacing_mm=float(sx),
            geometry=args.geometry,
            views=args.views,
            filter=args.filter,
            i0=args.i0,
            seed=args.seed,
            device=args.device,
            batch=args.batch,
            progress=progress,
        )
    finally:
        progress.close()
    desc = f"IPv2 {args.mode} {args.dose:g} dose ({args.geometry}, {args.filter}, seed {args.seed})"
    write_volume(vol.with_array(out, simulated_dose=args.dose, simulation=desc), args.output)
    if isinstance(progress, JsonLinesProgress):
        progress.emit(result=str(args.output))
    return 0
