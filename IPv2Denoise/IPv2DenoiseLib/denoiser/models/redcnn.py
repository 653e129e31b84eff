"""RED-CNN (Chen et al. 2017), the low-dose CT field's reference network, with 2.5D input."""

from __future__ import annotations

import torch
from torch import nn

from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D, check_input, check_positive_int


class REDCNN(Denoiser2p5D):
    """Residual encoder-decoder CNN: 5 valid 5x5 convs, 5 transposed convs, 3 shortcuts.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices given as input channels (odd; 1 = the original 2D network).
    channels : int
        Width of every hidden layer (96 in the paper).
    kernel_size : int
        Kernel size of every layer (5 in the paper).

    Notes
    -----
    As in the paper and ldct-benchmark's ``network.py``: no padding in the encoder (each conv
    shrinks the image by ``kernel_size - 1``), stride-1 transposed convs grow it back, so any
    H, W >= ``5 * (kernel_size - 1) + 1`` works and the output has the input's size. The last
    shortcut adds the centre slice, i.e. output = centre − noise; no final ReLU (our network
    units can be negative near air). 96 channels, 1 slice: 1,848,865 parameters, 3.5 MFLOP per
    pixel — GPU only for whole volumes (docs/models.md).

    References
    ----------
    .. [1] H. Chen et al., "Low-Dose CT With a Residual Encoder-Decoder Convolutional Neural
       Network", IEEE TMI 36(12), 2017, doi:10.1109/TMI.2017.2715284.

    Examples
    --------
    >>> net = REDCNN(in_slices=3, channels=8)
    >>> net(torch.zeros(1, 3, 33, 35)).shape
    torch.Size([1, 1, 33, 35])
    """

    ARCH = "redcnn"

    def __init__(self, *, in_slices: int = 1, channels: int = 96, kernel_size: int = 5) -> None:
        super().__init__(in_slices)
        ch = check_positive_int("channels", channels)
        ks = check_positive_int("kernel_size", kernel_size)
        self.config = {"in_slices": self.in_slices, "channels": ch, "kernel_size": ks}
        self.channels = ch
        self.min_size = 5 * (ks - 1) + 1
        self.convs = nn.ModuleList(nn.Conv2d(self.in_slices if i == 0 else ch, ch, ks) for i in range(5))
        self.tconvs = nn.ModuleList(nn.ConvTranspose2d(ch, 1 if i == 4 else ch, ks) for i in range(5))
        self.relu = nn.ReLU()

    def activation_floats_per_pixel(self) -> int:
        # two kept shortcuts + current + next layer, all `channels` wide
        return self.in_slices + 4 * self.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_slices, H, W]`` with H, W >= ``min_size`` → ``[B, 1, H, W]``."""
        check_input(x, self.in_slices)
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"REDCNN needs H, W >= {self.min_size}, got {tuple(x.shape[-2:])}")
        relu = self.relu
        out = relu(self.convs[0](x))
        out = relu(self.convs[1](out))
        res2 = out
        out = relu(self.convs[2](out))
        out = relu(self.convs[3](out))
        res3 = out
        out = relu(self.convs[4](out))
        out = self.tconvs[0](out) + res3
        out = self.tconvs[1](relu(out))
        out = self.tconvs[2](relu(out)) + res2
        out = self.tconvs[3](relu(out))
        out = self.tconvs[4](relu(out))
        return self.centre(x) + out
