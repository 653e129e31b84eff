"""Scores of one output against a reference per region, their summary over seeds, the paper's claims.

Metric definitions: DESIGN.md §6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.metrics import laa950, nps_2d, psnr, ssim
from IPv2DenoiseLib.training.grid.config import REFERENCES, REGIONS

#: The paper's claims: (text, strategy a, strategy b, metric, which direction is better for a).
CLAIMS = (
    ("IPv2 suppresses background better than IPv1", "ipv2", "ipv1", "background_noise", "lower"),
    ("IPv2 restores lung parenchyma better than IPv1 (PSNR)", "ipv2", "ipv1", "lungs_psnr", "higher"),
    ("IPv2 restores lung parenchyma better than IPv1 (SSIM)", "ipv2", "ipv1", "lungs_ssim", "higher"),
    (
        "Remove Background alone lowers background noise vs IPv1",
        "rb",
        "ipv1",
        "background_noise",
        "lower",
    ),
    ("Add noise alone improves lung PSNR vs IPv1", "an", "ipv1", "lungs_psnr", "higher"),
    ("IPv2 (both) beats Remove Background alone in lung PSNR", "ipv2", "rb", "lungs_psnr", "higher"),
    ("IPv2 (both) beats Add noise alone in background noise", "ipv2", "an", "background_noise", "lower"),
    ("IPv2 beats naive in body PSNR", "ipv2", "naive", "psnr", "higher"),
)


def score(
    output: np.ndarray, reference: np.ndarray, masks: dict[str, np.ndarray], spacing
) -> dict[str, float]:
    """Per-region PSNR, SSIM, noise (SD of output − reference), bias, plus NPS mean frequency and
    the LAA-950 error of ``output`` against ``reference`` (metric definitions: DESIGN.md §6)."""
    diff = output.astype(np.float64) - reference
    m: dict[str, float] = {}
    for region in REGIONS:
        mask = masks[region]
        if mask.sum() < 10:
            for key in ("psnr", "ssim", "noise", "bias"):
                m[f"{region}_{key}"] = math.nan
            continue
        m[f"{region}_psnr"] = psnr(reference, output, mask=mask)
        m[f"{region}_ssim"] = ssim(reference, output, mask=mask)
        m[f"{region}_noise"] = float(diff[mask].std())
        m[f"{region}_bias"] = float(diff[mask].mean())
    soft = masks["soft_tissue"]
    m["soft_tissue_bias"] = float(diff[soft].mean()) if soft.sum() >= 10 else math.nan
    m["psnr"] = psnr(reference, output, mask=masks["whole_body"])
    m["ssim"] = ssim(reference, output, mask=masks["whole_body"])
    roi = max(8, min(32, min(output.shape[-2:]) // 5))
    try:
        m["nps_mean_freq"] = nps_2d(
            diff, pixel_spacing_mm=(spacing[0], spacing[1]), roi_size=roi, mask=masks["whole_body"]
        ).mean_freq
    except UserError:
        m["nps_mean_freq"] = math.nan
    lungs = masks["lungs"]
    m["laa950_error"] = laa950(output, lungs) - laa950(reference, lungs) if lungs.any() else math.nan
    return m


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean over test cases per seed, then mean and SD over seeds, per method and reference."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["strategy"], r["model"], r["reference"]), {}).setdefault(
            r["seed"], []
        ).append(r["metrics"])
    out = []
    for (method, strategy, model, reference), by_seed in groups.items():
        keys = list(next(iter(by_seed.values()))[0])
        per_seed = {
            k: [
                float(np.nanmean([c[k] for c in cases]))
                if any(np.isfinite(c[k]) for c in cases)
                else math.nan
                for cases in by_seed.values()
            ]
            for k in keys
        }
        stats = {
            k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            for k, v in per_seed.items()
        }
        out.append(
            {
                "method": method,
                "strategy": strategy,
                "model": model,
                "reference": reference,
                "n_seeds": len(by_seed),
                "metrics": stats,
            }
        )
    return out


def check_claims(summary: Sequence[dict], models: Sequence[str]) -> list[dict]:
    """The paper's claims as comparisons per model (difference of means, and the seed SDs)."""
    table = {(s["strategy"], s["model"], s["reference"]): s["metrics"] for s in summary}
    out = []
    for text, a, b, metric, better in CLAIMS:
        for reference in REFERENCES:
            for model in models:
                ma, mb = table.get((a, model, reference)), table.get((b, model, reference))
                if ma is None or mb is None or metric not in ma:
                    continue
                (va, sa), (vb, sb) = ma[metric], mb[metric]
                delta = va - vb
                holds = delta < 0 if better == "lower" else delta > 0
                out.append(
                    {
                        "claim": text,
                        "model": model,
                        "reference": reference,
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "value_a": va,
                        "value_b": vb,
                        "sd_a": sa,
                        "sd_b": sb,
                        "delta": delta,
                        "holds": bool(holds) if np.isfinite(delta) else None,
                        "clear": bool(holds and abs(delta) > sa + sb) if np.isfinite(delta) else None,
                    }
                )
    return out
