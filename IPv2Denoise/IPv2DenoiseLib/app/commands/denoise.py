"""``ipv2-denoise denoise IN OUT``: denoise a CT volume with a trained model (CPU or GPU)."""

from __future__ import annotations

import argparse
import sys
import time

from IPv2DenoiseLib.core.device import DEVICE_CHOICES
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import JsonLinesProgress, TqdmProgress

NAME = "denoise"
HELP = "Denoise a CT volume (DICOM folder/file, NRRD, NIfTI, MHA) with a trained IPv2 model; writes NRRD/NIfTI/MHA."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="IN", help="DICOM folder or file, NRRD, NIfTI (.nii/.nii.gz) or MHA/MHD"
    )
    parser.add_argument(
        "output", metavar="OUT", help="output volume: .nrrd, .nii, .nii.gz or .mha (written atomically)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default="default",
        help="model name from Resources/Models/models.json (default: %(default)s)",
    )
    which.add_argument(
        "--weights", metavar="FILE", help="a .safetensors weights file with its .json model card"
    )
    parser.add_argument(
        "--no-remove-background",
        dest="remove_background",
        action="store_false",
        help="keep the denoised background instead of setting air outside the patient to -1000 HU",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where the network runs: auto = CUDA, then Apple MPS, then CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--slab", type=_positive_int, metavar="N", help="slices per slab (default: from free memory)"
    )
    parser.add_argument(
        "--series-uid", help="SeriesInstanceUID to read when a DICOM folder holds several series"
    )
    parser.add_argument(
        "--json-progress",
        action="store_true",
        help="print JSON lines: {'device': ...}, {'progress', 'eta_s', 'message'} ..., {'result', 'seconds'}",
    )


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.core.device import describe_device, resolve_device
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.io.volumes import image_suffix, read_volume, write_volume

    start = time.monotonic()
    device = resolve_device(args.device)  # fail fast: "--device cuda" without a GPU
    if image_suffix(args.output) not in {".nrrd", ".nii", ".nii.gz", ".mha"}:
        raise UserError(f"OUT {args.output!r}: unsupported output format; use .nrrd, .nii, .nii.gz or .mha")
    denoiser = Denoiser.from_file(args.weights) if args.weights else Denoiser.from_registry(args.model)
    progress = JsonLinesProgress() if args.json_progress else TqdmProgress(desc="denoise", unit="slice")
    where = describe_device(device)
    if args.json_progress:
        progress.emit(device=where, model=denoiser.name)
    else:
        print(f"running on: {where}; model {denoiser.name}", file=sys.stderr)
    try:
        volume = read_volume(args.input, series_uid=args.series_uid)
        result = denoiser.denoise(
            volume,
            remove_background=args.remove_background,
            device=device,
            slab_slices=args.slab,
            progress=progress,
        )
        write_volume(result, args.output)
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    seconds = round(time.monotonic() - start, 3)
    if args.json_progress:
        progress.emit(result=str(args.output), seconds=seconds)
    else:
        print(f"wrote {args.output} ({seconds:.1f} s)", file=sys.stderr)
    return 0
