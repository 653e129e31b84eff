"""``ipv2-denoise batch INPUT OUT``: denoise an archive, resumable, on one machine or a Ray cluster."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from IPv2DenoiseLib.app.arguments import add_model_arguments, non_negative_int, positive_float, positive_int
from IPv2DenoiseLib.app.batch.lock import batch_lock
from IPv2DenoiseLib.app.batch.records import run_identity, summary_stem, totals, write_summary
from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.core.atomic import clean_stale_staging_tree, make_output_folder, resolve_path
from IPv2DenoiseLib.core.errors import ExitCode, UserError
from IPv2DenoiseLib.core.paths import safe_component
from IPv2DenoiseLib.core.progress import JsonLinesProgress, make_progress
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength

NAME = "batch"
HELP = (
    "Denoise every study of a folder tree or CSV manifest into a mirrored output tree; resumable, "
    "failures isolated, on this machine or a Ray cluster."
)
EPILOG = """\
exit status: 0 every case is done (now or by an earlier run); 1 the run finished but some cases
failed (see the summary's error column); 2 bad arguments or paths, or OUT in use by another run
(nothing processed), or OUT stopped taking writes (full disk, quota, read-only: the run stops at
the first case that cannot be written; summary written, rerun to continue); 130 interrupted
(finished cases are kept; rerun to continue).

one run per OUT at a time (a lock in OUT/.ipv2-batch/locks/); the shards K/N of one job may share
OUT, each shard once.

outputs: OUT/<case>.nrrd (or the derived DICOM series OUT/<case>/ with --dicom), a done record per
case in OUT/.ipv2-batch/records/, and OUT/batch-summary.csv + .json (batch-summary.shard-K-of-N.*
with --shard; combine them with `ipv2-denoise batch-summary OUT`).
"""


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (``--gpus-per-worker 0`` runs the workers on CPUs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="folder tree (each DICOM series and each NRRD/NIfTI/MHA file is a case), or a CSV manifest "
        "with a 'path' and/or 'series_uid' column (optional 'case' column names the output)",
    )
    parser.add_argument("output", metavar="OUT", help="output folder; mirrors the input tree")
    add_model_arguments(parser)
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="write each case as a derived DICOM series folder instead of NRRD",
    )
    parser.add_argument(
        "--slab", type=positive_int, metavar="N", help="slices per slab (default: from memory)"
    )
    parser.add_argument(
        "--resample-gaps",
        action="store_true",
        help="interpolate DICOM series with missing, unreadable or unevenly spaced slices onto an even "
        "grid, with a warning (default: such a case fails, naming the file or gap)",
    )
    parser.add_argument(
        "--search-root",
        metavar="DIR",
        help="where manifest rows that give only a series_uid are looked up (default: the manifest's folder)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="process only shard K of N (0 <= K < N): the cases whose name hashes to K, about 1/N of them; "
        "for SLURM arrays ($SLURM_ARRAY_TASK_ID) and Kubernetes indexed Jobs ($JOB_COMPLETION_INDEX)",
    )
    parser.add_argument(
        "--prefetch",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="local engine: studies read ahead while the network runs (0: one step after another)",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="run here, or on Ray actors (extra [cluster])",
    )
    parser.add_argument(
        "--address",
        help="ray: address of a running cluster (e.g. ray://head:10001 or auto); default: start one here",
    )
    parser.add_argument("--workers", type=positive_int, metavar="N", help="ray: at most N worker actors")
    parser.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=2.0,
        metavar="N",
        help="ray: CPUs per worker actor (and its torch threads) (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=non_negative_float,
        metavar="G",
        help="ray: GPUs per worker (default: 1 when the cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--retries",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="ray: resubmit a case whose worker died up to N times (default: %(default)s)",
    )
    parser.add_argument(
        "--json-progress",
        action="store_true",
        help="print JSON lines: {'cases': n, ...}, {'case', 'status', ...} per case, progress with eta_s, {'summary', 'totals'}",
    )


def check_paths(input_path: Path, out_root: Path) -> None:
    """Refuse a missing input or an output that would touch the input, then make OUT (one line, exit 2)."""
    if not input_path.exists():
        raise UserError(f"INPUT {input_path} does not exist")
    out, source = resolve_path(out_root, "OUT"), resolve_path(input_path, "INPUT")
    # A manifest's folder is the root its paths, and so the outputs, are relative to.
    root = source if source.is_dir() else source.parent
    if out == root or (source.is_dir() and out.is_relative_to(root)):
        raise UserError(
            f"OUT {out_root} is the input folder or lies inside it; the input is never modified, "
            "choose an output folder outside it"
        )
    make_output_folder(out_root, what="OUT")


def find_cases(args: argparse.Namespace, input_path: Path, out_root: Path) -> list:
    """Every case INPUT names (tree, manifest or one file), all shards' (sharding is the caller's)."""
    # lazy: the CLI imports every command to build --help; SimpleITK & co. load on use
    from IPv2DenoiseLib.app.batch.cases import (
        discover_tree,
        read_manifest,
        refuse_outputs_over_inputs,
        volume_case,
    )
    from IPv2DenoiseLib.io.volumes import image_suffix

    if input_path.is_dir():
        cases = discover_tree(input_path, exclude=out_root)
    elif input_path.suffix.lower() == ".csv":
        cases, _ = read_manifest(input_path, search_root=args.search_root)
    elif image_suffix(input_path):
        cases = [volume_case(safe_component(input_path.name[: -len(image_suffix(input_path))]), input_path)]
    else:
        raise UserError(f"INPUT {input_path}: expected a folder, a .csv manifest or a volume file")
    if not cases:
        raise UserError(f"INPUT {input_path}: no DICOM series or NRRD/NIfTI/MHA volumes found")
    return refuse_outputs_over_inputs(cases, out_root, dicom=args.dicom)  # before sharding: all inputs count


def identity_settings(args: argparse.Namespace, input_path: Path) -> dict:
    """What shards of one run must share besides their case list (see ``records.run_identity``):
    the input, the model and every option that changes the outputs."""
    manifest = input_path.suffix.lower() == ".csv" and not input_path.is_dir()
    return {
        "input": str(resolve_path(input_path, "INPUT")),
        "search_root": (
            str(resolve_path(Path(args.search_root), "--search-root"))
            if manifest and args.search_root
            else None
        ),
        "model": str(resolve_path(Path(args.weights), "--weights")) if args.weights else args.model,
        "format": "dicom" if args.dicom else "nrrd",
        "remove_background": args.remove_background,
        "ensemble": args.ensemble,
        "refine": args.refine,
        "resample_gaps": args.resample_gaps,
        # only when set, so shards started before --strength existed still combine with later ones
        **({"strength": args.strength} if args.strength != DEFAULT_STRENGTH else {}),
    }


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; SimpleITK, torch & co. load on use
    from IPv2DenoiseLib.app.batch.cases import parse_shard

    start = time.monotonic()
    input_path, out_root = Path(args.input), Path(args.output)
    shard = parse_shard(args.shard) if args.shard else None
    options = DenoiseOptions.from_args(args)
    reference = options.reference()  # an unknown model or tier fails before OUT is touched
    if options.strength != DEFAULT_STRENGTH:  # so does a strength the model cannot take (Ray workers too)
        # lazy: torch; the model card (or the weights' header) says it, no network is loaded here
        from IPv2DenoiseLib.denoiser.weights import takes_noise_map

        check_strength(
            options.strength, model=reference.name, takes_noise_map=takes_noise_map(reference.weights)
        )
    check_paths(input_path, out_root)
    with batch_lock(out_root, shard):  # held until the summary is written
        return _locked_run(args, input_path, out_root, start)


def _locked_run(args: argparse.Namespace, input_path: Path, out_root: Path, start: float) -> int:
    # lazy: see run()
    from IPv2DenoiseLib.app.batch.cases import parse_shard, shard_cases
    from IPv2DenoiseLib.app.batch.pipeline import BatchSettings

    shard = parse_shard(args.shard) if args.shard else None
    all_cases = find_cases(args, input_path, out_root)
    identity = run_identity((c.case_id for c in all_cases), identity_settings(args, input_path))
    cases = shard_cases(all_cases, *shard) if shard is not None else all_cases
    options = DenoiseOptions.from_args(args)
    if options.weights:  # workers may run elsewhere (Ray): an absolute path
        options = replace(options, weights=str(Path(options.weights).resolve()))
    settings = BatchSettings(
        out_root=str(resolve_path(out_root, "OUT")),
        options=options,
        dicom=args.dicom,
        run_id=uuid.uuid4().hex,
        resample_gaps=args.resample_gaps,
    )
    with _stdout_for_json_only(args.json_progress and args.engine == "ray") as json_stream:
        return _run(args, input_path, out_root, cases, identity, shard, settings, start, json_stream)


@contextmanager
def _stdout_for_json_only(enabled: bool) -> Iterator[TextIO | None]:
    """With ``--json-progress``, keep stdout a clean JSON-lines channel: Ray's own messages
    (e.g. "(raylet) A worker died ...") are printed to file descriptor 1, so point that at stderr
    and give the JSON lines a private duplicate of the real stdout."""
    if not enabled:
        yield None
        return
    sys.stdout.flush()
    saved = os.dup(1)
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield stream
    finally:
        stream.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _event_reporter(progress, json_lines: bool, where: str) -> Callable[..., None]:
    """``event(**record)``: a JSON line with --json-progress; otherwise a text line above the bar for
    what a person should see."""

    def event(**record) -> None:
        if json_lines:
            progress.emit(**record)
        elif "retry" in record:
            progress.write(f"retrying {record['retry']} (attempt {record['attempt']}): {record['reason']}")
        elif "worker_index" in record:
            again = "restarted " if record.get("restarted") else ""
            progress.write(
                f"{again}worker {record['worker_index']}: {record['worker']} on {record['device']}"
            )
        elif "device" in record:
            progress.write(f"running on: {record['device']}; model {record['model']}")
        elif "cases" in record:
            progress.write(f"{where}{record['cases']} of {record['found']} cases; engine {record['engine']}")

    return event


def _run(args, input_path, out_root, cases, identity, shard, settings, start, json_stream) -> int:
    from IPv2DenoiseLib.app.batch.pipeline import OutputUnwritable  # lazy: see run()

    found = identity["cases_found"]
    if json_stream is not None:
        progress = JsonLinesProgress(json_stream)
    else:
        progress = make_progress(args.json_progress, desc="batch", unit="case")
    json_lines = isinstance(progress, JsonLinesProgress)

    where = f"shard {shard[0]}/{shard[1]}: " if shard else ""
    event = _event_reporter(progress, json_lines, where)
    event(cases=len(cases), found=found, engine=args.engine, shard=args.shard, output=str(out_root))
    rows: list[dict] = []
    failed = 0

    def on_row(row: dict) -> None:
        nonlocal failed
        rows.append(row)
        failed += row["status"] == "failed"
        event(
            case=row["case"],
            status=row["status"],
            seconds=row.get("seconds"),
            worker=row.get("worker"),
            error=row.get("error") or None,
        )
        progress(
            len(rows),
            len(cases),
            f"{row['case']}: {row['status']}" + (f" ({failed} failed)" if failed else ""),
        )

    progress(0, len(cases), "starting")
    interrupted = False
    stopped = ""  # why OUT took no more writes, when it stopped the run
    try:
        _run_engine(args, cases, settings, on_row, event, threading.Event())
    except KeyboardInterrupt:
        interrupted = True
    except OutputUnwritable as exc:
        interrupted, stopped = True, str(exc)
    finally:
        progress.close()
        seconds = round(time.monotonic() - start, 3)
        info = _summary_info(
            args,
            input_path,
            out_root,
            cases,
            rows,
            identity,
            seconds=seconds,
            interrupted=interrupted,
            stopped=stopped,
        )
        clean_stale_staging_tree(out_root)  # what workers killed mid-write left behind
        summary, unwritten = _write_run_summary(out_root, rows, info, shard, stopped=stopped)
    counts = totals(rows)
    event(summary=str(summary) if summary else None, totals=counts, seconds=seconds, stopped=stopped or None)
    if stopped:
        where_summary = (
            f"summary {summary}" if summary else f"the summary could not be written either ({unwritten})"
        )
        raise UserError(
            f"{where}stopped: {stopped}; {counts['done']} done, {counts['skipped']} already done, "
            f"{counts['failed']} failed, {len(cases) - len(rows)} not started of {len(cases)} cases; "
            f"{where_summary}; rerun the same command once OUT takes writes again (finished cases are skipped)"
        )
    print(
        f"{where}{counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed"
        f" of {len(cases)} cases in {seconds:.1f} s; summary {summary}",
        file=sys.stderr,
    )
    if interrupted:
        print("interrupted: rerun the same command to finish the remaining cases", file=sys.stderr)
        return ExitCode.CANCELLED
    return ExitCode.SOME_FAILED if counts["failed"] else ExitCode.OK


def _run_engine(args, cases, settings, on_row, event, stop: threading.Event) -> None:
    """Process ``cases`` on the engine ``--engine`` names, reporting each row to ``on_row``."""
    if args.engine == "ray":
        _run_ray(args, cases, settings, on_row, event, stop)
        return
    from IPv2DenoiseLib.app.batch.pipeline import CaseProcessor, run_local  # lazy: see run()

    processor = CaseProcessor(settings)
    event(device=processor.device_name, model=processor.denoiser.name)
    run_local(cases, processor, prefetch=args.prefetch, on_row=on_row, stop=stop)


def _summary_info(
    args, input_path, out_root, cases, rows, identity, *, seconds: float, interrupted: bool, stopped: str
) -> dict:
    """The summary's metadata: the run, how it ended, and what ``batch-summary`` checks (the shard's
    case count, its cases without a row, the run identity)."""
    finished = {row["case"] for row in rows}
    return {
        "input": str(input_path),
        "output": str(out_root),
        "engine": args.engine,
        "model": args.weights or args.model,
        "strength": args.strength,
        "ensemble": args.ensemble,
        "format": "dicom" if args.dicom else "nrrd",
        "shard": args.shard,
        "cases_found": identity["cases_found"],
        "shard_cases": len(cases),
        "seconds": seconds,
        "interrupted": interrupted,
        "stopped": stopped or None,
        "pending": sorted(c.case_id for c in cases if c.case_id not in finished),
        "identity": {k: v for k, v in identity.items() if k != "run_identity"},
        "run_identity": identity["run_identity"],
    }


def _write_run_summary(out_root, rows, info, shard, *, stopped: str) -> tuple[Path | None, str]:
    """Write the summary; (its CSV path, ""). When the run stopped because OUT takes no more
    writes, the summary may not fit either: (None, why) instead of a second error."""
    try:
        return write_summary(out_root, rows, info, stem=summary_stem(shard)), ""
    except (OSError, UserError) as exc:
        if not stopped:
            raise
        return None, " ".join(str(exc).split())


def _run_ray(args, cases, settings, on_row, event, stop) -> None:
    try:
        from IPv2DenoiseLib.app.batch.ray_engine import run_ray  # lazy: ray is the optional [cluster] extra
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise UserError("--engine ray needs Ray: pip install 'ipv2-denoise[cluster]'") from None
    run_ray(
        cases,
        settings,
        address=args.address,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        retries=args.retries,
        on_row=on_row,
        on_event=event,
        stop=stop,
    )
