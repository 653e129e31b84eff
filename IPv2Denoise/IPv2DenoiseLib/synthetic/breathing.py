"""Breathing misalignment between two acquisitions of the same synthetic chest.

Why: real ULDCT and NDCT scans of one patient are taken in different breath holds, so their
lungs do not line up (the reason IPv2 exists). We reproduce that with a smooth displacement field
that is large inside the lungs and below the diaphragm and decays to zero at the rigid structures
(spine, ribs, sternum, the body wall, the table): the diaphragm and lung interior move up to
``amplitude_mm`` inferiorly and a fraction of it anteriorly, as in a deeper inspiration, while the
lungs slide along the chest wall.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy import ndimage

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.synthetic.phantom import LABELS, Phantom, interp_matrix, make_chest_phantom

#: Labels that do not move with breathing (displacement is zero on them).
RIGID_LABELS = (
    "air",
    "table",
    "pad",
    "skin",
    "fat",
    "muscle",
    "bone_cortical",
    "bone_cancellous",
    "cartilage",
    "disc",
    "spinal_canal",
)
#: Relative motion of the mobile tissues (lungs and abdomen follow the diaphragm fully).
_MOBILITY = {"heart": 0.5, "great_vessels": 0.4, "mediastinum": 0.4, "airway": 0.5, "airway_wall": 0.5}


def breathing_displacement(
    phantom: Phantom,
    *,
    amplitude_mm: float = 10.0,
    seed: int = 0,
    ap_fraction: float = 0.3,
    decay_mm: float = 15.0,
) -> np.ndarray:
    """Smooth breathing displacement (mm) on the phantom's grid.

    Parameters
    ----------
    phantom : the reference anatomy (its labels decide what moves).
    amplitude_mm : superior-inferior displacement at the diaphragm, far from rigid structures.
    seed : varies the left/right amplitudes and a slow random modulation (about ±10 %).
    ap_fraction : anterior-posterior motion of the anterior lung as a fraction of ``amplitude_mm``.
    decay_mm : distance from rigid structures over which the motion rises from zero.

    Returns
    -------
    float32 ndarray (3, z, y, x)
        Components (dz, dy, dx) in mm along the array axes (z superior, y posterior, x left).
    """
    sx, sy, sz = phantom.spacing
    f = [max(1, int(round(4.0 / s))) for s in (sz, sy, sx)]  # coarse grid of about 4 mm
    lab = phantom.labels[:: f[0], :: f[1], :: f[2]]
    cs = (sz * f[0], sy * f[1], sx * f[2])
    nz, ny, nx = phantom.shape
    x, y, z = (o + np.arange(n) * s for o, n, s in zip(phantom.origin, (nx, ny, nz), (sx, sy, sz)))
    zc, yc, xc = z[:: f[0]], y[:: f[1]], x[:: f[2]]

    rigid = np.isin(lab, [LABELS[n] for n in RIGID_LABELS])
    if rigid.all():
        return np.zeros((3, nz, ny, nx), np.float32)
    dist = ndimage.distance_transform_edt(~rigid, sampling=cs)
    w = (1.0 - np.exp(-dist / decay_mm)).astype(np.float32)
    mob = np.ones(lab.shape, np.float32)
    for name, m in _MOBILITY.items():
        mob[lab == LABELS[name]] = m
    sig = [6.0 / c for c in cs]
    mob = ndimage.gaussian_filter(mob, sig)

    rng = np.random.default_rng([seed, 7])
    left, right = rng.uniform(0.85, 1.0, 2)
    side = np.clip(0.5 + xc / 120.0, 0, 1)[None, None, :]
    noise = ndimage.gaussian_filter(rng.standard_normal(lab.shape).astype(np.float32), [20.0 / c for c in cs])
    noise /= max(float(noise.std()), 1e-6)
    scale = (right + (left - right) * side) * (1.0 + 0.1 * np.clip(noise, -2, 2))
    s_z = np.clip((95.0 - zc) / 215.0, 0.15, 1.0)[:, None, None]  # 1 at the diaphragm dome
    ant = np.clip((60.0 - yc) / 150.0, 0, 1)[None, :, None]  # anterior lung moves forward most
    base = w * mob * scale
    comps = [
        -amplitude_mm * s_z * base,
        -ap_fraction * amplitude_mm * ant * base,
        0.08 * amplitude_mm * np.clip(xc / 100.0, -1, 1)[None, None, :] * base,
    ]
    out = np.empty((3, nz, ny, nx), np.float32)
    mz = interp_matrix(z, zc[0], cs[0], len(zc))
    my = interp_matrix(y, yc[0], cs[1], len(yc))
    mx = interp_matrix(x, xc[0], cs[2], len(xc))
    for i, c in enumerate(comps):
        c = ndimage.gaussian_filter(c.astype(np.float32), sig) * w  # smooth, still 0 at rigid parts
        a = np.matmul(my, c @ mx.T)
        out[i] = np.tensordot(mz, a, axes=(1, 0))
    return out


def warp(phantom: Phantom, displacement: np.ndarray) -> Phantom:
    """Resample the phantom so the voxel at x shows the tissue that sat at x - d(x) (order 1 / labels 0)."""
    sx, sy, sz = phantom.spacing
    nz, ny, nx = phantom.shape
    grid = np.indices((nz, ny, nx), dtype=np.float32)
    for i, s in enumerate((sz, sy, sx)):
        grid[i] -= displacement[i] / np.float32(s)
    hu = ndimage.map_coordinates(phantom.hu, grid, order=1, mode="nearest").astype(np.float32)
    labels = ndimage.map_coordinates(phantom.labels, grid, order=0, mode="nearest").astype(np.uint8)
    return replace(phantom, hu=hu, labels=labels)


def breathing_motion(
    phantom: Phantom, *, amplitude_mm: float = 10.0, seed: int = 0, ap_fraction: float = 0.3
) -> tuple[Phantom, np.ndarray]:
    """The same anatomy in another breath hold, and the displacement that maps one to the other.

    When the phantom came from :func:`make_chest_phantom`, it is rebuilt with extra slices above
    and below so tissue entering the slab is real anatomy rather than repeated edge slices.

    Parameters
    ----------
    phantom : reference anatomy (the NDCT breath hold).
    amplitude_mm : superior-inferior motion at the diaphragm (0-40 mm).
    seed : motion seed (independent of the anatomy seed).
    ap_fraction : anterior-posterior motion as a fraction of the amplitude.

    Returns
    -------
    moved : Phantom
        Same geometry; ``params["motion"]`` holds the motion settings and statistics.
    displacement : float32 (3, z, y, x)
        (dz, dy, dx) in mm; ``moved`` at x shows the tissue at x - d(x) of ``phantom``.

    Raises
    ------
    UserError
        If ``amplitude_mm`` is outside [0, 40].
    """
    if not 0.0 <= amplitude_mm <= 40.0:
        raise UserError(f"amplitude_mm must be in [0, 40] mm, got {amplitude_mm}")
    p = phantom.params
    pad = 0
    src = phantom
    if p.get("shape") == phantom.shape:
        pad = int(math.ceil((amplitude_mm + 4.0) / phantom.spacing[2]))
        shape = (phantom.shape[0] + 2 * pad,) + phantom.shape[1:]
        z = phantom.origin[2] + np.array([0.0, (phantom.shape[0] - 1) * phantom.spacing[2]])
        nodule_range = p.get("nodule_z_range_mm") or (float(z.min()), float(z.max()))
        src = make_chest_phantom(**{**p, "shape": shape, "nodule_z_range_mm": nodule_range})
    disp = breathing_displacement(src, amplitude_mm=amplitude_mm, seed=seed, ap_fraction=ap_fraction)
    moved = warp(src, disp)
    crop = np.s_[pad : pad + phantom.shape[0]]
    disp = np.ascontiguousarray(disp[:, crop])
    stats = motion_stats(disp, phantom.labels)
    moved = replace(
        phantom,
        hu=np.ascontiguousarray(moved.hu[crop]),
        labels=np.ascontiguousarray(moved.labels[crop]),
        params={
            **p,
            "motion": {"amplitude_mm": amplitude_mm, "seed": seed, "ap_fraction": ap_fraction, **stats},
        },
    )
    return moved, disp


def motion_stats(displacement: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Magnitude statistics (mm) of a displacement field, overall and inside the lungs."""
    mag = np.sqrt((displacement.astype(np.float64) ** 2).sum(0))
    out = {
        "max_mm": float(mag.max()),
        "mean_mm": float(mag.mean()),
        "max_si_mm": float(np.abs(displacement[0]).max()),
        "max_ap_mm": float(np.abs(displacement[1]).max()),
    }
    if labels is not None:
        lung = np.isin(
            labels, [LABELS[n] for n in ("lung", "lung_vessel", "emphysema", "nodule_solid", "nodule_ggo")]
        )
        if lung.any():
            out["lung_mean_mm"] = float(mag[lung].mean())
            out["lung_p95_mm"] = float(np.percentile(mag[lung], 95))
        bone = labels == LABELS["bone_cortical"]
        if bone.any():
            out["bone_max_mm"] = float(mag[bone].max())
    return out
