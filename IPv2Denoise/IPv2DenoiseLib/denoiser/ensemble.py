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
    """Transform ``index`` (0-7) of the last two axes: bit 4 transposes, bit 1 flips x, bit 2 flips y."""
    if index & 4:
        x = x.transpose(-1, -2)
    if index & 1:
        x = x.flip(-1)
    if index & 2:
        x = x.flip(-2)
    return x


def undo_dihedral(y: torch.Tensor, index: int) -> torch.Tensor:
    """The inverse of :func:`dihedral` (same ``index``)."""
    if index & 2:
        y = y.flip(-2)
    if index & 1:
        y = y.flip(-1)
    if index & 4:
        y = y.transpose(-1, -2)
    return y


def check_ensemble(ensemble: object) -> int:
    """A valid ensemble size (see :data:`ENSEMBLE_SIZES`), or :class:`UserError`."""
    if isinstance(ensemble, bool) or ensemble not in ENSEMBLE_SIZES:
        raise UserError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, got {ensemble!r}")
    return int(ensemble)
