"""Anatomical background texture: power-law random fields added to smooth phantom tissue.

Real CT anatomy is not piecewise constant: parenchyma, fat and muscle carry texture whose power
spectrum falls as ``1/f^β`` with β ≈ 3 (Burgess et al., Med Phys 28(4), 2001, for breast; similar
exponents are reported for lung and abdomen). A denoiser trained on flat phantom regions learns that
anything fine is noise and flattens real texture; adding such fields to the clean training anatomy
(where the noise is white-ish ramp-filtered, β ≤ 0 at low frequency) teaches it the difference.
"""

from __future__ import annotations

import numpy as np

from IPv2DenoiseLib.core.errors import UserError


def power_law_field(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    *,
    beta: float,
    rng: np.random.Generator,
    min_frequency_per_mm: float = 1.0 / 100.0,
) -> np.ndarray:
    """A zero-mean, unit-SD Gaussian field ``[z, y, x]`` with power spectrum ``∝ 1/f^β``.

    ``spacing_mm`` is (sz, sy, sx); frequencies below ``min_frequency_per_mm`` are held flat so the
    field has no slab-wide offset.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"shape={shape}: need three positive sizes (z, y, x)")
    freqs = [np.fft.fftfreq(n, d) for n, d in zip(shape[:2], spacing_mm[:2])]
    freqs.append(np.fft.rfftfreq(shape[2], spacing_mm[2]))
    fz, fy, fx = np.meshgrid(*freqs, indexing="ij", sparse=True)
    f = np.sqrt(fz**2 + fy**2 + fx**2)
    amplitude = np.maximum(f, min_frequency_per_mm) ** (-beta / 2.0)
    amplitude[0, 0, 0] = 0.0
    spectrum = amplitude * (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape))
    field = np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2))
    sd = field.std()
    return (field / sd if sd > 0 else field).astype(np.float32)


def add_tissue_texture(
    hu: np.ndarray,
    *,
    lungs: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float, float],
    rng: np.random.Generator,
    soft_tissue_sd: float,
    lung_sd: float,
    beta: float = 3.0,
) -> np.ndarray:
    """``hu`` plus power-law texture of ``soft_tissue_sd`` HU in the body and ``lung_sd`` HU in the lungs.

    Bone (> 300 HU) and air outside the body are left as they are; returns a new array.
    """
    field = power_law_field(hu.shape, spacing_mm, beta=beta, rng=rng)
    sd = np.where(lungs, lung_sd, np.where(body & (hu < 300.0), soft_tissue_sd, 0.0)).astype(np.float32)
    return (hu + sd * field).astype(np.float32)
