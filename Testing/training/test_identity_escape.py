"""A zero-head U-Net must leave the identity on IPv1 pairs (identity pairs in lungs and air).

With plain L1 the kink at a zero residual acts as a lasso penalty on the predicted noise, and a
network that starts as the identity can stay there exactly (the 2 % grid's IPv1/RB U-Nets did);
the default Huber loss removes the kink (training/trainer.py, ``LOSSES``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.imaging.masks import evaluation_rois
from IPv2DenoiseLib.purification.pairs import build_pairs
from IPv2DenoiseLib.purification.regions import sampling_regions
from IPv2DenoiseLib.training.evaluation import make_case, preset
from IPv2DenoiseLib.training.evaluation.scoring import TRAINED_MIN_CHANGE, training_check
from IPv2DenoiseLib.training.trainer import CasePairs, TrainConfig, train


@pytest.fixture(scope="module")
def ipv1_case():
    """A small simulated chest (phantom, breathing, 0.5 % scan) and its IPv1 training pair."""
    config = replace(
        preset("reduced", noise="matched"), shape=(6, 128, 128), spacing=(3.0, 3.0, 2.5), dose=0.005
    )
    case = make_case("chest", seed=100, config=config)
    pair = build_pairs(case.uldct, case.ndct, "ipv1", dose=config.dose, spacing=case.spacing, seed=7)
    regions = sampling_regions(case.uldct, case.ndct, pair)
    return case, CasePairs("chest", pair.train_input, pair.train_label, regions)


def _train_and_check(case, pairs, out, *, seed: int, loss: str | None = None) -> dict:
    """Train a tiny zero-head U-Net on the IPv1 pair; the grid's did-it-train check on the scan."""
    torch.set_num_threads(1)
    config = TrainConfig(
        cases=[],
        out=str(out),
        model_kwargs={"in_slices": 3, "base_channels": 8, "levels": 2},
        strategy="ipv1",
        patch=32,
        batch=8,
        iterations=200,
        val_every=40,
        lr=2e-3,
        seed=seed,
        device="cpu",
    )
    if loss is not None:
        config.loss = loss
    card = train(config, prepared=([pairs], []))
    output = Denoiser.from_file(out / "model.safetensors").denoise_array(
        case.uldct, remove_background=False, device="cpu"
    )
    return training_check(card["history"]["loss"], output, case.uldct, evaluation_rois(case.truth)["body"])


# seeds at which plain L1 stayed at the identity on this pair (measured with torch 2.13 CPU; not
# asserted: whether L1 stays pinned depends on the exact training path, which differs across CPUs)
@pytest.mark.parametrize("seed", [0, 3])
def test_default_loss_leaves_the_identity_on_ipv1_pairs(ipv1_case, tmp_path, seed) -> None:
    case, pairs = ipv1_case
    check = _train_and_check(case, pairs, tmp_path, seed=seed)
    assert check["trained"] and check["change"] >= TRAINED_MIN_CHANGE, check
