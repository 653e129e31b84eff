"""Run a trained denoiser over a CT volume: weights, device, slabs, progress, cancel.

HU in, HU out, geometry unchanged, input never modified. The volume is cut into slabs of axial
slices; each slab (plus the 2.5D margin, replicate-padded at the volume ends so a one-slice
volume works) is computed on the device and stitched into a CPU float32 output — the pattern of
MONAI's ``sliding_window_inference`` with ``sw_device`` ≠ ``device``. The networks are 2D over
whole slices, so slabs do not overlap in output and need no blending: the result does not depend
on the slab size. CUDA out-of-memory halves the slab and retries, then falls back to the CPU
(like MONAI's ``SlidingWindowInfererAdapt``). *Remove Background* (IPv2, Gong & Yu,
arXiv 2602.19314) then blends the air outside the patient towards −1000 HU with
:func:`~IPv2DenoiseLib.imaging.masks.background_weight`: 0 on every tissue voxel (skin, lungs
also where they reach a cropped image edge, table, arms), 1 a few mm away from it. Coronal and
sagittal volumes are reoriented to axial slices for the network and back (exact permutations).
A denoising strength other than 1 (:mod:`~IPv2DenoiseLib.denoiser.strength`) scales the noise level
map of a noise-aware network, per call, so a fine-tuning on the scan (``--adapt``) measures and
trains at 1 and only the final pass is stronger or weaker.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from IPv2DenoiseLib.core.device import resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.ensemble import check_ensemble, dihedral, undo_dihedral
from IPv2DenoiseLib.denoiser.model_reference import ModelReference
from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import noise_channels, wants_noise_map, with_noise_map
from IPv2DenoiseLib.denoiser.normalization import hu_to_net, net_to_hu
from IPv2DenoiseLib.denoiser.refine import refine_slices
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength
from IPv2DenoiseLib.denoiser.weights import load_model
from IPv2DenoiseLib.denoiser.windows import window_indices
from IPv2DenoiseLib.imaging.masks import background_weight, truncation_warning
from IPv2DenoiseLib.io.dicom_series import PADDING_HU

#: HU written into background voxels by *Remove Background* (air).
AIR_HU = -1000.0
#: Smallest slice side (pixels) the networks are run on: a 2.5D CT denoiser needs image context.
MIN_SLICE_PX = 16
#: Set to 1 to run every network in float32 (no bf16 / fp16 autocast on any device).
FLOAT32_ENV = "IPV2_DENOISE_FLOAT32"
#: Most slices per slab on the CPU (measured: larger batches gain nothing there; they cost memory and coarsen progress).
CPU_MAX_SLAB = 4

#: ``runner(model, batch, device) -> output``: ``batch`` is a CPU float32 ``[B, k, H, W]`` tensor in
#: network units, the result a CPU float32 ``[B, 1, H, W]`` tensor. Injectable for tests.
SlabRunner = Callable[[torch.nn.Module, torch.Tensor, torch.device], torch.Tensor]


def autocast_dtype(device: torch.device, model: torch.nn.Module | None = None) -> torch.dtype | None:
    """The reduced precision a network runs in: bf16 on CUDA GPUs that support it, else fp16 on
    CUDA; bf16 on CPUs with AMX matrix units for networks that keep their input layer in float32
    (:attr:`UNet.float32_input_layer <IPv2DenoiseLib.denoiser.models.unet.UNet>`); None (float32)
    elsewhere, and everywhere when the environment sets ``IPV2_DENOISE_FLOAT32=1``.

    On a CPU with AMX the quality network runs 2-4× faster in bf16 (docs/models.md); on one without,
    bf16 is emulated and slower than float32. The input layer stays in float32 because CT in network
    units ((HU + 1000) / 1000) would be rounded to 8 HU steps in bf16.

    Parameters
    ----------
    device : torch.device
        Where the network runs.
    model : torch.nn.Module, optional
        The network (the CPU's bf16 needs its float32 input layer).

    Returns
    -------
    torch.dtype or None
        The autocast dtype, or None to run in float32.
    """
    if float32_forced():
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and getattr(model, "float32_input_layer", False) and cpu_has_amx():
        return torch.bfloat16
    return None


def runs_in_bf16(device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """Whether ``model`` runs in bf16 on ``device`` (:func:`autocast_dtype`), and so whether a
    training step on it does (``train``, ``denoise --adapt``): float32 master weights, no loss
    scaling. Where inference runs in fp16 (a GPU without bf16) steps run in float32, since fp16
    steps would need loss scaling.

    Parameters
    ----------
    device : torch.device
        Where the network runs.
    model : torch.nn.Module, optional
        The network (the CPU's bf16 needs its float32 input layer).

    Returns
    -------
    bool
        True for bf16 autocast.
    """
    return autocast_dtype(device, model) == torch.bfloat16


def float32_forced() -> bool:
    """Whether the environment sets ``IPV2_DENOISE_FLOAT32`` (to anything but 0): float32 everywhere.

    Returns
    -------
    bool
    """
    return os.environ.get(FLOAT32_ENV, "").strip() not in ("", "0")


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (fast bf16 matrix products; Intel Xeon since Sapphire Rapids);
    asked once (every slab and training step asks).

    Returns
    -------
    bool
        False where torch cannot tell.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own CPU feature probe
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def run_slab(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The default :data:`SlabRunner`: channels_last, inference mode, autocast on CUDA.

    Parameters
    ----------
    model : torch.nn.Module
        The network; moved to ``device`` (channels_last).
    batch : torch.Tensor
        2.5D windows ``[B, in_slices, y, x]`` in network units.
    device : torch.device
        Where to compute.

    Returns
    -------
    torch.Tensor
        The denoised centre slices ``[B, 1, y, x]``, float32 on the CPU.
    """
    model.to(device=device, memory_format=torch.channels_last)
    x = batch.to(device, non_blocking=device.type == "cuda").contiguous(memory_format=torch.channels_last)
    amp = autocast_dtype(device, model)
    with torch.inference_mode():
        if amp is not None:
            with torch.autocast(device_type=device.type, dtype=amp):
                y = model(x)
        else:
            y = model(x)
        return y.float().to("cpu").contiguous()


def refine_on(
    device: torch.device,
    noisy: np.ndarray,
    denoised: np.ndarray,
    pixel_mm: float,
    cancel: CancelToken | None = None,
    report: Callable[[str], None] | None = None,
) -> np.ndarray:
    """:func:`~IPv2DenoiseLib.denoiser.refine.refine_slices` on ``device``, on the CPU when the GPU
    runs out of memory there.

    Parameters
    ----------
    device : torch.device
        Where the network ran.
    noisy, denoised : np.ndarray
        ``[z, y, x]`` HU: the network's input and output (the pilot); not modified.
    pixel_mm : float
        In-plane pixel size.
    cancel : CancelToken, optional
        Checked before each slice.
    report : callable(str), optional
        Told once when the refinement falls back to the CPU.

    Returns
    -------
    np.ndarray
        ``[z, y, x]`` float32 HU, the refined slices.
    """
    try:
        return refine_slices(noisy, denoised, pixel_mm=pixel_mm, device=device, cancel=cancel)
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if report is not None:
            report("out of GPU memory refining; refining on the CPU")
        return refine_slices(noisy, denoised, pixel_mm=pixel_mm, device="cpu", cancel=cancel)


def remove_background_from(
    hu: np.ndarray, denoised: np.ndarray, *, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """*Remove Background*: ``denoised`` blended towards air (:data:`AIR_HU`) outside the patient.

    Parameters
    ----------
    hu : np.ndarray
        ``[z, y, x]`` HU: the network's input, whose air the blend weight is found in.
    denoised : np.ndarray
        ``[z, y, x]`` HU: the output to blend; not modified.
    spacing : tuple of float, optional
        (x, y, z) mm, sizing the blend (default: 1 mm pixels).

    Returns
    -------
    np.ndarray
        ``(1 − w) · denoised + w · air`` with ``w = 0`` on every tissue voxel
        (:func:`~IPv2DenoiseLib.imaging.masks.background_weight`).
    """
    weight = background_weight(hu, spacing=spacing)
    return denoised + weight * (AIR_HU - denoised)


def _check_hu(hu: Any) -> np.ndarray:
    arr = np.asarray(hu)
    if arr.ndim != 3 or arr.size == 0:
        raise UserError(f"volume must be a non-empty 3-D [z, y, x] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise UserError(f"volume must hold real numbers (HU), got dtype {arr.dtype}")
    return arr


#: A constant fill at or below this (HU) is the outside of a reconstruction circle, not tissue or
#: noisy air (archives store it at -2000 to -3024 without naming it in PixelPaddingValue).
UNDECLARED_PADDING_BELOW_HU = -1500.0
#: ... when it covers at least this share of a slice.
UNDECLARED_PADDING_SHARE = 0.01


def undeclared_padding_as_air(hu: np.ndarray) -> np.ndarray:
    """``hu`` ``[z, y, x]`` with each slice's undeclared padding set to
    :data:`~IPv2DenoiseLib.io.dicom_series.PADDING_HU`, as the DICOM reader sets declared padding.

    The padding is the slice's minimum where that is a constant fill (at most
    :data:`UNDECLARED_PADDING_BELOW_HU`, on at least :data:`UNDECLARED_PADDING_SHARE` of the slice);
    noise in air, however low it swings, is never a constant and stays as it is. For the noise
    channels only: measured raw, -2048 HU padding is a step of a thousand HU around the body, and
    the texture channel, one value per slice, moved the whole slice's output by up to 90 HU.

    Parameters
    ----------
    hu : ndarray, [z, y, x]
        CT in HU; not modified.

    Returns
    -------
    ndarray
        ``hu`` itself when no slice holds such padding, else a copy with it set to air.
    """
    out = hu
    for k in range(hu.shape[0]):
        low = float(hu[k].min())
        if low > UNDECLARED_PADDING_BELOW_HU:
            continue
        fill = hu[k] == low
        if fill.mean() >= UNDECLARED_PADDING_SHARE:
            if out is hu:
                out = hu.copy()
            out[k][fill] = PADDING_HU
    return out


class Denoiser:
    """A trained network ready to denoise CT volumes.

    Parameters
    ----------
    model : Denoiser2p5D
        Network from :mod:`IPv2DenoiseLib.denoiser.models` (input ``[B, in_slices, H, W]`` in network
        units, output the denoised centre slice).
    card : dict, optional
        Its model card (see :mod:`IPv2DenoiseLib.denoiser.weights`).
    name : str, optional
        Registry name or file name, for messages.
    runner : SlabRunner, optional
        Computes one slab on a device; defaults to :func:`run_slab`.
    ensemble : int
        Test-time ensemble size (:data:`~IPv2DenoiseLib.denoiser.ensemble.ENSEMBLE_SIZES`): 1 = one pass (the fast default), 8 = the
        mean over all in-plane flips and transposes, 8 times slower.
    refine : bool
        Refine the output by collaborative Wiener filtering with the network as pilot
        (:mod:`~IPv2DenoiseLib.denoiser.refine`; ``--refine``): about 2 s per 512² slice on a CPU core.

    Examples
    --------
    >>> from IPv2DenoiseLib.denoiser.models import UNet
    >>> d = Denoiser(UNet(in_slices=3, base_channels=4))
    >>> d.denoise_array(np.full((2, 17, 19), -1000.0), device="cpu").shape
    (2, 17, 19)
    """

    def __init__(
        self,
        model: Denoiser2p5D,
        *,
        card: dict[str, Any] | None = None,
        name: str | None = None,
        runner: SlabRunner | None = None,
        ensemble: int = 1,
        refine: bool = False,
    ) -> None:
        self.model = model.eval()
        self.card = dict(card or {})
        self.name = name or self.card.get("weights") or type(model).__name__
        self.runner: SlabRunner = runner or run_slab
        self.ensemble = ensemble
        #: Refine the network's output by collaborative Wiener filtering (:mod:`~IPv2DenoiseLib.denoiser.refine`).
        self.refine = bool(refine)

    @property
    def ensemble(self) -> int:
        """Test-time ensemble size used by :meth:`denoise` (:mod:`~IPv2DenoiseLib.denoiser.ensemble`)."""
        return self._ensemble

    @ensemble.setter
    def ensemble(self, value: int) -> None:
        self._ensemble = check_ensemble(value)

    def run_ensemble(self, batch: torch.Tensor, device: torch.device, ensemble: int) -> torch.Tensor:
        """The runner's output for ``batch``, averaged over the first ``ensemble`` dihedral transforms."""
        total = None
        for index in range(ensemble):
            y = undo_dihedral(self.runner(self.model, dihedral(batch, index).contiguous(), device), index)
            total = y if total is None else total + y
        return total / ensemble if ensemble > 1 else total

    def check_strength(self, strength: object) -> float:
        """``strength`` if this network can be run at it (:func:`~IPv2DenoiseLib.denoiser.strength.check_strength`
        with this network's name and whether it takes a noise map); :class:`UserError` otherwise."""
        return check_strength(strength, model=self.name, takes_noise_map=wants_noise_map(self.model))

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, expected_sha256: str | None = None) -> Denoiser:
        """Load safetensors weights (+ model card); see :func:`IPv2DenoiseLib.denoiser.weights.load_model`.

        Parameters
        ----------
        path : path-like
            The ``.safetensors`` file; its card ``.json`` beside it is read when present.
        expected_sha256 : str, optional
            The checksum the catalogue lists for the file.

        Returns
        -------
        Denoiser
            The network on the CPU, named after the file, ensemble size 1.
        """
        model, card = load_model(path, expected_sha256=expected_sha256)
        return cls(model, card=card, name=Path(path).name)

    @classmethod
    def from_registry(
        cls, name: str = "default", *, models_json: str | os.PathLike | None = None
    ) -> Denoiser:
        """Load a model listed in ``Resources/Models/models.json`` by name (``"default"`` allowed);
        see :class:`~IPv2DenoiseLib.denoiser.model_reference.ModelReference`.

        The catalogue is ``{"default": NAME, "models": {NAME: {"file": ..., "sha256": ...,
        "summary": ...}}}`` with files relative to the JSON file's folder.

        Parameters
        ----------
        name : str
            A catalogue name, or ``"default"`` for the catalogue's default model.
        models_json : path-like, optional
            Another catalogue file; the bundled one when omitted.

        Returns
        -------
        Denoiser
            The network, checksum verified, named after its catalogue entry.

        Raises
        ------
        UserError
            Unknown name (the message lists the known ones), missing registry or weights file,
            checksum mismatch.
        """
        return ModelReference.resolve(name, models_json=models_json).load()

    # ------------------------------------------------------------------------------------ sizing

    def slab_size(
        self, shape_yx: tuple[int, int], device: torch.device, *, memory_budget_mb: float | None = None
    ) -> int:
        """Slices per slab that fit ``memory_budget_mb`` (default: 50 % of free GPU memory,
        or min(2 GiB, 25 % of available RAM) on the CPU), estimated from the model's width."""
        if memory_budget_mb is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                memory_budget_mb = 0.5 * free / 2**20
            else:
                memory_budget_mb = min(2048.0, 0.25 * psutil.virtual_memory().available / 2**20)
        per_pixel = self.model.activation_floats_per_pixel() + 2 * self.model.in_slices + 2
        bytes_per_slice = 2 * 4 * per_pixel * shape_yx[0] * shape_yx[1]  # float32, ×2 safety margin
        slab = max(1, int(memory_budget_mb * 2**20 // bytes_per_slice))
        return min(slab, CPU_MAX_SLAB) if device.type == "cpu" else slab

    # ------------------------------------------------------------------------------- denoising

    def denoise_array(
        self,
        hu: np.ndarray,
        *,
        remove_background: bool = True,
        spacing: tuple[float, float, float] | None = None,
        device: str | torch.device = "auto",
        slab_slices: int | None = None,
        memory_budget_mb: float | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        ensemble: int | None = None,
        refine: bool | None = None,
        strength: float = DEFAULT_STRENGTH,
    ) -> np.ndarray:
        """Denoise axial ``[z, y, x]`` HU slices; returns a new float32 HU array (see :meth:`denoise`).

        ``spacing`` (x, y, z mm) sizes the background blend (default: 1 mm pixels) and the refinement's
        noise model; ``ensemble`` and ``refine`` override :attr:`ensemble` and :attr:`refine`;
        ``strength`` scales the noise level map (:meth:`check_strength`).
        """
        hu = _check_hu(hu)
        strength = self.check_strength(strength)
        ensemble = self.ensemble if ensemble is None else check_ensemble(ensemble)
        refine = self.refine if refine is None else bool(refine)
        pixel_mm = float(spacing[0]) if spacing is not None else 1.0
        if slab_slices is not None and (isinstance(slab_slices, bool) or int(slab_slices) < 1):
            raise UserError(f"slab_slices must be a positive integer, got {slab_slices!r}")
        depth, height, width = hu.shape
        min_size = max(getattr(self.model, "min_size", 1), MIN_SLICE_PX)
        if min(height, width) < min_size:
            raise UserError(
                f"slices of {width} x {height} px (x, y) are too small to denoise with {self.name}; "
                f"need at least {min_size} x {min_size} px"
            )
        dev = resolve_device(device)
        k = self.model.in_slices
        slab = min(
            int(slab_slices)
            if slab_slices
            else self.slab_size((height, width), dev, memory_budget_mb=memory_budget_mb),
            depth,
        )
        out = np.empty(hu.shape, dtype=np.float32)
        report = progress or (lambda done, total, message: None)
        passes = f", {ensemble} flipped passes each" if ensemble > 1 else ""
        passes += ", refined" if refine else ""
        passes += f", strength {strength:g}" if strength != DEFAULT_STRENGTH else ""
        report(0, depth, f"denoising {depth} slices, {slab} per slab{passes}, on {dev.type}")
        done = 0
        while done < depth:
            if cancel is not None:
                cancel.check()
            n = min(slab, depth - done)
            index = window_indices(done, done + n, k, depth)
            x = torch.from_numpy(hu_to_net(hu[index]))  # [n + 2m, H, W]
            batch = x.unfold(0, k, 1).permute(0, 3, 1, 2)  # [n, k, H, W] windows, centre = slice
            if wants_noise_map(self.model):  # + the noise level map (and texture) of each centre slice
                centre = undeclared_padding_as_air(hu[done : done + n])
                batch = with_noise_map(batch, centre, noise_channels(self.model), strength)
            try:
                y = self.run_ensemble(batch, dev, ensemble)
            except torch.cuda.OutOfMemoryError:
                del batch, x
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if n > 1:
                    slab = max(1, n // 2)
                    report(done, depth, f"out of GPU memory; retrying with {slab}-slice slabs")
                    continue
                if dev.type != "cpu":
                    dev = torch.device("cpu")
                    slab = min(self.slab_size((height, width), dev, memory_budget_mb=None), depth - done)
                    report(done, depth, "out of GPU memory even for one slice; continuing on the CPU")
                    continue
                raise UserError(f"out of memory denoising one {height}x{width} slice") from None
            out[done : done + n] = net_to_hu(y[:, 0].numpy())
            if refine:
                out[done : done + n] = refine_on(
                    dev,
                    hu[done : done + n],
                    out[done : done + n],
                    pixel_mm,
                    cancel,
                    functools.partial(report, done, depth),
                )
            done += n
            report(done, depth, f"denoised {done}/{depth} slices")
        return remove_background_from(hu, out, spacing=spacing) if remove_background else out

    def denoise(
        self,
        volume: Volume,
        *,
        remove_background: bool = True,
        device: str | torch.device = "auto",
        slab_slices: int | None = None,
        memory_budget_mb: float | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        strength: float = DEFAULT_STRENGTH,
    ) -> Volume:
        """Denoise a CT volume.

        Parameters
        ----------
        volume : Volume
            Float32 HU ``[z, y, x]``; not modified.
        remove_background : bool
            Blend the air outside the patient to −1000 HU afterwards (never tissue; see the module
            docstring).
        device : {"auto", "cpu", "cuda", "mps"} or torch.device
            Where the network runs; the output is always stitched on the CPU.
        slab_slices : int, optional
            Slices per slab; by default from ``memory_budget_mb``.
        memory_budget_mb : float, optional
            Activation memory a slab may use on the device (default: see :meth:`slab_size`).
        progress : callable, optional
            ``progress(done_slices, total_slices, message)`` once per slab and on fallbacks.
        cancel : CancelToken, optional
            Checked between slabs; cancelling raises :class:`~IPv2DenoiseLib.core.progress.Cancelled`.
        strength : float
            Denoising strength (:mod:`~IPv2DenoiseLib.denoiser.strength`): the noise level map is
            scaled by it; below 1 keeps more of the scan's grain, above 1 smooths more.

        Returns
        -------
        Volume
            Same geometry, ``meta`` extended with ``denoiser`` (model name), its sha256, the
            options (``ensemble``, ``refined``, ``strength`` …) and ``warnings`` (one line each:
            truncated field of view, reorientation, and those of the reader).

        Raises
        ------
        UserError
            Bad device, too-small slices, out of memory even on the CPU, a strength out of range or
            other than 1 for a network without a noise map; ``Cancelled``.
        """
        warnings = list(volume.meta.get("warnings", []))
        plan = volume.axial_plan()
        work = volume.reoriented(*plan) if plan else volume
        if plan:
            warnings.append(
                f"{volume.meta.get('orientation', 'non-axial')} slices: reoriented to axial for the network "
                "and written back in the input's own geometry"
            )
        array = self.denoise_array(
            work.array,
            remove_background=remove_background,
            spacing=work.spacing,
            device=device,
            slab_slices=slab_slices,
            memory_budget_mb=memory_budget_mb,
            progress=progress,
            cancel=cancel,
            strength=strength,
        )
        truncated = truncation_warning(work.array, spacing=work.spacing)
        if truncated:
            warnings.append(truncated)
        result = work.with_array(
            array,
            denoiser=self.name,
            denoiser_sha256=self.card.get("sha256"),
            remove_background=bool(remove_background),
            ensemble=self.ensemble,
            refined=self.refine,
            strength=float(strength),
            warnings=warnings,
        )
        return result.reoriented(*Volume.inverse_plan(*plan)) if plan else result


__all__ = [
    "AIR_HU",
    "MIN_SLICE_PX",
    "Denoiser",
    "SlabRunner",
    "FLOAT32_ENV",
    "autocast_dtype",
    "cpu_has_amx",
    "float32_forced",
    "refine_on",
    "remove_background_from",
    "run_slab",
    "undeclared_padding_as_air",
]
