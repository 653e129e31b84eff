"""Train a denoiser on pairs built by :func:`IPv2DenoiseLib.purification.pairs.build_pairs` (IPv2 by default).

One loop with small hooks: the naive, IPv1 and IPv2 strategies differ only in the pairs that
``purify`` builds. Patches are 2.5D (``in_slices`` adjacent slices in, centre slice out), sampled
so that lungs, body and background air each get a fixed share of the batch — background
suppression and lung denoising are what IPv2 adds, so they must be seen. Intensities use the one
normalisation of :mod:`IPv2DenoiseLib.denoiser.normalization`.

Runs on CPU, one GPU (AMP bf16) or several GPUs with ``torchrun --nproc_per_node N -m
IPv2DenoiseLib train ...`` (DDP; rank 0 validates and writes). Checkpoints every validation and
resumes from ``OUT/checkpoint.pt``. Exports ``safetensors`` weights plus a model card.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from IPv2DenoiseLib.core.atomic import atomic_path, make_output_folder, save_figure
from IPv2DenoiseLib.core.device import describe_device, resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.locks import lock_holder, open_lock_file, record_holder, try_lock
from IPv2DenoiseLib.core.progress import Cancelled, CancelToken, ProgressCallback, StopRequest
from IPv2DenoiseLib.denoiser.infer import runs_in_bf16
from IPv2DenoiseLib.denoiser.models import (
    NoiseAwareUNet,
    TextureAwareUNet,
    UNet,
    build_model,
    count_parameters,
    flops_per_voxel,
)
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import (
    noise_channels,
    noise_maps,
    wants_noise_map,
    with_noise_map,
)
from IPv2DenoiseLib.denoiser.normalization import HU_SCALE, NORMALIZATION, hu_to_net, net_to_hu
from IPv2DenoiseLib.denoiser.weights import load_model, save_model
from IPv2DenoiseLib.denoiser.windows import slice_windows, window_indices
from IPv2DenoiseLib.imaging.metrics import psnr, roi_stats
from IPv2DenoiseLib.io.case_folder import read_case
from IPv2DenoiseLib.physics.scanner_noise import NOISE_TEXTURES, ProtocolRanges, ScannerProtocol
from IPv2DenoiseLib.purification.pairs import Strategy, build_pairs
from IPv2DenoiseLib.purification.regions import (
    BACKGROUND,
    BODY,
    LUNGS,
    REGION_NAMES,
    anatomy_regions,
    sampling_regions,
)
from IPv2DenoiseLib.training.scanner_data import (
    Augmentation,
    CleanVolume,
    ScannerNoiseSampler,
    load_anatomy_volumes,
    load_clean_volumes,
    validation_slabs,
)

#: The lock file in a training folder that keeps a second process out (:func:`training_folder_lock`).
TRAIN_LOCK = ".train.lock"
#: Training data sources: purified ULDCT/NDCT pairs, or clean anatomy + fresh scanner-like noise.
NOISE_SOURCES = ("pairs", "scanner")
#: Training losses. ``huber`` (the default): L1 for residuals beyond :data:`HUBER_DELTA_HU`,
#: quadratic below. Plain L1 has a kink at a zero residual, so on identity pairs (IPv1's N → N
#: region, Remove Background's air) it acts as a lasso penalty on the predicted noise and pins a
#: network that starts as the identity (the zero-head U-Net) at exactly the identity: in the 2 %
#: grid 2 of 6 IPv1/RB U-Nets never left it even after 800 iterations (docs/results.md §1).
#: Above the threshold Huber's gradient equals L1's, so L1's robustness to misaligned edges and
#: its learning rates carry over.
LOSSES = ("huber", "l1", "l2")
#: Residual (HU) below which the ``huber`` loss is quadratic: well under the 2 % noise (45-90 HU).
HUBER_DELTA_HU = 10.0
#: Learning-rate schedules: one-cycle (warm-up + cosine), or constant then a cosine decay at the end.
SCHEDULES = ("onecycle", "constant")
#: Fixed protocols the scanner-noise validation uses (the standard 2 % scan is the case's own ULDCT).
VALIDATION_PROTOCOL = ScannerProtocol(
    dose=0.02, kernel="shepp-logan", bowtie=True, tcm=0.5, z_correlation=0.45
)


@dataclass
class TrainConfig:
    """Everything a training run depends on; written into the model card."""

    cases: list[str]
    out: str
    val_cases: list[str] = field(default_factory=list)
    arch: str = "unet"
    model_kwargs: dict = field(default_factory=lambda: {"in_slices": 3, "base_channels": 16, "levels": 3})
    strategy: str = "ipv2"
    dose: float = 0.02
    weak_denoiser: str | None = None
    patch: int = 64
    batch: int = 16
    iterations: int = 2000
    lr: float = 1e-3
    loss: str = "huber"
    #: Share of patches centred in lungs, body and background air.
    region_shares: tuple[float, float, float] = (0.45, 0.4, 0.15)
    val_every: int = 250
    seed: int = 0
    device: str = "auto"
    name: str = "model"
    #: Start from these safetensors weights (fine-tuning) instead of a fresh network.
    init_weights: str | None = None
    #: ``pairs`` (purified pairs of ``strategy``) or ``scanner`` (clean anatomy, fresh noise per batch).
    noise: str = "pairs"
    #: ``onecycle`` or ``constant`` (5 % warm-up, constant, cosine decay over the last ``decay_fraction``).
    schedule: str = "onecycle"
    decay_fraction: float = 0.25
    #: Scanner-noise pool: slabs kept, and slabs replaced per iteration.
    noise_pool: int = 24
    noise_refresh: float = 1.0
    #: Processes making scanner-noise slabs beside the training step (0: the training process
    #: makes ``noise_refresh`` per batch). For a GPU, whose step is far faster than a slab.
    data_workers: int = 0
    #: Central slices per validation volume (scanner-noise validation).
    val_slices: int = 8
    #: Real normal-dose CT (volume files, folders of them, DICOM series folders) used as anatomy
    #: by scanner-noise training, beside the case folders (:func:`load_anatomy_volumes`).
    anatomy: list[str] = field(default_factory=list)
    #: Share of scanner-noise slabs drawn from ``anatomy`` when case folders are given too.
    real_share: float = 0.5
    #: Share of scanner-noise slabs on pixels 1.4-2.6x finer than their volume's (a small field of
    #: view; :class:`~IPv2DenoiseLib.training.scanner_data.Augmentation`): covers fine-pixel scans.
    fine_pixel_share: float = 0.0
    #: Stop this leg after so many minutes of wall time (validated, checkpointed and exported as
    #: usual); the learning-rate schedule then follows the clock (``schedule="constant"`` only).
    max_minutes: float | None = None
    #: Share of scanner-noise slabs whose noise gets the ``image`` texture (random phases, no
    #: streaks: iterative reconstructions; :func:`~IPv2DenoiseLib.physics.scanner_noise.image_domain_texture`).
    image_texture_share: float = 0.0
    #: Dose fractions the scanner-noise slabs are drawn from (log-uniform), low and high: a hospital
    #: fine-tuning for its own protocol sets its range; None keeps :class:`ProtocolRanges`'s.
    dose_range: tuple[float, float] | None = None
    #: Held-out real normal-dose CT (as ``anatomy``) to validate on each round, under the
    #: validation protocol in both noise textures; labels are the real scans (their own noise kept).
    val_anatomy: list[str] = field(default_factory=list)
    #: Keep an exponential moving average of the weights with this decay per step (0.999: about the
    #: last 1,000 steps), and validate and export it instead of the last step's weights; None: off.
    #: A mean of nearby weights lands nearer the middle of a flat minimum, as a soup of legs does.
    ema: float | None = None
    #: Interpolate real DICOM series (``anatomy``, ``val_anatomy``) with missing slices or uneven
    #: spacing onto an even grid instead of refusing them (``denoise --resample-gaps``).
    resample_gaps: bool = False


@dataclass
class CasePairs:
    """One case's training arrays (HU) and its sampling map, plus validation references."""

    name: str
    train_input: np.ndarray
    train_label: np.ndarray
    regions: np.ndarray  # uint8 BODY / LUNGS / BACKGROUND, 255 = outside every region
    test_input: np.ndarray | None = None
    test_label: np.ndarray | None = None
    truth: np.ndarray | None = None  # noise-free anatomy of the test input, when known


def prepare_case(folder: str | os.PathLike, config: TrainConfig, *, seed: int) -> CasePairs:
    """Build the purified pair of one case folder (``uldct.*``, ``ndct.*``, optional ``uldct_clean.*``)."""
    folder = Path(folder)
    vols = read_case(folder)
    u, n = vols["uldct"], vols["ndct"]
    if not u.same_geometry(n, atol=1e-2):
        raise UserError(
            f"{folder}: uldct and ndct differ in geometry (shape {u.shape} vs {n.shape}, spacing {u.spacing} vs {n.spacing})"
        )
    kwargs = {"dose": config.dose, "spacing": u.spacing, "seed": seed}
    if config.weak_denoiser:
        kwargs["weak_denoiser"] = config.weak_denoiser
    pair = build_pairs(u.array, n.array, Strategy.from_name(config.strategy), **kwargs)
    regions = sampling_regions(u.array, n.array, pair)
    truth = vols["uldct_clean"].array if "uldct_clean" in vols else None
    return CasePairs(
        folder.name, pair.train_input, pair.train_label, regions, u.array, pair.test_label, truth
    )


class PatchSampler:
    """Draws 2.5D patches whose centres fall in lungs / body / background with fixed shares."""

    def __init__(
        self,
        cases: Sequence[CasePairs],
        *,
        patch: int,
        in_slices: int,
        shares,
        seed: int,
        noise_channels: int = 0,
    ) -> None:
        self.cases = list(cases)
        #: Noise channels ``[z, channels, y, x]`` per case (noise-aware networks), measured on whole
        #: slices as at inference.
        self.maps = (
            [noise_maps(c.train_input, noise_channels) for c in self.cases] if noise_channels else None
        )
        self.patch = patch
        self.in_slices = in_slices
        self.rng = np.random.default_rng(seed)
        shares = np.asarray(shares, float)
        self.centres: list[list[np.ndarray]] = []  # [region][case] flat indices
        for region in (LUNGS, BODY, BACKGROUND):
            per_case = []
            for case in self.cases:
                idx = np.flatnonzero(case.regions == region)
                if idx.size > 200_000:
                    idx = self.rng.choice(idx, 200_000, replace=False)
                per_case.append(idx)
            self.centres.append(per_case)
        available = np.array([sum(i.size for i in per) > 0 for per in self.centres], float)
        if not available.any():
            raise UserError("no lung, body or background voxels found in the training cases")
        self.shares = shares * available / (shares * available).sum()

    def _patch(self, c: int, flat: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[c]
        z, y, x = np.unravel_index(flat, case.train_input.shape)
        nz, ny, nx = case.train_input.shape
        p = min(self.patch, ny, nx)
        y0 = int(np.clip(y - p // 2, 0, ny - p))
        x0 = int(np.clip(x - p // 2, 0, nx - p))
        zs = window_indices(z, z + 1, self.in_slices, nz)
        inp = hu_to_net(case.train_input[zs, y0 : y0 + p, x0 : x0 + p])
        if self.maps is not None:
            inp = np.concatenate([inp, self.maps[c][z, :, y0 : y0 + p, x0 : x0 + p]])
        lab = hu_to_net(case.train_label[z : z + 1, y0 : y0 + p, x0 : x0 + p])
        if flip:  # left-right mirror: plausible anatomy, doubles the data
            inp, lab = inp[..., ::-1], lab[..., ::-1]
        return inp, lab

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        regions = self.rng.choice(3, size=size, p=self.shares)
        inputs, labels = [], []
        for r in regions:
            per_case = self.centres[r]
            weights = np.array([i.size for i in per_case], float)
            c = int(self.rng.choice(len(per_case), p=weights / weights.sum()))
            flat = int(per_case[c][self.rng.integers(per_case[c].size)])
            inp, lab = self._patch(c, flat, bool(self.rng.integers(2)))
            inputs.append(np.ascontiguousarray(inp))
            labels.append(np.ascontiguousarray(lab))
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels))


def _denoise_slices(
    model, hu: np.ndarray, device: torch.device, in_slices: int, batch: int = 4, strength: float = 1.0
) -> np.ndarray:
    """Whole-slice inference for validation (small volumes), at a denoising ``strength`` (noise-aware
    networks: the level map scaled, as ``denoise --strength`` does)."""
    out = np.empty_like(hu, dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for z0 in range(0, hu.shape[0], batch):
            zs = range(z0, min(z0 + batch, hu.shape[0]))
            x = torch.from_numpy(hu_to_net(slice_windows(hu, zs.start, zs.stop, in_slices)))
            if wants_noise_map(model):
                x = with_noise_map(x, hu[zs.start : zs.stop], noise_channels(model), strength)
            y = model(x.to(device))
            out[z0 : z0 + len(zs)] = net_to_hu(y[:, 0].float().cpu().numpy())
    model.train()
    return out


def protocol_ranges(config: TrainConfig) -> ProtocolRanges:
    """The scanner protocols a run's slabs are drawn from: the defaults, with the run's texture
    share and dose range."""
    ranges = ProtocolRanges(image_texture_share=config.image_texture_share)
    return replace(ranges, dose=tuple(config.dose_range)) if config.dose_range is not None else ranges


def validate(
    model, cases: Sequence[CasePairs], device: torch.device, in_slices: int, strength: float = 1.0
) -> dict[str, float]:
    """Per-region metrics of the denoised test input, against the truth and the purified test label
    (at a denoising ``strength``: 1, what training validates, unless a comparison asks otherwise)."""
    sums: dict[str, list[float]] = {}
    for case in cases:
        if case.test_input is None:
            continue
        out = _denoise_slices(model, case.test_input, device, in_slices, strength=strength)
        body = (case.regions == BODY) | (case.regions == LUNGS)
        refs = {"label": case.test_label}
        if case.truth is not None:
            refs["truth"] = case.truth
        for ref_name, ref in refs.items():
            sums.setdefault(f"psnr_{ref_name}", []).append(psnr(ref, out, mask=body))
            for code, region in REGION_NAMES.items():
                mask = case.regions == code
                if mask.sum() < 10:
                    continue
                sums.setdefault(f"psnr_{ref_name}_{region}", []).append(psnr(ref, out, mask=mask))
        if case.truth is not None:
            for code, region in REGION_NAMES.items():
                mask = case.regions == code
                if mask.sum() >= 10:
                    sums.setdefault(f"noise_{region}_hu", []).append(roi_stats(out - case.truth, mask).std)
    return {k: float(np.mean(v)) for k, v in sums.items()}


def validation_record(
    model: torch.nn.Module,
    device: torch.device,
    *,
    val_cases: Sequence[CasePairs] = (),
    scanner_val: Sequence[CasePairs] = (),
    real_val: dict[str, Sequence[CasePairs]] | None = None,
) -> dict[str, float]:
    """Every validation set's metrics as a card records them, prefixed by set: none for the cases'
    own scans, ``scanner_`` for the fixed scanner protocol, ``real_<texture>_`` for held-out real
    anatomy (a training round, and ``scripts/soup.py`` for a soup)."""
    sets: dict[str, Sequence[CasePairs]] = {"": val_cases, "scanner_": scanner_val}
    sets |= {f"real_{texture}_": cases for texture, cases in (real_val or {}).items()}
    val: dict[str, float] = {}
    for prefix, cases in sets.items():
        if cases:
            metrics = validate(model, cases, device, model.in_slices)
            val.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return val


def huber_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber (smooth L1) in network units with the knee at :data:`HUBER_DELTA_HU` (see :data:`LOSSES`)."""
    return F.smooth_l1_loss(output, target, beta=HUBER_DELTA_HU / HU_SCALE)


def _loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    losses = {"huber": huber_loss, "l1": F.l1_loss, "l2": F.mse_loss}
    if name not in losses:
        raise UserError(f"unknown loss {name!r}; use {', '.join(LOSSES)}")
    return losses[name]


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _training_device(name: str, rank: int, world: int) -> torch.device:
    """The ``--device`` choice; under torchrun each rank takes its own GPU."""
    device = resolve_device(name)
    if world > 1 and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return device


def _build_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A fresh network of ``config.arch``, or the ``--init`` weights (which must match it), on
    ``device``; and the model card of the ``--init`` weights (empty for a fresh network).

    Two starts change the network without changing what it computes: a plain U-Net gains a
    zero-weight noise map channel (a noise-aware one a zero-weight texture channel), and a narrower U-Net of the same layout is widened
    (:meth:`~IPv2DenoiseLib.denoiser.models.unet.UNet.widened`; the card's ``widened_from`` says
    from how many channels), so the ``quality`` tier starts from the trained fast one."""
    model = build_model(config.arch, **config.model_kwargs)
    start_card: dict = {}
    if config.init_weights:
        start_from, start_card = load_model(config.init_weights)
        if model.ARCH in (NoiseAwareUNet.ARCH, TextureAwareUNet.ARCH) and start_from.ARCH == "unet":
            start_from = NoiseAwareUNet.from_unet(start_from)  # + a zero-weight noise map channel
        if model.ARCH == TextureAwareUNet.ARCH and start_from.ARCH == NoiseAwareUNet.ARCH:
            start_from = TextureAwareUNet.from_noise_aware(start_from)  # + a zero-weight texture channel
        if _widens(start_from, model):
            start_card = {**start_card, "widened_from": start_from.base_channels}
            start_from = start_from.widened(model.base_channels, seed=config.seed)
        if start_from.ARCH != model.ARCH or start_from.config != model.config:
            raise UserError(
                f"--init {config.init_weights} is {start_card.get('architecture')} {start_from.config}; "
                f"it does not match --arch {config.arch} {model.config}"
            )
        model.load_state_dict(start_from.state_dict())
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model, start_card


def _widens(start_from: torch.nn.Module, model: torch.nn.Module) -> bool:
    """Whether ``start_from`` is a narrower U-Net of ``model``'s class, slices and levels."""
    if not isinstance(start_from, UNet) or type(start_from) is not type(model):
        return False
    narrower = {**start_from.config, "base_channels": model.base_channels}
    return narrower == model.config and model.base_channels > start_from.base_channels


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, constant_then_decay(config.iterations, config.decay_fraction)
        )
    if config.iterations >= 100:  # warm up over 5 %, then cosine decay
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.iterations, pct_start=0.05
        )
    # too short for a warm-up phase (OneCycleLR needs several steps per phase)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class Trainer:
    """One training run: the loop in :meth:`run`, with small hooks for a step, a round's end
    (validation and checkpoint) and the export.

    A run resumes from ``OUT/checkpoint.pt`` when that was written for the same config.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_cases: Sequence[CasePairs],
        val_cases: Sequence[CasePairs],
        *,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        scanner_val: Sequence[CasePairs] = (),
        real_val: dict[str, Sequence[CasePairs]] | None = None,
        real_val_names: Sequence[str] = (),
        real_val_digests: Mapping[str, str] | None = None,
    ) -> None:
        self.config, self.device, self.rank, self.world = config, device, rank, world
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.scanner_val = list(scanner_val)
        #: Held-out real anatomy per noise texture (:func:`anatomy_validation`).
        self.real_val = {texture: list(cases) for texture, cases in (real_val or {}).items()}
        self.elapsed_before = 0.0  # training seconds of the run before this resume
        self.sampler_before: dict | None = None  # scanner-noise statistics of the run before this resume
        self.out = Path(config.out)
        self.checkpoint = self.out / "checkpoint.pt"
        self.model, init_card = _build_model(config, device)
        #: The legs of the campaign before this one (from the ``--init`` weights' model card).
        self.legs_before: list[dict] = list(init_card.get("legs") or [])
        #: The held-out real volumes (``--val-anatomy``), and those an earlier leg trained on.
        self.real_val_names = list(real_val_names)
        self.real_val_seen = trained_on_before(self.real_val_names, self.legs_before, real_val_digests)
        #: The ``--init`` network's width when it was widened to this one (else None).
        self.widened_from: int | None = init_card.get("widened_from")
        self.in_slices = self.model.in_slices
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=1e-4)
        self.schedule = _schedule(self.optimizer, config)
        #: The moving average of the weights (``config.ema``), updated after every step; None: off.
        self.averaged: AveragedModel | None = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
            if config.ema
            else None
        )
        self.history: dict[str, list] = {"iteration": [], "loss": [], "val": []}
        self.start = self._resume()
        #: This leg: iterations reached, why it stopped, when it began (reset by :meth:`run`).
        self.done, self.stopped_by = self.start, "iterations"
        self.began, self.started_utc = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.net = self.model
        if world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        seed = config.seed + 7919 * (rank + 1) + self.start
        if self.train_cases and isinstance(self.train_cases[0], CleanVolume):
            self.sampler: PatchSampler | ScannerNoiseSampler = ScannerNoiseSampler(
                self.train_cases,
                patch=config.patch,
                in_slices=self.in_slices,
                shares=config.region_shares,
                seed=seed,
                pool=config.noise_pool,
                refresh=config.noise_refresh,
                real_share=config.real_share,
                ranges=protocol_ranges(config),
                augmentation=Augmentation(fine_pixel_share=config.fine_pixel_share),
                noise_channels=noise_channels(self.model),
                device=str(device) if device.type == "cuda" else "cpu",  # simulate on the GPU
                workers=config.data_workers,  # these simulate on the CPU, in parallel
            )
            if self.sampler_before:  # the training range covers the whole run, not just this part
                self.sampler.slabs_made += int(self.sampler_before["slabs_made"])
                self.sampler.input_noise_hu[:0] = [float(v) for v in self.sampler_before["input_noise_hu"]]
        else:
            self.sampler = PatchSampler(
                self.train_cases,
                patch=config.patch,
                in_slices=self.in_slices,
                shares=config.region_shares,
                seed=seed,
                noise_channels=noise_channels(self.model),
            )
        self.loss_fn = _loss(config.loss)
        #: Also end a round (validate, checkpoint) when this many seconds passed since the last one
        #: (a time-boxed job: ``scripts/gpu_train_job.py``); None: every ``val_every`` iterations only.
        self.round_seconds: float | None = None
        #: Called with the trainer after each round on rank 0 (e.g. to export a snapshot).
        self.after_round: Callable[[Trainer], None] | None = None
        self.last_round = time.monotonic()
        #: The ``baseline`` network's validation on this leg's sets (:meth:`run`), if one was given.
        self.baseline_validation: dict | None = None

    def _config_json(self) -> dict:
        return json.loads(json.dumps(asdict(self.config)))

    def _resume(self) -> int:
        """Load the checkpoint of this config, if any; the iteration to start from."""
        if not self.checkpoint.exists():
            return 0
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        if not same_run(state.get("config"), self._config_json()):
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.history = state["history"]
        self.elapsed_before = float((self.history.get("seconds") or [0.0])[-1])
        self.sampler_before = state.get("sampler")
        return int(state["iteration"])

    def run(
        self,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        stop: StopRequest | None = None,
        baseline: tuple[str, torch.nn.Module, dict] | None = None,
    ) -> dict:
        """Train from the start (or the checkpoint) to ``config.iterations``; the card (rank 0).

        ``stop`` ends the leg early and keeps it: at the next step the leg validates, checkpoints
        and exports as if its ``max_minutes`` were spent (``cancel`` abandons it instead; the
        checkpoint stays for a resume). ``baseline`` (name, network, card: e.g. the shipped model)
        is validated once on the same sets before the first step; the card's
        ``validation_baseline`` then says what this leg must beat.
        """
        self.began = self.last_round = time.monotonic()
        self.started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.stopped_by = "iterations"
        self.done = self.start
        if self.real_val and self.rank == 0 and "val_start" not in self.history:
            # the --init network on the held-out real scans: what this leg must beat to ship
            self.history["val_start"] = self.validation_metrics(real_only=True)
        if baseline is not None and self.rank == 0:
            name, network, card = baseline
            self.baseline_validation = {
                "weights": name,
                "sha256": card.get("sha256"),
                **self.validation_metrics(network=network),
            }
        if stop is not None:
            stop.listening = True
        try:
            self.train_loop(progress=progress, cancel=cancel, stop=stop)
        finally:
            if stop is not None:
                stop.listening = False
            if isinstance(self.sampler, ScannerNoiseSampler):
                self.sampler.close()  # its worker processes, if any (also after an error)
        if self.done == 0:  # stopped before its first step, with nothing to resume from: nothing to keep
            raise Cancelled(f"stopped ({self.stopped_by}) before the first step: nothing to keep")
        card = self.export(time.monotonic() - self.began + self.elapsed_before) if self.rank == 0 else {}
        if self.world > 1:
            torch.distributed.barrier()
        return card

    def train_loop(
        self,
        *,
        progress: ProgressCallback | None,
        cancel: CancelToken | None,
        stop: StopRequest | None,
    ) -> None:
        """The steps of :meth:`run`, to ``config.iterations`` or an earlier stop (``stopped_by``)."""
        config = self.config
        running: list[float] = []
        for it in range(self.start, config.iterations):
            if cancel is not None:
                cancel.check()
            over, asked = self.out_of_time(), self.any_rank(stop is not None and stop.requested)
            if over or asked:
                self.stopped_by = "max_minutes" if over else (stop and stop.reason) or "stop request"
                if running:
                    self.end_round(it, running)
                break
            last_loss = self.step(*self.sampler.batch(config.batch), it=it)
            running.append(last_loss)
            done = self.done = it + 1
            if done % config.val_every == 0 or done == config.iterations or self.round_due():
                self.end_round(done, running)
                running = []
            if progress is not None and self.rank == 0:
                # counted from this run's start, so that a resumed run's rate (and ETA) is its own
                progress(
                    done - self.start, self.expected_iterations(done) - self.start, f"loss {last_loss:.4f}"
                )

    def expected_iterations(self, done: int) -> int:
        """The iteration this leg will end at, for progress and ETA: ``iterations``, or for a leg
        with ``max_minutes`` the pace so far carried to the deadline, whichever comes first."""
        config = self.config
        if config.max_minutes is None:
            return config.iterations
        fraction = self.clock_fraction()
        if fraction <= 0.0:
            return config.iterations
        paced = self.start + int((done - self.start) / fraction)
        return max(done, min(config.iterations, paced))

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any DDP rank: one answer on every rank, so all stop together."""
        if self.world == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def round_due(self) -> bool:
        """Whether ``round_seconds`` have passed since the last round (the same answer on every rank)."""
        if self.round_seconds is None:
            return False
        return self.any_rank(time.monotonic() - self.last_round >= self.round_seconds)

    def out_of_time(self) -> bool:
        """Whether this leg's ``max_minutes`` are spent (the same answer on every DDP rank)."""
        if self.config.max_minutes is None:
            return False
        return self.any_rank(time.monotonic() - self.began >= 60.0 * self.config.max_minutes)

    def clock_fraction(self) -> float:
        """Share of this leg's ``max_minutes`` spent so far."""
        return (time.monotonic() - self.began) / (60.0 * self.config.max_minutes)

    def clock_lr_factor(self, it: int) -> float:
        """Learning-rate factor of a leg with ``max_minutes``: the ``constant`` schedule's warm-up,
        plateau and decay, run at the pace of whichever ends first, the iterations or the clock."""
        config = self.config
        fraction = self.clock_fraction()
        left = config.iterations - self.start
        step = max(it, self.start + int(fraction * left))
        return constant_then_decay(config.iterations, config.decay_fraction)(min(step, config.iterations))

    def step(self, x: torch.Tensor, y: torch.Tensor, *, it: int | None = None) -> float:
        """One optimisation step on a batch (bf16 autocast on CUDA, and on a CPU with AMX for the
        U-Nets, as inference: 1.9× / 2.6× faster steps for fast / quality there; float32 master
        weights either way); the batch loss.

        ``it`` (the iteration) sets the learning rate from the clock when ``max_minutes`` is set.
        """
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.trains_in_bf16()):
            loss = self.loss_fn(self.net(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.config.max_minutes is not None and it is not None:
            factor = self.clock_lr_factor(it)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * factor
        self.optimizer.step()
        self.schedule.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        value = loss.item()
        if self.any_rank(not math.isfinite(value)):  # every DDP rank stops together
            self.diverged(it, f"the loss is {value}")
        return value

    def diverged(self, it: int, what: str) -> None:
        """Stop a run whose loss or weights stopped being finite numbers: one line naming the
        iteration and the learning rate, and nothing exported (the last checkpoint stays).

        Raises
        ------
        UserError
            Always.
        """
        raise UserError(
            f"training diverged at iteration {it + 1}: {what}; no weights were written; "
            f"try a lower --lr (now {self.config.lr:g})"
        )

    def trains_in_bf16(self) -> bool:
        """Whether steps run under bf16 autocast: where inference does
        (:func:`~IPv2DenoiseLib.denoiser.infer.runs_in_bf16`: a GPU with bf16; a CPU with AMX for a
        network with a float32 input layer; never with ``IPV2_DENOISE_FLOAT32=1``)."""
        return runs_in_bf16(self.device, self.model)

    def end_round(self, done: int, losses: Sequence[float]) -> None:
        """Record the round's mean loss; rank 0 validates and writes the checkpoint."""
        self.history["iteration"].append(done)
        self.history["loss"].append(float(np.mean(losses)))
        # the factor in use: a clock-paced leg decays by the clock, not by the iterations
        factor = (
            self.clock_lr_factor(done)
            if self.config.max_minutes is not None
            else self.optimizer.param_groups[0]["lr"] / self.config.lr
        )
        if "lr_factor" not in self.history:  # a checkpoint from before the factor was recorded
            self.history["lr_factor"] = [None] * (len(self.history["iteration"]) - 1)  # JSON null
        self.history["lr_factor"].append(round(factor, 4))
        self.last_round = time.monotonic()
        # a finite last loss can still have left non-finite weights (a huge step): never keep them
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self.diverged(done - 1, "the weights are no longer finite numbers")
        if self.rank != 0:
            return
        self.history["val"].append(self.validation_metrics())
        self.history.setdefault("seconds", []).append(
            round(time.monotonic() - self.began + self.elapsed_before, 1)
        )
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            **({"averaged": self.averaged.state_dict()} if self.averaged is not None else {}),
            "history": self.history,
            "iteration": done,
            "config": self._config_json(),
            # plain floats: a checkpoint is read back with weights_only=True, which refuses NumPy scalars
            "sampler": {
                "slabs_made": int(self.sampler.slabs_made),
                "input_noise_hu": [float(v) for v in self.sampler.input_noise_hu],
            }
            if isinstance(self.sampler, ScannerNoiseSampler)
            else None,
        }
        with atomic_path(self.checkpoint) as tmp:
            torch.save(state, tmp)
        if self.after_round is not None:
            self.after_round(self)

    def validation_metrics(
        self, *, real_only: bool = False, network: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """Every validation set's metrics, prefixed by set: none for the cases' own scans,
        ``scanner_`` for the fixed scanner protocol, ``real_<texture>_`` for held-out real anatomy
        (of the network in training, or of ``network``)."""
        return validation_record(
            self.kept_model() if network is None else network,
            self.device,
            val_cases=() if real_only else self.val_cases,
            scanner_val=() if real_only else self.scanner_val,
            real_val=self.real_val,
        )

    def kept_model(self) -> torch.nn.Module:
        """The network this run validates and exports: the moving average of its weights with
        ``config.ema``, else the network in training."""
        return self.averaged.module if self.averaged is not None else self.model

    def export(self, seconds: float) -> dict:
        """Write the safetensors weights with their model card, and the training curves; the card.

        Works on a CPU copy of the network, so it may also be called while training (snapshots).
        """
        config = self.config
        model = copy.deepcopy(self.kept_model()).to("cpu", memory_format=torch.contiguous_format).eval()
        card = {
            "name": config.name,
            "architecture": config.arch,
            "kwargs": dict(model.config),
            "in_slices": self.in_slices,
            "parameters": count_parameters(model),
            "flops_per_voxel": flops_per_voxel(model, self.in_slices),
            "normalization": NORMALIZATION,
            "strategy": config.strategy if config.noise == "pairs" else "scanner-noise",
            "data": {
                "training_cases": [c.name for c in self.train_cases],
                "validation_cases": [c.name for c in self.val_cases],
                "dose": config.dose,
                "patch": config.patch,
                "batch": config.batch,
                "region_shares": list(config.region_shares),
                **(
                    scanner_data_record(self.sampler, self.train_cases)
                    if isinstance(self.sampler, ScannerNoiseSampler)
                    else {}
                ),
            },
            "iterations": self.done,
            "initialised_from": Path(config.init_weights).name if config.init_weights else None,
            "loss": config.loss,
            "schedule": {
                "name": config.schedule,
                "lr": config.lr,
                "decay_fraction": config.decay_fraction,
                **({"ema": config.ema} if config.ema else {}),
            },
            "hardware": f"{describe_device(self.device)} x{self.world}; {platform.processor() or platform.machine()}",
            "precision": "bf16 autocast" if self.trains_in_bf16() else "float32",
            "training_seconds": round(seconds, 1),
            "validation": self.history["val"][-1] if self.history["val"] else {},
            **({"validation_baseline": self.baseline_validation} if self.baseline_validation else {}),
            "history": self.history,
        }
        card["legs"] = [*self.legs_before, self.leg_record(card)]
        save_model(model, self.out / f"{config.name}.safetensors", card)
        plot_training_curves(
            self.history,
            self.out / "training_curves.png",
            title=f"{config.arch} / {config.strategy if config.noise == 'pairs' else 'scanner noise'}",
            lr=constant_then_decay(config.iterations, config.decay_fraction)
            if config.schedule == "constant"
            else None,
        )
        return card

    def leg_record(self, card: dict) -> dict:
        """This leg of a campaign, for the model card's ``legs`` list (a campaign runs in legs, each
        started with ``--init`` from the previous leg's weights on any machine)."""
        sampler = self.sampler
        mix: dict = {
            "training": card["data"]["training_cases"],
            "validation": card["data"]["validation_cases"],
        }
        if isinstance(sampler, ScannerNoiseSampler):
            mix |= {
                "noise": "scanner",
                "real_share": sampler.real_share,
                "fine_pixel_share": sampler.augmentation.fine_pixel_share,
                "image_texture_share": sampler.ranges.image_texture_share,
                "dose_range": list(sampler.ranges.dose),
                "noise_pool": len(sampler.pool),
                "noise_refresh": sampler.refresh,
                "slabs": sampler.slabs_made,
                "real_slabs": sampler.real_slabs,
            }
        else:
            mix |= {"noise": "pairs", "strategy": self.config.strategy}
        digests = {c.name: c.digest for c in self.train_cases if isinstance(c, CleanVolume)}
        if digests:  # content, so that a renamed copy of a training volume is known (trained_on_before)
            mix["training_digests"] = digests
        if self.config.resample_gaps:  # series with gaps were interpolated, not refused
            mix["resample_gaps"] = True
        if self.real_val_names:
            mix["validation_real"] = self.real_val_names
        if self.real_val_seen:  # its validation_start flatters the --init network (trained_on_before)
            mix["validation_real_seen_before"] = self.real_val_seen
        return {
            "leg": len(self.legs_before) + 1,
            "started_utc": self.started_utc,
            "initialised_from": card["initialised_from"],
            **({"widened_from_channels": self.widened_from} if self.widened_from else {}),
            "iterations": [self.start, self.done],
            "stopped_by": self.stopped_by,
            "wall_seconds": round(time.monotonic() - self.began, 1),
            "batch": self.config.batch,
            "patch": self.config.patch,
            "lr": self.config.lr,
            **({"ema": self.config.ema} if self.config.ema else {}),
            "hardware": card["hardware"],
            "data": mix,
            "validation": card["validation"],
            # the held-out real scans before this leg (the --init network), when validated on
            **({"validation_start": self.history["val_start"]} if "val_start" in self.history else {}),
            **({"validation_baseline": self.baseline_validation} if self.baseline_validation else {}),
        }


def check_config(config: TrainConfig) -> None:
    """Refuse a config a user got wrong, in one line each, before any data is read."""
    if config.iterations < 1 or config.batch < 1 or config.patch < 8 or config.val_slices < 1:
        raise UserError("iterations, batch and validation slices must be >= 1 and patch >= 8")
    if config.noise not in NOISE_SOURCES:
        raise UserError(f"noise={config.noise!r} is not known; allowed: {', '.join(NOISE_SOURCES)}")
    if config.schedule not in SCHEDULES:
        raise UserError(f"schedule={config.schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
    _loss(config.loss)  # an unknown loss fails before any pairs are built
    if config.anatomy and config.noise != "scanner":
        raise UserError("--anatomy (real normal-dose CT) needs --noise scanner")
    if config.resample_gaps and not (config.anatomy or config.val_anatomy):
        raise UserError("--resample-gaps applies to the real series of --anatomy and --val-anatomy: give one")
    if not config.lr > 0:
        raise UserError(f"--lr {config.lr}: need a positive learning rate")
    if config.ema is not None and not 0.0 < config.ema < 1.0:
        raise UserError(
            f"--ema {config.ema}: need a decay between 0 and 1 (0.999: about the last 1,000 steps)"
        )
    check_scanner_options(config)
    if config.max_minutes is not None and (config.max_minutes <= 0 or config.schedule != "constant"):
        raise UserError(
            "--max-minutes needs a positive number and --schedule constant (its decay follows the clock)"
        )


def check_scanner_options(config: TrainConfig) -> None:
    """Refuse the shares and the dose range of scanner-noise slabs a user got wrong, one line each."""
    if not 0.0 <= config.real_share <= 1.0:
        raise UserError(f"--real-share {config.real_share}: need a fraction in [0, 1]")
    if not 0.0 <= config.fine_pixel_share <= 1.0 or (config.fine_pixel_share and config.noise != "scanner"):
        raise UserError(
            f"--fine-pixel-share {config.fine_pixel_share}: need a fraction in [0, 1] and --noise scanner"
        )
    if not 0.0 <= config.image_texture_share <= 1.0 or (
        config.image_texture_share and config.noise != "scanner"
    ):
        raise UserError(
            f"--image-texture-share {config.image_texture_share}: need a fraction in [0, 1] and --noise scanner"
        )
    if config.dose_range is not None:
        low, high = config.dose_range
        if config.noise != "scanner" or not (0.0 < low < high <= 1.0):
            raise UserError(
                f"--dose-range {low:g} {high:g}: need 0 < LOW < HIGH <= 1 (dose fractions) and --noise scanner"
            )


def train(
    config: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    stop: StopRequest | None = None,
    baseline: str | os.PathLike | None = None,
    prepared: tuple[Sequence[CasePairs], Sequence[CasePairs]] | None = None,
    notice: Callable[[str], None] | None = None,
) -> dict:
    """Train, validate, checkpoint and export; returns the model card (``stop``, ``baseline``:
    weights to validate beside the leg, see :meth:`Trainer.run`).

    ``prepared`` skips reading case folders (tests and the evaluation pass pairs they built).
    ``notice`` receives one-line remarks the user should read before the leg runs (a held-out
    volume an earlier leg trained on).
    """
    check_config(config)
    rank, world = _distributed()
    device = _training_device(config.device, rank, world)
    make_output_folder(config.out, what="--out")  # a file there is refused in one line
    reference = None
    if baseline is not None:  # checked before any data is read
        network, card = load_model(baseline)
        reference = (Path(baseline).stem, network.to(device).eval(), card)
    with training_folder_lock(config.out) if rank == 0 else contextlib.nullcontext():
        return _train_in_folder(
            config,
            rank=rank,
            world=world,
            device=device,
            reference=reference,
            progress=progress,
            cancel=cancel,
            stop=stop,
            prepared=prepared,
            notice=notice,
        )


@contextlib.contextmanager
def training_folder_lock(out: str | os.PathLike) -> Iterator[None]:
    """One training process per output folder: two would resume the same checkpoint and overwrite
    each other's weights (two ``train --legs`` on one campaign run the same leg). An ``flock`` on
    ``OUT/.train.lock``, released by the kernel even after ``kill -9``; the second process is
    refused in one line naming the first."""
    path = Path(out) / TRAIN_LOCK
    fd = open_lock_file(path)
    try:
        if not try_lock(fd):
            raise UserError(
                f"{out} is being trained by another process ({lock_holder(path)}); wait for it, or stop it "
                "(kill PID ends its leg and keeps it)"
            )
        record_holder(fd)
        yield
    finally:
        os.close(fd)


def _train_in_folder(
    config: TrainConfig,
    *,
    rank: int,
    world: int,
    device: torch.device,
    reference: tuple[str, torch.nn.Module, dict] | None,
    progress: ProgressCallback | None,
    cancel: CancelToken | None,
    stop: StopRequest | None,
    prepared: tuple[Sequence[CasePairs], Sequence[CasePairs]] | None,
    notice: Callable[[str], None] | None,
) -> dict:
    """:func:`train` once its folder is this process's: read the data, build the trainer, run it."""
    torch.manual_seed(config.seed + rank)
    scanner_val: list[CasePairs] = []
    real_val = {}
    held_out: list[CleanVolume] = []
    if config.val_anatomy:
        held_out = load_anatomy_volumes(
            config.val_anatomy, option="--val-anatomy", resample_gaps=config.resample_gaps
        )
        real_val = anatomy_validation(held_out, slices=config.val_slices)
    if prepared is not None:
        train_cases, val_cases = prepared
    elif config.noise == "scanner":
        train_cases = load_clean_volumes(config.cases) + load_anatomy_volumes(
            config.anatomy, resample_gaps=config.resample_gaps
        )
        val_cases, scanner_val = scanner_validation(config.val_cases, slices=config.val_slices)
    else:
        train_cases = [prepare_case(c, config, seed=config.seed + i) for i, c in enumerate(config.cases)]
        val_cases = [prepare_case(c, config, seed=10_000 + i) for i, c in enumerate(config.val_cases)]
    if not train_cases:
        raise UserError("no training cases given")
    held_out_names = [v.name for v in held_out]
    check_held_out(held_out, train_cases)
    trainer = Trainer(
        config,
        train_cases,
        val_cases,
        device=device,
        rank=rank,
        world=world,
        scanner_val=scanner_val,
        real_val=real_val,
        real_val_names=held_out_names,
        real_val_digests={v.name: v.digest for v in held_out},
    )
    if notice is not None and rank == 0:
        for name, legs in trainer.real_val_seen.items():
            notice(
                f"note: --val-anatomy {name} was in the training of leg(s) {', '.join(map(str, legs))} of the "
                "--init network, so it is not held out of that network: its validation_start flatters it"
            )
    return trainer.run(progress=progress, cancel=cancel, stop=stop, baseline=reference)


def check_held_out(held_out: Sequence[CleanVolume], train_cases: Sequence) -> None:
    """Refuse a ``--val-anatomy`` volume that is a training volume by name, or shares a slice, voxel
    for voxel, with one: the same scan under another name or format is not held out either (the
    "held-out" TotalSegmentator abdomen of 2026-12-05 was the training corpus's abdomen series,
    docs/results.md §4)."""
    trained = sorted({v.name for v in held_out} & {c.name for c in train_cases})
    if trained:
        raise UserError(f"--val-anatomy {trained[0]} is also a training volume: hold it out of --anatomy")
    for volume in held_out:
        for case in train_cases:
            if isinstance(case, CleanVolume) and (shared := volume.shared_slices(case)):
                raise UserError(
                    f"--val-anatomy {volume.name} shares {shared} of its {volume.hu.shape[0]} slices with "
                    f"the training volume {case.name} (the same scan under another name): hold it out of "
                    "--anatomy, or validate on another scan"
                )


def trained_on_before(
    volume_names: Sequence[str], legs: Sequence[dict], digests: Mapping[str, str] | None = None
) -> dict[str, list[int]]:
    """The held-out volumes that an earlier leg of the campaign trained on: name -> those legs.

    A ``--val-anatomy`` volume the ``--init`` network (or any leg before it) trained on is not held
    out of that network: its ``validation_start`` is flattering, and a leg that leaves the volume
    out looks worse on it by what the earlier network learnt of it (quality legs 11-14 were judged
    so on pyradiomics' lung 2, docs/results.md). Matched by the name the cards log
    (``real/<file name>``) and, with ``digests`` (name -> :attr:`CleanVolume.digest`), by content for
    the legs that log their volumes' digests (since 2026-12-06): a renamed copy is caught there.
    """
    digests = digests or {}
    seen: dict[str, list[int]] = {}
    for leg in legs:
        trained = leg_training_volumes(leg)
        trained_digests = set(((leg.get("data") or {}).get("training_digests") or {}).values())
        for name in volume_names:
            if name in trained or digests.get(name) in trained_digests:
                seen.setdefault(name, []).append(int(leg.get("leg", 0)))
    return seen


def leg_training_volumes(leg: dict) -> set[str]:
    """The volume names one leg of a model card's ``legs`` trained on (none for an older record)."""
    return set((leg.get("data") or {}).get("training") or [])


def same_run(saved: dict | None, current: dict) -> bool:
    """Whether a checkpoint's config continues the current run.

    Everything must match except ``iterations`` and ``max_minutes``: a run may be extended or
    shortened on resume (with ``--schedule constant`` the final decay moves with the new end).
    """
    if not saved:
        return False

    def strip(config: dict) -> dict:
        # a checkpoint from before a field existed ran with its default (``ema``: off)
        kept = {k: v for k, v in config.items() if k not in ("iterations", "max_minutes")}
        return {"ema": None, "resample_gaps": False, **kept}

    return strip(saved) == strip(current) and (
        current.get("schedule") == "constant" or saved.get("iterations") == current.get("iterations")
    )


def constant_then_decay(iterations: int, decay_fraction: float) -> Callable[[int], float]:
    """LR factor: 5 % linear warm-up, 1.0, then cosine to 0 over the last ``decay_fraction``.

    The constant phase shows whether the validation curve has flattened before the decay starts.
    """
    if not 0.0 <= decay_fraction <= 1.0:
        raise UserError(f"decay_fraction={decay_fraction}: need a fraction in [0, 1]")
    warm = max(1, int(0.05 * iterations)) if iterations >= 100 else 0
    decay_start = int(round(iterations * (1.0 - decay_fraction)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step < decay_start or iterations <= decay_start:
            return 1.0
        t = (step - decay_start) / max(1, iterations - decay_start)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def scanner_validation(folders: Sequence[str], *, slices: int) -> tuple[list[CasePairs], list[CasePairs]]:
    """Validation for scanner-noise training, from synthetic case folders.

    Two sets of the same anatomy (the central ``slices`` of ``uldct_clean``): the case's own ULDCT
    (the standard 2 % fan-beam ramp-filter scan of ``make-dataset``), and a fixed correlated,
    smooth-kernel, bowtie + TCM scan (:data:`VALIDATION_PROTOCOL`). Labels are the truth.
    """
    standard, scanner = [], []
    for i, folder in enumerate(map(Path, folders)):
        vols = read_case(folder)
        if "uldct_clean" not in vols:
            raise UserError(f"{folder}: scanner-noise validation needs uldct_clean.* (a make-dataset case)")
        clean_vol = vols["uldct_clean"]
        nz = clean_vol.shape[0]
        z0 = max(0, (nz - slices) // 2)
        keep = slice(z0, z0 + slices)
        clean = clean_vol.array[keep].astype(np.float32)
        regions = anatomy_regions(clean)
        uldct = vols["uldct"].array[keep].astype(np.float32)
        standard.append(CasePairs(folder.name, None, None, regions, uldct, clean, clean))
        volume = CleanVolume(folder.name, clean, regions, tuple(clean_vol.spacing), True)
        ((_, noisy, _, _),) = validation_slabs([volume], VALIDATION_PROTOCOL, slices=slices, seed=20_000 + i)
        scanner.append(CasePairs(folder.name, None, None, regions, noisy, clean, clean))
    return standard, scanner


def anatomy_validation(volumes: Sequence[CleanVolume], *, slices: int) -> dict[str, list[CasePairs]]:
    """Validation on held-out real normal-dose CT, per noise texture (:data:`NOISE_TEXTURES`).

    The central ``slices`` of each real volume (:func:`load_anatomy_volumes`) under
    :data:`VALIDATION_PROTOCOL` with that texture; the label is the real scan, its own noise kept,
    so PSNR is against the normal-dose image (``psnr_label*``). Synthetic phantoms validate what a
    network learnt of the noise; these tell whether it still helps on real anatomy (a leg that
    gained on the phantoms lost on the real slices: docs/results.md, quality leg 10).
    """
    sets: dict[str, list[CasePairs]] = {}
    for texture in NOISE_TEXTURES:
        protocol = replace(VALIDATION_PROTOCOL, texture=texture)
        slabs = validation_slabs(volumes, protocol, slices=slices, seed=30_000)
        sets[texture] = [
            CasePairs(name, None, None, regions, noisy, label) for name, noisy, label, regions in slabs
        ]
    return sets


def scanner_data_record(sampler: ScannerNoiseSampler, volumes) -> dict:
    """What the scanner-noise training saw, for the model card (incl. the ranges ``denoise`` checks)."""
    spacings = np.array([v.spacing for v in volumes], float)
    lo, hi = sampler.augmentation.pixel_scale()
    noise = np.array(sampler.input_noise_hu or [np.nan])
    return {
        "noise": "scanner",
        "training_volumes": [v.name for v in volumes],
        "protocol_ranges": sampler.ranges.as_dict(),
        "augmentation": sampler.augmentation.as_dict(),
        "validation_protocol": VALIDATION_PROTOCOL.as_dict(),
        "slabs_simulated": sampler.slabs_made,
        "training_range": {
            "input_noise_hu": [
                round(float(np.nanpercentile(noise, 2)), 1),
                round(float(np.nanpercentile(noise, 98)), 1),
            ],
            "pixel_mm": [
                round(float(spacings[:, 0].min() / hi), 3),
                round(float(spacings[:, 0].max() / lo), 3),
            ],
            "slice_mm": [round(float(spacings[:, 2].min()), 3), round(float(spacings[:, 2].max()), 3)],
        },
    }


def plot_training_curves(
    history: dict,
    path: str | os.PathLike,
    *,
    title: str = "",
    lr: Callable[[int], float] | None = None,
) -> Path:
    """Loss (and the learning-rate factor: the one recorded each round, else ``lr(step)``) and
    validation PSNR per region, as a PNG.

    One validation panel per set: the cases' own scans (``psnr_truth*``), for scanner-noise
    training the fixed scanner protocol (``scanner_psnr_truth*``), and held-out real anatomy per
    noise texture (``real_<texture>_psnr_label*``, dashed: the leg's starting network).
    """
    sets = [("", "validation: own 2 % scans", "psnr_truth")]
    if any(k.startswith("scanner_") for v in history["val"] for k in v):
        sets.append(
            ("scanner_", f"validation: {VALIDATION_PROTOCOL.kernel}, correlated, bowtie + TCM", "psnr_truth")
        )
    for texture in NOISE_TEXTURES:
        if any(k.startswith(f"real_{texture}_") for v in history["val"] for k in v):
            sets.append((f"real_{texture}_", f"held-out real CT, {texture} texture", "psnr_label"))
    fig = Figure(figsize=(5 * (1 + len(sets)), 3.6))
    axes = fig.subplots(1, 1 + len(sets))
    axes[0].plot(history["iteration"], history["loss"], marker="o")
    axes[0].set(xlabel="iteration", ylabel="training loss", yscale="log", title="loss")
    recorded = history.get("lr_factor") or []
    if len(recorded) == len(history["iteration"]) and recorded:
        twin = axes[0].twinx()
        factors = [math.nan if f is None else f for f in recorded]
        twin.plot(history["iteration"], factors, color="0.6", lw=1, drawstyle="steps-post")
        twin.set(ylabel="learning-rate factor", ylim=(0, 1.05))
    elif lr is not None and history["iteration"]:
        steps = np.arange(0, history["iteration"][-1] + 1)
        twin = axes[0].twinx()
        twin.plot(steps, [lr(int(i)) for i in steps], color="0.6", lw=1)
        twin.set(ylabel="learning-rate factor", ylim=(0, 1.05))
    start = history.get("val_start") or {}
    for ax, (prefix, name, metric) in zip(axes[1:], sets):
        keys = sorted({k for v in history["val"] for k in v if k.startswith(f"{prefix}{metric}")})
        for key in keys:
            label = key[len(prefix) :].replace(metric, "").strip("_") or "body + lungs"
            lines = ax.plot(
                history["iteration"], [v.get(key, math.nan) for v in history["val"]], marker="o", label=label
            )
            if key in start:  # the leg's --init network: the line to beat
                ax.axhline(start[key], color=lines[0].get_color(), ls="--", lw=1)
        reference = "truth" if metric == "psnr_truth" else "normal-dose scan"
        ax.set(xlabel="iteration", ylabel=f"PSNR vs {reference} (dB)", title=name)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
