"""Training on clean anatomy with fresh, scanner-like noise every batch (``train --noise scanner``).

The purified pairs of :mod:`IPv2DenoiseLib.purification.pairs` are fixed: one noise draw per case,
one kernel, one dose, slice-independent noise. Here the noise is drawn anew while training:
:class:`ScannerNoiseSampler` keeps a pool of noisy slabs; every batch replaces some of them with a
slab of clean anatomy (zoomed to another body size, with tissue texture added) scanned with a random
:class:`~IPv2DenoiseLib.physics.scanner_noise.ScannerProtocol` (dose, kernel, bowtie, TCM,
slice correlation), and patches are drawn from the pool with fixed lung / body / background shares.
The label is the clean centre slice.

Clean anatomy comes from case folders: ``ndct_clean.*`` and ``uldct_clean.*`` when present (the
synthetic cases of ``make-dataset``), else ``ndct.*`` (a real normal-dose scan: its noise stays in
the label, and only the extra low-dose noise is inserted). Real normal-dose CT also comes as plain
series or volumes (``train --anatomy``, :func:`load_anatomy_volumes`), mixed with the phantoms at a
chosen share of slabs (``real_share``): a hospital fine-tunes on its own archive, no pairs needed.

Making a slab (texture, zoom, projection, reconstruction, noise map) costs about a second of one
CPU core, far more than a training step on a GPU. With ``workers`` the slabs are made in that many
processes and the pool takes whichever are ready, so a GPU trains at its own pace (the GPU job,
``scripts/gpu_train_job.py``); without, they are made in the training process, one per batch.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_maps
from IPv2DenoiseLib.denoiser.normalization import hu_to_net
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.io.case_folder import case_file
from IPv2DenoiseLib.io.dicom_series import PADDING_HU
from IPv2DenoiseLib.io.volumes import image_suffix, read_volume
from IPv2DenoiseLib.physics.scanner_noise import ProtocolRanges, ScannerProtocol, draw_protocol, scanner_noise
from IPv2DenoiseLib.purification.regions import BACKGROUND, BODY, LUNGS, OUTSIDE, anatomy_regions
from IPv2DenoiseLib.synthetic.texture import add_tissue_texture


@dataclass
class CleanVolume:
    """One anatomy volume (HU) and its sampling map; ``clean`` False for a real NDCT."""

    name: str
    hu: np.ndarray
    regions: np.ndarray
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    clean: bool
    #: Full-dose flux of this scan relative to the simulator's calibration: 1.0 for phantoms and real
    #: scans alike (:func:`real_anatomy`), so a drawn dose means what it means on the benchmark.
    flux_scale: float = 1.0

    @cached_property
    def slice_fingerprints(self) -> frozenset[str]:
        """sha256 (16 hex digits) of each slice's HU: the same scan under another name, path or
        format (a DICOM series and its NRRD copy), or a subset of its slices, shares them."""
        return frozenset(
            hashlib.sha256(np.ascontiguousarray(s, dtype=np.float32).tobytes()).hexdigest()[:16]
            for s in self.hu
        )

    @cached_property
    def digest(self) -> str:
        """One fingerprint of the whole volume (16 hex digits), for the model card."""
        return hashlib.sha256("".join(sorted(self.slice_fingerprints)).encode()).hexdigest()[:16]

    def shared_slices(self, other: CleanVolume) -> int:
        """How many slices of this volume are, voxel for voxel, slices of ``other``."""
        return len(self.slice_fingerprints & other.slice_fingerprints)


@dataclass(frozen=True)
class Augmentation:
    """What besides the protocol varies per slab (recorded in the model card)."""

    #: In-plane zoom of the anatomy (body size), log-uniform.
    zoom: tuple[float, float] = (0.75, 1.35)
    #: Texture SD in HU: soft tissue and lungs, uniform from 0.
    soft_tissue_texture_hu: float = 12.0
    lung_texture_hu: float = 25.0
    #: Share of slabs that are one slice repeated (what the denoiser feeds the network for a
    #: single-slice input, and at a volume's first and last slice: its edge padding).
    single_slice_share: float = 0.15
    #: Share of slabs reconstructed on a finer pixel grid: the anatomy keeps its size in mm and is
    #: zoomed by a factor drawn log-uniformly from ``fine_pixel_zoom``; the whole body is scanned on
    #: the finer pixels and the reconstruction is then cropped to the volume's matrix (a small
    #: reconstruction field of view, as a scanner targets a neck, a head or one lung: every ray
    #: still crosses the whole patient). Covers scans whose pixels are finer than any training
    #: volume's.
    fine_pixel_share: float = 0.0
    fine_pixel_zoom: tuple[float, float] = (1.4, 2.6)

    def pixel_scale(self) -> tuple[float, float]:
        """Smallest and largest factor by which a slab's pixel size may differ from its volume's
        (as a zoom: structures ``f`` times larger in pixels look like pixels ``f`` times finer)."""
        lo, hi = self.zoom
        if self.fine_pixel_share > 0:
            hi = max(hi, self.fine_pixel_zoom[1])
        return lo, hi

    def as_dict(self) -> dict:
        return {
            "single_slice_share": self.single_slice_share,
            "zoom": list(self.zoom),
            "fine_pixel_share": self.fine_pixel_share,
            "fine_pixel_zoom": list(self.fine_pixel_zoom),
            "soft_tissue_texture_hu": self.soft_tissue_texture_hu,
            "lung_texture_hu": self.lung_texture_hu,
        }


def load_clean_volumes(folders: Sequence[str | os.PathLike]) -> list[CleanVolume]:
    """Anatomy volumes of case folders (``*_clean`` when present, else ``ndct``)."""
    volumes = []
    for folder in map(Path, folders):
        found = [(k, case_file(folder, k)) for k in ("ndct_clean", "uldct_clean")]
        found = [(k, p) for k, p in found if p is not None]
        clean = bool(found)
        if not found:
            ndct = case_file(folder, "ndct")
            if ndct is None:
                raise UserError(
                    f"{folder}: no ndct_clean.*, uldct_clean.* or ndct.* volume for scanner-noise training"
                )
            found = [("ndct", ndct)]
        for key, path in found:
            vol = read_volume(path)
            hu = vol.array.astype(np.float32)
            volumes.append(
                CleanVolume(f"{folder.name}/{key}", hu, anatomy_regions(hu), tuple(vol.spacing), clean)
            )
    return volumes


def load_anatomy_volumes(
    paths: Sequence[str | os.PathLike], *, option: str = "--anatomy", resample_gaps: bool = False
) -> list[CleanVolume]:
    """Real normal-dose CT as training anatomy (``clean=False``: its own noise stays in the label).

    Each path is a volume file (NRRD, NIfTI, MHA), a folder of such files, or a folder holding one
    DICOM series (read by :func:`~IPv2DenoiseLib.io.volumes.read_volume`, which refuses a folder of
    several series: give one path per series). ``option`` names the paths in error messages;
    ``resample_gaps`` interpolates a DICOM series with missing slices or uneven spacing onto an even
    grid instead of refusing it (as ``denoise --resample-gaps``: archives often hold such series).
    """
    volumes = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{option} {path}: not found")
        files = sorted(f for f in path.iterdir() if f.is_file() and image_suffix(f)) if path.is_dir() else []
        for source in files or [path]:
            vol = read_volume(source, resample_gaps=resample_gaps)
            hu = vol.array.astype(np.float32)
            if hu.shape[0] < 1 or min(hu.shape[1:]) < 64:
                raise UserError(f"{option} {source}: slices of {hu.shape[1:]} pixels are too small")
            volumes.append(real_anatomy(f"real/{source.name}", hu, tuple(vol.spacing)))
    return volumes


def real_anatomy(name: str, hu: np.ndarray, spacing: tuple[float, float, float]) -> CleanVolume:
    """A real normal-dose scan (float32 HU ``[z, y, x]``, spacing (sx, sy, sz) mm) as training anatomy:
    its sampling map, at the simulator's calibrated full-dose flux.

    A drawn dose is a fraction of that calibrated dose, as for the phantoms and as the benchmark's
    2 % (``benchmarks/bench_real_anatomy.py``), and a body too large for it is scanned at a higher
    dose by the exposure control (:func:`exposure_controlled_scan`). Until 2026-12-07 the flux was
    fitted to the scan's own noise, estimated on its anatomy: on chests that estimate read edges and
    vessels as noise (35 HU for a scan of 8), the fit sat at its floor of 0.05, and every real chest
    slab came out at 190-220 HU after three doublings where the benchmark's chest has about 100.

    Values below air (:data:`~IPv2DenoiseLib.io.dicom_series.PADDING_HU`) are no attenuation a scanner
    measures but the outside of its reconstruction circle (-2000 to -3024 HU in many archives, where
    no PixelPaddingValue names them); they become air, or noise would be inserted through them.
    """
    hu = np.maximum(hu, np.float32(PADDING_HU))
    return CleanVolume(name, hu, anatomy_regions(hu), tuple(spacing), False)


#: Exposure control for real anatomy: a real slab whose inserted noise (median local SD over soft
#: tissue) exceeds this is scanned again at a higher dose, at most :data:`AEC_MAX_DOUBLINGS` doublings
#: above the drawn one. A scanner's automatic exposure control does the same for a large patient: 2 %
#: of the own dose of a 42 cm abdomen with the arms down is photon-starved (several hundred HU), far
#: from any lung ULDCT the product meets (the phantom slabs span about 25-250 HU).
AEC_MAX_NOISE_HU = 150.0
AEC_MAX_DOUBLINGS = 3


def aec_doublings(noise_hu: float) -> int:
    """Doublings of the dose that bring a scan's inserted noise of ``noise_hu`` to at most
    :data:`AEC_MAX_NOISE_HU`, predicted as a scanner's exposure control predicts the mAs: at least one.

    Predicted for noise that falls as 1 / dose, the fastest it falls here (photon-starved rays: the
    calibration's real slabs measured 1366 → 710 → 373 → 203 HU at 2, 4, 8 and 16 %), so the
    prediction never overshoots the lowest passing dose; where the noise falls slower (quantum noise,
    1 / √dose) the scan after it is checked again and raised once more.
    """
    return max(1, math.ceil(math.log2(max(noise_hu, 1e-6) / AEC_MAX_NOISE_HU)))


def exposure_controlled_scan(
    vol: CleanVolume,
    hu: np.ndarray,
    regions: np.ndarray,
    protocol: ScannerProtocol,
    *,
    spacing_mm: float,
    seed: int | np.random.Generator,
    device: str = "cpu",
) -> tuple[np.ndarray, ScannerProtocol]:
    """Scan the slab ``hu`` (of ``vol``, with its ``regions``) with ``protocol``; the noisy slab and
    the protocol it was scanned with.

    A real scan whose inserted noise in soft tissue exceeds :data:`AEC_MAX_NOISE_HU` is scanned again
    at the dose :func:`aec_doublings` predicts (capped at :data:`AEC_MAX_DOUBLINGS` doublings and full
    dose), as a scanner's automatic exposure control raises the mAs for a large patient (its own dose
    may be far below the calibration's); phantoms are scanned once. An int ``seed`` seeds the scan
    at the drawn dose itself and, through one stream, each doubled dose (fixed validation noise: the
    scan at a given dose does not depend on how it was reached); a generator seeds every scan.
    """
    tissue = regions == BODY
    fixed = not isinstance(seed, np.random.Generator)
    rng = np.random.default_rng([seed, 2]) if fixed else seed
    level_seeds = [int(s) for s in rng.integers(2**62, size=AEC_MAX_DOUBLINGS)] if fixed else []
    drawn, doublings = protocol.dose, 0
    while True:
        if doublings == 0:
            scan_seed: int | np.random.Generator = seed
        else:
            scan_seed = level_seeds[doublings - 1] if fixed else int(rng.integers(2**62))
        noisy = scanner_noise(
            np.ascontiguousarray(hu),
            protocol,
            spacing_mm=spacing_mm,
            seed=scan_seed,
            clean=vol.clean,
            device=device,
            flux_scale=vol.flux_scale,
        )
        if vol.clean or protocol.dose >= 0.5 or tissue.sum() < 200 or doublings == AEC_MAX_DOUBLINGS:
            break
        noise_hu = estimate_noise_hu(noisy - hu, region=tissue)
        if noise_hu <= AEC_MAX_NOISE_HU:
            break
        doublings = min(AEC_MAX_DOUBLINGS, doublings + aec_doublings(noise_hu))
        protocol = replace(protocol, dose=min(1.0, drawn * 2.0**doublings))  # the scanner's AEC
    return noisy, protocol


class ScannerNoiseSampler:
    """Patches of clean anatomy under fresh scanner-like noise; same interface as ``PatchSampler``."""

    def __init__(
        self,
        volumes: Sequence[CleanVolume],
        *,
        patch: int,
        in_slices: int,
        shares: Sequence[float],
        seed: int,
        ranges: ProtocolRanges | None = None,
        augmentation: Augmentation | None = None,
        pool: int = 24,
        refresh: float = 1.0,
        device: str = "cpu",
        real_share: float | None = None,
        noise_channels: int = 0,
        workers: int = 0,
        max_stale_batches: int = 4,
    ) -> None:
        if not volumes:
            raise UserError("no training volumes for scanner-noise training")
        if real_share is not None and not 0.0 <= real_share <= 1.0:
            raise UserError(f"real share {real_share}: need a fraction in [0, 1]")
        self.volumes = list(volumes)
        #: Share of slabs drawn from real normal-dose volumes (None: every volume equally likely).
        self.real_share = real_share
        self.real_slabs = 0
        #: Dose of every slab after exposure control (real anatomy may be raised, see AEC_MAX_NOISE_HU).
        self.doses: list[float] = []
        self.patch, self.in_slices, self.m = patch, in_slices, in_slices // 2
        self.rng = np.random.default_rng(seed)
        self.ranges = ranges or ProtocolRanges()
        self.augmentation = augmentation or Augmentation()
        if refresh < 0:
            raise UserError(f"noise refresh {refresh}: need 0 or more slabs per batch")
        #: Slabs re-simulated per batch; a fraction re-simulates one every 1 / refresh batches
        #: (a slab costs ~2 s of one CPU core, a step of the fast network ~0.5 s: docs/training.md).
        self.refresh, self.device = refresh, device
        self.refresh_credit = 0.0  # slabs owed to the pool, carried from batch to batch
        self.shares = np.asarray(shares, float) / np.sum(shares)
        self.pool: list[
            tuple[np.ndarray, np.ndarray, np.ndarray]
        ] = []  # (noisy, clean centre, regions centre)
        self.slabs_made = 0
        #: Append this many noise channels of the noisy centre slice (noise-aware networks:
        #: :func:`noise_maps`); measured on the whole slice, as at inference, then cropped with the patch.
        self.noise_channels = noise_channels
        self.maps: list[np.ndarray | None] = []  # per pool slab, [channels, y, x] network units
        #: Noise SD (HU, :func:`estimate_noise_hu`) of every simulated input slice: the training range.
        self.input_noise_hu: list[float] = []
        #: With workers: batches in a row without a new slab before a batch waits for one.
        self.max_stale_batches = max_stale_batches
        self.stale_batches = 0
        #: Worker processes that make slabs (None: this process makes one per batch, in turn).
        self.executor: ProcessPoolExecutor | None = None
        self.in_flight: list[Future] = []
        if workers > 0:
            settings = {
                "volumes": self.volumes,
                "patch": patch,
                "in_slices": in_slices,
                "shares": tuple(shares),
                "ranges": self.ranges,
                "augmentation": self.augmentation,
                "real_share": real_share,
                "noise_channels": noise_channels,
            }
            self.executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=start_slab_worker,
                initargs=(settings,),
            )
            first = [self.submit() for _ in range(pool)]
            for future in first:
                self.keep(future.result(), None)
            self.in_flight = [self.submit() for _ in range(2 * workers)]
        else:
            for _ in range(pool):
                self.pool.append(self.make_slab())
                self.maps.append(self.slab_map(self.pool[-1][0]))

    def submit(self) -> Future:
        """Ask a worker for one slab, with a seed drawn here (reproducible draws, not order)."""
        assert self.executor is not None
        with single_threaded_children():  # a worker started now runs one thread, not one per core
            return self.executor.submit(make_worker_slab, int(self.rng.integers(2**62)))

    def keep(self, draw: SlabDraw, index: int | None) -> None:
        """Put a worker's slab into the pool (at ``index``, or appended) and count it."""
        if index is None:
            self.pool.append(draw.slab)
            self.maps.append(draw.noise_map)
        else:
            self.pool[index], self.maps[index] = draw.slab, draw.noise_map
        self.doses.append(draw.dose)
        self.slabs_made += 1
        self.real_slabs += int(draw.real)
        self.input_noise_hu.append(draw.input_noise_hu)

    def refresh_from_workers(self) -> None:
        """Swap every finished slab into the pool; wait for one only after ``max_stale_batches``
        batches in a row brought none (the pool never goes stale however slow the workers)."""
        finished = [f for f in self.in_flight if f.done()]
        if not finished and self.stale_batches >= self.max_stale_batches:
            finished = list(wait(self.in_flight, return_when=FIRST_COMPLETED).done)
        self.stale_batches = 0 if finished else self.stale_batches + 1
        for future in finished:
            self.in_flight.remove(future)
            self.keep(future.result(), int(self.rng.integers(len(self.pool))))
            self.in_flight.append(self.submit())

    def close(self) -> None:
        """Stop the worker processes (no-op without workers); slabs in flight are dropped."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor, self.in_flight = None, []

    def slab_map(self, noisy: np.ndarray) -> np.ndarray | None:
        """The noise channels ``[channels, y, x]`` of a pool slab's centre slice (None without)."""
        return noise_maps(noisy[self.m][None], self.noise_channels)[0] if self.noise_channels else None

    def make_slab(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One noisy ``in_slices`` slab, its clean centre slice and the centre's regions."""
        rng = self.rng
        vol = self.pick_volume()
        nz = vol.hu.shape[0]
        z = int(rng.integers(nz))
        # one extra slice each side so the slice mixing of the noise sees real neighbours
        single = rng.random() < self.augmentation.single_slice_share
        zs = np.clip(np.arange(z - self.m - 1, z + self.m + 2), 0, nz - 1)
        if single:
            zs = np.array([z])
        hu, regions = vol.hu[zs], vol.regions[zs]
        sx, sy, sz = vol.spacing
        fine = rng.random() < self.augmentation.fine_pixel_share
        lo, hi = self.augmentation.fine_pixel_zoom if fine else self.augmentation.zoom
        zoom = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        if fine:  # same anatomy in mm on pixels `zoom` times finer
            sx, sy = sx / zoom, sy / zoom
        field_of_view = hu.shape[1:]
        if abs(zoom - 1.0) > 0.02:  # a fine-pixel slab keeps the whole body until it is scanned
            hu = zoom_in_plane(hu, zoom, -1000.0, 1, whole=fine)
            regions = zoom_in_plane(regions, zoom, OUTSIDE, 0, whole=fine)
        if rng.random() < 0.5:
            hu, regions = hu[..., ::-1], regions[..., ::-1]
        if vol.clean:
            hu = add_tissue_texture(
                hu,
                lungs=regions == LUNGS,
                body=regions == BODY,
                spacing_mm=(sz, sy, sx),
                rng=rng,
                soft_tissue_sd=float(rng.uniform(0, self.augmentation.soft_tissue_texture_hu)),
                lung_sd=float(rng.uniform(0, self.augmentation.lung_texture_hu)),
                beta=float(rng.uniform(2.5, 3.5)),
            )
        noisy, protocol = exposure_controlled_scan(
            vol,
            hu,
            regions,
            draw_protocol(rng, self.ranges),
            spacing_mm=float(sx),
            seed=rng,
            device=self.device,
        )
        if fine:  # the reconstruction's field of view: the volume's matrix about the centre
            hu, regions, noisy = (centre_crop(a, field_of_view) for a in (hu, regions, noisy))
        self.doses.append(protocol.dose)
        self.slabs_made += 1
        self.real_slabs += int(not vol.clean)
        if single:  # the denoiser's edge padding: the same noisy slice in every channel
            hu = np.repeat(hu, self.in_slices + 2, axis=0)
            noisy = np.repeat(noisy, self.in_slices + 2, axis=0)
            regions = np.repeat(regions, self.in_slices + 2, axis=0)
        centre = self.m + 1
        self.input_noise_hu.append(estimate_noise_hu(noisy[centre]))
        return (
            noisy[1:-1].astype(np.float32),
            np.ascontiguousarray(hu[centre : centre + 1]).astype(np.float32),
            np.ascontiguousarray(regions[centre]),
        )

    def pick_volume(self) -> CleanVolume:
        """A random volume: real with probability ``real_share`` when both kinds are present."""
        real = [v for v in self.volumes if not v.clean]
        synthetic = [v for v in self.volumes if v.clean]
        pool = self.volumes
        if self.real_share is not None and real and synthetic:
            pool = real if self.rng.random() < self.real_share else synthetic
        return pool[int(self.rng.integers(len(pool)))]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.executor is not None:
            self.refresh_from_workers()
        else:
            self.refresh_credit += self.refresh
            due = int(self.refresh_credit + 1e-9)  # 4 x 0.25 makes one slab, not 0.999...
            self.refresh_credit -= due
            for _ in range(due):
                index = int(self.rng.integers(len(self.pool)))
                self.pool[index] = self.make_slab()
                self.maps[index] = self.slab_map(self.pool[index][0])
        inputs, labels = [], []
        for region in self.rng.choice(3, size=size, p=self.shares):
            code = (LUNGS, BODY, BACKGROUND)[region]
            for _ in range(8):  # a slab may lack the region (e.g. lungs outside a zoomed crop)
                index = int(self.rng.integers(len(self.pool)))
                noisy, clean, regions = self.pool[index]
                idx = np.flatnonzero(regions == code)
                if idx.size:
                    break
            else:
                idx = np.arange(regions.size)
            y, x = np.unravel_index(int(idx[self.rng.integers(idx.size)]), regions.shape)
            ny, nx = regions.shape
            p = min(self.patch, ny, nx)
            y0, x0 = int(np.clip(y - p // 2, 0, ny - p)), int(np.clip(x - p // 2, 0, nx - p))
            window = hu_to_net(noisy[:, y0 : y0 + p, x0 : x0 + p])
            if self.noise_channels:
                window = np.concatenate([window, self.maps[index][:, y0 : y0 + p, x0 : x0 + p]])
            inputs.append(window)
            labels.append(hu_to_net(clean[:, y0 : y0 + p, x0 : x0 + p]))
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(labels))


@dataclass(frozen=True)
class SlabDraw:
    """One slab made by a worker process, with what the sampler counts about it."""

    slab: tuple[np.ndarray, np.ndarray, np.ndarray]
    noise_map: np.ndarray | None
    dose: float
    real: bool
    input_noise_hu: float


#: The sampler of a slab worker process (set by :func:`start_slab_worker`).
WORKER_SAMPLER: ScannerNoiseSampler | None = None
#: Thread counts read by NumPy's, SciPy's and finufft's libraries when a process starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def single_threaded_children() -> Iterator[None]:
    """Processes started inside run one thread each (many workers on one machine, none oversubscribed)."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_slab_worker(settings: dict) -> None:
    """Initialise a slab worker process: its own sampler over the same volumes, no pool, on the CPU.

    It ignores Ctrl-C, which a terminal sends to the whole process group: the main process decides
    (``train`` ends the leg and keeps it), and a worker killed by it would break the pool mid-leg.
    """
    global WORKER_SAMPLER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    WORKER_SAMPLER = ScannerNoiseSampler(**settings, seed=0, pool=0)


def make_worker_slab(seed: int) -> SlabDraw:
    """One slab in a worker process, drawn from ``seed``."""
    sampler = WORKER_SAMPLER
    assert sampler is not None, "start_slab_worker was not run in this process"
    sampler.rng = np.random.default_rng(seed)
    real_before = sampler.real_slabs
    slab = sampler.make_slab()
    return SlabDraw(
        slab,
        sampler.slab_map(slab[0]),
        sampler.doses[-1],
        sampler.real_slabs > real_before,
        sampler.input_noise_hu[-1],
    )


def zoom_in_plane(
    arr: np.ndarray, zoom: float, fill: float, order: int, *, whole: bool = False
) -> np.ndarray:
    """Scale ``[z, y, x]`` in-plane about the centre, cropped or padded (with ``fill``) to the same
    size; with ``whole``, on a matrix ``zoom`` times larger (rounded up) that keeps all of it."""
    nz, ny, nx = arr.shape
    out_y, out_x = (math.ceil(ny * zoom), math.ceil(nx * zoom)) if whole else (ny, nx)
    matrix = np.diag([1.0, 1.0 / zoom, 1.0 / zoom])
    # the output's centre samples the input's centre
    offset = np.array([0.0, (ny - 1) / 2 - (out_y - 1) / 2 / zoom, (nx - 1) / 2 - (out_x - 1) / 2 / zoom])
    return ndi.affine_transform(
        arr, matrix, offset=offset, output_shape=(nz, out_y, out_x), order=order, mode="constant", cval=fill
    ).astype(arr.dtype)


def centre_crop(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The central ``shape`` of ``[..., y, x]`` (the reconstruction field of view of a larger scan)."""
    ny, nx = arr.shape[-2:]
    y0, x0 = (ny - shape[0]) // 2, (nx - shape[1]) // 2
    return np.ascontiguousarray(arr[..., y0 : y0 + shape[0], x0 : x0 + shape[1]])


def validation_slabs(
    volumes: Sequence[CleanVolume], protocol: ScannerProtocol, *, slices: int, seed: int
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed (name, noisy, clean, regions) validation volumes: the central ``slices`` of each volume,
    scanned with ``protocol`` under the exposure control of training (:func:`exposure_controlled_scan`)."""
    out = []
    for i, vol in enumerate(volumes):
        nz = vol.hu.shape[0]
        z0 = max(0, (nz - slices) // 2)
        hu = vol.hu[z0 : z0 + slices]
        regions = vol.regions[z0 : z0 + slices]
        noisy, _ = exposure_controlled_scan(
            vol, hu, regions, protocol, spacing_mm=float(vol.spacing[0]), seed=seed + i
        )
        out.append((vol.name, noisy, hu, regions))
    return out
