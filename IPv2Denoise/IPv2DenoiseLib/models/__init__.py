"""Denoiser networks (2D / 2.5D residual CNNs) and their registry.

See ``docs/models.md`` for parameters and cost of each architecture.
"""

from ._common import Denoiser2p5D
from .dncnn import DnCNN
from .redcnn import REDCNN
from .registry import MODEL_CLASSES, build_model, count_parameters, flops_per_voxel
from .unet import UNet

__all__ = [
    "MODEL_CLASSES",
    "REDCNN",
    "Denoiser2p5D",
    "DnCNN",
    "UNet",
    "build_model",
    "count_parameters",
    "flops_per_voxel",
]
