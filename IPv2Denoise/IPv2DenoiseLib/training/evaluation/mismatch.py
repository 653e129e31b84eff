"""How far the grid's "real" ULDCT noise is from Sim(N), the noise *Add noise* trains with.

Both are measured on the same noise-free anatomy (the test cases' truth), so only the noise
process differs: ``real = ULDCT − truth`` and ``sim = Sim(truth) − truth`` with the product's
simulator (:func:`~IPv2DenoiseLib.physics.lowdose.simulate_low_dose`) at the grid's dose. Reported
per source: the noise SD per region, the blind estimate a user would get
(:func:`~IPv2DenoiseLib.imaging.noise_estimate.estimate_noise_hu`), the NPS (mean and peak
frequency, radial curve; :func:`~IPv2DenoiseLib.imaging.metrics.nps_2d`) and the lag-1 correlation
of the noise between adjacent slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.masks import evaluation_rois
from IPv2DenoiseLib.imaging.metrics import nps_2d, roi_stats, slice_correlation
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.training.evaluation.cases import EvaluationCase
from IPv2DenoiseLib.training.evaluation.config import EvalConfig

#: Regions whose noise SD is reported.
MISMATCH_REGIONS = ("soft_tissue", "lungs", "background")


def noise_profile(noisy: np.ndarray, truth: np.ndarray, spacing, masks: dict[str, np.ndarray]) -> dict:
    """SD per region, blind estimate, NPS and slice correlation of ``noisy − truth``."""
    noise = noisy.astype(np.float32) - truth.astype(np.float32)
    out: dict = {
        f"sd_{r}": roi_stats(noise, masks[r]).std if masks[r].sum() >= 10 else math.nan
        for r in MISMATCH_REGIONS
    }
    out["estimated_sd"] = estimate_noise_hu(noisy)
    roi = max(8, min(32, min(noise.shape[-2:]) // 5))
    try:
        nps = nps_2d(noise, pixel_spacing_mm=(spacing[0], spacing[1]), roi_size=roi, mask=masks["whole_body"])
        out.update(
            nps_mean_freq=nps.mean_freq,
            nps_peak_freq=nps.peak_freq,
            nps_freq=[float(f) for f in nps.freq],
            nps_radial=[float(v) for v in nps.radial],
        )
    except UserError:
        out.update(nps_mean_freq=math.nan, nps_peak_freq=math.nan, nps_freq=[], nps_radial=[])
    out["z_correlation"] = slice_correlation(noise, masks["whole_body"])
    return out


def noise_mismatch(cases: Sequence[EvaluationCase], config: EvalConfig, *, seed: int = 4242) -> dict:
    """Noise of the grid's ULDCT ("real") and of Sim at the same dose ("sim"), averaged over
    ``cases`` (those with a known truth); ``ratio`` = real / sim per scalar figure."""
    profiles: dict[str, list[dict]] = {"real": [], "sim": []}
    for i, case in enumerate(cases):
        if case.truth is None:
            continue
        masks = evaluation_rois(case.truth)
        sim = simulate_low_dose(
            case.truth, dose=config.dose, spacing_mm=float(case.spacing[0]), seed=seed + i
        )
        profiles["real"].append(noise_profile(case.uldct, case.truth, case.spacing, masks))
        profiles["sim"].append(noise_profile(np.asarray(sim), case.truth, case.spacing, masks))
    if not profiles["real"]:
        return {}
    out: dict = {
        "noise": config.noise,
        "scanner": dict(config.scanner) if config.noise == "mismatched" else None,
    }
    for source, items in profiles.items():
        merged: dict = {}
        for key, value in items[0].items():
            if isinstance(value, list):
                n = min(len(it[key]) for it in items)
                merged[key] = [float(np.mean([it[key][j] for it in items])) for j in range(n)]
            else:
                merged[key] = float(np.nanmean([it[key] for it in items]))
        out[source] = merged
    out["ratio"] = {
        k: out["real"][k] / out["sim"][k]
        for k, v in out["sim"].items()
        if not isinstance(v, list) and np.isfinite(v) and v != 0
    }
    return out
