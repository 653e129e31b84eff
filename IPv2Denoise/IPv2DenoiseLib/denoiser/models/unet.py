"""A small multi-scale 2.5D U-Net, the default IPv2 denoiser (cheap enough for CPU inference).

Layout follows MONAI's ``basic_unet.py``: blocks first, then the network.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D, check_input, check_positive_int


def float32_region(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A region that runs in float32 when autocast is on for ``tensor``'s device (else nothing to do:
    the meta device of the FLOP counter has no autocast).

    Parameters
    ----------
    tensor : torch.Tensor
        A tensor on the device whose autocast is suspended.

    Returns
    -------
    contextlib.AbstractContextManager
        ``torch.autocast(..., enabled=False)`` or a no-op context.
    """
    kind = tensor.device.type
    if kind in ("cpu", "cuda", "mps") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


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
    #: The first convolution runs in float32 under autocast (:meth:`predict_noise`), so bf16 on a
    #: CPU keeps the input's HU (``denoiser.infer.autocast_dtype``).
    float32_input_layer = True

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

    def widened(self, base_channels: int, *, seed: int = 0) -> UNet:
        """A wider copy that computes exactly what this network computes (Net2WiderNet).

        The larger ``quality`` tier starts from the trained fast network instead of from scratch:
        new channel ``k`` copies old channel ``k mod self.base_channels`` (at each level's width)
        with its incoming weights and bias, so at a width that is not a multiple some channels get
        one copy more than others, and each consumer's weights on the copies of a channel are split
        at random into parts that sum to the original weight. The output is unchanged (the copies
        are equal after the ReLU), and the random split makes the copies' gradients differ, so they
        can learn apart.
        Written by hand: no maintained library widens a PyTorch network.

        Parameters
        ----------
        base_channels : int
            The new full-resolution width, more than this network's.
        seed : int
            Seed of the random split.

        Returns
        -------
        UNet
            A network of the same class, slices and levels, ``base_channels`` wide.

        Raises
        ------
        UserError
            ``base_channels`` is not more than this network's width.

        References
        ----------
        .. [1] T. Chen, I. Goodfellow, J. Shlens, "Net2Net: Accelerating Learning via Knowledge
           Transfer", ICLR 2016, arXiv:1511.05641.
        """
        if check_positive_int("base_channels", base_channels) <= self.base_channels:
            raise UserError(
                f"cannot widen a {self.base_channels}-channel network to {base_channels} channels; "
                f"use more than {self.base_channels}"
            )
        wide = type(self)(**{**self.config, "base_channels": base_channels})
        old = dict(self.named_parameters())
        new = dict(wide.named_parameters())
        splitter = _ChannelSplitter(torch.Generator().manual_seed(seed))
        for name, weight in new.items():
            source = old[name].detach()
            with torch.no_grad():
                weight.copy_(splitter.widen(name, source, tuple(weight.shape)))
        return wide

    def predict_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The noise of the centre slice, ``[B, 1, H, W]``, from all input channels (any H, W)."""
        h, w = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        # the input layer in float32 even under autocast: CT in network units ((HU + 1000) / 1000)
        # would be rounded to 8 HU steps in bf16 (a head slice lost 0.08 dB; 0.01 dB with this)
        convolution, activation, *rest = self.inc
        with float32_region(xp):
            features = activation(convolution(xp.float()))
        for layer in rest:
            features = layer(features)
        skips = [features]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        with float32_region(y):
            return self.head(y.float())[..., :h, :w]


class _ChannelSplitter:
    """The index maps and random splits of :meth:`UNet.widened`.

    A widened tensor is indexed by new channels; an index map gives the old channel each copies.
    A concatenated input (``ups.*.convs.0``: upsampled half, then the skip) maps each half alone.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    @staticmethod
    def old_index(new_size: int, old_size: int, *, halves: bool = False) -> torch.Tensor:
        if halves and new_size != old_size:
            half = torch.arange(new_size // 2) % (old_size // 2)
            return torch.cat([half, half + old_size // 2])
        return torch.arange(new_size) % old_size

    def split(
        self, shape: tuple[int, ...], in_dim: int, in_index: torch.Tensor, old_size: int
    ) -> torch.Tensor:
        """Random parts along ``in_dim`` that sum to 1 over the copies of each old channel."""
        if shape[in_dim] == old_size:
            return torch.ones(shape)
        parts = 1.0 + 0.5 * (torch.rand(shape, generator=self.generator) - 0.5)
        moved = parts.movedim(in_dim, 0)
        sums = torch.zeros((old_size, *moved.shape[1:])).index_add_(0, in_index, moved)
        return (moved / sums.index_select(0, in_index)).movedim(0, in_dim)

    def widen(self, name: str, source: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The widened value of parameter ``name`` (old value ``source``), of shape ``shape``."""
        transposed = name.endswith("up.weight")  # ConvTranspose2d weights are [in, out, kh, kw]
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        value = source.index_select(out_dim, self.old_index(shape[out_dim], source.shape[out_dim]))
        if source.ndim == 1:  # a bias
            return value
        in_index = self.old_index(shape[in_dim], source.shape[in_dim], halves=".convs.0." in name)
        value = value.index_select(in_dim, in_index)
        return value * self.split(shape, in_dim, in_index, source.shape[in_dim])
