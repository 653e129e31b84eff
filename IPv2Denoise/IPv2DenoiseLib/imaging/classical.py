"""Classical (non-learned) CT denoisers: the baselines the trained models are compared with.

Per axial slice, HU in and HU out, strength set from the measured noise so one call works at any
dose. Parameters were chosen by measurement on this project's machine (2 cores, 512² slice:
TV 0.12–0.16 s, curvature diffusion 0.16 s, NLM fast 0.25 s; BM3D 6.5 s and non-commercial, so it
is offered only when the ``bm3d`` package happens to be installed, for benchmarks).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback
from IPv2DenoiseLib.core.simpleitk import sitk
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu

#: Methods always available.
CLASSICAL_METHODS = ("nlm", "tv", "curvature")
#: Scale that maps HU to the normalised units of the TV weight (the range of a 12-bit CT).
TV_SCALE_HU = 4096.0


#: Per-slice filter: ``[y, x]`` HU in, ``[y, x]`` float32 HU out.
SliceFilter = Callable[[np.ndarray], np.ndarray]
#: NLM filtering strength ``h`` as a multiple of the noise SD, for the baseline (the purification's
#: weak denoiser passes its own, 0.8).
NLM_H_FACTOR = 0.9


def nlm_filter(noise_hu: float, *, h_factor: float = NLM_H_FACTOR) -> SliceFilter:
    """Non-local means (scikit-image, fast mode, patch 5, distance 6, ``h = h_factor·noise_hu``).

    Parameters
    ----------
    noise_hu : float
        Noise SD of the slices to filter, HU.
    h_factor : float
        Filtering strength as a multiple of ``noise_hu`` (0.9 for the baseline, 0.8 for the
        purification's weak denoiser).

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out.
    """
    sigma = float(noise_hu)

    def nlm(s: np.ndarray) -> np.ndarray:
        out = denoise_nl_means(
            s.astype(np.float64),
            patch_size=5,
            patch_distance=6,
            h=h_factor * sigma,
            sigma=sigma,
            fast_mode=True,
        )
        return out.astype(np.float32)

    return nlm


def tv_filter(noise_hu: float) -> SliceFilter:
    """Chambolle TV on HU/4096 with weight ``noise_hu/4096`` (0.02 at 80 HU, the best weight measured
    at 2 % dose).

    Parameters
    ----------
    noise_hu : float
        Noise SD of the slices to filter, HU.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out.
    """
    weight = noise_hu / TV_SCALE_HU

    def tv(s: np.ndarray) -> np.ndarray:
        out = denoise_tv_chambolle(s.astype(np.float64) / TV_SCALE_HU, weight=weight) * TV_SCALE_HU
        return out.astype(np.float32)

    return tv


def curvature_filter(noise_hu: float) -> SliceFilter:
    """SimpleITK curvature anisotropic diffusion, ``clip(noise_hu/12, 3, 8)`` iterations (7 at ~80 HU).

    Parameters
    ----------
    noise_hu : float
        Noise SD of the slices to filter, HU.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out (pixel units: time step 0.0625, conductance 1).
    """
    iterations = int(np.clip(round(noise_hu / 12.0), 3, 8))

    def curvature(s: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(s.astype(np.float32))  # unit spacing: time step 0.0625 is stable in 2D
        out = sitk.CurvatureAnisotropicDiffusion(
            image, timeStep=0.0625, conductanceParameter=1.0, numberOfIterations=iterations
        )
        return sitk.GetArrayFromImage(out)

    return curvature


def bm3d_filter(noise_hu: float) -> SliceFilter:
    """BM3D (the optional ``bm3d`` package) with white ``sigma_psd = noise_hu``.

    Parameters
    ----------
    noise_hu : float
        Noise SD of the slices to filter, HU.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out; about 6.5 s per 512² slice on 2 cores.
    """
    import bm3d  # lazy: optional, non-commercial; only reached when available_methods() lists it

    def bm3d_slice(s: np.ndarray) -> np.ndarray:
        return bm3d.bm3d(s.astype(np.float64), sigma_psd=noise_hu).astype(np.float32)

    return bm3d_slice


def gaussian_filter_mm(sigma_mm: float, spacing_xy: tuple[float, float]) -> SliceFilter:
    """Gaussian blur of ``sigma_mm`` (mm converted to pixels with ``spacing_xy = (sx, sy)``).

    Parameters
    ----------
    sigma_mm : float
        Standard deviation of the Gaussian, mm.
    spacing_xy : tuple of float
        Pixel size (sx, sy), mm.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out.
    """
    sx, sy = spacing_xy
    return lambda s: ndi.gaussian_filter(s, sigma=(sigma_mm / sy, sigma_mm / sx)).astype(np.float32)


def median_filter_mm(radius_mm: float, spacing_xy: tuple[float, float]) -> SliceFilter:
    """Median over a disk of ``radius_mm`` (at least 3x3 pixels).

    Parameters
    ----------
    radius_mm : float
        Radius of the disk, mm (an ellipse in pixels when the pixels are not square).
    spacing_xy : tuple of float
        Pixel size (sx, sy), mm.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out (edges repeated).
    """
    sx, sy = spacing_xy
    ry, rx = max(1, round(radius_mm / sy)), max(1, round(radius_mm / sx))
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    footprint = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0 + 1e-6
    footprint[ry] = True
    footprint[:, rx] = True
    return lambda s: ndi.median_filter(s, footprint=footprint, mode="nearest").astype(np.float32)


def bilateral_filter(sigma_mm: float, range_hu: float, spacing_xy: tuple[float, float]) -> SliceFilter:
    """SimpleITK bilateral filter: domain sigma ``sigma_mm`` mm, range sigma ``range_hu``.

    Parameters
    ----------
    sigma_mm : float
        Spatial (domain) sigma, mm.
    range_hu : float
        Intensity (range) sigma, HU: edges stronger than this are kept.
    spacing_xy : tuple of float
        Pixel size (sx, sy), mm.

    Returns
    -------
    SliceFilter
        ``[y, x]`` HU in, float32 HU out.
    """

    def bilateral(s: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(s.astype(np.float32))
        image.SetSpacing(tuple(spacing_xy))
        out = sitk.Bilateral(image, domainSigma=float(sigma_mm), rangeSigma=float(range_hu))
        return sitk.GetArrayFromImage(out).astype(np.float32)

    return bilateral


def available_methods() -> tuple[str, ...]:
    """The classical methods usable here (``bm3d`` only when that package is importable).

    Returns
    -------
    tuple of str
        :data:`CLASSICAL_METHODS`, plus ``"bm3d"`` when available.
    """
    extra = ("bm3d",) if importlib.util.find_spec("bm3d") is not None else ()
    return CLASSICAL_METHODS + extra


#: Baseline method name -> filter factory of the noise SD.
_BASELINES: dict[str, Callable[[float], SliceFilter]] = {
    "nlm": nlm_filter,
    "tv": tv_filter,
    "curvature": curvature_filter,
    "bm3d": bm3d_filter,
}


def denoise_classical(
    hu: np.ndarray,
    method: str,
    *,
    spacing: float | Sequence[float] | None = None,
    noise_hu: float | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Denoise a CT volume or slice with a classical method, slice by slice.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU; not modified.
    method : {"nlm", "tv", "curvature", "bm3d"}
        * ``nlm``: ``skimage.restoration.denoise_nl_means``, fast mode, patch 5, distance 6,
          ``h = 0.9·noise_hu`` (:data:`NLM_H_FACTOR`).
        * ``tv``: ``skimage.restoration.denoise_tv_chambolle`` on HU/4096 with weight
          ``noise_hu/4096`` (0.02 at 80 HU, the best measured weight at 2 % dose).
        * ``curvature``: SimpleITK ``CurvatureAnisotropicDiffusion``, time step 0.0625 (pixel
          units), conductance 1, ``clip(noise_hu/12, 3, 8)`` iterations (conductance 2 and 10
          iterations, the anchor's choice at 0.7 mm pixels, erase 1–2 px lung vessels at
          coarser pixels).
        * ``bm3d``: the ``bm3d`` package with white ``sigma_psd = noise_hu``; only if installed
          (non-commercial licence: benchmarks only).
    spacing : float or (sx, sy[, sz]) mm, optional
        Pixel size; accepted for a uniform signature (these methods work in pixel units).
    noise_hu : float, optional
        Noise SD of the input; by default estimated with
        :func:`IPv2DenoiseLib.imaging.noise_estimate.estimate_noise_hu`.
    progress, cancel
        Progress ``(done, total, message)`` per slice and a cancel token checked between slices.

    Returns
    -------
    float32 ndarray of the input's shape, in HU.

    Raises
    ------
    UserError
        Unknown or unavailable method, non-finite input, not 2D/3D, non-positive ``noise_hu``.
    """
    name = str(method).lower()
    if name not in available_methods():
        why = " (the bm3d package is not installed)" if name == "bm3d" else ""
        raise UserError(f"classical method: got {method!r}{why}; use one of {', '.join(available_methods())}")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise UserError(f"classical denoiser needs a [y, x] slice or [z, y, x] volume, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserError("classical denoiser: the CT contains NaN or infinite values")
    vol = arr[None] if arr.ndim == 2 else arr
    if noise_hu is None:
        noise_hu = estimate_noise_hu(vol)
    if not (noise_hu is not None and np.isfinite(noise_hu) and noise_hu > 0):
        raise UserError(f"noise_hu must be a positive number of HU, got {noise_hu!r}")
    fn = _BASELINES[name](float(noise_hu))
    out = np.empty(vol.shape, dtype=np.float32)
    for z in range(vol.shape[0]):
        if cancel is not None:
            cancel.check()
        out[z] = fn(vol[z])
        if progress is not None:
            progress(z + 1, vol.shape[0], f"{name} slice {z + 1}/{vol.shape[0]}")
    return out[0] if arr.ndim == 2 else out
