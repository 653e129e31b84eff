"""Blind noise measurements of one scan: the slice-to-slice correlation of its noise."""

from __future__ import annotations

import numpy as np
import pytest

from IPv2DenoiseLib.imaging.noise_estimate import estimate_slice_correlation
from IPv2DenoiseLib.physics.scanner_noise import correlate_slices
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return make_chest_phantom(shape=(8, 128, 128), spacing=(2.5, 2.5, 1.25), seed=4).hu


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6])
def test_slice_correlation_of_the_noise_is_recovered_through_the_anatomy(chest, rho) -> None:
    noise = np.random.default_rng(0).normal(0.0, 40.0, chest.shape).astype(np.float32)
    mixed = correlate_slices(noise, rho)
    # the volume's own lag-1 correlation (its end slices mix by reflection, a little above rho)
    actual = np.corrcoef(mixed[:-1].ravel(), mixed[1:].ravel())[0, 1]
    assert actual == pytest.approx(rho, abs=0.1)
    assert estimate_slice_correlation(chest + mixed) == pytest.approx(actual, abs=0.05)


def test_slice_correlation_needs_two_slices_and_tissue(chest) -> None:
    assert estimate_slice_correlation(chest[:1]) == 0.0
    assert estimate_slice_correlation(np.full((3, 64, 64), -1000.0, np.float32)) == 0.0
