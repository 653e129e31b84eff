"""What the grid measured (:class:`GridResult`) as ``results.json`` and Markdown tables and claims."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.training.evaluation.config import GRID_STRATEGIES, REFERENCES
from IPv2DenoiseLib.training.evaluation.scoring import CLAIMS, overall_verdict


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
    #: One did-it-train check per strategy × model × seed (:func:`.scoring.training_check`).
    training: list[dict] = field(default_factory=list)
    #: Noise of the grid's ULDCT vs Sim(N) (:func:`.mismatch.noise_mismatch`).
    mismatch: dict = field(default_factory=dict)

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
                model = s["model"]
                if s.get("untrained_seeds"):
                    model += " ⚠ did not train: seed " + ", ".join(str(v) for v in s["untrained_seeds"])
                lines.append(f"| {s['strategy']} | {model} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def claims_markdown(result: GridResult) -> str:
    """One row per claim: the verdict against the truth (primary) and the test label, per-model
    deltas with their seed spreads, and the region it is measured in."""
    lines = [
        "| claim | region | verdict vs truth | Δ vs truth per model (± spread) | verdict vs test label | Δ vs label |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[dict]] = {}
    for c in result.claims:
        by.setdefault((c["claim"], c["reference"]), []).append(c)

    def cells(items: list[dict]) -> tuple[str, str]:
        if not items:
            return "–", "–"
        overall = overall_verdict([c["verdict"] for c in items], [c["untrained"] for c in items])
        deltas = "; ".join(
            f"{c['model']} {c['delta']:+.2f} (±{c['sd_a'] + c['sd_b']:.2f}) {c['verdict']}"
            + (" ⚠ untrained run" if c["untrained"] else "")
            for c in items
        )
        return f"**{overall}**", deltas

    for text, *_ in CLAIMS:
        truth, label = by.get((text, "truth"), []), by.get((text, "label"), [])
        if not truth and not label:
            continue
        region = (truth or label)[0]["region"]
        vt, dt = cells(truth)
        vl, dl = cells(label)
        lines.append(f"| {text} | {region} | {vt} | {dt} | {vl} | {dl} |")
    lines.append(
        "\nVerdict: *holds* / *does not hold* when the difference of the seed means points the claimed "
        "way / the other way by more than the spread (sum of the two seed SDs), for every model "
        "whose runs trained; otherwise *cannot tell* (models disagree, one seed, or no compared run trained)."
    )
    return "\n".join(lines)


def mismatch_markdown(result: GridResult) -> str:
    """The noise of the grid's ULDCT against Sim(N) at the same dose, on the same anatomy."""
    m = result.mismatch
    if not m:
        return ""
    rows = [
        ("sd_soft_tissue", "noise SD soft tissue (HU)", 1),
        ("sd_lungs", "noise SD lungs (HU)", 1),
        ("sd_background", "noise SD background air (HU)", 1),
        ("estimated_sd", "blind estimate (estimate_noise_hu, HU)", 1),
        ("nps_mean_freq", "NPS mean frequency (1/mm)", 3),
        ("nps_peak_freq", "NPS peak frequency (1/mm)", 3),
        ("z_correlation", "noise correlation of adjacent slices", 2),
    ]
    scanner = m.get("scanner")
    what = "the product's simulator (matched)" if scanner is None else f"a scanner {scanner} (mismatched)"
    lines = [
        f"ULDCT made by {what}; Sim(N) = physics.lowdose at the same dose, both on the test cases' truth.\n",
        "| figure | ULDCT | Sim(N) | ratio |",
        "|---|---|---|---|",
    ]
    for key, text, d in rows:
        real, sim = m["real"].get(key, math.nan), m["sim"].get(key, math.nan)
        ratio = m["ratio"].get(key, math.nan)
        lines.append(f"| {text} | {real:.{d}f} | {sim:.{d}f} | {ratio:.2f} |")
    freq, a, b = (
        m["real"].get("nps_freq", []),
        m["real"].get("nps_radial", []),
        m["sim"].get("nps_radial", []),
    )
    if freq:
        pick = sorted({int(round(x)) for x in np.linspace(1, len(freq) - 1, 5)})
        lines.append(
            "\nNPS curve (HU² mm², ULDCT / Sim(N)): "
            + "; ".join(
                f"f {freq[k]:.2f}/mm: {a[k]:.0f} / {b[k]:.0f}" for k in pick if k < min(len(a), len(b))
            )
        )
    return "\n".join(lines)


def training_markdown(result: GridResult) -> str:
    """The did-it-train check of every run."""
    if not result.training:
        return ""
    lines = [
        "| strategy | model | seed | loss first → last round | loss drop | change vs input (× noise SD) | trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.training:
        lines.append(
            f"| {c['strategy']} | {c['model']} | {c['seed']} | {c['loss_first']:.4f} → {c['loss_last']:.4f} | "
            f"{c['loss_drop']:.0%} | {c['change']:.2f} | {'yes' if c['trained'] else '**NO**'} |"
        )
    return "\n".join(lines)


def write_results(result: GridResult, out: Path) -> tuple[Path, Path]:
    """``out/results.json`` and ``out/results.md`` (tables + claims)."""
    js = out / "results.json"
    with atomic_path(js) as tmp:
        Path(tmp).write_text(json.dumps(result.to_json(), indent=1, allow_nan=True), encoding="utf-8")
    md = out / "results.md"
    text = (
        f"# Evaluation grid ({result.config['name']}), seeds {result.seeds}, {result.seconds:.0f} s\n\n"
        + f"Real ULDCT noise: **{result.config.get('noise', 'matched')}**\n\n"
        + "**Noise of the ULDCT vs Sim(N)**\n\n"
        + mismatch_markdown(result)
        + "\n\n"
        + markdown_tables(result)
        + "\n**Did every run train?**\n\n"
        + training_markdown(result)
        + "\n\n**Claims**\n\n"
        + claims_markdown(result)
        + "\n"
    )
    with atomic_path(md) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return js, md
