"""A noise-aware 2.5D U-Net (FFDNet / DRUNet style): the slices plus a per-pixel noise level map.

BM3D is handed the noise level; a plain network must guess it from the image. This one gets it as
an extra input channel: :func:`~IPv2DenoiseLib.imaging.noise_map.noise_level_map` of the noisy
centre slice (HU, estimated from the scan itself), divided by :data:`NOISE_MAP_SCALE_HU`. Inference
(:mod:`IPv2DenoiseLib.denoiser.infer`), the trainer's samplers and validation, and scan adaptation
all build that channel with :func:`with_noise_map`, so training and inference see the same map.

:class:`TextureAwareUNet` is also told the noise's texture: a second channel holding the slice's
:func:`~IPv2DenoiseLib.imaging.noise_map.noise_fineness` (a smooth kernel's noise reads low, a sharp
one's high), the "local NPS class" BM3D's spectrum stands for.
"""

from __future__ import annotations

import numpy as np
import torch

from IPv2DenoiseLib.denoiser.models.base import check_input
from IPv2DenoiseLib.denoiser.models.unet import TwoConv, UNet
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength
from IPv2DenoiseLib.imaging.noise_map import noise_level_and_fineness, noise_level_map

#: Noise map HU per network unit: typical ultra-low-dose noise (20-300 HU) becomes 0.2-3.
NOISE_MAP_SCALE_HU = 100.0
#: The texture channel is ``(fineness - FINENESS_CENTRE) / FINENESS_SCALE``: scanner kernels
#: (fineness 0.45-1.0) become about -1.3 ... +1.5.
FINENESS_CENTRE = 0.7
FINENESS_SCALE = 0.2


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


def noise_channels(model: torch.nn.Module | type[torch.nn.Module]) -> int:
    """How many noise channels a network takes after its slices (0, 1 for the level map, 2 with texture).

    Parameters
    ----------
    model : torch.nn.Module or its class
        Any network of :mod:`IPv2DenoiseLib.denoiser.models`, built or not (a class attribute).

    Returns
    -------
    int
        The class's ``noise_channels`` (0 for networks without noise inputs).
    """
    return int(getattr(model, "noise_channels", 0))


def wants_noise_map(model: torch.nn.Module) -> bool:
    """Whether a network takes a noise level map (and maybe the texture) after its slices.

    Parameters
    ----------
    model : torch.nn.Module
        Any network of :mod:`IPv2DenoiseLib.denoiser.models`.

    Returns
    -------
    bool
        True for the noise-aware architectures.
    """
    return noise_channels(model) > 0


def noise_maps(centre_hu: np.ndarray, channels: int, strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    """The noise channels (network units) of noisy centre slices.

    Parameters
    ----------
    centre_hu : numpy.ndarray
        ``[B, H, W]`` noisy slices in HU (the maps are measured on them).
    channels : int
        1: the level map; 2: the level map, then the texture channel (constant over each slice).
    strength : float
        The denoising strength (:mod:`~IPv2DenoiseLib.denoiser.strength`): the level map is scaled by
        it, telling the network the noise is that many times as strong; the texture channel is not.

    Returns
    -------
    numpy.ndarray
        float32 ``[B, channels, H, W]``.

    Raises
    ------
    ValueError
        ``channels`` is not 1 or 2.
    UserError
        ``strength`` is outside :data:`~IPv2DenoiseLib.denoiser.strength.STRENGTH_RANGE`.
    """
    if channels not in (1, 2):
        raise ValueError(f"noise channels: 1 or 2, not {channels}")
    factor = np.float32(check_strength(strength))  # x * 1.0 is x: the default leaves the map bit for bit
    hu = np.asarray(centre_hu, dtype=np.float32)
    if channels == 1:
        return (noise_map_channel(noise_level_map(hu)) * factor)[:, None]
    level, fineness = noise_level_and_fineness(hu)  # one coarse residual per slice for both
    texture = (fineness - np.float32(FINENESS_CENTRE)) / np.float32(FINENESS_SCALE)
    return np.stack(
        [noise_map_channel(level) * factor, np.broadcast_to(texture[:, None, None], hu.shape)], axis=1
    )


def with_noise_map(
    batch: torch.Tensor, centre_hu: np.ndarray, channels: int = 1, strength: float = DEFAULT_STRENGTH
) -> torch.Tensor:
    """Append the noise channels of the centre slices to a batch of 2.5D windows.

    Parameters
    ----------
    batch : torch.Tensor
        ``[B, k, H, W]`` windows in network units.
    centre_hu : numpy.ndarray
        ``[B, H, W]`` noisy centre slices in HU (the maps are measured on them).
    channels : int
        The network's :func:`noise_channels`.
    strength : float
        The factor on the level map (:func:`noise_maps`); 1 for training and scan adaptation.

    Returns
    -------
    torch.Tensor
        ``[B, k + channels, H, W]``, float32, on the batch's device.

    Raises
    ------
    UserError
        ``strength`` is outside :data:`~IPv2DenoiseLib.denoiser.strength.STRENGTH_RANGE`.
    """
    centre = np.asarray(centre_hu, dtype=np.float32).reshape(batch.shape[0], *batch.shape[-2:])
    maps = torch.from_numpy(noise_maps(centre, channels, strength)).to(batch.device, batch.dtype)
    return torch.cat([batch, maps], dim=1)


def with_zero_weight_input(trained: UNet, cls: type[NoiseAwareUNet]) -> NoiseAwareUNet:
    """``cls`` (one more input channel than ``trained`` takes) computing what ``trained`` computes:
    every weight copied, the new last channel's first-layer weights zero."""
    net = cls(**trained.config)
    state = trained.state_dict()
    first = state["inc.0.weight"]  # [out, inputs, 3, 3]
    state["inc.0.weight"] = torch.cat([first, torch.zeros_like(first[:, :1])], dim=1)
    net.load_state_dict(state)
    return net


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
    #: :mod:`~IPv2DenoiseLib.denoiser.infer` and the trainer append this many noise channels.
    noise_channels = 1

    def __init__(self, *, in_slices: int = 3, base_channels: int = 16, levels: int = 3) -> None:
        super().__init__(in_slices=in_slices, base_channels=base_channels, levels=levels)
        self.inc = TwoConv(self.in_slices + self.noise_channels, self.base_channels)

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
        return with_zero_weight_input(unet, cls)

    def activation_floats_per_pixel(self) -> int:
        return super().activation_floats_per_pixel() + self.noise_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_slices + noise_channels, H, W]`` (slices, then the maps) → ``[B, 1, H, W]``."""
        check_input(x, self.in_slices + self.noise_channels)
        return self.centre(x) - self.predict_noise(x)


class TextureAwareUNet(NoiseAwareUNet):
    """:class:`NoiseAwareUNet` that is also told the noise's texture (a second noise channel).

    The channel is the centre slice's :func:`~IPv2DenoiseLib.imaging.noise_map.noise_fineness`,
    the same over the slice (:func:`noise_maps`): BM3D is handed the noise spectrum, a network that
    sees only the level must guess whether a 40 HU noise is a sharp kernel's or a smooth one's.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices (odd); the input has ``in_slices + 2`` channels.
    base_channels : int
        Channels at full resolution; doubled at each coarser level.
    levels : int
        Number of resolutions.

    Examples
    --------
    >>> net = TextureAwareUNet(in_slices=3, base_channels=4)
    >>> net(torch.zeros(2, 5, 33, 35)).shape
    torch.Size([2, 1, 33, 35])
    """

    ARCH = "unet-nmt"
    noise_channels = 2

    @classmethod
    def from_noise_aware(cls, net: NoiseAwareUNet) -> TextureAwareUNet:
        """A texture-aware U-Net that computes exactly what ``net`` computes, whatever the texture.

        ``train --arch quality-texture --init <noise-aware weights>`` starts here: every weight is
        copied and the texture channel's first-layer weights start at zero.

        Parameters
        ----------
        net : NoiseAwareUNet
            A trained noise-aware U-Net (its ``config`` gives the new network's size).

        Returns
        -------
        TextureAwareUNet
            The widened network.
        """
        return with_zero_weight_input(net, cls)


__all__ = [
    "FINENESS_CENTRE",
    "FINENESS_SCALE",
    "NOISE_MAP_SCALE_HU",
    "NoiseAwareUNet",
    "TextureAwareUNet",
    "noise_channels",
    "noise_map_channel",
    "noise_maps",
    "wants_noise_map",
    "with_noise_map",
]
