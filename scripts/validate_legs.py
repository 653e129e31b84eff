"""Validate trained weights side by side on the trainer's validation sets, real volumes one by one.

    python scripts/validate_legs.py Resources/Models/unet_nm_quality_ipv2.safetensors \
        campaign/unet_nm_quality_ipv2_leg13_bf16.safetensors ... \
        --val runs/phantoms/case_004 runs/phantoms/case_005 \
        --val-anatomy runs/corpus/heldout_chest_totalsegmentator.nrrd \
                      runs/corpus/heldout_chest_lidc.nrrd \
        --json runs/legs.json --figure docs/figures/legs_heldout.png

A leg's card holds its own validation and its start's (``validation_start``); this compares any
number of weights at once on the same noisy slices (the trainer's fixed seeds), for legs that were
validated on different sets, or on a volume an earlier leg trained on (``train`` now names that in
the leg's ``validation_real_seen_before``). The first weights are the baseline: every row also
gives its difference to them, their mean over the columns and the lowest, and whether it passes the
project's ship rule (:func:`ship_verdicts`: a mean above the baseline's and no column more than
``--tolerance`` dB below it); of those that pass, the best mean ships. Each real volume is
validated alone, in both noise textures, and a column says which of the weights' legs trained on
it: a "held-out" volume is held out only of weights none of whose legs saw it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.strength import check_strength
from IPv2DenoiseLib.denoiser.weights import load_model
from IPv2DenoiseLib.training.scanner_data import load_anatomy_volumes
from IPv2DenoiseLib.training.trainer import (
    anatomy_validation,
    scanner_validation,
    trained_on_before,
    validate,
)


def validation_columns(
    val: list[str], val_anatomy: list[str], *, slices: int
) -> tuple[dict[str, list], dict[str, str], dict[str, str]]:
    """The validation sets by column name, each real column's volume name as cards log it, and
    each real volume's content digest (a renamed copy of a training volume is starred too, for
    legs that log their volumes' digests)."""
    own, scanner = scanner_validation(val, slices=slices) if val else ([], [])
    columns: dict[str, list] = {"phantoms own": own, "phantoms scanner": scanner}
    volume_of: dict[str, str] = {}
    digests: dict[str, str] = {}
    for volume in load_anatomy_volumes(val_anatomy, option="--val-anatomy"):
        digests[volume.name] = volume.digest
        for texture, cases in anatomy_validation([volume], slices=slices).items():
            column = f"{Path(volume.name).stem} {texture}"
            columns[column], volume_of[column] = cases, volume.name
    return {k: v for k, v in columns.items() if v}, volume_of, digests


def ship_verdicts(rows: dict[str, dict], *, tolerance: float) -> dict[str, dict]:
    """Each non-baseline row's mean and lowest difference to the first row (dB) and whether it
    passes the ship rule: mean > 0 and lowest >= ``-tolerance``. ``best`` marks the passing row
    with the highest mean (the one to ship), if any."""
    names = list(rows)
    base = rows[names[0]]["psnr"]
    verdicts = {}
    for name in names[1:]:
        diffs = [rows[name]["psnr"][column] - value for column, value in base.items()]
        mean, lowest = sum(diffs) / len(diffs), min(diffs)
        verdicts[name] = {"mean": mean, "lowest": lowest, "passes": mean > 0 and lowest >= -tolerance}
    passing = [name for name, v in verdicts.items() if v["passes"]]
    for name in verdicts:
        verdicts[name]["best"] = bool(passing) and name == max(passing, key=lambda n: verdicts[n]["mean"])
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="+", type=Path, help=".safetensors files; the first is the baseline")
    parser.add_argument("--val", nargs="*", default=[], help="synthetic validation case folders")
    parser.add_argument("--val-anatomy", nargs="*", default=[], help="real normal-dose volumes")
    parser.add_argument("--val-slices", type=int, default=8, help="central slices per volume (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="ship rule: no column more than this below (dB, default 0.02)",
    )
    parser.add_argument(
        "--strengths",
        nargs="+",
        type=float,
        default=[1.0],
        help="denoising strengths to validate each weights at (the level map scaled, as denoise"
        " --strength; default 1). With several, each weights' best strength by the mean of the columns"
        " is printed too: the comparison at matched strength, where a leg that only learnt to denoise"
        " more or less strongly gains nothing",
    )
    parser.add_argument("--json", type=Path, help="write the table as JSON")
    parser.add_argument("--figure", type=Path, help="write each weights' difference to the baseline as PNG")
    args = parser.parse_args(argv)
    try:
        if not args.val and not args.val_anatomy:
            raise UserError("give --val and/or --val-anatomy")
        torch.set_num_threads(args.threads)
        columns, volume_of, digests = validation_columns(args.val, args.val_anatomy, slices=args.val_slices)
        for strength in args.strengths:
            check_strength(strength)
        rows, strength_of = validate_weights(args.weights, args.strengths, columns, volume_of, digests)
    except UserError as exc:
        print(f"validate_legs: {exc}", file=sys.stderr)
        return 2
    baseline = next(iter(rows))
    base = rows[baseline]["psnr"]
    verdicts = ship_verdicts(rows, tolerance=args.tolerance)
    print("\n| weights | " + " | ".join(columns) + " | mean | lowest | ships |")
    print("|---|" + "---:|" * (len(columns) + 2) + "---|")
    for name, row in rows.items():
        cells = []
        for column, value in row["psnr"].items():
            star = "*" if volume_of.get(column) in row["trained_on"] else ""
            cells.append(f"{value:.2f}{star}" if name == baseline else f"{value - base[column]:+.2f}{star}")
        if name == baseline:
            cells += ["", "", "baseline"]
        else:
            v = verdicts[name]
            verdict = "**best**" if v["best"] else ("passes" if v["passes"] else "no")
            cells += [f"{v['mean']:+.3f}", f"{v['lowest']:+.2f}", verdict]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "(baseline in dB, the others as differences; * the weights' legs trained on that volume; ships: "
        f"mean above the baseline and no column below -{args.tolerance:g} dB, the best mean of those)"
    )
    matched = best_strengths(rows, strength_of) if len(args.strengths) > 1 else {}
    if matched:
        first = next(iter(matched.values()))["mean"]
        print("\nat matched strength (each weights at its best strength by the mean of the columns):")
        for stem, best in matched.items():
            print(
                f"  {stem}: strength {best['strength']:g}, mean {best['mean']:.3f} dB ({best['mean'] - first:+.3f})"
            )
    if args.json:
        table = {
            "columns": list(columns),
            "rows": rows,
            "tolerance": args.tolerance,
            "verdicts": verdicts,
            "best_strengths": matched,
        }
        args.json.write_text(json.dumps(table, indent=1))
    if args.figure:
        plot_differences(rows, volume_of, args.figure)
    return 0


def validate_weights(
    paths: list[Path],
    strengths: list[float],
    columns: dict[str, list],
    volume_of: dict[str, str],
    digests: dict[str, str],
) -> tuple[dict[str, dict], dict[str, tuple[str, float]]]:
    """Each weights' PSNR per column at each strength (rows by name, "name @S" with several
    strengths), and each row's weights name and strength."""
    rows: dict[str, dict] = {}
    strength_of: dict[str, tuple[str, float]] = {}
    for path in paths:
        model, card = load_model(path)
        seen = trained_on_before(sorted(set(volume_of.values())), card.get("legs") or [], digests)
        # two weights of one name (legs of different runs) are told apart by their folder
        stems = {stem for stem, _ in strength_of.values()}
        stem = path.stem if path.stem not in stems else f"{path.parent.name}/{path.stem}"
        for strength in strengths:
            key = stem if strengths == [1.0] else f"{stem} @{strength:g}"
            psnrs = {
                column: validate(model, cases, torch.device("cpu"), model.in_slices, strength=strength)
                for column, cases in columns.items()
            }
            rows[key] = {
                "psnr": {column: result["psnr_label"] for column, result in psnrs.items()},
                "trained_on": seen,
                "strength": strength,
            }
            strength_of[key] = (stem, strength)
            print(key, {k: round(v, 3) for k, v in rows[key]["psnr"].items()}, flush=True)
    return rows, strength_of


def best_strengths(rows: dict[str, dict], strength_of: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """Each weights' strength with the highest mean PSNR over the columns, and that mean (dB)."""
    best: dict[str, dict] = {}
    for key, row in rows.items():
        stem, strength = strength_of[key]
        mean = sum(row["psnr"].values()) / len(row["psnr"])
        if stem not in best or mean > best[stem]["mean"]:
            best[stem] = {"strength": strength, "mean": mean}
    return best


def plot_differences(rows: dict[str, dict], volume_of: dict[str, str], out: Path) -> None:
    """One group of bars per validation column: each weights' PSNR minus the baseline's; hatched
    where those weights' legs trained on that column's volume."""
    from matplotlib.figure import Figure

    names = list(rows)
    base = rows[names[0]]["psnr"]
    columns = list(base)
    fig = Figure(figsize=(min(14.0, 2.0 + 1.3 * len(columns)), 5.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names) - 1)
    for i, name in enumerate(names[1:]):
        row = rows[name]
        xs = [c + (i - (len(names) - 2) / 2) * width for c in range(len(columns))]
        diffs = [row["psnr"][c] - base[c] for c in columns]
        bars = ax.bar(xs, diffs, width, label=name)
        for bar, column in zip(bars, columns):
            if volume_of.get(column) in row["trained_on"]:
                bar.set_hatch("//")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(columns)), [c.replace("_", "\n").replace(" ", "\n") for c in columns], fontsize=7)
    ax.set_ylabel(f"PSNR − {names[0]} (dB)")
    ax.set_title(
        "validation against the baseline (hatched: that volume was in the weights' training)", fontsize=9
    )
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
