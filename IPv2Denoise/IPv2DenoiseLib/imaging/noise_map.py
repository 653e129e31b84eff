"""Per-pixel noise level map (HU) of CT slices, from the noisy slices alone.

The input of the noise-aware networks (FFDNet / DRUNet style,
:mod:`IPv2DenoiseLib.denoiser.models.noise_aware_unet`): what BM3D is handed as the true noise
level, estimated from the scan itself, so no ground truth is needed at inference. Training and
inference call the same :func:`noise_level_map`.

Per slice: the anatomy is removed by a Gaussian mean of :data:`HIGH_PASS_PX` pixels; the robust SD
of the residual (1.4826 x the median of its magnitude, divided by the share of white noise's SD the
high-pass keeps) is taken over :data:`BLOCK_PX`-pixel blocks, median-filtered over 3 x 3 blocks
(about 17 mm at 0.7 mm pixels; an edge or a vessel occupies few pixels of a block and moves its
median little) and interpolated back to the pixels. Measured on a chest phantom with 60 HU of added
noise (soft tissue / lungs): white noise reads 1.14 / 1.24 x its SD, the projector's kernels (ramp
to Hann) 1.11-1.17 / 1.24-1.33, Gaussian-smoothed noise of width 1 px 0.90 / 0.99 and of 1.5 px
0.74 / 0.84 (the high-pass keeps less of smoother noise; a correction from the residual's lag-1
correlation was tried and over-read by 1.2-1.6 x, because the anatomy's texture is correlated too).
The map is a conditioning input, so what matters is that it is computed the same way at training
and at inference. Windows are in pixels, not mm: the network sees pixels, and the trainer's zoom
augmentation changes a pixel's size in mm.

The noise's *texture* is a second input (:func:`noise_fineness`): a smooth kernel's noise and a
sharp kernel's noise of the same SD need different denoising, and BM3D is handed the whole noise
spectrum. Per slice, the robust SD of a fine high-pass residual (Gaussian of
:data:`FINE_PASS_PX`) over that of the coarse one above, each divided by its white-noise share, so
white noise reads about 0.95. Measured on three slices of a real chest no network trains on
(LIDC-IDRI-0001, 0.70 mm pixels) under 2 % dose noise (``runs/diag/texture_probe2.py``): white
0.95-0.97; the training scans' ramp kernel 0.83-0.86 and Hann kernel 0.52-0.53; the benchmark's
projection noise 0.80-0.82 and its smooth-kernel spectrum 0.68-0.70; Gaussian-smoothed noise of
width 1 px 0.46; the slices alone (their own 14 HU of noise and their edges) 0.50-0.63. A
reconstruction kernel is one setting per slice, so the value is one number per slice (the median
over the blocks with noise), not a map the anatomy would mottle.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi

#: Width (pixels, Gaussian SD) of the smoothing whose residual is the noise sample.
HIGH_PASS_PX = 2.0
#: Side (pixels) of the blocks over which the residual's robust SD is taken.
BLOCK_PX = 8
#: The map is clipped to ``[0, MAX_NOISE_HU]``.
MAX_NOISE_HU = 500.0
#: Width (pixels, Gaussian SD) of the fine high-pass of :func:`noise_fineness`.
FINE_PASS_PX = 0.7
#: Blocks whose coarse residual SD is below this (HU) are padding or flat air: no noise to read.
MIN_BLOCK_NOISE_HU = 2.0


@functools.lru_cache(maxsize=8)  # called per slice with one of two widths
def white_noise_sd_ratio(high_pass_px: float) -> float:
    """SD of the high-pass residual over the SD of white noise (from the filter's impulse response).

    Parameters
    ----------
    high_pass_px : float
        Gaussian SD (pixels) of the mean that is subtracted.

    Returns
    -------
    float
        ``||delta - g||_2`` of the discrete filter SciPy applies (0.97 for 2 pixels).
    """
    size = 2 * int(4 * high_pass_px + 1) + 1
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return float(np.sqrt(np.sum((impulse - ndi.gaussian_filter(impulse, high_pass_px)) ** 2)))


def block_robust_sd(magnitude: np.ndarray, block: int) -> np.ndarray:
    """1.4826 x the median of ``magnitude`` over ``block`` x ``block`` tiles (edges reflected).

    Parameters
    ----------
    magnitude : numpy.ndarray
        ``|residual|`` of one slice, ``[y, x]``.
    block : int
        Tile side in pixels.

    Returns
    -------
    numpy.ndarray
        ``[ceil(y / block), ceil(x / block)]`` robust SDs.
    """
    h, w = magnitude.shape
    padded = np.pad(magnitude, ((0, (-h) % block), (0, (-w) % block)), mode="reflect")
    gh, gw = padded.shape[0] // block, padded.shape[1] // block
    tiles = padded.reshape(gh, block, gw, block).transpose(0, 2, 1, 3).reshape(gh, gw, block * block)
    return 1.4826 * np.median(tiles, axis=-1)


def noise_level_map(hu_slices: np.ndarray) -> np.ndarray:
    """Local noise SD (HU) of each pixel of one or more axial slices, from the noisy slices only.

    Parameters
    ----------
    hu_slices : numpy.ndarray
        ``[y, x]`` or ``[z, y, x]`` HU; each slice is measured on its own (in-plane), so the map of
        a slice does not depend on its neighbours.

    Returns
    -------
    numpy.ndarray
        float32 HU, the shape of ``hu_slices``, smooth over about 3 blocks, in ``[0, MAX_NOISE_HU]``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sd = noise_level_map(rng.normal(0.0, 30.0, (128, 128)))
    >>> bool(abs(np.median(sd) - 30.0) < 4.0)
    True
    """
    arr = np.asarray(hu_slices, dtype=np.float32)
    slices = arr[None] if arr.ndim == 2 else arr
    if slices.ndim != 3:
        raise ValueError(f"expected [y, x] or [z, y, x] slices, got shape {arr.shape}")
    out = np.empty(slices.shape, dtype=np.float32)
    for z, hu in enumerate(slices):
        out[z] = _level_from_grid(residual_block_sd(hu, HIGH_PASS_PX), hu.shape)
    return out.reshape(arr.shape)


def residual_block_sd(hu: np.ndarray, high_pass_px: float) -> np.ndarray:
    """Robust SD of one slice's high-pass residual over blocks (the grid :func:`noise_level_map` interpolates).

    Parameters
    ----------
    hu : numpy.ndarray
        One ``[y, x]`` slice, HU.
    high_pass_px : float
        Gaussian SD (pixels) of the mean that is subtracted.

    Returns
    -------
    numpy.ndarray
        ``[ceil(y / BLOCK_PX), ceil(x / BLOCK_PX)]`` HU, scaled so white noise reads its SD,
        median-filtered over 3 x 3 blocks.
    """
    residual = hu - ndi.gaussian_filter(hu, high_pass_px, mode="reflect")
    grid = block_robust_sd(np.abs(residual), BLOCK_PX) / white_noise_sd_ratio(high_pass_px)
    return ndi.median_filter(grid, size=3, mode="nearest")


def noise_fineness(hu_slices: np.ndarray) -> np.ndarray:
    """How fine-grained each slice's noise is: about 0.95 for white noise, lower for smoother kernels.

    Parameters
    ----------
    hu_slices : numpy.ndarray
        ``[y, x]`` or ``[z, y, x]`` noisy HU slices; each is measured on its own.

    Returns
    -------
    numpy.ndarray
        float32, one value per slice (shape ``[z]``, or ``[]`` for one ``[y, x]`` slice): the median,
        over the blocks with at least :data:`MIN_BLOCK_NOISE_HU` of noise, of the fine residual's SD
        over the coarse one's; 0 for a slice without noise.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> white = rng.normal(0.0, 30.0, (128, 128))
    >>> smooth = ndi.gaussian_filter(rng.normal(0.0, 30.0, (128, 128)), 1.0)
    >>> bool(noise_fineness(white) > 0.8 > 0.6 > noise_fineness(smooth))
    True
    """
    arr = np.asarray(hu_slices, dtype=np.float32)
    slices = arr[None] if arr.ndim == 2 else arr
    if slices.ndim != 3:
        raise ValueError(f"expected [y, x] or [z, y, x] slices, got shape {arr.shape}")
    out = np.array(
        [_fineness_from_grid(hu, residual_block_sd(hu, HIGH_PASS_PX)) for hu in slices], dtype=np.float32
    )
    return out.reshape(arr.shape[:-2])


def noise_level_and_fineness(hu_slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`noise_level_map` and :func:`noise_fineness` of the same slices, sharing their coarse residual.

    Parameters
    ----------
    hu_slices : numpy.ndarray
        ``[z, y, x]`` noisy HU slices.

    Returns
    -------
    level : numpy.ndarray
        float32 ``[z, y, x]``, as :func:`noise_level_map`.
    fineness : numpy.ndarray
        float32 ``[z]``, as :func:`noise_fineness`.
    """
    slices = np.asarray(hu_slices, dtype=np.float32)
    if slices.ndim != 3:
        raise ValueError(f"expected [z, y, x] slices, got shape {slices.shape}")
    level = np.empty(slices.shape, dtype=np.float32)
    fineness = np.empty(slices.shape[0], dtype=np.float32)
    for z, hu in enumerate(slices):
        coarse = residual_block_sd(hu, HIGH_PASS_PX)
        level[z] = _level_from_grid(coarse, hu.shape)
        fineness[z] = _fineness_from_grid(hu, coarse)
    return level, fineness


def _level_from_grid(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A block grid of :func:`residual_block_sd` interpolated back to the slice's pixels and clipped."""
    h, w = shape
    zoom = (h / grid.shape[0], w / grid.shape[1])
    full = ndi.zoom(grid, zoom, order=1, mode="nearest", grid_mode=True)[:h, :w]
    return np.clip(full, 0.0, MAX_NOISE_HU)


def _fineness_from_grid(hu: np.ndarray, coarse: np.ndarray) -> float:
    """One slice's fineness, given its coarse :func:`residual_block_sd` grid (0 without noise)."""
    noisy = coarse >= MIN_BLOCK_NOISE_HU
    if not noisy.any():
        return 0.0
    fine = residual_block_sd(hu, FINE_PASS_PX)
    return float(np.median(fine[noisy] / coarse[noisy]))


__all__ = [
    "BLOCK_PX",
    "FINE_PASS_PX",
    "HIGH_PASS_PX",
    "MAX_NOISE_HU",
    "MIN_BLOCK_NOISE_HU",
    "noise_fineness",
    "noise_level_and_fineness",
    "noise_level_map",
    "residual_block_sd",
    "white_noise_sd_ratio",
]
