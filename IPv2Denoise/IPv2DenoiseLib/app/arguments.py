"""Command-line argument types and option groups that several ``ipv2-denoise`` commands share.

argparse ``type=`` callables raise :class:`argparse.ArgumentTypeError`, which argparse turns into
one usage line and exit status 2, like every other error a user can cause.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from IPv2DenoiseLib.core.device import check_device_name
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.ensemble import ENSEMBLE_SIZES
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, STRENGTH_RANGE, check_strength


def _bounded(parse: Callable[[str], float], ok: Callable[[float], bool], what: str):
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


#: argparse type: an integer >= 1.
positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
#: argparse type: an integer >= 0 (counts, retries).
non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
#: argparse type: a number > 0 (sizes, CPUs).
positive_float = _bounded(float, lambda v: v > 0, "a positive number")
#: argparse type: a number of seconds > 0.
positive_seconds = _bounded(float, lambda v: v > 0, "seconds > 0")


#: The volume formats a command writes (DICOM series are written by ``--dicom``).
VOLUME_OUTPUT_FORMATS = (".nrrd", ".nii", ".nii.gz", ".mha")


def check_volume_output(output: str, *, source: str, overwrite: bool, other: str = "") -> None:
    """Refuse, in one line and before any reading, a volume OUT that cannot be written: another
    format than :data:`VOLUME_OUTPUT_FORMATS`, the input itself (never modified), an existing file
    without ``--overwrite``, a missing or read-only folder.

    Parameters
    ----------
    output : str
        The OUT argument.
    source : str
        The IN argument.
    overwrite : bool
        ``--overwrite`` was given.
    other : str
        Another way to write, named in the format refusal (``" (or --dicom)"``).

    Raises
    ------
    UserError
        Any of the refusals above.
    """
    from IPv2DenoiseLib.core.atomic import check_output_path
    from IPv2DenoiseLib.io.volumes import image_suffix  # lazy: the CLI imports every command for --help

    if image_suffix(output) not in VOLUME_OUTPUT_FORMATS:
        raise UserError(
            f"OUT {output!r}: unsupported output format; use {', '.join(VOLUME_OUTPUT_FORMATS[:-1])} "
            f"or {VOLUME_OUTPUT_FORMATS[-1]}{other}"
        )
    check_output_path(output, inputs=[source], overwrite=overwrite)


def device_name(text: str) -> str:
    """argparse type: a ``--device`` value of :mod:`core.device` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``), checked there without loading torch."""
    try:
        return check_device_name(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


def strength_value(text: str) -> float:
    """argparse type: a ``--strength`` value, checked by :func:`~IPv2DenoiseLib.denoiser.strength.check_strength`."""
    try:
        value = float(text)
    except ValueError:
        value = text  # refused below, in the words of every other front end
    try:
        return check_strength(value)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("strength ")) from None


#: What each kind of job can run on: the network (CUDA, Apple MPS, CPU), the projector (CUDA, CPU).
DEVICE_HELP = {
    "network": "where the network runs: auto = CUDA, then Apple MPS, then CPU; cuda:N picks one GPU",
    "projector": "where the projector runs: auto = CUDA when present, else CPU; cuda:N picks one GPU",
}


def add_device_argument(
    parser: argparse.ArgumentParser, *, runs: str = "network", default: str = "auto"
) -> None:
    """``--device``: the one definition of the option for every command (``runs`` words its help)."""
    parser.add_argument(
        "--device",
        type=device_name,
        default=default,
        metavar="DEVICE",
        help=f"{DEVICE_HELP[runs]} (default: %(default)s)",
    )


def add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    """How a CT volume is read (``--series``, ``--resample-gaps``, ``--force``): info and denoise."""
    parser.add_argument(
        "--series",
        "--series-uid",
        dest="series_uid",
        metavar="UID_OR_N",
        help="the series to read when a DICOM folder holds several: its SeriesInstanceUID or its number "
        "in the list the refusal prints",
    )
    parser.add_argument(
        "--resample-gaps",
        action="store_true",
        help="interpolate a DICOM series with missing slices or uneven spacing onto an even grid "
        "(default: refuse and say where the gap is)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="read non-CT modalities, non-HU values and volumes without air (no HU check)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model runs where and how (``--model`` | ``--weights``, ``--device``, ``--ensemble``, ``--refine``,
    ``--strength``, ``--no-remove-background``): denoise, batch, serve and demo."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default="default",
        help="model name from Resources/Models/models.json, or a tier: fast, quality (default: the "
        "catalogue's default model, the quality tier; an unknown name lists the installed ones)",
    )
    which.add_argument(
        "--weights", metavar="FILE", help="a .safetensors weights file with its .json model card"
    )
    add_device_argument(parser)
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        choices=ENSEMBLE_SIZES,
        metavar="N",
        help="average the network over N in-plane flips/transposes of each slice (1, 2, 4 or 8): "
        "N times slower; 8 gave +0.2 dB on the mean of the benchmark's real slices (README); the quality "
        "setting for a GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="filter once more with the network's output as the pilot of a collaborative Wiener filter "
        "and the noise measured on the scan: about +0.2 dB on the mean of the benchmark's real slices for a "
        "single pass (the head most; the chest and abdomen can lose, and on top of --ensemble 8 it gains "
        "nothing: README); about 2 s per 512x512 slice on a CPU core",
    )
    low, high = STRENGTH_RANGE
    parser.add_argument(
        "--strength",
        type=strength_value,
        default=DEFAULT_STRENGTH,
        metavar="S",
        help=f"denoising strength, {low:g} to {high:g}: the noise-aware network is told the noise is S times "
        "as strong as measured; below 1 removes less noise and keeps more of the scan's grain, above 1 "
        "smooths more; 1 is what the models were validated at (docs/models.md) (default: %(default)g)",
    )
    parser.add_argument(
        "--no-remove-background",
        dest="remove_background",
        action="store_false",
        help="keep the denoised background instead of setting air outside the patient to -1000 HU",
    )
