"""A small multi-scale 2.5D U-Net, the default IPv2 denoiser (cheap enough for CPU inference).

Layout follows MONAI's ``basic_unet.py``: blocks first, then the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D, check_input, check_positive_int


class TwoConv(nn.Sequential):
    """Two 3x3 convolutions with ReLU, same size.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then :class:`TwoConv`.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.MaxPool2d(2), TwoConv(in_ch, out_ch))


class UpCat(nn.Module):
    """2x2 transposed-conv upsampling, concatenation with the skip, :class:`TwoConv`.

    Parameters
    ----------
    in_ch : int
        Channels of the coarser input.
    skip_ch : int
        Channels of the skip connection (the upsampling's output channels too).
    out_ch : int
        Output channels.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, skip_ch, 2, stride=2)
        self.convs = TwoConv(2 * skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet(Denoiser2p5D):
    """Residual multi-scale U-Net: predicts the noise of the centre slice.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices given as input channels (odd; 1 = 2D, 3 = 2.5D).
    base_channels : int
        Channels at full resolution; doubled at each coarser level.
    levels : int
        Number of resolutions (1 = no downsampling). Inputs are padded (replicate) to a
        multiple of ``2 ** (levels - 1)`` and cropped back, so any H, W works.

    Notes
    -----
    Output = centre slice − predicted noise (residual learning, Zhang 2017). The defaults
    (3 slices, 16 channels, 3 levels) give 117,041 parameters and about 49 kFLOP per output
    pixel — cheap enough to denoise a 300-slice chest on 2 CPU cores in a few minutes
    (docs/models.md). See ``docs/models.md``.

    References
    ----------
    .. [1] O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical
       Image Segmentation", MICCAI 2015, arXiv:1505.04597.

    Examples
    --------
    >>> net = UNet(in_slices=3)
    >>> net(torch.zeros(2, 3, 33, 35)).shape
    torch.Size([2, 1, 33, 35])
    """

    ARCH = "unet"

    def __init__(self, *, in_slices: int = 3, base_channels: int = 16, levels: int = 3) -> None:
        super().__init__(in_slices)
        base = check_positive_int("base_channels", base_channels)
        levels = check_positive_int("levels", levels)
        self.config = {"in_slices": self.in_slices, "base_channels": base, "levels": levels}
        self.levels = levels
        self.base_channels = base
        widths = [base * 2**i for i in range(levels)]
        self.inc = TwoConv(self.in_slices, widths[0])
        self.downs = nn.ModuleList(Down(widths[i - 1], widths[i]) for i in range(1, levels))
        self.ups = nn.ModuleList(
            UpCat(widths[i], widths[i - 1], widths[i - 1]) for i in range(levels - 1, 0, -1)
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        # start as the identity (zero noise estimate): training then only ever improves on the input
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def activation_floats_per_pixel(self) -> int:
        # full-resolution skip (base) + concat (2 base) + conv output (base) + input, plus coarser levels
        return self.in_slices + 6 * self.base_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_slices, H, W]`` (any H, W) → ``[B, 1, H, W]``."""
        check_input(x, self.in_slices)
        return self.centre(x) - self.predict_noise(x)

    def predict_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The noise of the centre slice, ``[B, 1, H, W]``, from all input channels (any H, W)."""
        h, w = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        skips = [self.inc(xp)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)[..., :h, :w]
