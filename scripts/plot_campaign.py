"""Plot a CPU training campaign from model cards: synthetic validation at the end of every leg.

    python scripts/plot_campaign.py Resources/Models/unet_nm_ipv2.json \
        Resources/Models/unet_nm_quality_ipv2.json --out docs/figures/campaign.png

Each card's ``legs`` (written by ``train``, copied forward by ``--init``) gives every leg's wall
time and final validation, so the campaign's curve survives restarts and machines. A card that
shares its first legs with another (the quality tier, widened from the fast one) branches from
them. The figure answers one question before anyone says "needs a GPU": is the campaign flat yet?
It also prints the table it plots. The plotting lives in ``IPv2DenoiseLib.training.campaign``, which
``train --legs`` calls after every leg.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from IPv2DenoiseLib.training.campaign import campaign_table, plot_campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cards", nargs="+", type=Path, help="model cards (.json beside the weights)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    cards: list[tuple[str, dict]] = []
    for path in args.cards:
        card = json.loads(path.read_text(encoding="utf-8"))
        name = card.get("name", path.stem)
        if name in {n for n, _ in cards}:  # two legs of one model: tell them apart by folder
            name = f"{name} ({path.parent.name})"
        cards.append((name, card))
    print("\n".join(campaign_table(cards)))
    plot_campaign(cards, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
