"""Region codes of the training sampling map: which voxels are lungs, body or background air.

The trainer draws patch centres per region with fixed shares (``--region-shares``) and reports the
validation per region; the evaluation grid builds the same map for its cached pairs. Both build it
here, from the purified pair's lungs and background and the body of both scans.
"""

from __future__ import annotations

import numpy as np

from IPv2DenoiseLib.imaging.masks import body_mask
from IPv2DenoiseLib.purification.pairs import PurifiedPair

#: Region codes of the sampling map (``OUTSIDE``: in no region, never sampled).
BODY, LUNGS, BACKGROUND = 0, 1, 2
OUTSIDE = 255
REGION_NAMES = {BODY: "body", LUNGS: "lungs", BACKGROUND: "background"}


def sampling_regions(uldct: np.ndarray, ndct: np.ndarray, pair: PurifiedPair) -> np.ndarray:
    """uint8 map of :data:`BODY` / :data:`LUNGS` / :data:`BACKGROUND` codes, :data:`OUTSIDE` elsewhere.

    Body is the body of either scan (they differ by the breathing motion); the purified pair's
    lungs and background are then written over it, in that order.
    """
    regions = np.full(np.shape(uldct), OUTSIDE, np.uint8)
    regions[body_mask(ndct) | body_mask(uldct)] = BODY
    regions[pair.lungs] = LUNGS
    regions[pair.background] = BACKGROUND
    return regions
