"""Plot a CPU training campaign from model cards: synthetic validation at the end of every leg.

    python scripts/plot_campaign.py Resources/Models/unet_nm_ipv2.json \
        Resources/Models/unet_nm_quality_ipv2.json --out docs/figures/campaign.png

Each card's ``legs`` (written by ``train``, copied forward by ``--init``) gives every leg's wall
time and final validation, so the campaign's curve survives restarts and machines. A card that
shares its first legs with another (the quality tier, widened from the fast one) branches from
them. The figure answers one question before anyone says "needs a GPU": is the campaign flat yet?
It also prints the table it plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: The validation keys plotted: the cases' own 2 % scans, and the fixed scanner protocol.
SERIES = (("psnr_label", "own 2 % scans"), ("scanner_psnr_label", "scanner protocol"))


def leg_points(card: dict) -> list[tuple[float, dict]]:
    """(cumulative wall hours at the leg's end, that leg's validation) for every leg of a card."""
    points, hours = [], 0.0
    for leg in card.get("legs", []):
        hours += float(leg.get("wall_seconds", 0.0)) / 3600.0
        points.append((hours, leg.get("validation", {})))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cards", nargs="+", type=Path, help="model cards (.json beside the weights)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, len(SERIES))
    print("| model | leg | hours (cumulative) | own (dB) | scanner (dB) |")
    print("|---|---:|---:|---:|---:|")
    used: set[str] = set()
    for path in args.cards:
        card = json.loads(path.read_text(encoding="utf-8"))
        points = leg_points(card)
        name = card.get("name", path.stem)
        if name in used:  # two legs of one model: tell them apart by folder
            name = f"{name} ({path.parent.name})"
        used.add(name)
        for number, (hours, val) in enumerate(points, start=1):
            cells = " | ".join(f"{val.get(key, float('nan')):.2f}" for key, _ in SERIES)
            print(f"| {name} | {number} | {hours:.1f} | {cells} |")
        for ax, (key, title) in zip(axes, SERIES):
            ax.plot(
                [h for h, _ in points], [v.get(key, float("nan")) for _, v in points], marker="o", label=name
            )
            ax.set(xlabel="CPU hours (one core, cumulative)", ylabel="PSNR vs truth (dB)", title=title)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("training campaign: synthetic validation at the end of each leg")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
