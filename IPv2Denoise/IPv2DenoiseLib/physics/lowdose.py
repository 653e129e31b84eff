"""Add noise: physically based low-dose CT simulation in HU (IPv2's *Sim(N)*, docs/purification.md).

Two public functions, both HU in → HU out, ``[y, x]`` or ``[z, y, x]``, per axial slice:

* :func:`simulate_low_dose` treats the input as the noise-free object and simulates a scan at
  ``dose`` × the calibrated full-dose flux: Poisson photon counts plus Gaussian electronic noise,
  safe log, FBP.
* :func:`insert_noise` treats the input as a real normal-dose scan (which already carries its own
  noise) and adds only the *extra* projection noise that takes it to dose fraction ``dose``
  (Yu et al. 2012; Zeng et al. 2015).

Both reconstruct the noise only — ``out = input + FBP(p_noisy − p_clean)`` — which equals
``FBP(p_noisy)`` plus the (small) discretisation error of ``FBP(P(input)) − input``, so the
output keeps the input's resolution and mean HU exactly where no photon starvation occurs, and
still carries the log bias and streaks where it does (the difference is not zero-mean there).

Physics (see docs/noise-calibration.md): ``μ = μ_water (1 + HU/1000)`` clipped at 0, line
integrals ``p = Σ μ Δ`` with the pixel size in mm, expected counts ``λ = I0 · dose · e^{−p}``,
measured counts ``y = Poisson(λ) + N(0, σ_e²)``, ``p̂ = −ln(max(y, floor) / (I0 · dose))``.
The noise is drawn per slice from a generator seeded from ``(seed, slice index)``, so results are
identical for the same seed whatever the batch size or device order of work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.device import resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback
from IPv2DenoiseLib.physics.projector import (
    FILTERS,
    FanGeometry,
    FanRebinner,
    ParallelProjector,
)

#: Linear attenuation of water at ~70 keV effective energy (120 kVp), 1/mm.
MU_WATER_PER_MM = 0.0192
#: Full-dose incident photons per ray, calibrated (docs/noise-calibration.md) so that the
#: mediastinum ROI of a chest-like phantom has ~12 HU noise at 100 % with 0.7 mm pixels, ramp FBP.
I0_FULL_DOSE = {"parallel": 2.1e6, "fan": 2.8e5}
#: Electronic (detector) noise SD in counts per ray reading: 10 for parallel (TIGRE's value); the fan
#: rays need fewer photons for the same image noise (rebinning averages them), so the fan value keeps
#: the same electronic-to-quantum ratio, 10·√(I0_fan/I0_parallel) ≈ 3.7 (Zeng 2015 uses σ_e² ≈ 10).
ELECTRONIC_SIGMA = {"parallel": 10.0, "fan": 10.0 * math.sqrt(I0_FULL_DOSE["fan"] / I0_FULL_DOSE["parallel"])}
#: Safe-log floor: measured counts below this are set to it (photon starvation).
COUNT_FLOOR = 1.0
#: Default views: parallel over 180°, fan over 360° (Siemens-like 1152 per rotation).
DEFAULT_VIEWS = {"parallel": 720, "fan": 1152}
GEOMETRIES = ("fan", "parallel")
#: Most views per scan: eight times a clinical fan scanner's (more only costs memory and time).
MAX_VIEWS = 8 * DEFAULT_VIEWS["fan"]
#: Finest in-plane sampling (mm) a clinical detector resolves at the isocentre: noise simulated for
#: finer pixels would have a texture no scanner makes (see :func:`detector_grid_noise`).
DETECTOR_PITCH_MM = 0.6

#: Per-ray exposure model: ``(p, ray_offsets_mm) -> relative flux``. ``p`` holds the clean line
#: integrals ``[slices, views, rays]`` in the measurement domain (fan or parallel), ``ray_offsets_mm``
#: each ray's distance from the isocentre ``[rays]``; the result (broadcastable to ``p``) multiplies
#: the incident photons of every ray: a bowtie filter, tube-current modulation (see
#: :mod:`IPv2DenoiseLib.physics.scanner_noise`). ``None`` = uniform flux.
FluxModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hu_to_mu(hu: np.ndarray | torch.Tensor, mu_water: float = MU_WATER_PER_MM):
    """HU → linear attenuation (1/mm), negative values clipped to 0."""
    mu = mu_water * (1.0 + hu / 1000.0)
    return mu.clip(min=0.0) if isinstance(mu, torch.Tensor) else np.clip(mu, 0.0, None)


# ----------------------------------------------------------------------------------------------
# Scanner model: projector (+ fan rebinning) for one slice size, geometry and device; cached.
# ----------------------------------------------------------------------------------------------


class _Scanner:
    """Line integrals in the measurement domain and FBP of measurement-domain differences."""

    def __init__(
        self, n: int, pixel_mm: float, geometry: str, views: int, device: torch.device, backend: str
    ) -> None:
        self.geometry = geometry
        par_views = views // 2 if geometry == "fan" else views
        self.proj = ParallelProjector(n, par_views, device=device, backend=backend)
        self.rebin: FanRebinner | None = None
        if geometry == "fan":
            r = FanGeometry().source_to_iso_mm
            dgamma = pixel_mm / r  # channel pitch at the isocentre = one pixel
            radius = (self.proj.n_det / 2 + 1) * pixel_mm
            half = math.asin(min(radius / r, 0.95))
            channels = 2 * int(math.ceil(half / dgamma)) + 1
            fan = FanGeometry(views=views, channels=channels, dgamma=dgamma)
            self.rebin = FanRebinner(fan, n_det=self.proj.n_det, ds_mm=pixel_mm, device=device)

    def ray_offsets_mm(self, pixel_mm: float) -> torch.Tensor:
        """Distance of each measured ray from the isocentre (fan: ``R sin γ``; parallel: ``s``)."""
        if self.rebin is not None:
            fan = self.rebin.fan
            gamma = (torch.arange(fan.channels, dtype=torch.float64) - (fan.channels - 1) / 2) * fan.dgamma
            return (fan.source_to_iso_mm * torch.sin(gamma)).float()
        m = self.proj.n_det
        return ((torch.arange(m, dtype=torch.float64) - (m - 1) / 2) * pixel_mm).float()

    def line_integrals(self, mu_px: torch.Tensor) -> torch.Tensor:
        p = self.proj.forward(mu_px)
        return self.rebin.to_fan(p) if self.rebin is not None else p

    def reconstruct(self, dp: torch.Tensor, filter: str) -> torch.Tensor:
        if self.rebin is not None:
            dp = self.rebin.to_parallel(dp)
        return self.proj.fbp(dp, filter=filter)


@lru_cache(maxsize=4)
def _scanner(n: int, pixel_mm: float, geometry: str, views: int, device: str, backend: str) -> _Scanner:
    return _Scanner(n, pixel_mm, geometry, views, torch.device(device), backend)


# ----------------------------------------------------------------------------------------------
# Noise draws (separate from applying them): each returns p_noisy − p_clean.
# ----------------------------------------------------------------------------------------------


def slice_generators(
    seed: int | np.random.Generator | None, n_slices: int, device: torch.device
) -> list[torch.Generator]:
    """One torch generator per slice, seeded from ``seed`` and the slice index.

    ``seed`` may be an int, a numpy ``Generator`` (its next draws give the seeds) or None (fresh
    entropy, not reproducible).
    """
    if isinstance(seed, np.random.Generator):
        seeds = [int(s) for s in seed.integers(0, 2**63 - 1, size=n_slices)]
    else:
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise UserError(f"seed={seed!r} must be an int, a numpy Generator or None")
        children = np.random.SeedSequence(None if seed is None else int(seed)).spawn(n_slices)
        seeds = [int(c.generate_state(1, np.uint64)[0] >> np.uint64(1)) for c in children]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def draw_count_noise(
    p: torch.Tensor,
    *,
    i0: float | torch.Tensor,
    electronic_sigma: float,
    count_floor: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Line-integral error of a scan with ``i0`` incident photons per ray (a number, or a tensor of
    ``p``'s shape for a per-ray exposure).

    Counts ``y = Poisson(i0·e^{−p}) + N(0, σ_e²)``; safe log ``p̂ = −ln(max(y, floor)/i0)``.
    Returns ``p̂ − p`` (same shape as ``p``, first axis = slices).
    """
    per_ray = isinstance(i0, torch.Tensor)
    i0 = i0.double().expand_as(p) if per_ray else i0
    lam = i0 * torch.exp(-p.double())
    out = torch.empty_like(p)
    for i, g in enumerate(generators):
        i0_i = i0[i] if per_ray else i0
        counts = torch.poisson(lam[i], generator=g)
        if electronic_sigma > 0:
            counts = counts + electronic_sigma * torch.randn(
                lam[i].shape, generator=g, device=p.device, dtype=lam.dtype
            )
        p_hat = -torch.log(counts.clamp_min(count_floor) / i0_i)
        out[i] = (p_hat - p[i].double()).to(p.dtype)
    return out


def insertion_variance(
    p: torch.Tensor, *, dose: float, i0: float | torch.Tensor, electronic_sigma: float
) -> torch.Tensor:
    """Extra line-integral variance taking a dose-1 scan to dose fraction ``dose`` (Yu 2012 / Zeng 2015).

    ``σ² = (1−a)/a · e^{p}/I0 · (1 + (1+a)/a · σ_e² e^{p}/I0)``, the variance of
    ``−ln(y_a/(a I0))`` minus that already present in the normal-dose measurement (first order).
    """
    a = dose
    q = torch.exp(p.double()) / (i0.double() if isinstance(i0, torch.Tensor) else i0)
    return (1 - a) / a * q * (1 + (1 + a) / a * electronic_sigma**2 * q)


def draw_insertion_noise(
    p: torch.Tensor,
    *,
    dose: float,
    i0: float | torch.Tensor,
    electronic_sigma: float,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Zero-mean Gaussian line-integral noise with :func:`insertion_variance`."""
    sd = insertion_variance(p, dose=dose, i0=i0, electronic_sigma=electronic_sigma).sqrt()
    out = torch.empty_like(p)
    for i, g in enumerate(generators):
        z = torch.randn(p[i].shape, generator=g, device=p.device, dtype=sd.dtype)
        out[i] = (sd[i] * z).to(p.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def check_views(views: int | None, geometry: str) -> None:
    """Refuse, in one line, a number of views no scan can use (``None``: the default).

    Parameters
    ----------
    views : int or None
        Views per scan.
    geometry : str
        ``fan`` (views must be even) or ``parallel``.

    Raises
    ------
    UserError
        Fewer than 4 views, more than :data:`MAX_VIEWS`, or an odd number for the fan geometry.
    """
    if views is not None and not (
        4 <= int(views) <= MAX_VIEWS and (geometry != "fan" or int(views) % 2 == 0)
    ):
        raise UserError(f"views={views}: need 4 to {MAX_VIEWS} (and an even number for the fan geometry)")


def _check(hu, dose, spacing_mm, geometry, views, filter, i0, batch) -> tuple[np.ndarray, int]:
    arr = np.asarray(hu)
    if arr.ndim not in (2, 3) or arr.size == 0 or min(arr.shape[-2:]) < 2:
        raise UserError(f"hu has shape {arr.shape}; need a non-empty [y, x] slice or [z, y, x] volume")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise UserError(f"hu has dtype {arr.dtype}; need real numbers (HU)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise UserError(f"hu contains {int((~np.isfinite(arr)).sum())} NaN/infinite values; need finite HU")
    if not isinstance(dose, (int, float, np.floating, np.integer)) or not (0.0 < float(dose) <= 1.0):
        raise UserError(f"dose={dose!r} is outside (0, 1]; give the dose fraction, e.g. 0.02 for 2 %")
    if not (
        isinstance(spacing_mm, (int, float, np.floating)) and math.isfinite(spacing_mm) and spacing_mm > 0
    ):
        raise UserError(f"spacing_mm={spacing_mm!r}: need the in-plane pixel size in mm (> 0)")
    if geometry not in GEOMETRIES:
        raise UserError(f"geometry={geometry!r} is not known; allowed: {', '.join(GEOMETRIES)}")
    if filter not in FILTERS:
        raise UserError(f"filter={filter!r} is not known; allowed: {', '.join(FILTERS)}")
    check_views(views, geometry)
    if i0 is not None and not (i0 > 0 and math.isfinite(i0)):
        raise UserError(f"i0={i0!r}: need a positive number of incident photons per ray")
    if batch is not None and int(batch) < 1:
        raise UserError(f"batch={batch}: need >= 1 slices per batch")
    return arr, int(views if views is not None else DEFAULT_VIEWS[geometry])


def _run(
    hu,
    *,
    dose,
    spacing_mm,
    geometry,
    views,
    filter,
    i0,
    seed,
    device,
    batch,
    progress,
    cancel,
    backend,
    draw,
    flux,
) -> np.ndarray:
    arr, views = _check(hu, dose, spacing_mm, geometry, views, filter, i0, batch)
    dev = resolve_device(device, kinds=("cuda",))  # the projector runs on CPU or CUDA
    vol = arr[None] if arr.ndim == 2 else arr
    nz, ny, nx = vol.shape
    n = max(ny, nx)
    oy, ox = (n - ny) // 2, (n - nx) // 2
    scanner = _scanner(n, float(spacing_mm), geometry, views, str(dev), backend)
    i0 = float(i0 if i0 is not None else I0_FULL_DOSE[geometry])
    batch = int(batch or (32 if dev.type == "cuda" else 8))
    gens = slice_generators(seed, nz, dev)
    offsets = scanner.ray_offsets_mm(float(spacing_mm)).to(dev) if flux is not None else None
    out = np.empty_like(vol)
    for start in range(0, nz, batch):
        if cancel is not None:
            cancel.check()
        stop = min(nz, start + batch)
        slab = torch.full((stop - start, n, n), -1000.0, dtype=torch.float32)
        slab[:, oy : oy + ny, ox : ox + nx] = torch.from_numpy(vol[start:stop])
        slab = slab.to(dev)
        mu_px = hu_to_mu(slab) * float(spacing_mm)  # attenuation per pixel: p is dimensionless
        p = scanner.line_integrals(mu_px)
        dp = draw(p, i0 if flux is None else i0 * flux(p, offsets), gens[start:stop])
        dmu = scanner.reconstruct(dp, filter) / float(spacing_mm)
        d_hu = 1000.0 * dmu / MU_WATER_PER_MM
        out[start:stop] = vol[start:stop] + d_hu[:, oy : oy + ny, ox : ox + nx].cpu().numpy()
        if progress is not None:
            progress(stop, nz, f"slices {stop}/{nz}")
    return out[0] if arr.ndim == 2 else out


def simulate_low_dose(
    hu: np.ndarray,
    *,
    dose: float,
    spacing_mm: float,
    geometry: str = "fan",
    views: int | None = None,
    i0: float | None = None,
    electronic_sigma: float | None = None,
    count_floor: float = COUNT_FLOOR,
    filter: str = "ramp",
    flux: FluxModel | None = None,
    seed: int | np.random.Generator | None = 0,
    device: str = "auto",
    batch: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Simulate a CT scan of the (noise-free) object ``hu`` at dose fraction ``dose``.

    Parameters
    ----------
    hu : ``[y, x]`` or ``[z, y, x]`` HU array (any real dtype); not modified.
    dose : dose fraction in (0, 1] relative to the calibrated full dose (0.02 = 2 %).
    spacing_mm : in-plane pixel size in mm (square pixels).
    geometry : ``"fan"`` (equiangular, 360°, rebinned to parallel for FBP) or ``"parallel"`` (180°).
    views : views per scan (default 1152 fan / 720 parallel).
    i0 : full-dose incident photons per ray (default :data:`I0_FULL_DOSE` for the geometry).
    electronic_sigma : electronic noise SD in counts (default :data:`ELECTRONIC_SIGMA`); count_floor : safe-log floor in counts.
    filter : FBP window: ``ramp``, ``shepp-logan``, ``cosine``, ``hann``.
    flux : optional per-ray exposure (:data:`FluxModel`: bowtie, tube-current modulation).
    seed : int, numpy Generator or None; same int → identical output.
    device : ``auto``, ``cpu`` or ``cuda``; batch : slices per projector call.
    progress, cancel : progress callback ``(done, total, message)`` and cancel token.
    backend : NUFFT back end (``auto``, ``finufft``, ``torch``).

    Returns
    -------
    float32 array of the input's shape, in HU: ``hu + FBP(p̂ − p)``.

    Raises
    ------
    UserError
        dose outside (0, 1], non-finite or non-2D/3D input, unknown geometry/filter, bad options.
    """

    if electronic_sigma is None:
        electronic_sigma = ELECTRONIC_SIGMA.get(geometry, 10.0)

    def draw(p, i0_full, gens):
        return draw_count_noise(
            p,
            i0=i0_full * float(dose),
            electronic_sigma=electronic_sigma,
            count_floor=count_floor,
            generators=gens,
        )

    return _run(
        hu,
        dose=dose,
        spacing_mm=spacing_mm,
        geometry=geometry,
        views=views,
        filter=filter,
        i0=i0,
        seed=seed,
        device=device,
        batch=batch,
        progress=progress,
        cancel=cancel,
        backend=backend,
        draw=draw,
        flux=flux,
    )


def insert_noise(
    hu_ndct: np.ndarray,
    *,
    dose: float,
    spacing_mm: float,
    geometry: str = "fan",
    views: int | None = None,
    i0: float | None = None,
    electronic_sigma: float | None = None,
    filter: str = "ramp",
    flux: FluxModel | None = None,
    seed: int | np.random.Generator | None = 0,
    device: str = "auto",
    batch: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Take a real normal-dose scan to dose fraction ``dose`` by projection-domain noise insertion.

    The NDCT's line integrals ``p`` get zero-mean Gaussian noise of variance
    ``(1−a)/a · e^{p}/I0 · (1 + (1+a)/a · σ_e² e^{p}/I0)`` (``a = dose``); only that noise is
    reconstructed and added to the NDCT, so its resolution and mean are kept and the total noise
    variance becomes ≈ 1/a times the NDCT's. Arguments as :func:`simulate_low_dose`.

    References
    ----------
    Yu L, Shiung M, Jondal D, McCollough CH. Development and validation of a practical lower-dose-
    simulation tool for optimizing computed tomography scan protocols. J Comput Assist Tomogr
    36(4):477–487, 2012. Zeng D, Huang J, Bian Z, et al. A simple low-dose x-ray CT simulation from
    high-dose scan. IEEE Trans Nucl Sci 62(5):2226–2233, 2015.
    """

    if electronic_sigma is None:
        electronic_sigma = ELECTRONIC_SIGMA.get(geometry, 10.0)

    def draw(p, i0_full, gens):
        return draw_insertion_noise(
            p, dose=float(dose), i0=i0_full, electronic_sigma=electronic_sigma, generators=gens
        )

    return _run(
        hu_ndct,
        dose=dose,
        spacing_mm=spacing_mm,
        geometry=geometry,
        views=views,
        filter=filter,
        i0=i0,
        seed=seed,
        device=device,
        batch=batch,
        progress=progress,
        cancel=cancel,
        backend=backend,
        draw=draw,
        flux=flux,
    )


def detector_grid_noise(
    hu: np.ndarray,
    *,
    dose: float,
    spacing_mm: float,
    detector_mm: float = DETECTOR_PITCH_MM,
    seed: int | np.random.Generator | None = 0,
    clean: bool = False,
    **options,
) -> np.ndarray:
    """The noise (HU, same shape) :func:`insert_noise` adds to ``hu`` ``[y, x]`` or ``[z, y, x]``
    (with ``clean``: the noise of :func:`simulate_low_dose`, ``hu`` being noise-free anatomy).

    Pixels finer than ``detector_mm`` get their noise simulated on a ``detector_mm`` grid and
    cubic-interpolated back, so the texture is that of a real detector, not of the image's pixels
    (a 0.3 mm head reconstruction does not have 0.3 mm noise grain). ``options`` go to
    :func:`insert_noise` (geometry, filter, i0, flux, device, ...).
    """
    scan = simulate_low_dose if clean else insert_noise
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise UserError(f"hu has shape {arr.shape}; need a [y, x] slice or [z, y, x] volume")
    vol = arr[None] if arr.ndim == 2 else arr
    sim_mm = max(float(spacing_mm), float(detector_mm))
    scale = float(spacing_mm) / sim_mm
    coarse = ndi.zoom(vol, (1.0, scale, scale), order=3, mode="nearest") if scale < 0.999 else vol
    noise = scan(coarse, dose=dose, spacing_mm=sim_mm, seed=seed, **options) - coarse
    if scale < 0.999:  # back onto the image grid, pixel centres aligned (cubic spline)
        _, ny, nx = vol.shape
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
        coords = [(yy + 0.5) * scale - 0.5, (xx + 0.5) * scale - 0.5]
        noise = np.stack([ndi.map_coordinates(n, coords, order=3, mode="nearest") for n in noise])
    noise = noise.astype(np.float32)
    return noise[0] if arr.ndim == 2 else noise
