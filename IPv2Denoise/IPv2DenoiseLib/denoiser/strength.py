"""Denoising strength: how much noise a noise-aware network removes, as a factor on its noise level map.

The noise-aware networks (FFDNet style: :mod:`~IPv2DenoiseLib.denoiser.models.noise_aware_unet`) are
told the scan's noise level as an input channel. Scaling that level map (not the texture channel)
by a strength S tells the network the noise is S times as strong: S < 1 removes less noise and keeps
more of the scan's grain, S > 1 smooths more. 1 is what every model was trained and validated at.
On held-out chests 0.8-1.25 moved PSNR by up to ±0.25 dB, and the best factor differed between
scans (docs/models.md), so it is the user's choice, like the strength levels of commercial CT
denoisers. Networks without a noise map input have no such knob.

This module imports no torch, so building ``--help`` and the Slicer panel read :data:`STRENGTH_RANGE`
from here.
"""

from __future__ import annotations

import math
import numbers

from IPv2DenoiseLib.core.errors import UserError

__all__ = ["DEFAULT_STRENGTH", "STRENGTH_RANGE", "check_strength"]

#: The strength every model was validated at: the noise level map as measured on the scan.
DEFAULT_STRENGTH = 1.0
#: Smallest and largest strength accepted: beyond them the map tells the network a noise level
#: it never saw in training (the maps of 20-300 HU, at most twice or half that of the scan).
STRENGTH_RANGE = (0.5, 2.0)


def check_strength(strength: object, *, model: str | None = None, takes_noise_map: bool = True) -> float:
    """A valid denoising strength (a number within :data:`STRENGTH_RANGE`), or :class:`UserError`.

    Parameters
    ----------
    strength : object
        The factor on the noise level map, as given by a user or a caller.
    model : str, optional
        The network's name, for the refusal of a model without a noise map.
    takes_noise_map : bool
        Whether the network takes a noise level map; one that does not accepts only
        :data:`DEFAULT_STRENGTH`.

    Returns
    -------
    float
        The strength.

    Raises
    ------
    UserError
        Not a real number (booleans included), outside :data:`STRENGTH_RANGE`, or other than 1 for a
        network without a noise map (the message names ``model``).
    """
    low, high = STRENGTH_RANGE
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise UserError(f"strength must be a number from {low:g} to {high:g}, got {strength!r}")
    value = float(strength)
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"strength must be a number from {low:g} to {high:g}, got {value:g}")
    if value != DEFAULT_STRENGTH and not takes_noise_map:
        network = f"model {model}" if model else "this model"
        raise UserError(
            f"strength {value:g}: {network} takes no noise level map, so only strength "
            f"{DEFAULT_STRENGTH:g} applies; choose a noise-aware model (the fast or quality tier)"
        )
    return value
