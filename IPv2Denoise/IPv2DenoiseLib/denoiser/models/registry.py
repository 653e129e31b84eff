"""Architecture registry: build a model from its card's ``architecture`` and ``kwargs``."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D
from IPv2DenoiseLib.denoiser.models.dncnn import DnCNN
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import NoiseAwareUNet, TextureAwareUNet, noise_channels
from IPv2DenoiseLib.denoiser.models.redcnn import REDCNN
from IPv2DenoiseLib.denoiser.models.unet import UNet

#: Registry name → class. Constructors take plain keyword values only.
MODEL_CLASSES: dict[str, type[Denoiser2p5D]] = {
    "unet": UNet,
    "unet-nm": NoiseAwareUNet,
    "unet-nmt": TextureAwareUNet,
    "redcnn": REDCNN,
    "dncnn": DnCNN,
}

#: Named sizes (``train --arch fast|quality``): preset → (architecture, constructor keywords).
#: ``fast`` is the noise-aware U-Net of 16 channels (117 k parameters); ``quality`` the same at twice the width
#: (32 channels, 3 levels: 467 k parameters, 4x the FLOPs), the shipped default since 2026-12-05 (docs/models.md).
#: Same layout, so ``train --arch quality --init <fast weights>`` starts from the trained fast network, widened
#: without changing its output (``UNet.widened``; ``--model-kwargs '{"base_channels": 48}'`` widens further).
ARCH_PRESETS: dict[str, tuple[str, dict]] = {
    "fast": ("unet-nm", {"in_slices": 3, "base_channels": 16, "levels": 3}),
    "quality": ("unet-nm", {"in_slices": 3, "base_channels": 32, "levels": 3}),
    # the same two sizes, also told the noise's texture (a second noise channel; issue #24)
    "fast-texture": ("unet-nmt", {"in_slices": 3, "base_channels": 16, "levels": 3}),
    "quality-texture": ("unet-nmt", {"in_slices": 3, "base_channels": 32, "levels": 3}),
}


def resolve_architecture(name: str, kwargs: dict | None = None) -> tuple[str, dict | None]:
    """An architecture name or preset → (registry name, constructor keywords).

    Parameters
    ----------
    name : str
        A key of :data:`MODEL_CLASSES` or of :data:`ARCH_PRESETS`.
    kwargs : dict, optional
        Keywords the user gave; for a preset they override the preset's own.

    Returns
    -------
    arch : str
        A key of :data:`MODEL_CLASSES` (what a model card records).
    kwargs : dict or None
        The keywords to build it with (None: the caller's default).

    Raises
    ------
    UserError
        Neither an architecture nor a preset.
    """
    if name in ARCH_PRESETS:
        arch, preset = ARCH_PRESETS[name]
        return arch, {**preset, **(kwargs or {})}
    if name not in MODEL_CLASSES:
        known = ", ".join([*sorted(MODEL_CLASSES), *ARCH_PRESETS])
        raise UserError(f"unknown architecture {name!r}; known: {known}")
    return name, kwargs


def model_class(arch: str) -> type[Denoiser2p5D]:
    """The network class of an architecture name (a model card's ``architecture``).

    Parameters
    ----------
    arch : str
        One of :data:`MODEL_CLASSES`.

    Returns
    -------
    type
        The class, not built.

    Raises
    ------
    UserError
        Unknown ``arch`` (the message lists the known ones).
    """
    cls = MODEL_CLASSES.get(arch)
    if cls is None:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(sorted(MODEL_CLASSES))}")
    return cls


def build_model(arch: str, **kwargs) -> Denoiser2p5D:
    """Build an untrained network.

    Parameters
    ----------
    arch : str
        One of :data:`MODEL_CLASSES` (``"unet"``, ``"redcnn"``, ``"dncnn"``).
    **kwargs
        The class's constructor keywords (e.g. ``in_slices=3, base_channels=16``).

    Returns
    -------
    Denoiser2p5D
        The network with freshly initialised weights, on the CPU.

    Raises
    ------
    UserError
        Unknown ``arch`` or keywords the class does not take.
    """
    cls = model_class(arch)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"bad keywords {sorted(kwargs)} for architecture {arch!r}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Any network.

    Returns
    -------
    int
        The count of elements of parameters that require gradients.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_voxel(model: nn.Module, in_slices: int | None = None, size: int = 512) -> float:
    """Forward FLOPs (2 x multiply-accumulates of convs and matmuls) per output voxel.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one ``size x size`` input
    of a copy of the model on the ``meta`` device (no arithmetic is done, so any size is free);
    biases, activations and pooling are not counted (< 2 % here). The default 512 is the usual CT
    slice: RED-CNN's valid convolutions make its cost per pixel depend on the size (3.50 MFLOP/px
    at 512, 2.28 at 64).

    Parameters
    ----------
    model : torch.nn.Module
        The network (left untouched: a copy is counted).
    in_slices : int, optional
        Input channels; the model's ``in_slices`` (else 1) when omitted.
    size : int
        Height and width of the counted input, pixels.

    Returns
    -------
    float
        FLOPs per output pixel of one slice.
    """
    if in_slices is None:
        in_slices = getattr(model, "in_slices", 1)
    channels = in_slices + noise_channels(model)  # the noise map (and texture) channels
    meta = copy.deepcopy(model).to("meta").eval()
    x = torch.zeros(1, channels, size, size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x)
    return counter.get_total_flops() / float(size * size)
