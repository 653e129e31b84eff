"""Region codes of the training sampling map: which voxels are lungs, body or background air.

The trainer draws patch centres per region with fixed shares (``--region-shares``) and reports the
validation per region; the evaluation harness builds the same map for its cached pairs. Both build
it here: from a purified pair's lungs and background and the body of both scans
(:func:`sampling_regions`), or from one clean or normal-dose volume (:func:`anatomy_regions`, the
scanner-noise training).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from IPv2DenoiseLib.imaging.masks import body_mask, lung_mask
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
    return compose_regions(body_mask(ndct) | body_mask(uldct), pair.lungs, pair.background)


def anatomy_regions(hu: np.ndarray) -> np.ndarray:
    """The sampling map of one volume: its body, its lungs, and air (< −900 HU) beyond 3 voxels
    of the body as background."""
    body = body_mask(hu)
    background = ~ndi.binary_dilation(body, iterations=3) & (np.asarray(hu) < -900)
    return compose_regions(body, lung_mask(hu, body=body), background)


def compose_regions(body: np.ndarray, lungs: np.ndarray, background: np.ndarray) -> np.ndarray:
    """uint8 codes: body, then lungs and background written over it in that order; OUTSIDE elsewhere."""
    regions = np.full(np.shape(body), OUTSIDE, np.uint8)
    regions[body] = BODY
    regions[lungs] = LUNGS
    regions[background] = BACKGROUND
    return regions
