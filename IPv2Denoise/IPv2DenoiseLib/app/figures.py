"""Figures people would rather look at than read: before/after comparisons in CT windows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from IPv2DenoiseLib.core.atomic import save_figure
from IPv2DenoiseLib.imaging.metrics import LUNG_DISPLAY, MEDIASTINAL_DISPLAY


def _window(level_width: tuple[float, float]) -> tuple[float, float]:
    level, width = level_width
    return level - width / 2, level + width / 2


def pick_slice(hu: np.ndarray, mask: np.ndarray | None = None) -> int:
    """The axial slice to show: the one with the most ``mask`` voxels (e.g. lungs), else the middle."""
    if mask is not None and mask.any():
        return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    return hu.shape[0] // 2


def comparison_figure(
    images: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    *,
    slice_index: int,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    difference: tuple[str, str] | None = None,
    title: str = "",
    diff_range_hu: float = 200.0,
) -> Path:
    """One axial slice of each named volume in the lung and the mediastinal window, as a PNG.

    Parameters
    ----------
    images
        ``(label, hu_volume)`` pairs, all ``[z, y, x]`` of the same shape, shown left to right.
    slice_index
        Axial slice to show.
    spacing
        ``(sx, sy, sz)`` mm, for the physical aspect ratio and the scale bar.
    difference
        ``(label_a, label_b)``: add a column with ``a − b`` in ±``diff_range_hu`` (the removed noise).
    """
    named = dict(images)
    columns = list(images)
    if difference is not None:
        a, b = difference
        columns.append((f"{a} − {b}", named[a] - named[b]))
    rows = (("lung window", LUNG_DISPLAY), ("mediastinal window", MEDIASTINAL_DISPLAY))
    sx, sy, _ = spacing
    ny, nx = columns[0][1].shape[1:]
    aspect = sy / sx
    fig = Figure(figsize=(3.4 * len(columns), 3.4 * len(rows) * ny * aspect / nx + 0.5))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (row_name, display) in enumerate(rows):
        vmin, vmax = _window(display)
        for c, (label, volume) in enumerate(columns):
            ax = axes[r][c]
            image = volume[slice_index]
            is_diff = difference is not None and c == len(columns) - 1
            if is_diff:
                ax.imshow(image, cmap="RdBu_r", vmin=-diff_range_hu, vmax=diff_range_hu, aspect=aspect)
            else:
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label + (f"  (±{diff_range_hu:.0f} HU)" if is_diff else ""), fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{row_name}\nL {display[0]} W {display[1]}", fontsize=9)
        bar_px = 50.0 / sx  # 5 cm scale bar
        axes[r][0].plot([nx * 0.05, nx * 0.05 + bar_px], [ny * 0.95] * 2, color="yellow", lw=2)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
