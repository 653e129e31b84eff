"""Shared checks and helpers for the denoiser networks (2D / 2.5D, residual)."""

from __future__ import annotations

import torch
from torch import nn

from IPv2DenoiseLib.core.errors import UserError


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as int, or raise :class:`UserError` naming the argument.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        What the caller passed.
    minimum : int
        The smallest value allowed.

    Returns
    -------
    int
        ``value`` unchanged.

    Raises
    ------
    UserError
        ``value`` is not an int (booleans refused) or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def check_in_slices(in_slices: object) -> int:
    """2.5D input depth: an odd number of adjacent slices (1 = plain 2D).

    Parameters
    ----------
    in_slices : object
        What the caller passed.

    Returns
    -------
    int
        The checked depth.

    Raises
    ------
    UserError
        Not a positive integer, or even (no centre slice).
    """
    k = check_positive_int("in_slices", in_slices)
    if k % 2 == 0:
        raise UserError(f"`in_slices` must be odd (centre slice plus equal margins), got {k}")
    return k


def check_input(x: torch.Tensor, in_slices: int) -> None:
    """Raise ValueError (a bug, not a user error) if ``x`` is not ``[B, in_slices, H, W]``.

    Parameters
    ----------
    x : torch.Tensor
        A network input.
    in_slices : int
        The channels the network expects.
    """
    if x.ndim != 4 or x.shape[1] != in_slices:
        raise ValueError(f"expected input [B, {in_slices}, H, W], got {tuple(x.shape)}")


class Denoiser2p5D(nn.Module):
    """Base class: input ``[B, in_slices, H, W]`` in network units, output ``[B, 1, H, W]``.

    Subclasses set ``ARCH`` (the registry name) and store their constructor kwargs in
    ``self.config`` so a model card can rebuild them with ``build_model(ARCH, **config)``.

    Parameters
    ----------
    in_slices : int
        Adjacent axial slices given as input channels (odd; 1 = 2D).
    """

    ARCH = ""

    def __init__(self, in_slices: int) -> None:
        super().__init__()
        self.in_slices = check_in_slices(in_slices)
        self.config: dict = {}

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The centre slice of a 2.5D input, ``[B, 1, H, W]``."""
        c = self.in_slices // 2
        return x[:, c : c + 1]

    def activation_floats_per_pixel(self) -> int:
        """Rough peak number of live activation values per input pixel during inference.

        Used by :mod:`IPv2DenoiseLib.denoiser.infer` to size slabs from a memory budget.
        """
        raise NotImplementedError
