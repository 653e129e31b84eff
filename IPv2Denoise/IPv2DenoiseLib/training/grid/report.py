"""What the grid measured (:class:`GridResult`) as ``results.json`` and Markdown tables and claims."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.training.grid.config import GRID_STRATEGIES, REFERENCES


@dataclass
class GridResult:
    """Everything the grid measured."""

    config: dict
    seeds: list[int]
    records: list[dict]  # one per method × seed × test case × reference
    summary: list[dict]  # one per method × reference: metric → (mean, sd) over seeds
    claims: list[dict]
    seconds: float
    figure: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _fmt(stat: tuple[float, float], n_seeds: int, digits: int) -> str:
    mean, sd = stat
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n_seeds > 1 else f"{mean:.{digits}f}"


TABLE_COLUMNS = {
    "quality": [
        ("psnr", "PSNR body+lungs", 2),
        ("ssim", "SSIM body+lungs", 3),
        ("lungs_psnr", "PSNR lungs", 2),
        ("lungs_ssim", "SSIM lungs", 3),
        ("body_psnr", "PSNR body", 2),
        ("background_psnr", "PSNR background", 2),
    ],
    "noise": [
        ("background_noise", "noise bg (HU)", 1),
        ("lungs_noise", "noise lungs (HU)", 1),
        ("body_noise", "noise body (HU)", 1),
        ("soft_tissue_bias", "bias soft tissue (HU)", 1),
        ("lungs_bias", "bias lungs (HU)", 1),
        ("nps_mean_freq", "NPS f̄ (1/mm)", 3),
        ("laa950_error", "LAA-950 error (pp)", 2),
    ],
}


def markdown_tables(result: GridResult) -> str:
    """Markdown: per reference, a quality table and a noise/texture table (mean ± SD over seeds)."""
    lines = []
    order = {"input": 0, "classical": 1, **{s: 2 + i for i, s in enumerate(GRID_STRATEGIES)}}
    rows = sorted(result.summary, key=lambda s: (order.get(s["strategy"], 99), s["strategy"], s["model"]))
    ref_text = {
        "truth": "against the noise-free truth (clean anatomy of the ULDCT)",
        "label": "against the IPv2 refined test label (paper protocol: NDCT in body and background, WD(ULDCT) in lungs)",
    }
    for reference in REFERENCES:
        sel = [s for s in rows if s["reference"] == reference]
        if not sel:
            continue
        for kind, columns in TABLE_COLUMNS.items():
            lines.append(f"**{kind.capitalize()} {ref_text[reference]}**\n")
            lines.append("| strategy | model | " + " | ".join(c[1] for c in columns) + " |")
            lines.append("|---|---|" + "---|" * len(columns))
            for s in sel:
                cells = [_fmt(s["metrics"].get(k, (math.nan, 0.0)), s["n_seeds"], d) for k, _, d in columns]
                lines.append(f"| {s['strategy']} | {s['model']} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def claims_markdown(result: GridResult) -> str:
    """One row per claim × reference: how many models it holds for, and the deltas."""
    lines = ["| claim | reference | holds for | Δ per model (mean; ± seed SDs) |", "|---|---|---|---|"]
    seen: dict[tuple[str, str], list[dict]] = {}
    for c in result.claims:
        seen.setdefault((c["claim"], c["reference"]), []).append(c)
    for (claim, reference), items in seen.items():
        held = sum(1 for c in items if c["holds"])
        clear = sum(1 for c in items if c["clear"])
        deltas = "; ".join(
            f"{c['model']} {c['delta']:+.2f}"
            + (f" (±{c['sd_a']:.2f}/{c['sd_b']:.2f})" if len(result.seeds) > 1 else "")
            for c in items
        )
        note = f"{held}/{len(items)}" + (f" ({clear} beyond the seed SDs)" if len(result.seeds) > 1 else "")
        lines.append(f"| {claim} | {reference} | {note} | {deltas} |")
    return "\n".join(lines)


def write_results(result: GridResult, out: Path) -> tuple[Path, Path]:
    """``out/results.json`` and ``out/results.md`` (tables + claims)."""
    js = out / "results.json"
    tmp = js.with_suffix(".partial")
    tmp.write_text(json.dumps(result.to_json(), indent=1, allow_nan=True), encoding="utf-8")
    os.replace(tmp, js)
    md = out / "results.md"
    text = (
        f"# Evaluation grid ({result.config['name']}), seeds {result.seeds}, {result.seconds:.0f} s\n\n"
        + markdown_tables(result)
        + "\n**Claims**\n\n"
        + claims_markdown(result)
        + "\n"
    )
    md.write_text(text, encoding="utf-8")
    return js, md
