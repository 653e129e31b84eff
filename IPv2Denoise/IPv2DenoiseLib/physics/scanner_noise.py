"""Scanner-like low-dose noise: the variety a network meets on real scanners, on top of :mod:`lowdose`.

:func:`IPv2DenoiseLib.physics.lowdose.simulate_low_dose` scans one axial slice at a time with a
uniform flux and the ramp filter. Real ultra-low-dose scans differ in ways a denoiser notices:

* **kernels** from smooth to sharp: the FBP window (``hann`` … ``ramp``) sets the noise texture;
* a **bowtie filter** lowers the flux of peripheral rays (noisier periphery and air);
* **tube-current modulation** (TCM) raises the mA for the lateral, more attenuating views,
  ``mA(θ) ∝ A(θ)^α`` (α = 0.5 minimises noise at a fixed dose; Gies et al., Med Phys 26(11), 1999),
  at a constant mean dose;
* **slice-correlated noise**: helical reconstructions interpolate between rotations and overlap
  slices, so neighbouring slices share noise (lag-1 correlation 0.2–0.6 is typical);
* a **range of doses and body sizes**;
* **two noise textures**: the filtered back-projection's own (``projection``: streaks where the
  rays are starved) and ``image``, the same 2D spectrum and local SD with random phases (no
  streaks): the texture of iterative reconstructions and of image-domain noise insertion
  (:func:`image_domain_texture`).

:class:`ScannerProtocol` holds one choice of these, :func:`draw_protocol` draws one at random and
:func:`scanner_noise` scans a clean (or normal-dose) slab with it. The projector, the photon
statistics and the FBP are those of :mod:`lowdose`; this module only supplies the per-ray flux
(:func:`exposure_model`) and the inter-slice mixing (:func:`correlate_slices`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.physics.lowdose import (
    I0_FULL_DOSE,
    MU_WATER_PER_MM,
    FluxModel,
    detector_grid_noise,
)
from IPv2DenoiseLib.physics.projector import FILTERS

#: Noise textures of a simulated scan: filtered back-projection's own (streaks included), or the
#: same spectrum and local SD with random phases (iterative reconstructions; :func:`image_domain_texture`).
NOISE_TEXTURES = ("projection", "image")
#: Neighbourhood (Gaussian sigma, mm) over which the local noise SD of a texture is matched.
LOCAL_SD_SIGMA_MM = 10.0

#: Radius (mm) of the water cylinder a body bowtie is shaped for, and its lowest transmission.
BOWTIE_RADIUS_MM = 160.0
BOWTIE_MIN_TRANSMISSION = 0.08


@dataclass(frozen=True)
class ScannerProtocol:
    """One scanner set-up for a simulated low-dose scan (written into training records)."""

    dose: float = 0.02
    kernel: str = "ramp"
    bowtie: bool = True
    #: TCM exponent α (0 = constant mA).
    tcm: float = 0.5
    #: Lag-1 correlation of the noise between adjacent slices (0 = independent).
    z_correlation: float = 0.0
    geometry: str = "fan"
    #: One of :data:`NOISE_TEXTURES`: the reconstruction's own noise, or its random-phase twin.
    texture: str = "projection"

    def __post_init__(self) -> None:
        if not 0.0 < self.dose <= 1.0:
            raise UserError(f"dose={self.dose}: need a fraction in (0, 1]")
        if self.kernel not in FILTERS:
            raise UserError(f"kernel={self.kernel!r} is not known; allowed: {', '.join(FILTERS)}")
        if self.texture not in NOISE_TEXTURES:
            raise UserError(f"texture={self.texture!r} is not known; allowed: {', '.join(NOISE_TEXTURES)}")
        if not 0.0 <= self.tcm <= 1.0:
            raise UserError(f"tcm={self.tcm}: need an exponent in [0, 1]")
        if not 0.0 <= self.z_correlation <= MAX_Z_CORRELATION:
            raise UserError(
                f"z_correlation={self.z_correlation}: need a value in [0, {MAX_Z_CORRELATION:.2f}]"
            )

    def as_dict(self) -> dict:
        return asdict(self)


#: The largest lag-1 correlation a symmetric 3-tap mix reaches (1/√2).
MAX_Z_CORRELATION = 1.0 / math.sqrt(2.0)


def bowtie_transmission(offsets_mm: torch.Tensor, *, radius_mm: float = BOWTIE_RADIUS_MM) -> torch.Tensor:
    """Relative flux behind a body bowtie: it equalises a water cylinder of ``radius_mm``.

    ``exp(−μ_w (2R − 2√(R² − r²)))`` inside the cylinder, floored at
    :data:`BOWTIE_MIN_TRANSMISSION` (the filter's thickest part); 1 on the central ray.
    """
    r = offsets_mm.double().abs()
    chord = 2.0 * torch.sqrt((radius_mm**2 - r**2).clamp_min(0.0))
    t = torch.exp(-MU_WATER_PER_MM * (2.0 * radius_mm - chord))
    return t.clamp_min(BOWTIE_MIN_TRANSMISSION).float()


def tcm_factor(p: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Angular tube-current modulation ``[slices, views, 1]``, mean 1 per slice.

    Each view's attenuation is taken from its most attenuating rays (mean of the top 5 % of the
    line integrals), ``mA(θ) ∝ exp(α · p(θ))``.
    """
    if alpha == 0:
        return torch.ones(p.shape[0], p.shape[1], 1, dtype=p.dtype, device=p.device)
    k = max(1, p.shape[-1] // 20)
    top = p.double().topk(k, dim=-1).values.mean(dim=-1, keepdim=True)
    m = torch.exp(alpha * (top - top.mean(dim=1, keepdim=True)))
    return (m / m.mean(dim=1, keepdim=True)).to(p.dtype)


def exposure_model(protocol: ScannerProtocol) -> FluxModel | None:
    """The per-ray flux of ``protocol`` for :func:`lowdose.simulate_low_dose` (None = uniform)."""
    if not protocol.bowtie and protocol.tcm == 0:
        return None

    def flux(p: torch.Tensor, offsets_mm: torch.Tensor) -> torch.Tensor:
        f = torch.ones_like(p[:1, :1, :])
        if protocol.bowtie:
            f = f * bowtie_transmission(offsets_mm).to(p.device, p.dtype)
        if protocol.tcm > 0:
            f = f * tcm_factor(p, alpha=protocol.tcm)
        return f

    return flux


def mixing_weight(z_correlation: float) -> float:
    """Side weight ``a`` of the mix ``(n[z−1]·a + n[z] + n[z+1]·a)/√(1+2a²)`` with the given lag-1 correlation.

    Lag-1 correlation of that mix is ``2a/(1 + 2a²)``; solved for ``a`` (the root in [0, 1/√2]).
    """
    rho = float(z_correlation)
    if rho <= 0:
        return 0.0
    if rho > MAX_Z_CORRELATION + 1e-9:
        raise UserError(f"z_correlation={rho}: need a value in [0, {MAX_Z_CORRELATION:.2f}]")
    return (1.0 - math.sqrt(max(0.0, 1.0 - 2.0 * rho * rho))) / (2.0 * rho)


def correlate_slices(noise: np.ndarray, z_correlation: float) -> np.ndarray:
    """Mix independent per-slice noise ``[z, y, x]`` along z to the given lag-1 correlation.

    Variance is kept (weights normalised); the end slices reuse their neighbour by reflection.
    Written by hand: a 3-tap normalised filter along one axis (``scipy.ndimage.correlate1d`` would
    need the same weights; this keeps the reflection explicit).
    """
    a = mixing_weight(z_correlation)
    if a == 0 or noise.shape[0] < 2:
        return noise
    padded = np.concatenate([noise[1:2], noise, noise[-2:-1]], axis=0)
    mixed = a * padded[:-2] + padded[1:-1] + a * padded[2:]
    return (mixed / math.sqrt(1.0 + 2.0 * a * a)).astype(noise.dtype, copy=False)


def noise_power_spectrum(noise: np.ndarray, sigma_bins: float = 2.0) -> np.ndarray:
    """The 2D noise power spectrum of ``noise`` ``[z, y, x]``: mean periodogram over the slices, smoothed
    over neighbouring frequencies (keeps the anisotropy of tube-current modulation and streaks)."""
    centred = noise - noise.mean(axis=(-2, -1), keepdims=True)  # a bias is not noise: no DC power
    power = (np.abs(np.fft.fft2(centred)) ** 2).mean(axis=0)
    return np.fft.ifftshift(ndi.gaussian_filter(np.fft.fftshift(power), sigma_bins, mode="wrap"))


def local_noise_sd(noise: np.ndarray, sigma_px: float) -> np.ndarray:
    """Local SD of zero-mean ``noise`` ``[z, y, x]``: RMS over an in-plane Gaussian of ``sigma_px``."""
    return np.sqrt(ndi.gaussian_filter(noise.astype(np.float64) ** 2, (0, sigma_px, sigma_px)))


def shape_noise(
    template: np.ndarray, power: np.ndarray, local_sd: np.ndarray, *, sigma_px: float
) -> np.ndarray:
    """``template`` ``[z, y, x]`` given the 2D spectrum ``power`` (:func:`noise_power_spectrum`) and then
    the local SD ``local_sd`` (:func:`local_noise_sd` with ``sigma_px``).

    The template is first brought to the target's level, so that the per-frequency gain (clipped at
    10x) bounds the reshaping and not the level. Float32, same shape as ``template``.
    """
    own = noise_power_spectrum(template)
    level = math.sqrt(float(power.sum()) / max(float(own.sum()), 1e-12))
    gain = level * np.clip(np.sqrt(power / np.maximum(own * level**2, 1e-12)), 0.0, 10.0)
    field = np.real(np.fft.ifft2(np.fft.fft2(template) * gain))
    field *= local_sd / np.maximum(local_noise_sd(field, sigma_px), 1e-3)
    return field.astype(np.float32)


def image_domain_texture(noise: np.ndarray, *, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with the 2D spectrum and local SD of ``noise`` ``[z, y, x]`` but random phases.

    Filtered back-projection noise carries streaks (phase structure along starved rays) that
    iterative reconstructions and image-domain noise insertion do not; a network trained on streaks
    alone under-performs on such scans. White Gaussian noise shaped by :func:`shape_noise`.
    """
    white = rng.standard_normal(noise.shape).astype(np.float32)
    sigma_px = LOCAL_SD_SIGMA_MM / pixel_mm
    return shape_noise(white, noise_power_spectrum(noise), local_noise_sd(noise, sigma_px), sigma_px=sigma_px)


def scanner_noise(
    hu: np.ndarray,
    protocol: ScannerProtocol,
    *,
    spacing_mm: float,
    seed: int | np.random.Generator | None = 0,
    clean: bool = True,
    device: str = "auto",
    flux_scale: float = 1.0,
) -> np.ndarray:
    """Scan the slab ``hu`` ``[z, y, x]`` with ``protocol``; returns the low-dose slab (HU).

    ``clean=True``: ``hu`` is noise-free anatomy (Poisson + electronic counts,
    :func:`lowdose.simulate_low_dose`); ``clean=False``: ``hu`` is a real normal-dose scan and only the
    extra noise is inserted (:func:`lowdose.insert_noise`). The noise (output − input) is then mixed
    along z to ``protocol.z_correlation``. ``flux_scale`` multiplies the calibrated full-dose flux
    (:data:`lowdose.I0_FULL_DOSE`): a real scan whose own dose differs from the calibration's.
    Pixels finer than a detector (:data:`lowdose.DETECTOR_PITCH_MM`) get a detector's noise grain,
    interpolated onto them (:func:`lowdose.detector_grid_noise`), as a small field of view has.
    ``protocol.texture="image"`` then replaces each slice's noise by its random-phase twin
    (:func:`image_domain_texture`), before the slice mixing.
    """
    if not (flux_scale > 0 and math.isfinite(flux_scale)):
        raise UserError(f"flux_scale={flux_scale!r}: need a positive number")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 3:
        raise UserError(f"hu has shape {arr.shape}; need a [z, y, x] slab")
    single = arr.shape[0] == 1  # lowdose takes a [y, x] slice, not [1, y, x]
    noise = detector_grid_noise(  # pixels finer than the detector: a detector's noise grain
        arr[0] if single else arr,
        dose=protocol.dose,
        spacing_mm=spacing_mm,
        clean=clean,
        geometry=protocol.geometry,
        filter=protocol.kernel,
        flux=exposure_model(protocol),
        seed=seed,
        device=device,
        i0=None if flux_scale == 1.0 else I0_FULL_DOSE[protocol.geometry] * flux_scale,
    )
    noise = noise[None] if single else noise
    if protocol.texture == "image":
        # a stream of its own: the detector counts may have been drawn from ``seed`` already
        rng = (
            seed
            if isinstance(seed, np.random.Generator)
            else np.random.default_rng(None if seed is None else [int(seed), 1])
        )
        noise = image_domain_texture(noise, pixel_mm=spacing_mm, rng=rng)
    noise = correlate_slices(noise, protocol.z_correlation)
    return arr + noise


@dataclass(frozen=True)
class ProtocolRanges:
    """Ranges :func:`draw_protocol` draws from (the training distribution; recorded in model cards)."""

    dose: tuple[float, float] = (0.01, 0.04)  # log-uniform
    kernels: tuple[str, ...] = FILTERS
    bowtie_share: float = 0.8
    tcm: tuple[float, float] = (0.0, 0.7)
    z_correlation: tuple[float, float] = (0.0, 0.6)
    correlated_share: float = 0.6
    #: Share of fan-beam scans; the rest are parallel-beam (4x cheaper, nearly the same texture).
    fan_share: float = 0.3
    #: Share of scans with the ``image`` texture (:data:`NOISE_TEXTURES`); the rest keep the FBP's own.
    image_texture_share: float = 0.0

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def draw_protocol(rng: np.random.Generator, ranges: ProtocolRanges | None = None) -> ScannerProtocol:
    """A random scanner protocol from ``ranges`` (default :class:`ProtocolRanges`)."""
    ranges = ranges or ProtocolRanges()
    lo, hi = ranges.dose
    dose = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    z_corr = float(rng.uniform(*ranges.z_correlation)) if rng.random() < ranges.correlated_share else 0.0
    return ScannerProtocol(
        dose=dose,
        kernel=str(rng.choice(ranges.kernels)),
        bowtie=bool(rng.random() < ranges.bowtie_share),
        tcm=float(rng.uniform(*ranges.tcm)),
        z_correlation=z_corr,
        geometry="fan" if rng.random() < ranges.fan_share else "parallel",
        # drawn last, and only when asked for: the draws of a range without it stay as they were
        texture="image"
        if ranges.image_texture_share > 0 and rng.random() < ranges.image_texture_share
        else "projection",
    )
