"""Test-time flip ensemble: the in-plane flips and transposes a slice is denoised under, and undone.

A CT slice has no preferred orientation for noise, so a network run on the N transforms of a slice
errs differently each time and the mean of the N undone outputs is closer to the truth (+0.23 dB
with N = 8 on ``bench_infer``'s synthetic cases) at N times the cost. Inference
(:meth:`~IPv2DenoiseLib.denoiser.infer.Denoiser.run_ensemble`) applies it; the command line offers
the sizes as ``--ensemble``.

This module imports no torch (the transforms only call tensor methods), so building ``--help``
can read :data:`ENSEMBLE_SIZES` from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPv2DenoiseLib.core.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["ENSEMBLE_SIZES", "check_ensemble", "dihedral", "undo_dihedral"]

#: Ensemble sizes: the first N of the 8 in-plane flips and transposes (the dihedral group of the square).
ENSEMBLE_SIZES = (1, 2, 4, 8)


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """Transform ``index`` (0-7) of the last two axes: bit 4 transposes, bit 1 flips x, bit 2 flips y.

    Parameters
    ----------
    x : torch.Tensor
        Slices, (..., y, x).
    index : int
        Which of the 8 transforms, 0 being the identity.

    Returns
    -------
    torch.Tensor
        The transformed view (no copy).
    """
    if index & 4:
        x = x.transpose(-1, -2)
    if index & 1:
        x = x.flip(-1)
    if index & 2:
        x = x.flip(-2)
    return x


def undo_dihedral(y: torch.Tensor, index: int) -> torch.Tensor:
    """The inverse of :func:`dihedral` (same ``index``).

    Parameters
    ----------
    y : torch.Tensor
        Output of the network on ``dihedral(x, index)``, (..., y, x).
    index : int
        The transform that was applied (0-7).

    Returns
    -------
    torch.Tensor
        ``y`` back in the orientation of ``x``.
    """
    if index & 2:
        y = y.flip(-2)
    if index & 1:
        y = y.flip(-1)
    if index & 4:
        y = y.transpose(-1, -2)
    return y


def check_ensemble(ensemble: object) -> int:
    """A valid ensemble size (see :data:`ENSEMBLE_SIZES`), or :class:`UserError`.

    Parameters
    ----------
    ensemble : object
        The size as given by a user or a caller.

    Returns
    -------
    int
        The size, one of :data:`ENSEMBLE_SIZES`.

    Raises
    ------
    UserError
        When it is not one of the sizes (booleans included).
    """
    if isinstance(ensemble, bool) or ensemble not in ENSEMBLE_SIZES:
        raise UserError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, got {ensemble!r}")
    return int(ensemble)
