"""Region masks on CT volumes in HU: the IPv1/IPv2 dark mask, background, body, lungs, airways, soft tissue.

Every function takes a float HU array ``[z, y, x]`` (a single ``[y, x]`` slice is accepted), never
modifies it, and returns a bool array of the same shape. "Per slice" operations work on each axial
slice on its own, as the IPv1/IPv2 reference code does on 8-bit PNG slices (Gong & Yu); "3D"
operations use 6-connectivity across slices.

References
----------
.. [1] G. Gong, M. Yu, "IPv2: an improved image purification strategy for real-world ultra-low-dose
   lung CT denoising", arXiv:2602.19314 (2026).
.. [2] G. Gong, M. Yu et al., "A denoising framework for real-world ultra-low dose lung CT images based
   on an image purification strategy", arXiv:2510.07492 (2025).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import regionprops

from IPv2DenoiseLib.core.errors import UserError

#: In-plane 4-connectivity (a 3x3 cross) as a 3-D structure: no links between slices.
_CROSS_2D = np.zeros((3, 3, 3), dtype=bool)
_CROSS_2D[1] = ndi.generate_binary_structure(2, 1)
#: In-plane 8-connectivity, no links between slices.
_SQUARE_2D = np.zeros((3, 3, 3), dtype=bool)
_SQUARE_2D[1] = True
#: 3-D 6-connectivity.
_CROSS_3D = ndi.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------------------- helpers


def _as_hu(hu: np.ndarray, name: str = "hu") -> tuple[np.ndarray, bool]:
    """float32 3-D view/copy of ``hu`` and whether the input was 2-D. Never writes to the input."""
    arr = np.asarray(hu)
    if arr.ndim not in (2, 3):
        raise UserError(
            f"{name}: expected a 2-D [y, x] slice or a 3-D [z, y, x] volume, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise UserError(f"{name}: empty array of shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise UserError(f"{name}: expected real HU values, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise UserError(f"{name}: contains NaN or infinite values; only finite HU are allowed")
    return (arr[None] if arr.ndim == 2 else arr), arr.ndim == 2


def _as_mask(mask: np.ndarray, name: str = "mask") -> tuple[np.ndarray, bool]:
    arr = np.asarray(mask)
    if arr.ndim not in (2, 3):
        raise UserError(f"{name}: expected a 2-D or 3-D mask, got shape {arr.shape}")
    arr = arr.astype(bool, copy=False)
    return (arr[None] if arr.ndim == 2 else arr), arr.ndim == 2


def _out(mask: np.ndarray, was_2d: bool) -> np.ndarray:
    return mask[0] if was_2d else mask


def _disk_2d(radius: int) -> np.ndarray:
    """A disk of ``radius`` pixels as an in-plane 3-D structure ``(1, 2r+1, 2r+1)``."""
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx <= r * r + r * 0.5)[None]  # r=1 gives the 3x3 cross (OpenCV's 3x3 ellipse)


def _open_in_plane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening per slice; pixels outside the image count as set during erosion.

    scipy's default ``border_value=0`` would erode the outermost ring of every slice, cutting the
    outside air off from the image border; OpenCV (used by the authors) replicates the border.
    """
    if radius <= 0:
        return mask.copy()
    se = _disk_2d(radius)
    eroded = ndi.binary_erosion(mask, se, border_value=1)
    return ndi.binary_dilation(eroded, se, border_value=0)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    # The structure has no z offsets, so the fill runs from each slice's own in-plane border.
    return ndi.binary_fill_holes(mask, structure=_CROSS_2D)


def _in_plane_border(shape: tuple[int, ...]) -> np.ndarray:
    border = np.zeros(shape, dtype=bool)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    return border


def _component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


# --------------------------------------------------------------------------------------- IPv1/IPv2 masks


def _otsu_dark_slice(
    img: np.ndarray, *, clip: tuple[float, float], min_contrast: float, fallback: float
) -> np.ndarray:
    x = np.clip(img, *clip)
    lo, hi = float(x.min()), float(x.max())
    threshold = fallback
    if hi - lo >= min_contrast:
        t = float(threshold_otsu(x))
        dark, bright = x[x <= t], x[x > t]
        if dark.size and bright.size and float(bright.mean() - dark.mean()) >= min_contrast:
            threshold = t
    return img <= threshold


def dark_mask(
    hu: np.ndarray,
    *,
    opening_radius: int = 1,
    clip: tuple[float, float] = (-1024.0, 400.0),
    min_contrast: float = 300.0,
    fallback_threshold: float = -400.0,
) -> np.ndarray:
    """The IPv1 dark-region mask: Otsu-dark pixels per slice, after a small opening.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    opening_radius : int
        Radius in pixels of the in-plane disk used for the binary opening (1 = the 3x3 cross, which is
        what OpenCV's 3x3 elliptical kernel in the reference code is). 0 disables it.
    clip : (low, high)
        HU range the Otsu threshold is computed on, so bone, metal and the -2048/-3024 padding
        outside the reconstruction circle do not pull the threshold.
    min_contrast : float
        If a slice's clipped range, or the gap between the two Otsu class means, is below this (HU),
        the slice is not bimodal (all air, all tissue) and ``fallback_threshold`` is used instead.
    fallback_threshold : float
        Fixed air/tissue threshold (HU) for slices that are not bimodal.

    Returns
    -------
    ndarray of bool, same shape as ``hu``
        On a real chest slice: the outside air (including air under the table), both lungs,
        the airways and enclosed gas; the body wall, mediastinum, bone and table are False.

    Notes
    -----
    The reference code thresholds the 8-bit PNG with ``cv2.threshold(..., THRESH_BINARY_INV +
    THRESH_OTSU)`` (per image, the fixed value 10 is ignored), opens once with a 3x3 ellipse and then
    keeps pixels with a set 8-neighbour; after a cross-shaped opening every remaining pixel already
    has one, so that last step is a no-op and is not repeated here. Without the ``min_contrast``
    guard Otsu would split the noise of an all-tissue slice in half.
    """
    vol, was_2d = _as_hu(hu)
    dark = np.empty(vol.shape, dtype=bool)
    for z in range(vol.shape[0]):
        dark[z] = _otsu_dark_slice(vol[z], clip=clip, min_contrast=min_contrast, fallback=fallback_threshold)
    return _out(_open_in_plane(dark, opening_radius), was_2d)


def common_dark_mask(u: np.ndarray, n: np.ndarray, **kw) -> np.ndarray:
    """IPv1's common mask CM: dark in the ULDCT **or** dark in the NDCT (a true logical OR).

    Parameters
    ----------
    u, n : ndarray
        ULDCT and NDCT in HU, same shape.
    **kw
        Passed to :func:`dark_mask` for both images.

    Returns
    -------
    ndarray of bool
        Air + lungs of either scan: on a misaligned chest pair it also covers the band where the
        lungs or the skin line moved between the two scans.

    Notes
    -----
    The authors add the two 0/255 uint8 masks, so 255 + 255 wraps to 254 and the "dark in both"
    region is weighted 0.996 instead of 1 in their blend. This is the exact OR they intended.

    Raises
    ------
    UserError
        The two scans differ in shape (or either is not a finite 2-D/3-D HU array).
    """
    u_arr, n_arr = np.asarray(u), np.asarray(n)
    if u_arr.shape != n_arr.shape:
        raise UserError(f"ULDCT shape {u_arr.shape} and NDCT shape {n_arr.shape} differ; they must match")
    return dark_mask(u_arr, **kw) | dark_mask(n_arr, **kw)


def border_connected(mask: np.ndarray, *, per_slice: bool = True) -> np.ndarray:
    """The parts of ``mask`` connected to the image border: IPv2's *Remove Background* flood fill.

    Parameters
    ----------
    mask : ndarray of bool, [z, y, x] or [y, x]
    per_slice : bool
        True: per slice, 2-D 4-connectivity (like ``cv2.floodFill``'s default). False: 3-D
        6-connectivity, keeping the 3-D components that touch the in-plane border of any slice (the
        first and last slices are not "border": the lungs may be cut there).

    Returns
    -------
    ndarray of bool
        On the dark mask of a chest: the air outside the patient (above and below the table),
        without the lungs, airways or enclosed gas.

    Notes
    -----
    The reference code flood-fills from the single corner pixel (0, 0). We fill from every border
    pixel: a table spanning the full width, an arm or a bright object in the corner can cut the air
    below the table (or the whole outside) off from that corner, and the reference would then count
    it as lung.
    """
    m, was_2d = _as_mask(mask)
    labels, n = ndi.label(m, structure=_CROSS_2D if per_slice else _CROSS_3D)
    if n == 0:
        return _out(np.zeros(m.shape, dtype=bool), was_2d)
    touching = np.unique(labels[_in_plane_border(m.shape)])
    touching = touching[touching > 0]
    keep = np.zeros(n + 1, dtype=bool)
    keep[touching] = True
    return _out(keep[labels], was_2d)


def split_dark(dark: np.ndarray, *, per_slice: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split the dark mask ``D`` into background ``B`` (border-connected) and lungs ``L = D & ~B``.

    Parameters
    ----------
    dark : ndarray of bool, [z, y, x] or [y, x]
        The dark mask (e.g. :func:`common_dark_mask`).
    per_slice : bool
        Flood fill per slice (2-D) or in 3-D; see :func:`border_connected`.

    Returns
    -------
    background, lungs : ndarray of bool
        On a chest: ``background`` = outside air; ``lungs`` = lungs, airways, enclosed gas and the
        misalignment band inside the body (IPv2's CM2).
    """
    d, was_2d = _as_mask(dark, "dark")
    background = border_connected(d, per_slice=per_slice)
    return _out(background, was_2d), _out(d & ~background, was_2d)


# --------------------------------------------------------------------------------------- anatomy masks


def body_mask(
    hu: np.ndarray,
    *,
    threshold: float = -500.0,
    opening_radius: int = 3,
    include_arms: bool = False,
    arm_fraction: float = 0.02,
) -> np.ndarray:
    """The patient's body in 3D, without the scanner table, with the lungs inside.

    Steps: voxels above ``threshold`` with holes filled per slice; an in-plane opening of ``opening_radius`` px cuts thin links
    (table top, mattress, blankets, skin contact with the arms); the largest 3-D component is the
    body; voxels of the filled mask within ``opening_radius`` of it are added back (so the skin
    line keeps its detail); holes are filled per slice again (lungs, airways, gas stay inside).
    A table that touches the body and encloses air under the back may be kept; at -500 HU the
    mattress usually separates them.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
    threshold : float
        Air/tissue threshold in HU.
    opening_radius : int
        In-plane opening radius in pixels (3 px is about 2 mm at 0.7 mm pixels).
    include_arms : bool
        False (default): body = largest component only, so arms lying beside the trunk (separate
        components) are excluded. True: also keep every component at least ``arm_fraction`` of the
        largest one whose centroid lies within the trunk's anterior-posterior (y) extent: arms lie
        beside the trunk, the table lies below (or above, prone) it, whatever its size.
    arm_fraction : float
        Size fraction for ``include_arms``.

    Returns
    -------
    ndarray of bool
        On a chest CT: trunk including lungs and mediastinum; not the table, not the outside air,
        not the arms unless ``include_arms``. All-air input gives an all-False mask.
    """
    vol, was_2d = _as_hu(hu)
    # Fill first: a lung close to the skin leaves a thin wall the opening would cut.
    raw = _fill_holes_per_slice(vol > threshold)
    opened = _open_in_plane(raw, opening_radius)
    labels, n = ndi.label(opened, structure=_CROSS_3D)
    if n == 0:
        return _out(np.zeros(vol.shape, dtype=bool), was_2d)
    sizes = _component_sizes(labels, n)
    keep = np.zeros(n + 1, dtype=bool)
    keep[1 + int(np.argmax(sizes))] = True
    if include_arms:
        ys = np.nonzero(labels == 1 + int(np.argmax(sizes)))[1]
        y_lo, y_hi = ys.min(), ys.max()
        centres = ndi.center_of_mass(opened, labels, np.arange(1, n + 1))
        for i, (size, centre) in enumerate(zip(sizes, centres), start=1):
            keep[i] |= size >= arm_fraction * sizes.max() and y_lo <= centre[1] <= y_hi
    body = keep[labels]
    if opening_radius > 0:
        body = ndi.binary_dilation(body, _disk_2d(opening_radius)) & raw
    body = _fill_holes_per_slice(body)
    # A truncated field of view opens the body wall at the image edge: the air there that is not
    # outside air (a lung reaching the edge) is still inside the body.
    open_inside = border_connected(~raw) & ~outside_air(vol, threshold=threshold)
    if open_inside.any():
        pieces, n_pieces = ndi.label(open_inside, structure=_CROSS_2D)
        touching = np.unique(pieces[ndi.binary_dilation(body, _CROSS_2D) & open_inside])
        body |= np.isin(pieces, touching[touching > 0])
    return _out(body, was_2d)


def _smooth_in_plane(vol: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndi.gaussian_filter(vol, sigma=(0.0, sigma_px, sigma_px)) if sigma_px > 0 else vol


def _pure_air(values: np.ndarray, pure_air_hu: float, min_fraction: float) -> bool:
    """True for a region that is mostly pure air (smoothed HU below ``pure_air_hu``); lung is not."""
    return values.size >= 20 and float(np.mean(values < pure_air_hu)) >= min_fraction


def outside_air(
    hu: np.ndarray,
    *,
    threshold: float = -500.0,
    smooth_px: float = 1.0,
    pure_air_hu: float = -950.0,
    pure_fraction: float = 0.8,
    min_body_fraction: float = 0.02,
) -> np.ndarray:
    """The air outside the patient, per axial slice; never lung, also when the body is cut by the image edge.

    Rule, per slice: air (in-plane smoothed HU below ``threshold``) connected to the image border
    is outside air when the slice's body lies wholly inside the image, since a closed body wall
    encloses the lungs. When a large tissue region (at least ``min_body_fraction`` of the slice:
    a body, not a table or a blanket) touches the image border, the field of view is truncated
    and a lung may reach the edge: there a border-connected air region counts as outside air only
    when it is *mostly pure air*: at least ``pure_fraction`` of it (its 2-px rim left out) is below
    ``pure_air_hu`` after a 2-px in-plane smoothing. Lung parenchyma (about −850 HU, with vessels)
    fails that test even with severe emphysema; outside air passes it also with a foam pad, a
    blanket or arms in it (those are tissue and are kept by :func:`background_weight`). A lung
    that is mostly bullae or a large pneumothorax reaching the edge of a truncated image would
    pass it: that is the rule's limit.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    threshold : float
        Smoothed HU below which a voxel is air.
    smooth_px : float
        In-plane Gaussian sigma (pixels) before the air threshold.
    pure_air_hu : float
        HU below which a (2-px smoothed) voxel counts as pure air.
    pure_fraction : float
        Share of pure air an edge-touching region needs in a truncated slice.
    min_body_fraction : float
        Share of the slice a border-touching tissue region needs to mean a truncated body.

    Returns
    -------
    ndarray of bool
        The air regions; they still contain their rim next to tissue. :func:`background_weight`
        keeps the removal away from tissue.
    """
    vol, was_2d = _as_hu(hu)
    smooth = _smooth_in_plane(vol, smooth_px)
    outside = _outside_air(vol, smooth, threshold, pure_air_hu, pure_fraction, min_body_fraction)
    return _out(outside, was_2d)


def _outside_air(
    vol: np.ndarray,
    smooth: np.ndarray,
    threshold: float,
    pure_air_hu: float,
    pure_fraction: float,
    min_body_fraction: float,
) -> np.ndarray:
    """:func:`outside_air` of a 3-D volume whose in-plane smoothed copy is ``smooth``."""
    air = smooth < threshold
    air_labels, n_air = ndi.label(air, structure=_CROSS_2D)
    border = _in_plane_border(vol.shape)
    outside = np.zeros(n_air + 1, dtype=bool)
    if n_air == 0:
        return np.zeros(vol.shape, dtype=bool)
    outside[np.unique(air_labels[border])] = True
    outside[0] = False
    truncated = np.zeros(vol.shape[0], dtype=bool)
    for z in np.flatnonzero((~air & border).any(axis=(1, 2))):  # only these can be truncated
        truncated[z] = _large_tissue_at_border(~air[z], border[z], min_body_fraction)
    if truncated.any():
        interior = ndi.binary_erosion(air, _disk_2d(2), border_value=1)
        smoother = _smooth_in_plane(vol, 2.0)
        slices_of = ndi.find_objects(air_labels)
        for label in np.flatnonzero(outside):
            z = slices_of[label - 1][0].start  # in-plane labelling: one slice per label
            if truncated[z]:
                region = air_labels[z] == label
                values = smoother[z][region & interior[z]]
                outside[label] = _pure_air(values, pure_air_hu, pure_fraction)
    return outside[air_labels]


def _large_tissue_at_border(tissue: np.ndarray, border: np.ndarray, min_fraction: float) -> bool:
    """Does a tissue region of at least ``min_fraction`` of this slice touch its border?"""
    labels, n = ndi.label(tissue)
    if n == 0:
        return False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    touching = np.unique(labels[border])
    touching = touching[touching > 0]
    return bool((sizes[touching] >= min_fraction * tissue.size).any())


def _dilate_in_plane(mask: np.ndarray, *, square: bool) -> np.ndarray:
    """In-plane 3x3 square (or cross) dilation of a bool ``[z, y, x]`` mask by shifted ORs
    (several times faster than ``ndimage.binary_dilation`` for these small structures)."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    source = rows if square else mask
    grown = rows.copy()
    grown[:, :, 1:] |= source[:, :, :-1]
    grown[:, :, :-1] |= source[:, :, 1:]
    return grown


def background_weight(
    hu: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    tissue_hu: float = -900.0,
    margin_mm: float = 1.0,
    blend_mm: float = 3.0,
    smooth_px: float = 1.0,
) -> np.ndarray:
    """How much of each voxel *Remove Background* may set to air: 0 on tissue, 1 deep in outside air.

    A voxel is tissue when its in-plane smoothed HU is above ``tissue_hu`` (skin, table, clothes,
    blankets, arms, and every partial-volume voxel at their edge). The weight is 0 on tissue and
    within ``margin_mm`` (at least 1.5 px: its partial-volume neighbours) of it, and on every voxel whose own HU is above ``tissue_hu``, rises linearly to 1 over the next ``blend_mm`` and is non-zero only
    in :func:`outside_air`. The denoiser blends ``(1 - w) * denoised + w * (−1000 HU)``, so the
    edge of the body is kept as the network made it and no tissue voxel changes.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order; default 1 mm (the mm values are read as pixels).
    tissue_hu : float
        Smoothed HU above which a voxel is tissue.
    margin_mm : float
        Distance from tissue kept at weight 0, mm (at least 1.5 pixels).
    blend_mm : float
        Distance over which the weight then rises from 0 to 1, mm.
    smooth_px : float
        In-plane Gaussian sigma (pixels) before the tissue threshold.

    Returns
    -------
    float32 ndarray, same shape as ``hu``, values in [0, 1].
    """
    vol, was_2d = _as_hu(hu)
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    smooth = _smooth_in_plane(vol, smooth_px)
    outside = _outside_air(vol, smooth, -500.0, -950.0, 0.8, 0.02)
    tissue = smooth > tissue_hu
    # a voxel above tissue_hu is never touched, even a lone one in noisy air
    weight = (outside & ~tissue & (vol <= tissue_hu)).astype(np.float32)
    margin = max(margin_mm, 1.5 * max(sx, sy))  # the 8 neighbours of tissue are partial-volume voxels
    # Distance to tissue in octagonal steps (3x3 square, then cross, alternating) of the smaller
    # pixel side: within 8 % of the Euclidean distance and never more within the first two
    # pixels, so tissue's partial-volume neighbours stay at 0; shifted-OR dilations cost a
    # fraction of a Euclidean distance transform per slice.
    step_mm = min(sx, sy)
    reached = tissue
    for k in range(1, int(np.ceil((margin + blend_mm) / step_mm)) + 1):
        grown = _dilate_in_plane(reached, square=k % 2 == 1)
        ring = grown & ~reached
        weight[ring] *= float(np.clip((k * step_mm - margin) / max(blend_mm, 1e-6), 0.0, 1.0))
        reached = grown
    return _out(weight, was_2d)


def background_mask(hu: np.ndarray, *, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Air outside the patient that *Remove Background* touches: ``background_weight(hu) > 0``.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order; default 1 mm.

    Returns
    -------
    ndarray of bool
        On a chest CT: the air around the patient and the table (also below a full-width table),
        and the padding outside the reconstruction circle, at least 1 mm away from any tissue;
        never the lungs or enclosed gas, also when they reach the image edge (see
        :func:`outside_air`), never skin, table, arms or clothes.
    """
    return background_weight(hu, spacing=spacing) > 0


def truncated_slices(
    hu: np.ndarray,
    *,
    body: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    min_contact_mm: float = 10.0,
    coarse_mm: float = 2.0,
) -> np.ndarray:
    """Per axial slice: does the body touch the image edge along at least ``min_contact_mm``?

    A truncated (cropped) field of view: anatomy is missing beyond the edge, and ROI volumes and
    background removal there are less certain. Without ``body``, :func:`body_mask` is computed on
    a grid of about ``coarse_mm`` pixels (the first and last rows and columns kept), which is
    plenty for a contact of centimetres and costs a fraction of the full-resolution mask.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    body : ndarray of bool, optional
        Body mask of ``hu`` when the caller has one.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order; default 1 mm.
    min_contact_mm : float
        Length of body along the image edge that makes a slice truncated, mm.
    coarse_mm : float
        Pixel size of the coarse grid the body mask is computed on, mm.

    Returns
    -------
    ndarray of bool, [z]
        One flag per axial slice.
    """
    vol, _ = _as_hu(hu)
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    if body is None:
        rows = _coarse_axis(vol.shape[1], sy, coarse_mm)
        cols = _coarse_axis(vol.shape[2], sx, coarse_mm)
        body_m = body_mask(vol[:, rows][:, :, cols])
        sy, sx = sy * vol.shape[1] / len(rows), sx * vol.shape[2] / len(cols)
    else:
        body_m = _as_mask(body, "body")[0]
    contact = (body_m[:, 0, :].sum(axis=1) + body_m[:, -1, :].sum(axis=1)) * sx + (
        body_m[:, :, 0].sum(axis=1) + body_m[:, :, -1].sum(axis=1)
    ) * sy
    return contact >= min_contact_mm


def _coarse_axis(n: int, spacing_mm: float, target_mm: float) -> np.ndarray:
    """About every ``target_mm / spacing_mm``-th index of an axis of ``n``, first and last included."""
    count = max(2, min(n, int(np.ceil(n * spacing_mm / target_mm)) + 1))
    return np.unique(np.rint(np.linspace(0, n - 1, count)).astype(int))


def truncation_warning(
    hu: np.ndarray, *, body: np.ndarray | None = None, spacing: Sequence[float] | None = None
) -> str | None:
    """One line saying the field of view is truncated (see :func:`truncated_slices`), or None.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    body : ndarray of bool, optional
        Body mask of ``hu`` when the caller has one.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order; default 1 mm.

    Returns
    -------
    str or None
        The warning (how many slices, the first one), or None when no slice is truncated.
    """
    cut = truncated_slices(hu, body=body, spacing=spacing)
    if not cut.any():
        return None
    first = int(np.flatnonzero(cut)[0])
    return (
        f"the field of view is truncated: the body touches the image edge in {int(cut.sum())} of {cut.size} "
        f"slices (first: slice {first}); anatomy beyond the edge is missing, and air touching the edge is "
        "kept unless it is pure air outside the body"
    )


def airway_mask(
    hu: np.ndarray,
    lungs: np.ndarray,
    *,
    body: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    max_area_mm2: float = 700.0,
    max_offset_mm: float = 20.0,
    min_solidity: float = 0.7,
    min_slices: int = 3,
) -> np.ndarray:
    """The trachea and main bronchi where they are separate tubes in the axial slices.

    Rule (simple and documented rather than a full airway tree): in every slice, a 2-D component
    of ``lungs`` is airway-like if its area is at most ``max_area_mm2``, it is convex-ish (solidity
    >= ``min_solidity``) and its centroid is within ``max_offset_mm`` of the body's left-right
    centre in that slice. Airway-like pieces are linked across slices (6-connectivity) and chains
    spanning at least ``min_slices`` slices are kept. Lung apices are small and round too but lie
    well off the midline (> 30 mm), which is what separates them.

    Parameters
    ----------
    hu : ndarray
        CT in HU (used for the body when ``body`` is not given).
    lungs : ndarray of bool
        Air-like voxels inside the body, e.g. ``lung_mask(hu)`` or IPv2's ``L``.
    body : ndarray of bool, optional
        Body mask; default :func:`body_mask` of ``hu``.
    spacing : (sx, sy, sz) mm, optional
        Voxel size (ITK order); default 1 mm, i.e. the mm limits are read as pixels.
    max_area_mm2 : float
        Largest in-slice area of an airway piece, mm².
    max_offset_mm : float
        Largest left-right distance of its centroid from the body's centre, mm.
    min_solidity : float
        Smallest solidity (area / convex hull area) of an airway piece.
    min_slices : int
        Fewest slices a chain of airway pieces must span.

    Returns
    -------
    ndarray of bool
        On a chest CT: the trachea from the top of the scan to the carina and the parts of the main
        bronchi that are separate from the lung in the slice. Where a bronchus joins the lung within
        a slice it stays part of the lung.

    Raises
    ------
    UserError
        ``lungs`` and ``hu`` differ in shape (or ``hu`` is not finite 2-D/3-D HU).
    """
    vol, was_2d = _as_hu(hu)
    lung, _ = _as_mask(lungs, "lungs")
    if lung.shape != vol.shape:
        raise UserError(f"lungs mask shape {lung.shape} does not match the CT shape {vol.shape}")
    body_m = body_mask(vol) if body is None else _as_mask(body, "body")[0]
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    candidates = np.zeros(vol.shape, dtype=bool)
    for z in range(vol.shape[0]):
        if not lung[z].any():
            continue
        cols = np.flatnonzero(body_m[z].any(axis=0))
        centre_x = 0.5 * (cols[0] + cols[-1]) if cols.size else 0.5 * (vol.shape[2] - 1)
        labels, n = ndi.label(lung[z], structure=np.ones((3, 3), dtype=bool))
        for region in regionprops(labels):
            if (
                region.area * sx * sy <= max_area_mm2
                and region.solidity >= min_solidity
                and abs(region.centroid[1] - centre_x) * sx <= max_offset_mm
            ):
                candidates[z][labels == region.label] = True
    chains, n = ndi.label(candidates, structure=_CROSS_3D)
    airway = np.zeros(vol.shape, dtype=bool)
    for i, sl in enumerate(ndi.find_objects(chains), start=1):
        if sl is not None and sl[0].stop - sl[0].start >= min_slices:
            airway[sl] |= chains[sl] == i
    return _out(airway, was_2d)


def lung_mask(
    hu: np.ndarray,
    *,
    body: np.ndarray | None = None,
    threshold: float = -400.0,
    smooth_px: float = 1.0,
    max_components: int = 2,
    min_fraction: float = 0.1,
    fill_vessels: bool = True,
    separate_trachea: bool = False,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Both lungs: air-like voxels inside the body, the largest 3-D components only.

    Steps: in-plane Gaussian (``smooth_px``) so 2 %-dose noise does not speckle the threshold;
    voxels below ``threshold`` inside ``body`` and not connected to the image border; optionally
    remove the airways (:func:`airway_mask`); keep at most ``max_components`` 3-D components, each at
    least ``min_fraction`` of the largest (bowel and stomach gas, enclosed air drop out); with
    ``fill_vessels`` fill holes per slice so vessels and nodules inside the lung count as lung
    (as LAA-950 and lung-volume conventions expect).

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    body : ndarray of bool, optional
        Default :func:`body_mask` of ``hu``.
    threshold : float
        Smoothed HU below which a voxel is air-like.
    smooth_px : float
        In-plane Gaussian sigma, pixels.
    max_components : int
        Most 3-D components kept (2: left and right lung).
    min_fraction : float
        Smallest size of a kept component, as a share of the largest.
    fill_vessels : bool
        Fill holes per slice so vessels and nodules count as lung.
    separate_trachea : bool
        Remove the trachea/main bronchi before picking components (see :func:`airway_mask`).
    spacing : (sx, sy, sz) mm, optional
        Only used by ``separate_trachea``.

    Returns
    -------
    ndarray of bool
        On a chest CT: left and right lung (one component when the airways link them), vessels
        included, no outside air, no gut gas; the trachea included only when it is connected and
        ``separate_trachea`` is False. Empty when the slices hold no lung.

    Raises
    ------
    UserError
        ``body`` and ``hu`` differ in shape (or ``hu`` is not finite 2-D/3-D HU).
    """
    vol, was_2d = _as_hu(hu)
    body_m = body_mask(vol) if body is None else _as_mask(body, "body")[0]
    if body_m.shape != vol.shape:
        raise UserError(f"body mask shape {body_m.shape} does not match the CT shape {vol.shape}")
    air = _smooth_in_plane(vol, smooth_px) < threshold
    # not border_connected(air): in a truncated field of view the lungs reach the image edge
    candidates = air & body_m & ~outside_air(vol, threshold=threshold, smooth_px=smooth_px)
    if separate_trachea:
        candidates &= ~airway_mask(vol, candidates, body=body_m, spacing=spacing)
    labels, n = ndi.label(candidates, structure=_CROSS_3D)
    if n == 0:
        return _out(np.zeros(vol.shape, dtype=bool), was_2d)
    sizes = _component_sizes(labels, n)
    order = np.argsort(sizes)[::-1][:max_components]
    keep = np.zeros(n + 1, dtype=bool)
    keep[1 + order[sizes[order] >= min_fraction * sizes.max()]] = True
    lungs = keep[labels]
    if fill_vessels:
        lungs = _fill_holes_per_slice(lungs)
    return _out(lungs, was_2d)


def soft_tissue_mask(
    hu: np.ndarray,
    *,
    body: np.ndarray | None = None,
    low: float = -100.0,
    high: float = 100.0,
    smooth_px: float = 1.5,
    erosion_radius: int = 2,
) -> np.ndarray:
    """Homogeneous soft tissue (muscle, mediastinum, liver) for noise and CNR ROIs.

    Body voxels whose in-plane smoothed HU lies in [``low``, ``high``], eroded by
    ``erosion_radius`` px in-plane so edges (fat/muscle, vessel walls) stay out. The range test
    uses the smoothed HU because at 2 % dose the raw noise (~90 HU) would scatter the range.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    body : ndarray of bool, optional
        Default :func:`body_mask` of ``hu``.
    low, high : float
        The HU range of soft tissue (after smoothing).
    smooth_px : float
        In-plane Gaussian sigma before the range test, pixels.
    erosion_radius : int
        In-plane erosion that keeps edges out, pixels (0: none).

    Returns
    -------
    ndarray of bool
        On a chest CT: chest-wall muscles, heart and great vessels' interior, liver dome; no fat
        (about -100 HU, at the edge of the range), lung, bone or air.
    """
    vol, was_2d = _as_hu(hu)
    body_m = body_mask(vol) if body is None else _as_mask(body, "body")[0]
    smooth = _smooth_in_plane(vol, smooth_px)
    tissue = (smooth >= low) & (smooth <= high) & body_m
    if erosion_radius > 0:
        tissue = ndi.binary_erosion(tissue, _disk_2d(erosion_radius))
    return _out(tissue, was_2d)


def lung_parenchyma_mask(
    hu: np.ndarray,
    *,
    lungs: np.ndarray | None = None,
    vessel_hu: float = -600.0,
    smooth_px: float = 0.7,
    erosion_radius: int = 1,
) -> np.ndarray:
    """Homogeneous lung parenchyma (lungs without vessels, airways walls and nodules) for noise ROIs.

    Lung voxels at least one pixel away from anything brighter than ``vessel_hu`` (in-plane
    smoothed by ``smooth_px`` so 2 %-dose noise does not count as vessel), eroded by
    ``erosion_radius`` px in-plane. The std of HU inside the whole lung mask is dominated by vessels (about 190 HU on a
    chest), so lung *noise* must be measured here instead (docs/results.md, metrics: homogeneous ROIs).

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    lungs : ndarray of bool, optional
        Default :func:`lung_mask` of ``hu``.
    vessel_hu : float
        Smoothed HU at or above which a voxel is vessel (or wall, nodule).
    smooth_px : float
        In-plane Gaussian sigma before the vessel test, pixels.
    erosion_radius : int
        In-plane erosion of the result, pixels (0: none).

    Returns
    -------
    ndarray of bool
        On a chest CT: the parenchyma between vessels, typically 80–90 % of the lung volume.
    """
    vol, was_2d = _as_hu(hu)
    lung_m = lung_mask(vol) if lungs is None else _as_mask(lungs, "lungs")[0]
    bright = _smooth_in_plane(vol, smooth_px) >= vessel_hu
    paren = lung_m & ~ndi.binary_dilation(bright, _disk_2d(1))
    if erosion_radius > 0:
        paren = ndi.binary_erosion(paren, _disk_2d(erosion_radius))
    return _out(paren, was_2d)


def standard_rois(
    hu: np.ndarray, *, spacing: tuple[float, float, float] | None = None, body: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The automatic ROIs of every before/after table: lung parenchyma, soft tissue, background air.

    Also returns the whole ``lungs`` under the key ``"lungs_whole"`` (for LAA-950, which by
    convention counts vessels in the denominator); it is not a noise ROI. ``body`` reuses a body
    mask the caller already has.

    Parameters
    ----------
    hu : ndarray, [z, y, x] or [y, x]
        CT in HU.
    spacing : (sx, sy, sz) mm, optional
        Voxel size, ITK order; default 1 mm.
    body : ndarray of bool, optional
        Body mask of ``hu``; computed when omitted.

    Returns
    -------
    dict of str to ndarray of bool
        ``lung``, ``soft_tissue``, ``background`` and ``lungs_whole``, each of ``hu``'s shape.
    """
    vol, was_2d = _as_hu(hu)
    body = body_mask(vol) if body is None else _as_mask(body, "body")[0]
    lungs = lung_mask(vol, body=body, spacing=spacing)
    rois = {
        "lung": lung_parenchyma_mask(vol, lungs=lungs),
        "soft_tissue": soft_tissue_mask(vol, body=body),
        "background": background_mask(vol, spacing=spacing),
        "lungs_whole": lungs,
    }
    return {name: _out(mask, was_2d) for name, mask in rois.items()}


def evaluation_rois(reference: np.ndarray) -> dict[str, np.ndarray]:
    """The regions the evaluation grid scores, on a noise-free (or low-noise) reference.

    A variant of :func:`standard_rois` for scoring against a reference rather than measuring one
    scan: ``background`` (border-connected air *below −950 HU*: the foam pad under the patient,
    −800…−700 HU, is border-connected too, and the inference's background removal erases it, which
    is not noise), ``lungs`` (whole), ``body`` (not lungs), ``soft_tissue``, ``whole_body`` and the
    vessel-free ``lung_parenchyma``.

    Parameters
    ----------
    reference : ndarray, [z, y, x] or [y, x]
        The reference CT in HU (noise-free or normal dose).

    Returns
    -------
    dict of str to ndarray of bool
        The six regions above by name, each of ``reference``'s shape.
    """
    body = body_mask(reference)
    lungs = lung_mask(reference) & body
    air = background_mask(reference) & (np.asarray(reference) < -950.0)
    return {
        "background": air,
        "lungs": lungs,
        "body": body & ~lungs,
        "soft_tissue": soft_tissue_mask(reference),
        "whole_body": body,
        "lung_parenchyma": lung_parenchyma_mask(reference, lungs=lungs),
    }
