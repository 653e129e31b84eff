"""Plot what each pair of the quality campaign gained on the held-out validation, pair by pair.

    python scripts/plot_campaign_pairs.py --out docs/figures/campaign_pairs.png \
        "1:benchmarks/results/campaign_pairs/validate9.json" \
        "2:benchmarks/results/campaign_pairs/validate10.json,benchmarks/results/campaign_pairs/validate10b.json" ...

Each argument is ``PAIR:FILE[,FILE...]``: the ``scripts/validate_legs.py --json`` results of that
pair's candidates (legs, soups, mixes), each measured against the default of its day. ``FILE#A+B``
keeps only candidates ``A`` and ``B`` of a file that also holds other rows (an earlier pair's
control, the same weights at another ``--strengths`` value). A point is a
candidate's mean difference over the validation columns (dB); a filled point passed the ship rule
(mean above the default, no column more than the tolerance below it). The figure answers "is the
campaign flat yet?" across pairs, where ``plot_campaign.py`` shows the legs inside one card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pair_points(spec: str) -> tuple[str, list[tuple[str, float, float, bool]]]:
    """(pair label, [(candidate, mean, lowest, passes), ...]) from ``PAIR:FILE[#A+B][,FILE...]``."""
    label, _, files = spec.partition(":")
    points = []
    for item in files.split(","):
        name, _, keep = item.partition("#")
        wanted = set(keep.split("+")) if keep else None
        verdicts = json.loads(Path(name).read_text(encoding="utf-8"))["verdicts"]
        if wanted is not None and not wanted <= set(verdicts):
            raise SystemExit(
                f"{name}: no candidate {sorted(wanted - set(verdicts))}; it has {sorted(verdicts)}"
            )
        for candidate, verdict in verdicts.items():
            if wanted is None or candidate in wanted:
                points.append((candidate, verdict["mean"], verdict["lowest"], bool(verdict["passes"])))
    return label, points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="PAIR:FILE[,FILE...] (validate_legs.py --json results)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    print("| pair | candidate | mean (dB) | lowest (dB) | passes |\n|---|---|---:|---:|---|")
    labels = []
    for x, spec in enumerate(args.pairs):
        label, points = pair_points(spec)
        labels.append(label)
        for candidate, mean, lowest, passes in points:
            print(f"| {label} | {candidate} | {mean:+.3f} | {lowest:+.3f} | {'yes' if passes else 'no'} |")
            ax.plot(x, mean, "o", color="tab:green" if passes else "tab:gray", mfc=None if passes else "none")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(args.pairs) - 0.4)
    ax.set_ylabel("validation mean vs the day's default (dB)")
    ax.set_title("quality campaign, pair by pair (filled: passes the ship rule)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
