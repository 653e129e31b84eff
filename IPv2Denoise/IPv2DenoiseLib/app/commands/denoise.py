"""``ipv2-denoise denoise IN OUT``: denoise a CT volume with a trained model (CPU or GPU).

With ``--dicom`` OUT is a folder that receives a derived DICOM series (in the input's study when
the input is DICOM, else a new CT series); ``--send DEST`` then stores it on a PACS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from IPv2DenoiseLib.app.arguments import (
    add_model_arguments,
    add_reading_arguments,
    check_volume_output,
    positive_int,
    positive_seconds,
)
from IPv2DenoiseLib.app.pacs import add_peer_arguments, send_and_report
from IPv2DenoiseLib.app.pipeline import (
    ADAPT_SECONDS,
    ADAPT_STEPS_SECONDS_CAP,
    DenoiseOptions,
    DenoiseOutcome,
    DenoisePipeline,
)
from IPv2DenoiseLib.core.atomic import check_output_path, claim_output
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import JsonLinesProgress, make_progress

NAME = "denoise"
HELP = (
    "Denoise a CT volume (DICOM folder/file, NRRD, NIfTI, MHA) with a trained IPv2 model; "
    "writes NRRD/NIfTI/MHA, or a derived DICOM series (--dicom) and sends it to a PACS (--send)."
)


def _series_number(text: str) -> int:
    value = positive_int(text)
    if value < 300:
        raise argparse.ArgumentTypeError(f"derived series use numbers >= 300, got {value}")
    return value


def add_dicom_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the derived DICOM series (shared with ``serve``)."""
    group = parser.add_argument_group("derived DICOM series")
    group.add_argument(
        "--series-number",
        type=_series_number,
        metavar="N",
        help="SeriesNumber, >= 300 (default: 3NN followed by six digits of the time, NN the source's number mod 100: each run differs)",
    )
    group.add_argument(
        "--series-description",
        metavar="TEXT",
        help='SeriesDescription (default: the source\'s plus "IPv2 denoised (MODEL)"; always says "denoised")',
    )
    group.add_argument(
        "--patient-name", metavar="NAME", help="non-DICOM input only: PatientName (default: generated)"
    )
    group.add_argument(
        "--patient-id", metavar="ID", help="non-DICOM input only: PatientID (default: generated)"
    )
    group.add_argument(
        "--study-uid",
        metavar="UID",
        help="non-DICOM input only: StudyInstanceUID to join (default: a new study)",
    )
    group.add_argument("--study-description", metavar="TEXT", help="non-DICOM input only: StudyDescription")


def series_options(args: argparse.Namespace):
    """:class:`DerivedSeriesOptions` from the command line (the pipeline adds model and warnings)."""
    from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions  # lazy: pydicom, not at CLI start-up

    return DerivedSeriesOptions(
        series_number=args.series_number,
        series_description=args.series_description,
        patient_name=args.patient_name,
        patient_id=args.patient_id,
        study_instance_uid=args.study_uid,
        study_description=args.study_description,
    )


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapt [--adapt-seconds S] [--adapt-steps N]``: scan-adaptive fine-tuning before denoising
    (training/adapt.py)."""
    group = parser.add_argument_group("scan-adaptive fine-tuning")
    group.add_argument(
        "--adapt",
        action="store_true",
        help="first fine-tune a copy of the model on this scan alone (recorrupted pairs; no normal-dose "
        "scan needed), then denoise with it; the shipped weights are not changed",
    )
    group.add_argument(
        "--adapt-seconds",
        type=positive_seconds,
        metavar="S",
        help=f"with --adapt: wall-clock cap of the fine-tuning (default: {ADAPT_SECONDS:.0f} s; with "
        f"--adapt-steps alone {ADAPT_STEPS_SECONDS_CAP:.0f} s)",
    )
    group.add_argument(
        "--adapt-steps",
        type=positive_int,
        metavar="N",
        help="with --adapt: optimiser steps (default: the few dozen of docs/training.md; more can "
        "over-smooth a scan whose noise texture the model does not know). A step count gives the same "
        "output on a busy or an idle machine",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="IN", help="DICOM folder or file, NRRD, NIfTI (.nii/.nii.gz) or MHA/MHD"
    )
    parser.add_argument(
        "output",
        metavar="OUT",
        help="output volume: .nrrd, .nii, .nii.gz or .mha; with --dicom a new folder (written atomically)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--slab", type=positive_int, metavar="N", help="slices per slab (default: from free memory)"
    )
    add_reading_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it already exists (with --dicom: a folder of *.dcm files only)",
    )
    parser.add_argument(
        "--dicom", action="store_true", help="write OUT as a derived DICOM CT series (one file per slice)"
    )
    parser.add_argument(
        "--send",
        metavar="DEST",
        help="with --dicom: then store the series on HOST:PORT:AET (or HOST:PORT --aet AET) or a DICOMweb URL",
    )
    add_dicom_arguments(parser)
    add_peer_arguments(parser)
    add_adapt_arguments(parser)
    parser.add_argument(
        "--json-progress",
        action="store_true",
        help="print JSON lines: {'device': ...}, {'progress', 'eta_s', 'message'} ..., {'result', 'seconds'}",
    )


def run(args: argparse.Namespace) -> int:
    """``ipv2-denoise denoise``: check every option and the output first, then read, denoise, write."""
    start = time.monotonic()
    for given, flag in ((args.adapt_seconds, "--adapt-seconds"), (args.adapt_steps, "--adapt-steps")):
        if given is not None and not args.adapt:
            raise UserError(f"{flag} needs --adapt")
    if args.dicom:
        _check_dicom_output(args)
    else:
        _check_volume_output(args)
    options = DenoiseOptions.from_args(args)
    options.reference()  # an unknown --model fails before any work
    _announce_device(options, json_progress=args.json_progress)
    progress = make_progress(args.json_progress, desc="denoise", percent=True)

    def warn(message: str) -> None:
        if args.json_progress:
            progress.emit(warning=message)
        else:
            progress.write(f"warning: {message}")

    pipeline = DenoisePipeline(options, progress=progress, warn=warn)
    with claim_output(args.output):  # a second run to the same OUT fails now, not after the work
        try:
            outcome, files = _denoise_and_write(pipeline, args, progress)
        finally:
            progress.close()
    if args.dicom and args.send:
        _send_written(files, args, progress)
    seconds = round(time.monotonic() - start, 3)
    if args.json_progress:
        progress.emit(result=str(args.output), seconds=seconds)
    else:
        print(f"wrote {args.output} with {outcome.model_name} ({seconds:.1f} s)", file=sys.stderr)
    return 0


def _check_dicom_output(args: argparse.Namespace) -> None:
    """``--dicom``: OUT is a usable folder (a replaceable derived series with --overwrite), and a
    malformed --send destination fails before any work."""
    from IPv2DenoiseLib.io.dicom_net import parse_destination  # lazy: pydicom & co. load on use

    check_output_path(args.output, inputs=[args.input], folder=True, overwrite=args.overwrite)
    if args.overwrite and Path(args.output).exists():
        from IPv2DenoiseLib.io.dicom_export import check_replaceable_series  # lazy: pydicom

        check_replaceable_series(args.output)
    if args.send:
        parse_destination(args.send, args.aet)


def _check_volume_output(args: argparse.Namespace) -> None:
    """A volume OUT: a supported file format, no DICOM-only option, and a writable path."""
    used = [
        o
        for o in ("send", "series_number", "series_description", "patient_name", "patient_id")
        if getattr(args, o)
    ]
    if used:
        raise UserError(f"--{used[0].replace('_', '-')} needs --dicom")
    check_volume_output(args.output, source=args.input, overwrite=args.overwrite, other=" (or --dicom)")


def _announce_device(options: DenoiseOptions, *, json_progress: bool) -> None:
    """Say which device runs the network; "--device cuda" without a GPU fails here, before any work."""
    from IPv2DenoiseLib.core.device import describe_device, resolve_device  # lazy: torch

    where = describe_device(resolve_device(options.device))
    if json_progress:
        JsonLinesProgress().emit(device=where)
    else:  # before the bar exists, so the line never lands on its first frame
        print(f"running on: {where}", file=sys.stderr, flush=True)


def _denoise_and_write(
    pipeline: DenoisePipeline, args: argparse.Namespace, progress
) -> tuple[DenoiseOutcome, list[Path] | None]:
    """Read IN, denoise it and write OUT (volume file or derived series); returns the outcome and,
    for a series, its files."""
    volume = pipeline.read(
        args.input, series_uid=args.series_uid, force=args.force, resample_gaps=args.resample_gaps
    )
    if args.json_progress:
        progress.emit(model=pipeline.reference.name)
    outcome = pipeline.denoise(volume)
    if args.json_progress and outcome.adapted:
        progress.emit(adapted=outcome.adapted)
    if args.json_progress:  # the weights that made the pixels, for a front end to keep with its result
        progress.emit(provenance=outcome.provenance.to_record())
    if not args.dicom:
        pipeline.write_volume(outcome, args.output)
        return outcome, None
    files = pipeline.export_dicom(
        outcome, args.output, series_options=series_options(args), replace_existing=args.overwrite
    )
    return outcome, files


def _send_written(files, args: argparse.Namespace, progress) -> None:
    """``--send``: store the written series; on failure say what was written and how to finish."""
    try:
        # the series stays in OUT whatever happens; with --json-progress stdout carries JSON only
        report = send_and_report(files, args.send, args, lines=sys.stderr if args.json_progress else None)
    except UserError as exc:
        raise UserError(
            f"{exc} — the derived series is complete in {args.output} ({len(files)} files); store it later "
            f"with: ipv2-denoise send {args.output} --to {args.send}"
            + (f" --aet {args.aet}" if args.aet else "")
        ) from None
    if args.json_progress:
        progress.emit(sent=len(report.results), destination=report.destination)
