"""Image-quality metrics with one definition everywhere .

ROI statistics, noise, CNR, PSNR/SSIM/RMSE in the lung window, the noise power spectrum (AAPM TG-233
style) and LAA-950, plus :func:`roi_comparison_table` for the "before/after denoising" report. Every
function takes HU arrays (2D ``[y, x]`` or 3D ``[z, y, x]``) or :class:`~IPv2DenoiseLib.core.volume.Volume`
objects, never modifies them, and raises :class:`~IPv2DenoiseLib.core.errors.UserError` on mismatched
shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from IPv2DenoiseLib.core.display import LUNG, MEDIASTINAL
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.masks import standard_rois
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable  # re-exported: metrics.MetricsTable

LUNG_WINDOW: tuple[float, float] = LUNG.low_high
"""(low, high) HU: the one window for PSNR/SSIM/RMSE (the lung display preset, −1350 … 150)."""
LUNG_DISPLAY: tuple[float, float] = (LUNG.level, LUNG.width)
"""(level, width) HU for showing lungs (:data:`core.display.LUNG`)."""
MEDIASTINAL_DISPLAY: tuple[float, float] = (MEDIASTINAL.level, MEDIASTINAL.width)
"""(level, width) HU for showing the mediastinum and soft tissue (:data:`core.display.MEDIASTINAL`)."""

SOFT_TISSUE_KEYS = ("soft_tissue", "soft tissue", "mediastinum", "muscle")


def _array(x: Any) -> np.ndarray:
    return np.asarray(getattr(x, "array", x))


def _check_shapes(func: str, names: tuple[str, ...], *arrays: np.ndarray) -> None:
    if len({a.shape for a in arrays}) > 1:
        found = " and ".join(f"{n} shape {a.shape}" for n, a in zip(names, arrays))
        raise UserError(f"{func}: {found} must match")


def _mask(func: str, mask: Any, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    m = _array(mask).astype(bool, copy=False)
    if m.shape != shape:
        raise UserError(f"{func}: {name} shape {m.shape} does not match the image shape {shape}")
    return m


@dataclass(frozen=True)
class RoiStats:
    """HU statistics of the voxels in one region (NaN and ``count=0`` for an empty region).

    Attributes
    ----------
    mean, std : float
        Mean and sample standard deviation (``ddof=1``), HU.
    p5, p95 : float
        5th and 95th percentile, HU.
    count : int
        Voxels in the region.
    """

    mean: float
    std: float
    p5: float
    p95: float
    count: int


def roi_stats(hu: Any, mask: Any) -> RoiStats:
    """Mean, standard deviation, 5th and 95th percentile of ``hu`` inside ``mask``.

    Parameters
    ----------
    hu : array_like or Volume
        Image in HU.
    mask : array_like of bool, same shape as ``hu``
        Region of interest.

    Returns
    -------
    RoiStats
        ``std`` is the sample standard deviation (``ddof=1``; NaN for fewer than 2 voxels).
        Percentiles use linear interpolation between order statistics (rank ``q/100·(n−1)``).
        An empty mask gives NaN values and ``count=0``.
    """
    img = _array(hu)
    vals = img[_mask("roi_stats", mask, img.shape)]
    n = int(vals.size)
    if n == 0:
        return RoiStats(math.nan, math.nan, math.nan, math.nan, 0)
    p5, p95 = np.percentile(vals, [5.0, 95.0])
    std = float(np.std(vals, dtype=np.float64, ddof=1)) if n > 1 else math.nan
    return RoiStats(float(np.mean(vals, dtype=np.float64)), std, float(p5), float(p95), n)


def noise_std(hu: Any, mask: Any) -> float:
    """Noise as the standard deviation of HU in a homogeneous ROI (NaN when empty).

    Parameters
    ----------
    hu : array_like or Volume
        Image in HU.
    mask : array_like of bool, same shape as ``hu``
        A homogeneous region (e.g. :func:`~IPv2DenoiseLib.imaging.masks.soft_tissue_mask`).

    Returns
    -------
    float
        Sample standard deviation, HU.
    """
    return roi_stats(hu, mask).std


def noise_from_realisations(a: Any, b: Any, mask: Any) -> float:
    """Noise of one image from two noise realisations of the same object: ``std(a − b)/√2``.

    The structure cancels in the difference, so this works in non-uniform regions too; the √2
    undoes the doubled variance of a difference of two independent realisations.

    Parameters
    ----------
    a, b : array_like or Volume
        Two scans of the same object in HU, same shape, independent noise.
    mask : array_like of bool, same shape
        Where to measure.

    Returns
    -------
    float
        Noise SD of one realisation, HU (NaN when the mask is empty).
    """
    a, b = _array(a), _array(b)
    _check_shapes("noise_from_realisations", ("a", "b"), a, b)
    diff = a.astype(np.float64) - b
    return roi_stats(diff, mask).std / math.sqrt(2.0)


def cnr(hu: Any, mask_a: Any, mask_b: Any, *, noise_mask: Any = None) -> float:
    """Contrast-to-noise ratio ``|mean_a − mean_b| / noise``.

    ``noise`` is the standard deviation in ``mask_b`` (the background, e.g. soft tissue when
    ``mask_a`` is lung), or in ``noise_mask`` when given (a homogeneous ROI). CNR rewards
    over-smoothing, so report it next to an edge or texture metric (e.g. :func:`nps_2d`).

    Parameters
    ----------
    hu : array_like or Volume
        Image in HU.
    mask_a, mask_b : array_like of bool, same shape as ``hu``
        The two regions compared (``mask_b`` also gives the noise by default).
    noise_mask : array_like of bool, optional
        A homogeneous region for the noise instead of ``mask_b``.

    Returns
    -------
    float
        The CNR (unitless); NaN if a region is empty or the noise is zero.
    """
    a, b = roi_stats(hu, mask_a), roi_stats(hu, mask_b)
    noise = b.std if noise_mask is None else noise_std(hu, noise_mask)
    if not noise > 0:
        return math.nan
    return abs(a.mean - b.mean) / noise


def _windowed(func: str, reference: Any, test: Any, mask: Any, window: tuple[float, float]):
    ref, tst = _array(reference), _array(test)
    _check_shapes(func, ("reference", "test"), ref, tst)
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise UserError(f"{func}: window {tuple(window)} must be (low, high) HU with low < high")

    def scale(x: np.ndarray) -> np.ndarray:
        return (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)

    m = None if mask is None else _mask(func, mask, ref.shape)
    return scale(ref), scale(tst), m, hi - lo


def psnr(reference: Any, test: Any, *, mask: Any = None, window: tuple[float, float] = LUNG_WINDOW) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference``.

    Both images are clipped to ``window`` (HU) and scaled to [0, 1]; PSNR = 10·log10(1/MSE) with
    ``data_range=1`` (:func:`skimage.metrics.peak_signal_noise_ratio`) over the voxels in ``mask``
    (all voxels if ``None``). Identical images give ``inf``; an empty mask gives NaN.

    Parameters
    ----------
    reference, test : array_like or Volume
        The reference (e.g. NDCT or noise-free truth) and the image scored, HU, same shape.
    mask : array_like of bool, optional
        Voxels scored; all when None.
    window : (low, high) HU
        Clipping window; the lung window by default.

    Returns
    -------
    float
        PSNR, dB.

    Raises
    ------
    UserError
        If the shapes of ``reference``, ``test`` and ``mask`` differ, or the window is invalid.
    """
    ref, tst, m, _ = _windowed("psnr", reference, test, mask, window)
    if m is not None:
        ref, tst = ref[m], tst[m]
    if ref.size == 0:
        return math.nan
    if np.array_equal(ref, tst):
        return math.inf
    return float(peak_signal_noise_ratio(ref, tst, data_range=1.0))


def rmse(reference: Any, test: Any, *, mask: Any = None, window: tuple[float, float] = LUNG_WINDOW) -> float:
    """Root-mean-square error **in HU** between the window-clipped images (inside ``mask``).

    Computed on the [0, 1]-scaled images like :func:`psnr` and multiplied back by the window
    width, so ``psnr = 20·log10(width / rmse)``. An empty mask gives NaN.

    Parameters
    ----------
    reference, test : array_like or Volume
        The reference and the image scored, HU, same shape.
    mask : array_like of bool, optional
        Voxels scored; all when None.
    window : (low, high) HU
        Clipping window; the lung window by default.

    Returns
    -------
    float
        RMSE, HU.
    """
    ref, tst, m, width = _windowed("rmse", reference, test, mask, window)
    if m is not None:
        ref, tst = ref[m], tst[m]
    if ref.size == 0:
        return math.nan
    return float(np.sqrt(np.mean((ref - tst) ** 2)) * width)


def ssim(
    reference: Any,
    test: Any,
    *,
    mask: Any = None,
    window: tuple[float, float] = LUNG_WINDOW,
    win_size: int = 7,
) -> float:
    """Mean structural similarity (Wang et al. 2004) of ``test`` against ``reference``.

    Images are clipped to ``window`` and scaled to [0, 1]; the SSIM map comes from
    :func:`skimage.metrics.structural_similarity` (``data_range=1``, ``full=True``, uniform
    ``win_size`` window), one 2D axial slice at a time. The result is the mean of the map over the
    voxels of ``mask`` (all voxels if ``None``) pooled over slices, leaving out a border of
    ``(win_size − 1)//2`` pixels where the filter sees padding — with no mask this equals
    skimage's own mean SSIM of a 2D image. Slices with no mask voxel are skipped; NaN if none is left.

    Parameters
    ----------
    reference, test : array_like or Volume
        The reference and the image scored, HU, same shape, 2D [y, x] or 3D [z, y, x].
    mask : array_like of bool, optional
        Voxels scored; all when None.
    window : (low, high) HU
        Clipping window; the lung window by default.
    win_size : int
        Side of the uniform SSIM window, pixels (odd).

    Returns
    -------
    float
        Mean SSIM, at most 1.

    Raises
    ------
    UserError
        On mismatched shapes or slices smaller than ``win_size``.

    References
    ----------
    .. [1] Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from
       error visibility to structural similarity", IEEE TIP 13(4):600–612, 2004.
       :doi:`10.1109/TIP.2003.819861`
    """
    ref, tst, m, _ = _windowed("ssim", reference, test, mask, window)
    if ref.ndim not in (2, 3) or min(ref.shape[-2:]) < win_size:
        raise UserError(
            f"ssim: image shape {ref.shape} must be 2D/3D with slices of at least {win_size}×{win_size}"
        )
    ref, tst = ref.reshape((-1, *ref.shape[-2:])), tst.reshape((-1, *tst.shape[-2:]))
    m = np.ones(ref.shape, bool) if m is None else m.reshape(ref.shape)
    pad = (win_size - 1) // 2
    inner = np.zeros(ref.shape[1:], bool)
    inner[pad : ref.shape[1] - pad, pad : ref.shape[2] - pad] = True
    total, count = 0.0, 0
    for r, t, mk in zip(ref, tst, m):
        sel = mk & inner
        if not sel.any():
            continue
        _, smap = structural_similarity(r, t, data_range=1.0, win_size=win_size, full=True)
        total += float(smap[sel].sum())
        count += int(sel.sum())
    return total / count if count else math.nan


@dataclass(frozen=True)
class NPS:
    """A noise power spectrum.

    Attributes
    ----------
    freq : radial frequencies in 1/mm (bin centres, 0 … Nyquist).
    radial : radially averaged NPS in HU²·mm² at ``freq``.
    nps2d : 2D NPS in HU²·mm², zero frequency at the centre (``fftshift``), axes (fy, fx).
    mean_freq : Σ f·NPS / Σ NPS over the 2D NPS, 1/mm (lower = blotchier, "plastic" texture).
    peak_freq : frequency of the radial maximum, 1/mm.
    variance : ∫ NPS df over the 2D NPS, HU² (≈ noise variance of the ROIs after detrending).
    n_rois : number of ROIs averaged.
    """

    freq: np.ndarray
    radial: np.ndarray
    nps2d: np.ndarray
    mean_freq: float
    peak_freq: float
    variance: float
    n_rois: int


def nps_2d(
    noise: Any,
    *,
    pixel_spacing_mm: float | tuple[float, float],
    roi_size: int = 64,
    mask: Any = None,
    detrend: str = "mean",
    stride: int | None = None,
) -> NPS:
    """2D noise power spectrum of a noise-only image, AAPM TG-233 style.

    Square ``roi_size`` ROIs are taken on a grid (step ``stride``, default ``roi_size``) in every
    axial slice, keeping only ROIs entirely inside ``mask`` when given. Each ROI is detrended
    (``"mean"``: subtract its mean; ``"plane"``: subtract a least-squares first-order 2D fit), and
    ``NPS = |FFT2(roi)|² · dx·dy / (Nx·Ny)`` is averaged over all ROIs and slices. The radial profile
    averages the 2D NPS in rings one frequency bin wide.

    Parameters
    ----------
    noise : array_like or Volume, 2D [y, x] or 3D [z, y, x]
        A noise-only image in HU: ``image − truth``, or ``(a − b)/√2`` for two realisations
        ``a, b`` (a plain difference has twice the variance).
    pixel_spacing_mm : float or (dx, dy)
        In-plane pixel spacing in mm.
    roi_size : int
        ROI side in pixels.
    mask : array_like of bool, optional
        Where ROIs may lie (e.g. a homogeneous region or the body).
    detrend : {"mean", "plane"}
    stride : int, optional
        Grid step in pixels (``roi_size//2`` gives half-overlapping ROIs).

    Returns
    -------
    NPS

    Raises
    ------
    UserError
        If no ROI fits, or an option is out of range.

    References
    ----------
    .. [1] E. Samei et al., "Performance evaluation of computed tomography systems: Summary of AAPM
       Task Group 233", Med. Phys. 46(11):e735–e756, 2019. :doi:`10.1002/mp.13763`
    """
    img = _array(noise)
    if img.ndim not in (2, 3):
        raise UserError(f"nps_2d: noise must be 2D or 3D, got shape {img.shape}")
    if detrend not in ("mean", "plane"):
        raise UserError(f"nps_2d: detrend {detrend!r} must be 'mean' or 'plane'")
    dx, dy = (float(pixel_spacing_mm),) * 2 if np.isscalar(pixel_spacing_mm) else map(float, pixel_spacing_mm)
    r, step = int(roi_size), int(stride or roi_size)
    if r < 4 or step < 1 or dx <= 0 or dy <= 0:
        raise UserError(
            f"nps_2d: roi_size {roi_size}, stride {stride}, spacing {pixel_spacing_mm} out of range"
        )
    m = None if mask is None else _mask("nps_2d", mask, img.shape)
    img3 = img.reshape((-1, *img.shape[-2:]))
    m3 = None if m is None else m.reshape(img3.shape)
    ny, nx = img3.shape[1:]
    corners = [(y, x) for y in range(0, ny - r + 1, step) for x in range(0, nx - r + 1, step)]
    yy, xx = np.mgrid[0:r, 0:r]
    design = np.stack([np.ones(r * r), xx.ravel(), yy.ravel()], axis=1)
    fit = np.linalg.pinv(design)  # (3, r²): least-squares plane coefficients of a flattened ROI
    acc, n = np.zeros((r, r)), 0
    for z in range(img3.shape[0]):
        keep = [(y, x) for y, x in corners if m3 is None or m3[z, y : y + r, x : x + r].all()]
        if not keep:
            continue
        rois = np.stack([img3[z, y : y + r, x : x + r] for y, x in keep]).astype(np.float64)
        if detrend == "mean":
            rois -= rois.mean(axis=(1, 2), keepdims=True)
        else:
            flat = rois.reshape(len(keep), -1)
            rois = (flat - (flat @ fit.T) @ design.T).reshape(rois.shape)
        acc += (np.abs(np.fft.fft2(rois)) ** 2).sum(axis=0)
        n += len(keep)
    if n == 0:
        raise UserError(
            f"nps_2d: no {r}×{r} ROI fits in the image {img.shape} (inside the mask); use a smaller roi_size"
        )
    nps = np.fft.fftshift(acc / n * dx * dy / (r * r))
    fy, fx = np.meshgrid(
        np.fft.fftshift(np.fft.fftfreq(r, dy)), np.fft.fftshift(np.fft.fftfreq(r, dx)), indexing="ij"
    )
    f = np.hypot(fx, fy)
    df = 1.0 / (r * max(dx, dy))
    ring = np.rint(f / df).astype(int)
    nbins = r // 2 + 1
    inside = ring < nbins
    counts = np.bincount(ring[inside], minlength=nbins)
    radial = np.bincount(ring[inside], weights=nps[inside], minlength=nbins) / np.maximum(counts, 1)
    freq = np.arange(nbins) * df
    total = nps.sum()
    mean_freq = float((f * nps).sum() / total) if total > 0 else math.nan
    variance = float(total / (r * dx) / (r * dy))
    return NPS(freq, radial, nps, mean_freq, float(freq[int(np.argmax(radial))]), variance, n)


def laa950(hu: Any, lung_mask: Any, *, threshold: float = -950.0) -> float:
    """Low-attenuation area: percent of lung voxels strictly below ``threshold`` HU (LAA-950).

    The emphysema index (RA950) at the usual −950 HU threshold for inspiratory CT. Noise inflates
    it and smoothing deflates it, so compare it against the standard-dose value. NaN for an empty
    lung mask.

    Parameters
    ----------
    hu : array_like or Volume
        Image in HU.
    lung_mask : array_like of bool, same shape as ``hu``
        The whole lungs (vessels included, by convention).
    threshold : float
        HU below which a voxel counts as low attenuation.

    Returns
    -------
    float
        Percent of lung voxels, 0–100.
    """
    img = _array(hu)
    vals = img[_mask("laa950", lung_mask, img.shape, "lung_mask")]
    return float(np.count_nonzero(vals < threshold) * 100.0 / vals.size) if vals.size else math.nan


def roi_comparison_table(
    before_hu: Any,
    after_hu: Any,
    regions: dict[str, Any],
    *,
    lung_key: str = "lung",
    soft_tissue_key: str | None = None,
    laa_mask: Any = None,
) -> MetricsTable:
    """The "before/after denoising" ROI table .

    Per region: mean, std, p5, p95 before and after (HU) with ``change = after − before``, and the
    noise reduction ``100·(1 − std_after/std_before)`` in %. If ``regions`` has ``lung_key``: the
    CNR of lung against soft tissue (the first of ``soft_tissue``, ``soft tissue``, ``mediastinum``,
    ``muscle``, or ``soft_tissue_key``; noise from the soft-tissue std) and LAA-950 (%, change in
    percentage points) over ``laa_mask`` (the whole lungs, vessels included, by convention) or, if
    not given, over the ``lung_key`` region.

    Parameters
    ----------
    before_hu, after_hu : array_like or Volume
        The scan before and after denoising, HU, same shape.
    regions : dict of str to array_like of bool
        The ROIs by name, each of the scan's shape.
    lung_key : str
        The region that is lung (for CNR and LAA-950).
    soft_tissue_key : str, optional
        The region that is soft tissue; found among the usual names when None.
    laa_mask : array_like of bool, optional
        The whole lungs for LAA-950; the ``lung_key`` region when None.

    Returns
    -------
    MetricsTable
        One row per statistic (before, after, change, unit).
    """
    before, after = _array(before_hu), _array(after_hu)
    _check_shapes("roi_comparison_table", ("before_hu", "after_hu"), before, after)
    table = MetricsTable()
    for name, mask in regions.items():
        b, a = roi_stats(before, mask), roi_stats(after, mask)
        for stat in ("mean", "std", "p5", "p95"):
            vb, va = getattr(b, stat), getattr(a, stat)
            table.add_row(f"{name} {stat}", vb, va, va - vb, "HU")
        reduction = 100.0 * (1.0 - a.std / b.std) if b.std > 0 else math.nan
        table.add_row(metric=f"{name} noise reduction", change=reduction, unit="%")
    soft = soft_tissue_key or next((k for k in SOFT_TISSUE_KEYS if k in regions), None)
    if lung_key in regions and soft in regions:
        cb, ca = (cnr(x, regions[lung_key], regions[soft]) for x in (before, after))
        table.add_row(f"CNR {lung_key} vs {soft}", cb, ca, ca - cb, "")
    if laa_mask is not None or lung_key in regions:
        lungs = regions[lung_key] if laa_mask is None else laa_mask
        lb, la = (laa950(x, lungs) for x in (before, after))
        table.add_row("LAA-950", lb, la, la - lb, "%")
    return table


def slice_correlation(noise: np.ndarray, mask: np.ndarray) -> float:
    """Lag-1 correlation of ``noise`` between adjacent slices, over voxels in ``mask`` in both.

    Written by hand: a Pearson correlation of the voxel pairs (z, z+1); no library call takes a mask.

    Parameters
    ----------
    noise : ndarray, [z, y, x]
        A noise-only image, HU.
    mask : ndarray of bool, same shape
        Where to measure.

    Returns
    -------
    float
        The correlation in [-1, 1]; NaN for fewer than 2 slices or 10 voxel pairs.
    """
    if noise.ndim != 3 or noise.shape[0] < 2:
        return math.nan
    both = mask[:-1] & mask[1:]
    if both.sum() < 10:
        return math.nan
    a, b = noise[:-1][both].astype(np.float64), noise[1:][both].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def scan_comparison_table(
    before_hu: Any,
    after_hu: Any,
    *,
    spacing: tuple[float, float, float] | None = None,
    extra_regions: dict[str, Any] | None = None,
) -> MetricsTable:
    """The ROI metrics table of one scan before and after denoising: the numbers every front end shows.

    Regions are :func:`~IPv2DenoiseLib.imaging.masks.standard_rois` of the scan *before* denoising
    (lung parenchyma, soft tissue, background air; the same voxels for both), plus
    ``extra_regions`` (a user's ROI or segment); LAA-950 over the whole lungs. ``demo``, the Slicer
    module and the web app call this, so their tables agree to the last digit.

    Parameters
    ----------
    before_hu, after_hu : array_like or Volume
        The scan before and after denoising, HU, (z, y, x), same shape.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order, for the ROIs.
    extra_regions : dict of str to array_like of bool, optional
        More ROIs by name, each of the scan's shape.

    Returns
    -------
    MetricsTable
        As :func:`roi_comparison_table`.
    """
    before = _array(before_hu)
    regions = standard_rois(before, spacing=spacing)
    lungs = regions.pop("lungs_whole")
    regions.update(extra_regions or {})
    return roi_comparison_table(
        before, after_hu, regions, lung_key="lung", soft_tissue_key="soft_tissue", laa_mask=lungs
    )
