"""DnCNN (Zhang et al. 2017): a plain residual CNN with 2.5D input."""

from __future__ import annotations

import torch
from torch import nn

from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D, check_input, check_positive_int


class DnCNN(Denoiser2p5D):
    """Conv-ReLU, ``depth - 2`` x (Conv-BN-ReLU), Conv; predicts the noise.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices given as input channels (odd; 1 = 2D).
    depth : int
        Number of 3x3 conv layers (17 in the paper), at least 2.
    width : int
        Hidden channels (64 in the paper).
    batch_norm : bool
        Batch normalisation in the middle layers, as in the paper.

    Notes
    -----
    Output = centre − noise. Same-padding, so any H, W works. Depth 17, width 64, 3 slices:
    557,249 parameters and 1.1 MFLOP per pixel.

    References
    ----------
    .. [1] K. Zhang, W. Zuo, Y. Chen, D. Meng, L. Zhang, "Beyond a Gaussian Denoiser: Residual
       Learning of Deep CNN for Image Denoising", IEEE TIP 26(7), 2017, arXiv:1608.03981.

    Examples
    --------
    >>> net = DnCNN(in_slices=3, depth=5, width=8)
    >>> net(torch.zeros(1, 3, 33, 35)).shape
    torch.Size([1, 1, 33, 35])
    """

    ARCH = "dncnn"

    def __init__(
        self, *, in_slices: int = 3, depth: int = 17, width: int = 64, batch_norm: bool = True
    ) -> None:
        super().__init__(in_slices)
        depth = check_positive_int("depth", depth, minimum=2)
        width = check_positive_int("width", width)
        batch_norm = bool(batch_norm)
        self.config = {"in_slices": self.in_slices, "depth": depth, "width": width, "batch_norm": batch_norm}
        self.width = width
        layers: list[nn.Module] = [nn.Conv2d(self.in_slices, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def activation_floats_per_pixel(self) -> int:
        return self.in_slices + 2 * self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_slices, H, W]`` → ``[B, 1, H, W]``."""
        check_input(x, self.in_slices)
        return self.centre(x) - self.body(x)
