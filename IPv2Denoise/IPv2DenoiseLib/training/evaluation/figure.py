"""The figure grid: references and classical outputs, then one row per strategy and one column per model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from IPv2DenoiseLib.core.atomic import save_figure


def grid_figure(
    panels: dict[str, np.ndarray],
    model_panels: dict[tuple[str, str], np.ndarray],
    strategies: Sequence[str],
    models: Sequence[str],
    path: str | os.PathLike,
    *,
    spacing=(1.0, 1.0, 1.0),
    title: str = "",
    window: tuple[float, float] = (-1350.0, 150.0),
) -> Path:
    """First row: references and classical outputs; then one row per strategy, one column per model."""
    ncol = max(len(models), len(panels))
    nrow = 1 + len(strategies)
    fig = Figure(figsize=(2.2 * ncol, 2.3 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    aspect = float(spacing[1]) / float(spacing[0])
    lo, hi = window
    for j, (label, img) in enumerate(panels.items()):
        axes[0, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        axes[0, j].set_title(label, fontsize=8)
    for i, strategy in enumerate(strategies, start=1):
        for j, arch in enumerate(models):
            img = model_panels.get((strategy, arch))
            if img is None:
                continue
            axes[i, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            axes[i, j].set_title(f"{strategy} / {arch}", fontsize=8)
    fig.suptitle(f"{title} — lung window [{lo:.0f}, {hi:.0f}] HU", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
