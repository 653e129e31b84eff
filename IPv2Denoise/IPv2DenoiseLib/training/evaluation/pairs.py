"""Purified training pairs per strategy (cached as ``.npz``) and the IPv2 refined test label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.purification.pairs import build_pairs, make_weak_denoiser
from IPv2DenoiseLib.purification.regions import sampling_regions
from IPv2DenoiseLib.training.evaluation.cases import EvaluationCase
from IPv2DenoiseLib.training.evaluation.config import EvalConfig
from IPv2DenoiseLib.training.trainer import CasePairs


def purified_training_cases(
    cases: Sequence[EvaluationCase], strategy: str, config: EvalConfig, cache: Path | None
):
    """:class:`~IPv2DenoiseLib.training.trainer.CasePairs` of the training cases for one strategy (cached)."""
    out = []
    for i, case in enumerate(cases):
        path = None if cache is None else cache / f"{strategy.replace('+', '_')}_{case.name}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                out.append(CasePairs(case.name, z["train_input"], z["train_label"], z["regions"]))
            continue
        # the training input does not depend on the test label, so skip the weak denoiser here
        name = strategy.replace("ipv2", "rb+an") if strategy == "ipv2" else strategy
        pair = build_pairs(case.uldct, case.ndct, name, dose=config.dose, spacing=case.spacing, seed=7 + i)
        regions = sampling_regions(case.uldct, case.ndct, pair)
        item = CasePairs(case.name, pair.train_input, pair.train_label, regions)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                np.savez(tmp, train_input=item.train_input, train_label=item.train_label, regions=regions)
        out.append(item)
    return out


def ipv2_test_label(case: EvaluationCase, config: EvalConfig) -> np.ndarray:
    """The IPv2 refined test label: NDCT in body and background, WD(ULDCT) in the lungs."""
    wd = make_weak_denoiser(
        config.weak_denoiser, spacing=case.spacing, noise_hu=estimate_noise_hu(case.uldct)
    )
    # rb+rn gives the same test label as ipv2 without simulating the (unused) Add-noise input
    return build_pairs(
        case.uldct, case.ndct, "rb+rn", dose=config.dose, spacing=case.spacing, weak_denoiser=wd
    ).test_label
