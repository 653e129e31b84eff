"""Estimate the noise level (SD in HU) of a single CT scan, without a second realisation.

Used to scale the weak denoiser of *Remove noise* and the classical baselines to the noise of the
scan at hand. CT noise is spatially correlated, so white-noise estimators (e.g. the wavelet MAD of
``skimage.restoration.estimate_sigma``) report about half the true SD; both estimates here work on
the image itself.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from IPv2DenoiseLib.imaging.masks import body_mask, soft_tissue_mask
from IPv2DenoiseLib.imaging.metrics import slice_correlation


def estimate_noise_hu(hu: np.ndarray, *, region: np.ndarray | None = None, window: int = 7) -> float:
    """Noise SD in HU of a CT slice or volume.

    The median local SD in ``window``² patches over a homogeneous region (default
    :func:`~IPv2DenoiseLib.imaging.masks.soft_tissue_mask`), corrected for the patch's degrees of freedom.
    With fewer than 200 such pixels (small or tissue-poor slices): the robust SD (1.4826·MAD) of
    horizontal pixel differences inside the body, divided by √2.
    """
    vol = np.asarray(hu, dtype=np.float32)
    vol3 = vol[None] if vol.ndim == 2 else vol
    if region is None:
        region = soft_tissue_mask(vol3)
    region = np.asarray(region, dtype=bool).reshape(vol3.shape)
    inner = ndi.binary_erosion(region, np.ones((1, window, window), dtype=bool))
    if inner.sum() >= 200:
        size = (1, window, window)
        mean = ndi.uniform_filter(vol3.astype(np.float64), size=size)
        sq = ndi.uniform_filter(vol3.astype(np.float64) ** 2, size=size)
        local_sd = np.sqrt(np.maximum(sq - mean * mean, 0.0))
        return float(np.median(local_sd[inner]) * np.sqrt(window * window / (window * window - 1)))
    diff = np.diff(vol3, axis=-1)
    inside = body_mask(vol3)[..., 1:]
    values = diff[inside] if inside.sum() >= 100 else diff.ravel()
    mad = np.median(np.abs(values - np.median(values)))
    return float(1.4826 * mad / np.sqrt(2.0))


def estimate_slice_correlation(hu: np.ndarray, *, region: np.ndarray | None = None, window: int = 7) -> float:
    """Lag-1 correlation of the noise between adjacent axial slices of a ``[z, y, x]`` scan (0 … 1).

    Helical reconstructions share noise between neighbouring slices; a noise model that ignores it
    mismatches the scan. The in-plane high-pass residual (the slice minus its ``window``² local mean)
    of two adjacent slices is correlated over homogeneous tissue (default: the soft-tissue mask of
    both slices, eroded), where anatomy contributes little to the residual. One slice, or too little
    tissue, gives 0. Clipped at 0: anti-correlation does not occur in CT reconstructions.
    """
    vol = np.asarray(hu, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] < 2:
        return 0.0
    if region is None:
        region = soft_tissue_mask(vol)
    region = ndi.binary_erosion(np.asarray(region, dtype=bool), np.ones((1, window, window), dtype=bool))
    both = region[1:] & region[:-1]
    if both.sum() < 200:
        return 0.0
    residual = vol.astype(np.float64) - ndi.uniform_filter(vol.astype(np.float64), size=(1, window, window))
    return max(0.0, slice_correlation(residual, region))
