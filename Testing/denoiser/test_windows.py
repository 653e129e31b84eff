"""2.5D windows: edge-replicated neighbours, identical for inference, the patch sampler and validation."""

from __future__ import annotations

import numpy as np
import pytest

from IPv2DenoiseLib.denoiser.windows import slice_windows, window_indices


@pytest.mark.parametrize("in_slices", [1, 3, 5])
def test_window_indices_repeat_the_end_slices(in_slices):
    depth = 7
    m = in_slices // 2
    idx = window_indices(0, depth, in_slices, depth)
    assert len(idx) == depth + 2 * m
    for z in range(depth):
        expected = [min(max(z + d, 0), depth - 1) for d in range(-m, m + 1)]
        assert idx[z : z + in_slices].tolist() == expected


def test_slice_windows_centre_is_the_slice_on_an_odd_volume():
    vol = np.arange(5 * 3 * 7, dtype=np.float32).reshape(5, 3, 7)
    win = slice_windows(vol, 1, 4, 3)
    assert win.shape == (3, 3, 3, 7)
    np.testing.assert_array_equal(win[:, 1], vol[1:4])
    np.testing.assert_array_equal(slice_windows(vol, 0, 1, 3)[0, 0], vol[0])  # edge repeated
    np.testing.assert_array_equal(slice_windows(vol, 4, 5, 3)[0, 2], vol[4])
