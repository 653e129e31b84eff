"""CT display windows (level, width in HU): the lung and mediastinal presets every front end shows.

One home for the presets of the Slicer views, the web app's buttons, the figures and the window
values written into derived DICOM series; :data:`IPv2DenoiseLib.imaging.metrics.LUNG_WINDOW`, the
range PSNR is computed over, is the lung preset's span.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DisplayWindow:
    """A grey-level window: ``level`` (centre) and ``width`` in HU."""

    level: float
    width: float

    @property
    def low_high(self) -> tuple[float, float]:
        """(lowest, highest) HU shown."""
        return (self.level - self.width / 2, self.level + self.width / 2)


LUNG = DisplayWindow(level=-600.0, width=1500.0)
MEDIASTINAL = DisplayWindow(level=40.0, width=400.0)
#: By name, in the order the buttons show them.
DISPLAY_PRESETS: dict[str, DisplayWindow] = {"Lung": LUNG, "Mediastinal": MEDIASTINAL}

__all__ = ["DISPLAY_PRESETS", "LUNG", "MEDIASTINAL", "DisplayWindow"]
