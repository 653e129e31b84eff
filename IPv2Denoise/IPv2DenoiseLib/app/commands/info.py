"""``ipv2-denoise info PATH``: what a CT volume holds — size, spacing, HU range, body/lung/air volumes, ROI stats."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import numpy as np

from IPv2DenoiseLib.app.arguments import add_reading_arguments
from IPv2DenoiseLib.core.text import printable_line

NAME = "info"
HELP = "Describe a CT volume: dimensions, spacing, HU range, body/lung/background volumes (mL) and ROI stats."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="DICOM folder or file, NRRD, NIfTI (.nii/.nii.gz) or MHA/MHD")
    add_reading_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(volume) -> dict:
    """The facts ``info`` prints, as a JSON-ready dict."""
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.imaging.masks import body_mask, standard_rois, truncation_warning
    from IPv2DenoiseLib.imaging.metrics import roi_stats

    hu = volume.array
    body = body_mask(hu)
    warnings = list(volume.meta.get("warnings", []))
    truncated = truncation_warning(hu, body=body, spacing=volume.spacing)
    if truncated:
        warnings.append(truncated)
    regions = standard_rois(hu, spacing=volume.spacing, body=body)
    lungs, background = regions.pop("lungs_whole"), regions["background"]
    ml = volume.voxel_volume_ml
    rois = {}
    for name, mask in regions.items():
        stats = roi_stats(hu, mask)
        rois[name] = {
            k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(stats).items()
        }
    hidden = {"dicom_files", "SOPInstanceUIDs", "dicom_series_files", "warnings"}
    meta = {k: v for k, v in volume.meta.items() if k not in hidden}
    return {
        "shape_zyx": list(volume.shape),
        "spacing_xyz_mm": list(volume.spacing),
        "origin_xyz_mm": list(volume.origin),
        "direction": list(volume.direction),
        "hu_min": float(hu.min()),
        "hu_max": float(hu.max()),
        "hu_mean": float(hu.mean()),
        "volume_ml": {
            "body": float(body.sum() * ml),
            "lungs": float(lungs.sum() * ml),
            "background": float(background.sum() * ml),
        },
        "roi_stats_hu": rois,
        "meta": meta,
        "warnings": warnings,
    }


def _text(facts: dict) -> str:
    z, y, x = facts["shape_zyx"]
    sx, sy, sz = facts["spacing_xyz_mm"]
    lines = [
        f"dimensions   {x} x {y} x {z} (x, y, z)",
        f"spacing      {sx:.3f} x {sy:.3f} x {sz:.3f} mm",
        f"origin       ({', '.join(f'{o:.1f}' for o in facts['origin_xyz_mm'])}) mm (LPS)",
        f"HU range     {facts['hu_min']:.0f} .. {facts['hu_max']:.0f} (mean {facts['hu_mean']:.0f})",
        "volumes      " + ", ".join(f"{k} {v:.1f} mL" for k, v in facts["volume_ml"].items()),
        "ROI stats (HU)   mean     std      p5     p95    voxels",
    ]
    for name, s in facts["roi_stats_hu"].items():
        if not s["count"]:
            lines.append(f"  {name:<12} (empty)")
            continue
        lines.append(
            f"  {name:<12} {s['mean']:7.1f} {s['std']:7.1f} {s['p5']:7.1f} {s['p95']:7.1f} {s['count']:9d}"
        )
    meta = facts["meta"]
    for key in (
        "series_choice",
        "PatientID",
        "StudyInstanceUID",
        "SeriesDescription",
        "kVp",
        "mAs",
        "CTDIvol",
    ):
        if key in meta:  # a tag value: no escape sequence or line break reaches the terminal
            lines.append(f"{key:<12} {printable_line(meta[key], limit=120)}")
    lines.extend(f"warning      {printable_line(w, limit=10_000)}" for w in facts["warnings"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.io.volumes import read_volume

    volume = read_volume(
        args.path, series_uid=args.series_uid, force=args.force, resample_gaps=args.resample_gaps
    )
    facts = describe(volume)
    print(json.dumps(facts, indent=2, default=str) if args.json else _text(facts))
    return 0
