"""``ipv2-denoise demo``: the main job on the bundled sample — denoised volume, figure, ROI metrics."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from IPv2DenoiseLib.app.arguments import add_model_arguments
from IPv2DenoiseLib.app.pipeline import DenoiseOptions, DenoisePipeline
from IPv2DenoiseLib.core.atomic import atomic_dir, check_output_path, claim_output
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import TqdmProgress, make_progress
from IPv2DenoiseLib.core.resources import resources_dir

NAME = "demo"
HELP = (
    "Denoise the bundled sample ULDCT with the bundled default model; write the denoised volume, a "
    "before/after figure and the ROI metrics (CSV + Markdown)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="demo-output",
        help="output folder: new or empty (default: %(default)s); written completely or not at all",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo output in --out")
    parser.add_argument("--input", default=None, help="a CT volume instead of the bundled sample ULDCT")
    parser.add_argument(
        "--reference",
        default=None,
        help="a normal-dose scan of the same patient to show beside (default: the bundled sample NDCT)",
    )
    add_model_arguments(parser)
    parser.add_argument("--json-progress", action="store_true", help="JSON-lines progress on stdout")


def sample_uldct() -> Path:
    """The bundled sample ULDCT volume (``Resources/SampleData/*uldct*.nrrd``)."""
    folder = resources_dir() / "SampleData"
    found = sorted(p for p in folder.glob("*uldct*.nrrd") if "clean" not in p.name)
    if not found:
        raise UserError(f"{folder}: no bundled sample ULDCT (*uldct*.nrrd) found")
    return found[0]


#: What ``demo`` writes into ``--out``; ``--overwrite`` replaces only a folder holding nothing else.
DEMO_FILES = frozenset({"denoised.nrrd", "metrics.csv", "metrics.md", "before_after.png"})


def check_demo_output(out: Path, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Before any work: ``--out`` is new or empty, or (``--overwrite``) an earlier demo output that
    holds none of ``inputs`` (``--overwrite`` must never replace the scan being read)."""
    check_output_path(out, inputs=inputs, folder=True, overwrite=overwrite, what="--out")
    if out.is_dir():
        strangers = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES)
        if strangers:
            raise UserError(
                f"--out {out} holds {strangers[0]!r}, which the demo did not write; --overwrite replaces "
                "only an earlier demo output, choose a new folder"
            )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.reference and not Path(args.reference).exists():
        raise UserError(f"--reference {args.reference} does not exist")
    inputs = tuple(str(p) for p in (args.input, args.reference) if p)
    check_demo_output(out, args.overwrite, inputs)  # before any work
    with claim_output(out, what="--out"), atomic_dir(out, replace=True) as staging:
        return write_demo(args, staging, out)


def write_demo(args: argparse.Namespace, out: Path, final: Path) -> int:
    """Denoise the sample and write the volume, metrics and figure into ``out`` (renamed to ``final``)."""
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.app.figures import comparison_figure, pick_slice
    from IPv2DenoiseLib.imaging.masks import lung_mask
    from IPv2DenoiseLib.imaging.metrics import scan_comparison_table
    from IPv2DenoiseLib.io.volumes import read_volume

    source = Path(args.input) if args.input else sample_uldct()
    volume = read_volume(source)
    reference_path = args.reference or (
        None if args.input else source.with_name(source.name.replace("uldct", "ndct"))
    )
    reference = read_volume(reference_path) if reference_path and Path(reference_path).exists() else None
    if reference is not None and reference.shape != volume.shape:
        raise UserError(f"--reference shape {reference.shape} differs from the input's {volume.shape}")
    progress = make_progress(args.json_progress, desc="denoise", percent=True)
    pipeline = DenoisePipeline(
        DenoiseOptions.from_args(args),
        progress=progress,
        warn=lambda line: print(f"warning: {line}", file=sys.stderr),
    )
    began = time.monotonic()
    try:
        outcome = pipeline.denoise(volume)
        volume_path = pipeline.write_volume(outcome, out / "denoised.nrrd")
    finally:
        if isinstance(progress, TqdmProgress):
            progress.close()
    seconds = time.monotonic() - began
    denoised = outcome.denoised
    denoiser_name = outcome.model_name
    table = scan_comparison_table(volume.array, denoised.array, spacing=volume.spacing)
    table.to_csv(out / "metrics.csv")
    (out / "metrics.md").write_text(
        f"# ROI metrics: {source.name} denoised with {denoiser_name}\n\n" + table.to_markdown() + "\n"
    )
    shown = [("ULDCT (input)", volume.array), ("denoised", denoised.array)]
    if reference is not None:
        shown.append(("NDCT (other breath hold)", reference.array))
    figure = comparison_figure(
        shown,
        out / "before_after.png",
        slice_index=pick_slice(volume.array, lung_mask(volume.array, spacing=volume.spacing)),
        spacing=volume.spacing,
        difference=("ULDCT (input)", "denoised"),
        title=f"{source.name} — {denoiser_name}",
    )
    voxels = volume.array.size
    print(
        f"denoised {volume.shape[2]}x{volume.shape[1]}x{volume.shape[0]} in {seconds:.1f} s "
        f"({voxels / seconds / 1e6:.2f} Mvoxel/s) with {denoiser_name}"
    )
    print(table.to_markdown())
    print(f"volume:  {final / volume_path.name}")
    print(f"figure:  {final / Path(figure).name}")
    print(f"metrics: {final / 'metrics.csv'} and {final / 'metrics.md'}")
    return 0
