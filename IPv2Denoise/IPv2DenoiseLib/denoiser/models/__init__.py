"""Denoiser networks (2D / 2.5D residual CNNs) and their registry.

See ``docs/models.md`` for parameters and cost of each architecture.
"""

from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D
from IPv2DenoiseLib.denoiser.models.dncnn import DnCNN
from IPv2DenoiseLib.denoiser.models.noise_aware_unet import NoiseAwareUNet, TextureAwareUNet
from IPv2DenoiseLib.denoiser.models.redcnn import REDCNN
from IPv2DenoiseLib.denoiser.models.registry import (
    ARCH_PRESETS,
    MODEL_CLASSES,
    build_model,
    count_parameters,
    flops_per_voxel,
    model_class,
    resolve_architecture,
)
from IPv2DenoiseLib.denoiser.models.unet import UNet

__all__ = [
    "ARCH_PRESETS",
    "MODEL_CLASSES",
    "REDCNN",
    "Denoiser2p5D",
    "DnCNN",
    "NoiseAwareUNet",
    "TextureAwareUNet",
    "UNet",
    "build_model",
    "count_parameters",
    "flops_per_voxel",
    "model_class",
    "resolve_architecture",
]
