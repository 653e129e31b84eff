"""The one intensity normalisation shared by training and inference.

Networks see ``x = (clip(HU, -1024, 3071) + 1000) / 1000``: air ≈ 0, water = 1, lung
parenchyma ≈ 0.15, dense bone up to ≈ 4. Fixed constants (no per-image min-max, unlike the
authors' 8-bit PNGs, and no data-set mean/std, unlike ldct-benchmark) keep HU meaningful and
make a network's output convertible back to HU exactly.
"""

from __future__ import annotations

import numpy as np
import torch

#: HU range kept before scaling (the 12-bit CT range); values outside are clipped.
HU_MIN, HU_MAX = -1024.0, 3071.0
#: ``x = (HU + HU_OFFSET) / HU_SCALE``.
HU_OFFSET, HU_SCALE = 1000.0, 1000.0
#: Name written to model cards so a loader can refuse a different convention.
NORMALIZATION = "hu_plus_1000_div_1000_clip_-1024_3071"

ArrayLike = np.ndarray | torch.Tensor


def hu_to_net(hu: ArrayLike, *, clip: bool = True) -> ArrayLike:
    """HU → network units (float32 for arrays; tensors keep their dtype). Returns a new array.

    ``clip=False`` keeps values outside the HU range (a training target's noise, which clipping
    would bias in the air).

    Parameters
    ----------
    hu : numpy.ndarray or torch.Tensor
        Values in HU, any shape.
    clip : bool
        Clip to [:data:`HU_MIN`, :data:`HU_MAX`] first.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``(HU + 1000) / 1000``, same shape and kind as ``hu``.

    Examples
    --------
    >>> hu_to_net(np.array([-1000.0, 0.0, 5000.0]))
    array([0.   , 1.   , 4.071], dtype=float32)
    """
    if isinstance(hu, torch.Tensor):
        return ((hu.clamp(HU_MIN, HU_MAX) if clip else hu) + HU_OFFSET) / HU_SCALE
    out = np.asarray(hu, dtype=np.float32)
    out = np.clip(out, HU_MIN, HU_MAX) if clip else out.copy()
    out += np.float32(HU_OFFSET)
    out /= np.float32(HU_SCALE)
    return out


def net_to_hu(x: ArrayLike) -> ArrayLike:
    """Network units → HU (no clipping; the inverse of :func:`hu_to_net` inside the HU range).

    Parameters
    ----------
    x : numpy.ndarray or torch.Tensor
        Values in network units, any shape.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``x * 1000 - 1000`` in HU (float32 for arrays; tensors keep their dtype).
    """
    if isinstance(x, torch.Tensor):
        return x * HU_SCALE - HU_OFFSET
    out = np.asarray(x, dtype=np.float32) * np.float32(HU_SCALE)
    out -= np.float32(HU_OFFSET)
    return out
