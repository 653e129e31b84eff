"""Estimate the noise level (SD in HU) of a single CT scan, without a second realisation.

Used to scale the weak denoiser of *Remove noise* and the classical baselines to the noise of the
scan at hand. CT noise is spatially correlated, so white-noise estimators (e.g. the wavelet MAD of
``skimage.restoration.estimate_sigma``) report about half the true SD; both estimates here work on
the image itself.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import structure_tensor, structure_tensor_eigenvalues

from IPv2DenoiseLib.imaging.masks import body_mask, soft_tissue_mask
from IPv2DenoiseLib.imaging.metrics import slice_correlation

#: Width (pixels, Gaussian SD) of the in-region smoothing whose residual is the noise sample.
HIGH_PASS_PX = 6.0
#: In-plane smoothing (pixels) and erosion of the default soft-tissue region. The region is found
#: on the noisy scan by its HU range; with the mask's own 1.5 px smoothing, smooth noise of 100+ HU
#: scatters pixels out of the range wherever the noise is large, and what stays reads at half the
#: SD. Smoothing over 8 px (and eroding as far, to keep the blurred edges out) fixes that.
MASK_SMOOTH_PX = 8.0
MASK_EROSION_PX = 8
#: Widest noise correlation (pixels, Gaussian SD) the high-pass correction assumes. CT kernels at
#: clinical pixel sizes correlate noise over 0.5-2 px; a residual more correlated than that is
#: anatomy, not noise (a denoised scan, small vessels), and dividing it out as if it were noise read
#: the shipped model's output of pydicom's CT_small at 74 HU against 47 for its input. At 2.5 px the
#: correction is at most 1.26x and smooth noise up to 2 px still reads within 15 %.
MAX_NOISE_WIDTH_PX = 2.5
#: Noise correlation widths (pixels) of the model table that undoes the high-pass's loss.
_MODEL_WIDTHS = np.linspace(0.0, MAX_NOISE_WIDTH_PX, int(round(MAX_NOISE_WIDTH_PX * 10)) + 1)


def _high_pass_model(high_pass_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Lag-1 correlation of the residual, and the share of the noise variance it keeps, for noise of
    Gaussian correlation width ``c`` (:data:`_MODEL_WIDTHS`) after removing a Gaussian mean of width
    ``high_pass_px`` (computed on a 256² frequency grid)."""
    k = 2.0 * np.pi * np.fft.fftfreq(256)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    keep = (1.0 - np.exp(-0.5 * k2 * high_pass_px**2)) ** 2
    lag1, share = [], []
    for c in _MODEL_WIDTHS:
        psd = np.exp(-k2 * c * c)  # white noise smoothed by a Gaussian of SD c pixels
        kept = psd * keep
        share.append(kept.sum() / psd.sum())
        lag1.append((kept * np.cos(k)[None, :]).sum() / kept.sum())
    return np.asarray(lag1), np.asarray(share)


_LAG1, _SHARE = _high_pass_model(HIGH_PASS_PX)


def _robust_sd(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


#: Slices (evenly spaced) on which the noise of a whole volume is measured: bounded time and memory.
NOISE_SLICES = 16


def noise_region(hu: np.ndarray, *, window: int = 7) -> np.ndarray:
    """The homogeneous region :func:`estimate_noise_hu` measures in by default.

    Soft tissue of the scan smoothed over :data:`MASK_SMOOTH_PX` and eroded by
    :data:`MASK_EROSION_PX`; on small or tissue-poor slices (fewer than 200 pixels left after a
    further ``window``² erosion) the plain soft-tissue mask.

    Parameters
    ----------
    hu : ndarray, [z, y, x]
        CT in HU.
    window : int
        Side of the square the caller erodes the region with, pixels.

    Returns
    -------
    ndarray of bool
        Same shape as ``hu``.
    """
    vol3 = np.asarray(hu, dtype=np.float32)
    region = soft_tissue_mask(vol3, smooth_px=MASK_SMOOTH_PX, erosion_radius=MASK_EROSION_PX)
    if ndi.binary_erosion(region, np.ones((1, window, window), dtype=bool)).sum() < 200:
        region = soft_tissue_mask(vol3)
    return region


def volume_noise_hu(
    hu: np.ndarray, *, reference: np.ndarray | None = None, slices: int = NOISE_SLICES
) -> float:
    """Noise SD (HU) of a whole volume: :func:`estimate_noise_hu` on up to ``slices`` evenly spaced slices.

    The one rule for "how noisy is this scan" (the training-range warning, ``batch``'s records,
    the DICOM node's log). With ``reference`` (the same scan before denoising), the region comes
    from the reference, so a before/after pair is measured on the same voxels.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    reference : ndarray, optional
        The scan ``hu`` was made from (same shape): its region is used.
    slices : int
        At most this many slices are measured.

    Returns
    -------
    float
        Noise SD in HU.
    """
    vol = np.asarray(hu, dtype=np.float32)
    vol = vol[None] if vol.ndim == 2 else vol
    picks = np.unique(np.linspace(0, vol.shape[0] - 1, min(slices, vol.shape[0])).round().astype(int))
    region = None
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float32).reshape(vol.shape)
        region = noise_region(ref[picks])
    return estimate_noise_hu(vol[picks], region=region)


def estimate_noise_hu(hu: np.ndarray, *, region: np.ndarray | None = None, window: int = 7) -> float:
    """Noise SD in HU of a CT slice or volume, also for smooth (coarse-grained) noise.

    Over a homogeneous region (default :func:`~IPv2DenoiseLib.imaging.masks.soft_tissue_mask` of the
    scan smoothed over :data:`MASK_SMOOTH_PX`, eroded by ``window // 2``) the anatomy is removed by a Gaussian mean of :data:`HIGH_PASS_PX`
    pixels taken inside the region, and the residual's robust SD (1.4826·MAD) is measured. Smooth
    noise (a soft kernel, or pixels finer than the detector) keeps much of its power below that
    scale, and a plain local SD then reads it at half its SD; so the residual's lag-1 correlation
    (robustly, from the MAD of its pixel differences) gives the noise's correlation width, and the
    share of the variance the high-pass kept for noise of that width is divided out. Each slice is
    measured in-plane, so slice-correlated noise reads the same as independent noise. With fewer than
    200 such pixels (small or tissue-poor slices): the robust SD of horizontal pixel differences
    inside the body, divided by √2.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU; not modified.
    region : ndarray of bool, optional
        A homogeneous region of ``hu``'s shape to measure in; the soft-tissue mask by default.
    window : int
        Side of the in-plane square the region is eroded with, pixels (keeps edges out).

    Returns
    -------
    float
        The noise SD, HU.
    """
    vol = np.asarray(hu, dtype=np.float32)
    vol3 = vol[None] if vol.ndim == 2 else vol
    square = np.ones((1, window, window), dtype=bool)
    if region is None:
        region = noise_region(vol3, window=window)
    region = np.asarray(region, dtype=bool).reshape(vol3.shape)
    inner = ndi.binary_erosion(region, square)
    if inner.sum() >= 200:
        weight = region.astype(np.float64)
        sigma = (0.0, HIGH_PASS_PX, HIGH_PASS_PX)
        mean = ndi.gaussian_filter(vol3 * weight, sigma) / np.maximum(
            ndi.gaussian_filter(weight, sigma), 1e-6
        )
        residual = vol3 - mean
        sd = _robust_sd(residual[inner])
        pairs = np.concatenate(
            [
                (residual[..., 1:] - residual[..., :-1])[inner[..., 1:] & inner[..., :-1]],
                (residual[:, 1:] - residual[:, :-1])[inner[:, 1:] & inner[:, :-1]],
            ]
        )
        if sd <= 0 or pairs.size < 100:
            return float(sd)
        lag1 = float(np.clip(1.0 - (_robust_sd(pairs) / sd) ** 2 / 2.0, _LAG1[0], _LAG1[-1]))
        share = float(np.interp(lag1, _LAG1, _SHARE))
        return float(sd / np.sqrt(share))  # a Python float: it goes into training checkpoints
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

    Parameters
    ----------
    hu : ndarray, [z, y, x]
        CT in HU; not modified.
    region : ndarray of bool, optional
        A homogeneous region of ``hu``'s shape; the soft-tissue mask by default.
    window : int
        Side of the local mean removed in-plane and of the region's erosion, pixels.

    Returns
    -------
    float
        The correlation, 0 … 1.
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


#: Smoothing (pixels) of the noise before its gradients: the measure reads the grain, not single pixels.
STREAK_GRAIN_PX = 1.0
#: Window (mm, Gaussian SD) over which the orientation is pooled: the length of a streak segment.
STREAK_WINDOW_MM = 3.0
#: Neighbourhood (mm, Gaussian SD) of the local SD the noise is divided by first, so that the measure
#: follows the direction of the noise, not where it is strong.
STREAK_LEVEL_MM = 10.0


def noise_streakiness(noise: np.ndarray, *, region: np.ndarray, pixel_mm: float) -> float:
    """How streaky a noise field is: mean orientation coherence of its local structure tensor in ``region``.

    Noise inserted in the projection domain at low dose runs along the rays through dense anatomy
    (streaks: about 0.3–0.8 at 2 % dose); image-domain noise of a smooth kernel or an iterative
    reconstruction has no local direction (about 0.1–0.2, the floor of a finite window). Two noise
    fields with the same power spectrum and local SD can differ here, and a denoiser fine-tuned on
    the wrong one of them learns the wrong thing (docs/training.md, "How many steps").

    Parameters
    ----------
    noise : ndarray, [z, y, x] or [y, x]
        A noise sample (HU), e.g. a scan minus its denoised self; not modified.
    region : ndarray of bool, same shape
        Where to average (homogeneous tissue); edges of anatomy would read as streaks.
    pixel_mm : float
        In-plane pixel size, mm.

    Returns
    -------
    float
        0 (isotropic) … 1 (every neighbourhood one direction); NaN when ``region`` is empty.
    """
    field = np.asarray(noise, dtype=np.float64)
    inside = np.asarray(region, dtype=bool)
    if field.ndim == 2:
        field, inside = field[None], inside[None]
    if not inside.any():
        return float("nan")
    level = STREAK_LEVEL_MM / pixel_mm
    values = []
    for plane, mask in zip(field, inside, strict=True):
        if not mask.any():
            continue
        local_sd = np.sqrt(ndi.gaussian_filter(plane**2, level))
        grain = ndi.gaussian_filter(plane / np.maximum(local_sd, 1e-6), STREAK_GRAIN_PX)
        tensor = structure_tensor(grain, sigma=STREAK_WINDOW_MM / pixel_mm, mode="reflect", order="rc")
        largest, smallest = structure_tensor_eigenvalues(tensor)
        coherence = (largest - smallest) / np.maximum(largest + smallest, 1e-12)
        values.append(coherence[mask])
    return float(np.concatenate(values).mean())
