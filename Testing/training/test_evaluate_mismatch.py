"""Issue #17: the mismatched "real" ULDCT, the did-it-train check and the claims' verdicts (no training)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.masks import evaluation_rois
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom
from IPv2DenoiseLib.training.evaluation import (
    CANNOT_TELL,
    CLAIMS,
    DOES_NOT_HOLD,
    HOLDS,
    EvalConfig,
    EvaluationCase,
    check_claims,
    noise_mismatch,
    overall_verdict,
    preset,
    scan_uldct,
    training_check,
    verdict,
)
from IPv2DenoiseLib.training.evaluation.report import claims_markdown

TINY = EvalConfig(name="tiny", shape=(6, 96, 96), spacing=(4.0, 4.0, 4.0), dose=0.01, n_train=1, n_test=1)


@pytest.fixture(scope="module")
def anatomy():
    return make_chest_phantom(shape=TINY.shape, spacing=TINY.spacing, seed=11).hu.astype(np.float32)


def _case(anatomy, noise: str) -> EvaluationCase:
    config = replace(TINY, noise=noise)
    uldct = scan_uldct(anatomy, seed=5, config=config).astype(np.float32)
    return EvaluationCase("t", uldct, anatomy, anatomy, TINY.spacing)


def test_matched_uldct_is_the_products_simulator(anatomy):
    case = _case(anatomy, "matched")
    np.testing.assert_array_equal(
        case.uldct, simulate_low_dose(anatomy, dose=TINY.dose, spacing_mm=4.0, seed=5).astype(np.float32)
    )
    m = noise_mismatch([case], replace(TINY, noise="matched"))
    assert m["scanner"] is None
    assert m["ratio"]["sd_soft_tissue"] == pytest.approx(1.0, abs=0.12)  # same process, another seed
    assert m["ratio"]["nps_mean_freq"] == pytest.approx(1.0, abs=0.1)
    # noisy − truth also holds FBP's deterministic error, alike in adjacent slices; the same in both
    assert m["real"]["z_correlation"] == pytest.approx(m["sim"]["z_correlation"], abs=0.1)


def test_mismatched_uldct_differs_from_sim_as_designed(anatomy):
    config = replace(TINY, noise="mismatched")
    m = noise_mismatch([_case(anatomy, "mismatched")], config)
    assert m["scanner"]["kernel"] == "hann"
    # slice-correlated noise (lag-1 0.45 by design) where Sim(N) has independent slices
    assert m["real"]["z_correlation"] > m["sim"]["z_correlation"] + 0.2
    # the smoother kernel shifts the NPS to lower frequencies and lowers the noise
    assert m["ratio"]["nps_mean_freq"] < 0.9
    assert m["real"]["nps_peak_freq"] <= m["sim"]["nps_peak_freq"]
    # ... everywhere; this tiny phantom's soft-tissue ROI swings by about ±0.1 between noise draws
    # (0.73-0.95 over six, anatomy seeds 11-13 x scan seeds 5-6), its lungs and background far less
    # (0.68-0.78 and 0.76-0.83), so those carry the tight bounds
    assert m["ratio"]["sd_soft_tissue"] < 1.0
    assert m["ratio"]["sd_lungs"] < 0.85 and m["ratio"]["sd_background"] < 0.9
    assert len(m["real"]["nps_radial"]) == len(m["sim"]["nps_radial"]) > 3


def test_noise_condition_is_checked():
    with pytest.raises(UserError, match="noise"):
        EvalConfig(name="x", noise="real")
    assert preset("reduced", noise="matched").noise == "matched"
    full = preset("full")
    assert full.noise == "mismatched" and full.dose == 0.02 and full.spacing[0] == 0.7


def test_training_check_flags_an_identity_network(anatomy):
    rng = np.random.default_rng(0)
    noisy = anatomy + rng.normal(0, 40, anatomy.shape).astype(np.float32)
    body = evaluation_rois(anatomy)["body"]
    falling = [0.05, 0.03, 0.02, 0.018]
    untrained = training_check(falling, noisy.copy(), noisy, body)  # identity: output == input
    assert not untrained["trained"] and untrained["change"] < 0.05
    trained = training_check(falling, anatomy, noisy, body)  # the noise removed
    assert trained["trained"] and trained["change"] > 0.5 and trained["loss_drop"] == pytest.approx(0.64)
    flat = training_check([0.02, 0.0199, 0.02], anatomy, noisy, body)  # changed, but the loss never fell
    assert not flat["trained"]


@pytest.mark.parametrize(
    "delta, spread, better, n_seeds, expected",
    [
        (1.0, 0.4, "higher", 3, HOLDS),
        (-1.0, 0.4, "higher", 3, DOES_NOT_HOLD),
        (0.3, 0.4, "higher", 3, CANNOT_TELL),
        (-2.0, 0.5, "lower", 3, HOLDS),
        (2.0, 0.5, "lower", 3, DOES_NOT_HOLD),
        (5.0, 0.0, "higher", 1, CANNOT_TELL),  # one seed: no spread known
        (float("nan"), 0.1, "higher", 3, CANNOT_TELL),
    ],
)
def test_verdict(delta, spread, better, n_seeds, expected):
    assert verdict(delta, spread, better, n_seeds) == expected


def test_claims_per_model_overall_and_untrained():
    def row(strategy, model, body_psnr, sd):
        return {
            "strategy": strategy,
            "model": model,
            "reference": "truth",
            "n_seeds": 3,
            "metrics": {"body_psnr": (body_psnr, sd)},
        }

    summary = [row("ipv2", "unet", 31.0, 0.1), row("naive", "unet", 30.0, 0.2)]
    summary += [row("ipv2", "dncnn", 29.0, 0.1), row("naive", "dncnn", 30.0, 0.1)]
    claims = [c for c in check_claims(summary, ["unet", "dncnn"]) if c["metric"] == "body_psnr"]
    by = {c["model"]: c for c in claims if c["b"] == "naive"}
    assert by["unet"]["verdict"] == HOLDS and by["unet"]["delta"] == pytest.approx(1.0)
    assert by["dncnn"]["verdict"] == DOES_NOT_HOLD
    assert by["unet"]["region"].startswith("body only")
    assert overall_verdict([by["unet"]["verdict"], by["dncnn"]["verdict"]]) == CANNOT_TELL
    assert overall_verdict([HOLDS, HOLDS]) == HOLDS
    assert overall_verdict([HOLDS, DOES_NOT_HOLD], [False, True]) == HOLDS  # the untrained model is left out
    assert overall_verdict([HOLDS], [True]) == CANNOT_TELL
    flagged = check_claims(summary, ["unet"], untrained=[("naive", "unet", 0)])
    assert all(c["verdict"] == CANNOT_TELL and c["untrained"] for c in flagged if c["b"] == "naive")


def test_each_claims_direction_follows_from_its_metric():
    """A claim measured in noise or bias holds when a's value is lower, in PSNR or SSIM when higher:
    a claim pointing the wrong way would report a worse strategy as the better one."""
    for text, a, b, metric, better in CLAIMS:
        kind = metric.rsplit("_", 1)[-1]
        assert kind in ("noise", "bias", "psnr", "ssim"), (text, metric)
        assert better == ("lower" if kind in ("noise", "bias") else "higher"), text
        assert a != b


def test_a_false_claim_does_not_hold():
    """ipv2's background noise above ipv1's and its lung PSNR below: both claims are false and say so
    (``holds`` False, "does not hold" in the verdict and the report); its lung SSIM above: that one holds."""

    def row(strategy, noise, lung_psnr, lung_ssim):
        metrics = {
            "background_noise": (noise, 0.5),
            "lungs_psnr": (lung_psnr, 0.2),
            "lungs_ssim": (lung_ssim, 0.01),
        }
        return {"strategy": strategy, "model": "unet", "reference": "truth", "n_seeds": 3, "metrics": metrics}

    claims = check_claims([row("ipv2", 12.0, 28.0, 0.90), row("ipv1", 8.0, 30.0, 0.80)], ["unet"])
    by = {c["metric"]: c for c in claims}
    assert len(claims) == len(by) == 3
    noise, lung_psnr, lung_ssim = by["background_noise"], by["lungs_psnr"], by["lungs_ssim"]
    assert noise["claim"] == "IPv2 suppresses background better than IPv1"
    assert noise["delta"] == pytest.approx(4.0) and noise["holds"] is False and noise["clear"] is False
    assert noise["verdict"] == DOES_NOT_HOLD == "does not hold"
    assert lung_psnr["delta"] == pytest.approx(-2.0) and lung_psnr["holds"] is False
    assert lung_psnr["verdict"] == DOES_NOT_HOLD
    assert lung_ssim["holds"] is True and lung_ssim["verdict"] == HOLDS
    for c in claims:
        assert c["holds"] == (c["delta"] < 0 if c["better"] == "lower" else c["delta"] > 0), c["claim"]
    lines = claims_markdown(SimpleNamespace(claims=claims)).splitlines()
    (line,) = [line for line in lines if line.startswith(f"| {noise['claim']} |")]
    assert "**does not hold**" in line and "unet +4.00 (±1.00) does not hold" in line
    # the same claim, true: ipv2's background noise below ipv1's
    (true,) = [
        c
        for c in check_claims([row("ipv2", 5.0, 28, 0.9), row("ipv1", 8.0, 30, 0.8)], ["unet"])
        if c["metric"] == "background_noise"
    ]
    assert true["holds"] is True and true["holds"] == (true["delta"] < 0) and true["verdict"] == HOLDS
