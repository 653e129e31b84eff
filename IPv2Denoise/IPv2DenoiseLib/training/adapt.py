"""Scan-adaptive fine-tuning: adapt a trained denoiser to one real ULDCT without any NDCT.

A network trained on phantoms meets, on a patient, anatomy and noise it has never seen. This
module fine-tunes a copy of it on the scan itself with *recorrupted* pairs (Noisier2Noise, Moran et
al., CVPR 2020; in the unbiased form of Recorrupted-to-Recorrupted, Pang et al., CVPR 2021):

* ``y = x + n`` is the scan. ``z`` is fresh noise of the same kind as ``n``: drawn with our own
  projection-domain insertion (:func:`~IPv2DenoiseLib.physics.lowdose.detector_grid_noise`: the
  scan's own attenuation sets where the noise is strong, streaks included) or, where the scan's
  noise has no streaks (a smooth kernel, an iterative reconstruction), as image-domain noise; then
  matched to the scan's noise level, spectrum and slice correlation.
* The network learns ``y + α·z  →  y − z/α``. When ``z`` has the covariance of ``n``, the input's
  noise ``n + αz`` and the target's ``n − z/α`` are uncorrelated, so the MSE minimiser is the
  clean image's conditional mean: a denoiser, learnt from the noisy scan alone.
* It starts from the shipped weights and runs a fixed number of steps (the clock only caps it),
  with progress and cancel; the adapted copy then denoises ``y`` itself (noise ``n`` is √(1+α²)×
  below the training input's, inside the range the pretrained network already covers).

The pairs are unbiased only if ``z`` has the covariance of ``n``: a level 20 % low already makes the
adapted network keep a third of the noise, and streaks where the scan has none make it over-smooth.
The level, spectrum, streakiness and slice correlation are therefore taken from the scan itself,
from the pretrained network's residual ``y − f(y)`` (see :func:`recorruption_noise`), not from a
blind estimate.

Written by hand: no maintained library implements recorrupted self-supervised fine-tuning of a CT
denoiser with a physical noise model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.device import resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.infer import Denoiser, runs_in_bf16
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels, wants_noise_map, with_noise_map
from IPv2DenoiseLib.denoiser.normalization import hu_to_net
from IPv2DenoiseLib.denoiser.windows import window_indices
from IPv2DenoiseLib.imaging.masks import soft_tissue_mask
from IPv2DenoiseLib.imaging.noise_estimate import estimate_slice_correlation, noise_streakiness
from IPv2DenoiseLib.physics.lowdose import I0_FULL_DOSE, detector_grid_noise
from IPv2DenoiseLib.physics.scanner_noise import (
    LOCAL_SD_SIGMA_MM,
    MAX_Z_CORRELATION,
    correlate_slices,
    local_noise_sd,
    noise_power_spectrum,
    shape_noise,
)

__all__ = ["NOISE_TEXTURES", "AdaptConfig", "AdaptReport", "adapt_denoiser", "recorruption_noise"]

#: Dose the product is built for: the noise template is drawn as if the scan were at this dose,
#: then scaled to the level measured on the scan.
NOMINAL_DOSE = 0.02
#: Tissue voxels (HU) patch centres are drawn from: the body and lungs, not the air around them.
TISSUE_HU = -950.0
#: Textures the recorruption noise can start from: our projection-domain insertion (streaks along
#: the rays, as filtered back-projection gives) or white noise in the image domain (no direction, as
#: a smooth kernel or an iterative reconstruction gives). ``auto`` takes the one whose streakiness,
#: once shaped, is nearer the scan's residual's.
NOISE_TEXTURES = ("auto", "projection", "image")


@dataclass(frozen=True)
class AdaptConfig:
    """How long and how hard to adapt (defaults chosen on synthetic validation cases, see docs/training.md)."""

    #: Wall-clock cap of the fine-tuning loop (s); the noise draws before it are not counted.
    seconds: float = 60.0
    #: Optimiser steps (whichever of the two limits comes first). Few on purpose: where the
    #: recorruption noise differs from the scan's, the pairs are biased and the copy drifts towards
    #: over-smoothing with every step, while most of the gain comes in the first 50
    #: (docs/training.md, "How many steps"). A step count, not a clock: a GPU must not run 40 times
    #: as many.
    max_iterations: int = 50
    batch: int = 8
    patch: int = 64
    lr: float = 1e-5
    #: Recorruption strength α: input ``y + αz``, target ``y − z/α``.
    alpha: float = 1.0
    #: Scale of the recorruption noise over the level matched to the scan (1 = matched). A study knob:
    #: ±15 % costs about 1 dB either way (docs/training.md), which is why the level is measured.
    noise_gain: float = 1.0
    #: Independent noise realisations drawn before training (each is also used with its sign flipped).
    noise_draws: int = 2
    #: The recorruption noise's texture, one of :data:`NOISE_TEXTURES` (``auto``: measured on the scan).
    texture: str = "auto"
    #: The scan's slices used: up to ``chunks`` runs of ``chunk_slices`` contiguous slices, spread evenly.
    chunks: int = 4
    chunk_slices: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise UserError(f"adapt seconds={self.seconds!r}: need a positive number of seconds")
        for name in ("max_iterations", "batch", "patch", "noise_draws", "chunks", "chunk_slices"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"adapt {name}={getattr(self, name)!r}: need >= 1")
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"adapt alpha={self.alpha!r}: need a value in (0, 1]")
        if not (self.noise_gain > 0 and math.isfinite(self.noise_gain)):
            raise UserError(f"adapt noise_gain={self.noise_gain!r}: need a positive number")
        if self.texture not in NOISE_TEXTURES:
            raise UserError(f"adapt texture={self.texture!r}: need one of {', '.join(NOISE_TEXTURES)}")


@dataclass
class AdaptReport:
    """What the adaptation did: in the adapted copy's model card (``adapted``), hence in the derived
    DICOM series' DerivationDescription and the ``denoise --json-progress`` record."""

    iterations: int
    seconds: float
    noise_seconds: float
    slices: int
    noise_sd_hu: float
    z_correlation: float
    #: The recorruption noise's texture on most of the scan's runs of slices (``projection``/``image``).
    noise_texture: str
    loss_first: float
    loss_last: float
    config: dict
    #: The steps' arithmetic: ``bfloat16`` (autocast, float32 weights) where inference runs in bf16.
    precision: str = "float32"

    def as_dict(self) -> dict:
        return asdict(self)


def _chunks(depth: int, chunks: int, length: int) -> list[np.ndarray]:
    """Up to ``chunks`` runs of ``length`` contiguous slice indices, spread evenly over ``depth``."""
    length = min(length, depth)
    starts = np.unique(np.linspace(0, depth - length, min(chunks, depth - length + 1)).round().astype(int))
    return [np.arange(s, s + length) for s in starts]


def _template(texture: str, scan: np.ndarray, pixel_mm: float, seed: int, device: str) -> np.ndarray:
    """One unshaped noise field of ``texture`` on ``scan``'s grid."""
    if texture == "image":
        return np.random.default_rng(seed).standard_normal(scan.shape).astype(np.float32)
    return detector_grid_noise(
        scan,
        dose=0.5,  # as if the scan were full dose at I0 · 2 %: halving it adds its own variance
        spacing_mm=pixel_mm,
        i0=I0_FULL_DOSE["fan"] * NOMINAL_DOSE,
        seed=seed,
        device=device,
    )


def recorruption_noise(
    scan: np.ndarray,
    residual: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    draws: int,
    seed: int = 0,
    device: str = "cpu",
    texture: str = "auto",
) -> tuple[np.ndarray, dict]:
    """``draws`` realisations ``[draws, z, y, x]`` (HU) of noise like the scan's own, and how it was matched.

    ``residual`` is the scan minus the pretrained network's output: mostly the scan's noise. The
    template is projection-domain insertion as if ``scan`` were a 2 %-dose scan (where the noise is
    strong, streaks) or, for ``texture="image"``, white image-domain noise; ``auto`` draws one of
    each and keeps the texture whose streakiness
    (:func:`~IPv2DenoiseLib.imaging.noise_estimate.noise_streakiness`) is nearer the residual's.
    The template is then given the residual's 2D noise power spectrum (over the slices: the
    reconstruction kernel's texture, the anisotropy of tube-current modulation), the residual's
    local SD (a 10 mm neighbourhood: bowtie and tube-current patterns) and the residual's
    slice-to-slice correlation. Recorrupted pairs are only unbiased when the
    added noise has the scan's covariance, and a blind level estimate is off by 10-25 % on
    correlated CT noise, which biases the adapted network towards keeping noise.
    """
    if texture not in NOISE_TEXTURES:
        raise UserError(f"texture={texture!r}: need one of {', '.join(NOISE_TEXTURES)}")
    pixel_mm = float(min(spacing[0], spacing[1]))
    rng = np.random.default_rng(seed)
    target_power = noise_power_spectrum(residual)
    sigma_px = LOCAL_SD_SIGMA_MM / pixel_mm
    target_sd = local_noise_sd(residual, sigma_px)
    soft = soft_tissue_mask(scan)
    rho = min(estimate_slice_correlation(residual, region=soft), MAX_Z_CORRELATION)

    def shaped(kind: str) -> np.ndarray:
        template = _template(kind, scan, pixel_mm, int(rng.integers(2**31)), device)
        return correlate_slices(shape_noise(template, target_power, target_sd, sigma_px=sigma_px), rho)

    info: dict = {"z_correlation": rho}
    first: dict[str, np.ndarray] = {}
    if texture == "auto":
        # homogeneous tissue only: the edges of anatomy in the residual would read as streaks
        region = ndi.binary_erosion(soft, ndi.generate_binary_structure(2, 1)[None], iterations=2)
        streaks = {"scan": noise_streakiness(residual, region=region, pixel_mm=pixel_mm)}
        for kind in NOISE_TEXTURES[1:]:
            first[kind] = shaped(kind)
            streaks[kind] = noise_streakiness(first[kind], region=region, pixel_mm=pixel_mm)
        if math.isfinite(streaks["scan"]):
            texture = min(NOISE_TEXTURES[1:], key=lambda kind: abs(streaks[kind] - streaks["scan"]))
        else:  # no homogeneous tissue to measure on: our insertion, the scanner's own physics
            texture = "projection"
        info["streakiness"] = {kind: round(float(value), 3) for kind, value in streaks.items()}
    out = np.empty((draws, *scan.shape), dtype=np.float32)
    for d in range(draws):
        out[d] = first.pop(texture) if d == 0 and texture in first else shaped(texture)
    sd = float(residual[soft].std()) if soft.any() else float(residual.std())
    return out, {**info, "noise_sd_hu": sd, "texture": texture}


def adapt_denoiser(
    denoiser: Denoiser,
    volume: Volume,
    config: AdaptConfig | None = None,
    *,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> tuple[Denoiser, AdaptReport]:
    """A copy of ``denoiser`` fine-tuned on ``volume`` (axial HU, not modified); the original is untouched.

    Progress is reported in seconds of the budget (``progress(elapsed_s, budget_s, message)``); when
    ``max_iterations`` ends the loop before the clock, the steps' share of it is reported instead.
    """
    config = config or AdaptConfig()
    dev = resolve_device(device)
    report = progress or (lambda done, total, message: None)
    plan = volume.axial_plan()
    work = volume.reoriented(*plan) if plan else volume
    hu = np.asarray(work.array, dtype=np.float32)
    model = denoiser.model
    k = model.in_slices
    began = time.monotonic()
    report(0.0, config.seconds, "adapt: measuring the scan's noise and drawing noise like it")
    runs = _chunks(hu.shape[0], config.chunks, config.chunk_slices)
    scans = [hu[run] for run in runs]
    noises, matched = [], []
    rng = np.random.default_rng(config.seed)
    for scan in scans:
        if cancel is not None:
            cancel.check()
        residual = scan - denoiser.denoise_array(scan, remove_background=False, device=dev, refine=False)
        noise, info = recorruption_noise(
            scan,
            residual,
            spacing=work.spacing,
            draws=config.noise_draws,
            seed=int(rng.integers(2**31)),
            texture=config.texture,
        )
        noises.append(noise)
        matched.append(info)
    noise_seconds = time.monotonic() - began
    if cancel is not None:
        cancel.check()

    centres = []
    for scan in scans:
        tissue = ndi.gaussian_filter(scan, (0, 2, 2)) > TISSUE_HU
        centres.append(np.flatnonzero(tissue) if tissue.any() else np.arange(scan.size))
    rng = np.random.default_rng(config.seed + 1)
    # channels_last, as inference leaves a model (run_slab): a copy taken before the first inference
    # would otherwise train with other kernels and give other weights
    tuned = copy.deepcopy(model).to(dev, memory_format=torch.channels_last).train()
    optimiser = torch.optim.Adam(tuned.parameters(), lr=config.lr)
    # steps in bf16 where inference runs in bf16 (a CPU with AMX, a GPU with bf16; float32 master
    # weights, no loss scaling needed): on this machine's CPU the quality network's steps take 2.5x less time
    in_bf16 = runs_in_bf16(dev, tuned)
    alpha = float(config.alpha)
    losses: list[float] = []
    start = time.monotonic()
    iteration = 0
    while iteration < config.max_iterations and time.monotonic() - start < config.seconds:
        if cancel is not None:
            cancel.check()
        inputs, targets, centres_hu = [], [], []
        for _ in range(config.batch):
            c = int(rng.integers(len(scans)))
            scan, noise = scans[c], noises[c]
            nz, ny, nx = scan.shape
            z, y, x = np.unravel_index(int(rng.choice(centres[c])), scan.shape)
            p = min(config.patch, ny, nx)
            y0, x0 = int(np.clip(y - p // 2, 0, ny - p)), int(np.clip(x - p // 2, 0, nx - p))
            win = window_indices(z, z + 1, k, nz)
            sign = 1.0 if rng.integers(2) else -1.0
            draw = noise[int(rng.integers(len(noise)))] * (sign * config.noise_gain)
            y_win = scan[win, y0 : y0 + p, x0 : x0 + p]
            z_win = draw[win, y0 : y0 + p, x0 : x0 + p]
            noisier = y_win + alpha * z_win
            target = y_win[k // 2 : k // 2 + 1] - z_win[k // 2 : k // 2 + 1] / alpha
            if rng.integers(2):  # left-right mirror
                noisier, target = noisier[..., ::-1], target[..., ::-1]
            centres_hu.append(noisier[k // 2])
            inputs.append(hu_to_net(noisier))  # clipped, as in inference
            targets.append(hu_to_net(target, clip=False))  # the target's noise stays unbiased
        x_t = torch.from_numpy(np.ascontiguousarray(np.stack(inputs), dtype=np.float32)).to(dev)
        t_t = torch.from_numpy(np.ascontiguousarray(np.stack(targets), dtype=np.float32)).to(dev)
        if wants_noise_map(tuned):  # the map of the noisier input (of the patch: whole slices cost too much)
            x_t = with_noise_map(x_t, np.stack(centres_hu), noise_channels(tuned))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=in_bf16):
            loss = F.mse_loss(tuned(x_t).float(), t_t)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        iteration += 1
        if iteration % 10 == 0:
            # the budget's share spent: of the clock, or of the steps if they end it first
            spent = max((time.monotonic() - start) / config.seconds, iteration / config.max_iterations)
            report(
                min(spent, 1.0) * config.seconds,
                config.seconds,
                f"adapt: step {iteration}, loss {np.mean(losses[-10:]):.2e}",
            )
    tuned.eval()
    seconds = time.monotonic() - start
    report(config.seconds, config.seconds, f"adapt: {iteration} steps in {seconds:.0f} s")
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10) :]
    result = AdaptReport(
        iterations=iteration,
        seconds=round(seconds, 2),
        noise_seconds=round(noise_seconds, 2),
        slices=int(sum(len(r) for r in runs)),
        noise_sd_hu=round(float(np.mean([m["noise_sd_hu"] for m in matched])), 2),
        z_correlation=round(float(np.mean([m["z_correlation"] for m in matched])), 3),
        noise_texture=max(NOISE_TEXTURES[1:], key=[m["texture"] for m in matched].count),
        loss_first=float(np.mean(head)) if losses else math.nan,
        loss_last=float(np.mean(tail)) if losses else math.nan,
        config=asdict(config),
        precision="bfloat16" if in_bf16 else "float32",
    )
    card = {**denoiser.card, "adapted": result.as_dict()}
    adapted = Denoiser(
        tuned.to("cpu"),
        card=card,
        name=f"{denoiser.name}+adapt",
        runner=denoiser.runner,
        ensemble=denoiser.ensemble,
        refine=denoiser.refine,
    )
    return adapted, result
