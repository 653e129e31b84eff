"""2.5D slice windows: the ``in_slices`` neighbouring axial slices a network sees for one output slice.

The window of slice ``z`` is ``z - m … z + m`` with ``m = in_slices // 2``, the volume's end slices
repeated where it runs past them (edge padding). Inference (slabs), the training patch sampler and
the validation pass all take their windows from here, so they agree on what the network sees.
"""

from __future__ import annotations

import numpy as np

__all__ = ["slice_windows", "window_indices"]


def window_indices(start: int, stop: int, in_slices: int, depth: int) -> np.ndarray:
    """Slice indices covering the windows of slices ``start … stop - 1``: ``stop - start + 2m`` of them.

    Window ``i`` (of slice ``start + i``) is ``indices[i : i + in_slices]``.

    Parameters
    ----------
    start, stop : int
        The output slices, ``start`` included, ``stop`` excluded.
    in_slices : int
        Slices per window (odd).
    depth : int
        Slices in the volume; indices past its ends are clipped to them (edge padding).

    Returns
    -------
    numpy.ndarray
        The slice indices, int.
    """
    margin = in_slices // 2
    return np.clip(np.arange(start - margin, stop + margin), 0, depth - 1)


def slice_windows(volume: np.ndarray, start: int, stop: int, in_slices: int) -> np.ndarray:
    """``[stop - start, in_slices, y, x]`` windows of slices ``start … stop - 1`` of a ``[z, y, x]`` array.

    Parameters
    ----------
    volume : numpy.ndarray
        The volume, (z, y, x).
    start, stop : int
        The output slices, ``start`` included, ``stop`` excluded.
    in_slices : int
        Slices per window (odd).

    Returns
    -------
    numpy.ndarray
        The windows, a new array of ``volume``'s dtype.
    """
    stack = volume[window_indices(start, stop, in_slices, volume.shape[0])]
    return np.stack([stack[i : i + in_slices] for i in range(stop - start)])
