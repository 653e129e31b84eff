"""Is this scan within what the model was trained on? One warning line when it is not.

A denoiser trained on 2 %-dose noise removes noise of that strength and texture. Given a
normal-dose scan (far less noise) it still removes what it believes is noise and over-smooths real
anatomy; given pixels or slices far from its training data, its 2.5D filters see structures at a
scale they never learnt. The model card records the ranges it saw (``data.training_range``:
``input_noise_hu``, ``pixel_mm``, ``slice_mm``, written by the trainer or measured for older
models); :func:`applicability_warning` compares a scan with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.imaging.noise_estimate import volume_noise_hu

#: A scan is "far below" the training noise when its measured noise is under this share of the
#: lowest training noise (the 2nd percentile the trainer records).
FAR_BELOW = 0.5
#: ... and "far above" it over this multiple of the highest (the 98th percentile): photon
#: starvation (a large patient at a very low dose), where the network keeps noise and streaks.
FAR_ABOVE = 2.0
#: Relative tolerance on pixel size and slice thickness.
SPACING_TOLERANCE = 0.1


@dataclass(frozen=True)
class TrainingRange:
    """What a model was trained on; any bound may be missing (None).

    Attributes
    ----------
    input_noise_hu : tuple of float or None
        (low, high) noise SD of the training inputs, HU.
    pixel_mm : tuple of float or None
        (low, high) in-plane pixel size, mm.
    slice_mm : tuple of float or None
        (low, high) slice thickness, mm.
    """

    input_noise_hu: tuple[float, float] | None = None
    pixel_mm: tuple[float, float] | None = None
    slice_mm: tuple[float, float] | None = None

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> TrainingRange | None:
        """The range in a model card (``data.training_range``), or None when the card has none.

        Parameters
        ----------
        card : Mapping
            The parsed model card (JSON object).

        Returns
        -------
        TrainingRange or None
            The recorded bounds; a malformed bound is None, a card without a range gives None.
        """
        data = card.get("data") or {}
        rng = data.get("training_range") if isinstance(data, Mapping) else None
        if not isinstance(rng, Mapping):
            return None

        def pair(key: str) -> tuple[float, float] | None:
            value = rng.get(key)
            if not value or len(value) != 2:
                return None
            return (float(value[0]), float(value[1]))

        return cls(pair("input_noise_hu"), pair("pixel_mm"), pair("slice_mm"))


def describe_range(bounds: tuple[float, float]) -> str:
    """``0.52–0.93``, or ``1.25`` when both ends are equal (never "1.25–1.25").

    Parameters
    ----------
    bounds : tuple of float
        (low, high), printed with two decimals.

    Returns
    -------
    str
        The range as a reader sees it in the warning.
    """
    lo, hi = (f"{b:.2f}" for b in bounds)
    return lo if lo == hi else f"{lo}–{hi}"


def applicability_warning(
    volume: Volume, card: Mapping[str, Any], *, noise_hu: float | None = None
) -> str | None:
    """One line saying how ``volume`` lies outside the model's training range, or None.

    Checks: measured noise far below the training noise (a normal-dose scan would be
    over-smoothed) or far above it (photon starvation), in-plane pixel size and slice thickness
    outside the trained range. A card without a training range gives None (nothing to compare with).

    Parameters
    ----------
    volume : Volume
        The scan to denoise (HU; spacing in mm, x, y, z order).
    card : Mapping
        The model card of the denoiser.
    noise_hu : float, optional
        The scan's noise SD in HU when the caller has measured it already; measured here otherwise.

    Returns
    -------
    str or None
        One warning line naming every check that failed, or None when the scan is in range.
    """
    rng = TrainingRange.from_card(card)
    if rng is None:
        return None
    problems = []
    if rng.input_noise_hu is not None:
        noise = volume_noise_hu(volume.array) if noise_hu is None else float(noise_hu)
        trained = f"the {rng.input_noise_hu[0]:.0f}–{rng.input_noise_hu[1]:.0f} HU the model was trained on"
        if math.isfinite(noise) and noise < FAR_BELOW * rng.input_noise_hu[0]:
            problems.append(
                f"its noise ({noise:.0f} HU) is far below {trained} (a normal-dose scan will be over-smoothed)"
            )
        elif math.isfinite(noise) and noise > FAR_ABOVE * rng.input_noise_hu[1]:
            problems.append(
                f"its noise ({noise:.0f} HU) is far above {trained} (photon starvation: noise and streaks "
                "will remain, and --adapt can make it worse)"
            )
    sx, sy, sz = (float(s) for s in volume.spacing)
    for what, value, bounds in (
        ("pixel size", (sx + sy) / 2, rng.pixel_mm),
        ("slice thickness", sz, rng.slice_mm),
    ):
        if bounds is None or volume.shape[0] < 2 and what == "slice thickness":
            continue
        lo, hi = bounds[0] * (1 - SPACING_TOLERANCE), bounds[1] * (1 + SPACING_TOLERANCE)
        if not lo <= value <= hi:
            problems.append(f"its {what} ({value:.2f} mm) is outside the trained {describe_range(bounds)} mm")
    if not problems:
        return None
    return "this scan is outside the model's training range: " + "; ".join(problems)
