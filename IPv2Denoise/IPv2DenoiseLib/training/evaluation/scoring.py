"""Scores of one output against a reference per region, their summary over seeds, the paper's claims.

Metric definitions: docs/results.md, metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.metrics import laa950, nps_2d, psnr, ssim
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.training.evaluation.config import REFERENCES, REGIONS

#: Where each claim metric is measured (regions of :func:`~IPv2DenoiseLib.imaging.masks.evaluation_rois`
#: on the truth; the reference is the truth unless the row says label).
METRIC_REGIONS = {
    "background_noise": "background: border-connected air below -950 HU (SD of output - reference)",
    "lungs_psnr": "lungs: lung_mask (parenchyma and vessels), lung window",
    "lungs_ssim": "lungs: lung_mask (parenchyma and vessels), lung window",
    "body_psnr": "body only: body mask minus lungs, lung window",
    "psnr": "body and lungs: whole body mask, lung window",
}

#: The paper's claims and the grid's controls: (text, strategy a, strategy b, metric, which
#: direction is better for a). Each is measured in :data:`METRIC_REGIONS` of its metric.
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
    ("IPv2 beats naive in body PSNR", "ipv2", "naive", "body_psnr", "higher"),
    ("IPv2 beats the IPv1 texture blend in lung PSNR", "ipv2", "ipv1+tb", "lungs_psnr", "higher"),
    ("IPv2 beats the IPv1 texture blend in background noise", "ipv2", "ipv1+tb", "background_noise", "lower"),
    ("Real pairs help: IPv2 beats sim-only (Sim(N)->N) in body PSNR", "ipv2", "sim", "body_psnr", "higher"),
    ("Real pairs help: IPv2 beats sim-only (Sim(N)->N) in lung PSNR", "ipv2", "sim", "lungs_psnr", "higher"),
)

#: Verdicts of a claim (:func:`verdict`).
HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"

#: A run counts as trained when its output differs from its input in the body by at least
#: TRAINED_MIN_CHANGE × the input's noise SD (an identity network changes nothing there) and its
#: training loss fell from the first to the last round by at least TRAINED_MIN_LOSS_DROP (it did not
#: diverge). The loss drop alone cannot tell: a residual network starts at the identity, and when the
#: misalignment dominates the loss, a good denoiser lowers it by only 5-10 %.
TRAINED_MIN_LOSS_DROP = 0.02
TRAINED_MIN_CHANGE = 0.30


def score(
    output: np.ndarray, reference: np.ndarray, masks: dict[str, np.ndarray], spacing
) -> dict[str, float]:
    """Per-region PSNR, SSIM, noise (SD of output − reference), bias, plus NPS mean frequency and
    the LAA-950 error of ``output`` against ``reference`` (metric definitions: docs/results.md, metrics)."""
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


def training_check(losses: Sequence[float], output: np.ndarray, inputs: np.ndarray, body: np.ndarray) -> dict:
    """Did a run train? Its loss must fall and its output must differ from the identity in the body.

    ``losses``: the mean training loss per round; ``output``/``inputs``: a denoised test volume
    and its input; ``body``: where every strategy trains on real U→N pairs (body without lungs).
    ``change`` is SD(output − input) in ``body`` over the input's estimated noise SD.
    """
    drop = 1.0 - losses[-1] / losses[0] if len(losses) >= 2 and losses[0] > 0 else math.nan
    noise = estimate_noise_hu(inputs)
    diff = output.astype(np.float64) - inputs
    change = float(diff[body].std() / noise) if body.sum() >= 10 and noise > 0 else math.nan
    trained = bool(
        np.isfinite(drop)
        and drop >= TRAINED_MIN_LOSS_DROP
        and np.isfinite(change)
        and change >= TRAINED_MIN_CHANGE
    )
    return {
        "loss_first": float(losses[0]) if losses else math.nan,
        "loss_last": float(losses[-1]) if losses else math.nan,
        "loss_drop": float(drop),
        "change": change,
        "trained": trained,
    }


def verdict(delta: float, spread: float, better: str, n_seeds: int) -> str:
    """:data:`HOLDS` when ``delta`` points the claimed way by more than ``spread`` (the seed
    spread), :data:`DOES_NOT_HOLD` when it points the other way by more, else :data:`CANNOT_TELL`
    (also with fewer than 2 seeds: no spread is known)."""
    if n_seeds < 2 or not (np.isfinite(delta) and np.isfinite(spread)):
        return CANNOT_TELL
    signed = -delta if better == "lower" else delta
    if signed > spread:
        return HOLDS
    if signed < -spread:
        return DOES_NOT_HOLD
    return CANNOT_TELL


def overall_verdict(verdicts: Sequence[str], untrained: Sequence[bool] = ()) -> str:
    """One verdict over models: the common verdict of the models whose runs all trained, else
    :data:`CANNOT_TELL` (models disagree, or none trained)."""
    flags = list(untrained) or [False] * len(verdicts)
    unique = {v for v, bad in zip(verdicts, flags) if not bad}
    return unique.pop() if len(unique) == 1 else CANNOT_TELL


def check_claims(
    summary: Sequence[dict], models: Sequence[str], *, untrained: Sequence[tuple[str, str, int]] = ()
) -> list[dict]:
    """The claims per model and reference: difference of means, seed SDs and the verdict.

    The spread is the sum of the two seed SDs; a comparison with an ``untrained`` run
    (strategy, model, seed) is :data:`CANNOT_TELL` (an optimisation failure is no strategy effect).
    """
    table = {(s["strategy"], s["model"], s["reference"]): s for s in summary}
    failed = {(s, m) for s, m, _ in untrained}
    out = []
    for text, a, b, metric, better in CLAIMS:
        for reference in REFERENCES:
            for model in models:
                ra, rb = table.get((a, model, reference)), table.get((b, model, reference))
                if ra is None or rb is None or metric not in ra["metrics"]:
                    continue
                ma, mb = ra["metrics"], rb["metrics"]
                (va, sa), (vb, sb) = ma[metric], mb[metric]
                delta = va - vb
                holds = delta < 0 if better == "lower" else delta > 0
                flagged = (a, model) in failed or (b, model) in failed
                n_seeds = min(ra["n_seeds"], rb["n_seeds"])
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
                        "region": METRIC_REGIONS.get(metric, metric),
                        "better": better,
                        "n_seeds": n_seeds,
                        "untrained": flagged,
                        "verdict": CANNOT_TELL if flagged else verdict(delta, sa + sb, better, n_seeds),
                    }
                )
    return out
