"""A noise-aware 2.5D U-Net (FFDNet / DRUNet style): the slices plus a per-pixel noise level map.

BM3D is handed the noise level; a plain network must guess it from the image. This one gets it as
an extra input channel: :func:`~IPv2DenoiseLib.imaging.noise_map.noise_level_map` of the noisy
centre slice (HU, estimated from the scan itself), divided by :data:`NOISE_MAP_SCALE_HU`. Inference
(:mod:`IPv2DenoiseLib.denoiser.infer`), the trainer's samplers and validation, and scan adaptation
all build that channel with :func:`with_noise_map`, so training and inference see the same map.
"""

from __future__ import annotations

import numpy as np
import torch

from IPv2DenoiseLib.denoiser.models.base import check_input
from IPv2DenoiseLib.denoiser.models.unet import TwoConv, UNet
from IPv2DenoiseLib.imaging.noise_map import noise_level_map

#: Noise map HU per network unit: typical ultra-low-dose noise (20-300 HU) becomes 0.2-3.
NOISE_MAP_SCALE_HU = 100.0


def noise_map_channel(map_hu: np.ndarray) -> np.ndarray:
    """A noise level map (HU) in network units.

    Parameters
    ----------
    map_hu : numpy.ndarray
        Output of :func:`~IPv2DenoiseLib.imaging.noise_map.noise_level_map`.

    Returns
    -------
    numpy.ndarray
        float32, ``map_hu / NOISE_MAP_SCALE_HU``.
    """
    return np.asarray(map_hu, dtype=np.float32) / np.float32(NOISE_MAP_SCALE_HU)


def wants_noise_map(model: torch.nn.Module) -> bool:
    """Whether a network takes a noise level map as its last input channel.

    Parameters
    ----------
    model : torch.nn.Module
        Any network of :mod:`IPv2DenoiseLib.denoiser.models`.

    Returns
    -------
    bool
        True for the noise-aware architectures.
    """
    return bool(getattr(model, "wants_noise_map", False))


def with_noise_map(batch: torch.Tensor, centre_hu: np.ndarray) -> torch.Tensor:
    """Append the noise level map of the centre slices to a batch of 2.5D windows.

    Parameters
    ----------
    batch : torch.Tensor
        ``[B, k, H, W]`` windows in network units.
    centre_hu : numpy.ndarray
        ``[B, H, W]`` noisy centre slices in HU (the map is measured on them).

    Returns
    -------
    torch.Tensor
        ``[B, k + 1, H, W]``, float32, on the batch's device.
    """
    maps = torch.from_numpy(noise_map_channel(noise_level_map(np.asarray(centre_hu, dtype=np.float32))))
    maps = maps.reshape(batch.shape[0], 1, *batch.shape[-2:]).to(batch.device, batch.dtype)
    return torch.cat([batch, maps], dim=1)


class NoiseAwareUNet(UNet):
    """The residual U-Net of :class:`~IPv2DenoiseLib.denoiser.models.unet.UNet` with a noise map channel.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices (odd); the input has ``in_slices + 1`` channels, the last being the
        noise level map of the centre slice (:func:`with_noise_map`).
    base_channels : int
        Channels at full resolution; doubled at each coarser level.
    levels : int
        Number of resolutions.

    Notes
    -----
    3 slices, 16 channels, 3 levels (the fast tier's size): 117,185 parameters, 49 kFLOP per voxel;
    32 channels, 3 levels (the ``quality`` preset, started from the fast weights by
    :meth:`~IPv2DenoiseLib.denoiser.models.unet.UNet.widened`): 466,817 parameters, 195 kFLOP per
    voxel (docs/models.md).

    References
    ----------
    .. [1] K. Zhang, W. Zuo, L. Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN based
       Image Denoising", IEEE TIP 27(9), 2018, arXiv:1710.04026.
    .. [2] K. Zhang et al., "Plug-and-Play Image Restoration with Deep Denoiser Prior" (DRUNet),
       IEEE TPAMI 44(10), 2022, arXiv:2008.13751.

    Examples
    --------
    >>> net = NoiseAwareUNet(in_slices=3, base_channels=4)
    >>> net(torch.zeros(2, 4, 33, 35)).shape
    torch.Size([2, 1, 33, 35])
    """

    ARCH = "unet-nm"
    #: :mod:`~IPv2DenoiseLib.denoiser.infer` and the trainer append the map channel for this network.
    wants_noise_map = True

    def __init__(self, *, in_slices: int = 3, base_channels: int = 16, levels: int = 3) -> None:
        super().__init__(in_slices=in_slices, base_channels=base_channels, levels=levels)
        self.inc = TwoConv(self.in_slices + 1, self.base_channels)

    @classmethod
    def from_unet(cls, unet: UNet) -> NoiseAwareUNet:
        """A noise-aware U-Net that computes exactly what ``unet`` computes, whatever the map.

        Fine-tuning starts from a trained plain U-Net (``train --arch unet-nm --init unet.safetensors``):
        every weight is copied and the map channel's first-layer weights start at zero, so training
        only has to learn what the map adds.

        Parameters
        ----------
        unet : UNet
            A plain U-Net (its ``config`` gives the new network's size).

        Returns
        -------
        NoiseAwareUNet
            The widened network.
        """
        net = cls(**unet.config)
        state = unet.state_dict()
        first = state["inc.0.weight"]  # [out, in_slices, 3, 3]
        state["inc.0.weight"] = torch.cat([first, torch.zeros_like(first[:, :1])], dim=1)
        net.load_state_dict(state)
        return net

    def activation_floats_per_pixel(self) -> int:
        return super().activation_floats_per_pixel() + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_slices + 1, H, W]`` (slices, then the map) → ``[B, 1, H, W]``."""
        check_input(x, self.in_slices + 1)
        return self.centre(x) - self.predict_noise(x)


__all__ = ["NOISE_MAP_SCALE_HU", "NoiseAwareUNet", "noise_map_channel", "wants_noise_map", "with_noise_map"]
