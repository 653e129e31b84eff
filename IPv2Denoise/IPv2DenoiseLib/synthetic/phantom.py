"""Synthetic chest CT phantom in HU, built in physical millimetres from a seed.

Why: we have no real ULDCT/NDCT pairs we may ship, yet training and every test need chest CT with
the structures that matter to a lung denoiser (fine vessels, nodules, emphysema, the body wall,
bone, the table). The phantom is analytic: every structure is a function of the physical position
(x, y, z) in mm, so the same seed gives the same anatomy at any voxel size, and sampling is
vectorised numpy (body layers in 2D, tubes rasterised on local bounding boxes).

Coordinates follow DICOM/ITK LPS: x grows toward the patient's left, y toward the back (posterior),
z toward the head (superior). Arrays are ``[z, y, x]``; ``spacing`` is ``(sx, sy, sz)`` (ITK order).
z = 0 mm is the carina; the lungs reach from about z = -170 mm (posterior recesses) to +95 mm
(apices); the default slab is centred at z = -30 mm (heart, hila and both lungs).

Breathing motion between two acquisitions lives in :mod:`IPv2DenoiseLib.synthetic.breathing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume

#: Label ids of :attr:`Phantom.labels` (uint8); 0 is the air around the patient.
LABELS: dict[str, int] = {
    "air": 0,
    "table": 1,
    "pad": 2,
    "skin": 3,
    "fat": 4,
    "muscle": 5,
    "bone_cortical": 6,
    "bone_cancellous": 7,
    "cartilage": 8,
    "disc": 9,
    "spinal_canal": 10,
    "heart": 11,
    "great_vessels": 12,
    "mediastinum": 13,
    "airway": 14,
    "airway_wall": 15,
    "lung": 16,
    "lung_vessel": 17,
    "nodule_solid": 18,
    "nodule_ggo": 19,
    "emphysema": 20,
    "abdomen": 21,
}

#: Nominal HU range (inclusive) of each label's median; the values the phantom is built with.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1010.0, -990.0),
    "table": (-1000.0, 300.0),  # carbon-fibre shells (~200 HU) around a foam core (~-950 HU)
    "pad": (-800.0, -700.0),
    "skin": (10.0, 60.0),
    "fat": (-120.0, -80.0),
    "muscle": (35.0, 55.0),
    "bone_cortical": (700.0, 1200.0),
    "bone_cancellous": (200.0, 300.0),
    "cartilage": (90.0, 150.0),
    "disc": (70.0, 110.0),
    "spinal_canal": (0.0, 30.0),
    "heart": (30.0, 50.0),
    "great_vessels": (30.0, 50.0),
    "mediastinum": (-120.0, -60.0),
    "airway": (-1010.0, -950.0),
    "airway_wall": (-200.0, 60.0),
    "lung": (-900.0, -800.0),
    "lung_vessel": (-400.0, 50.0),  # blood 40 HU, partial volume with lung at the edges
    "nodule_solid": (20.0, 70.0),
    "nodule_ggo": (-700.0, -400.0),
    "emphysema": (-1000.0, -950.0),
    "abdomen": (40.0, 70.0),
}

# Fixed anatomy (mm). Body centre, semi-axes and the spine position.
_CY = -15.0  # body centre y
_A, _B_ANT, _B_POST = 150.0, 105.0, 100.0
_Y_SPINE = _CY + _B_POST - 72.0  # vertebral body centre y
_Z_APEX, _Z_CARINA = 95.0, 0.0
_LATTICE_HALF = 260.0  # half extent (mm) of the random lattices in x and y


@dataclass(frozen=True)
class VesselTree:
    """Tube segments of the lung vessel trees (one tree per lung) as drawn.

    Attributes
    ----------
    p0, p1 : float64 (n, 3) segment ends in mm, (x, y, z).
    radius : float64 (n,) mm.
    generation : int (n,) 0 at the hilum, +1 per bifurcation.
    side : int (n,) +1 left lung (x > 0), -1 right lung.
    parent : int (n,) index of the parent segment, -1 for the roots.
    """

    p0: np.ndarray
    p1: np.ndarray
    radius: np.ndarray
    generation: np.ndarray
    side: np.ndarray
    parent: np.ndarray


@dataclass(frozen=True)
class Phantom:
    """A sampled chest phantom.

    Attributes
    ----------
    hu : float32 [z, y, x] noise-free HU.
    labels : uint8 [z, y, x], ids in :data:`LABELS`.
    spacing : (sx, sy, sz) mm.
    origin : (x, y, z) mm of voxel [0, 0, 0] (LPS).
    params : the keyword arguments of :func:`make_chest_phantom` (to rebuild or extend it).
    vessels : the lung vessel trees.
    nodules : one dict per nodule (kind, centre_mm, radius_mm, hu).
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    params: dict[str, Any] = field(default_factory=dict)
    vessels: VesselTree | None = None
    nodules: tuple[dict[str, Any], ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def mask(self, *names: str) -> np.ndarray:
        """Boolean mask of the voxels whose label is one of ``names``."""
        ids = [LABELS[n] for n in names]
        return np.isin(self.labels, ids)

    def to_volume(self, **meta: Any) -> Volume:
        """The HU array as a :class:`Volume` with this geometry."""
        return Volume(
            self.hu,
            spacing=self.spacing,
            origin=self.origin,
            meta={"source": "IPv2DenoiseLib.synthetic.phantom", **meta},
        )

    def labels_volume(self) -> Volume:
        """The label map as a float :class:`Volume` (for writing next to the HU volume)."""
        return Volume(
            self.labels.astype(np.float32),
            spacing=self.spacing,
            origin=self.origin,
            meta={"source": "IPv2DenoiseLib.synthetic.phantom", "labels": dict(LABELS)},
        )


# --------------------------------------------------------------------------------------------
# Grid, random lattices and rasterisation helpers


def _axes(shape, spacing, z_center):
    nz, ny, nx = shape
    sx, sy, sz = spacing
    x = (np.arange(nx) - (nx - 1) / 2.0) * sx
    y = (np.arange(ny) - (ny - 1) / 2.0) * sy
    z = z_center + (np.arange(nz) - (nz - 1) / 2.0) * sz
    return x, y, z


def interp_matrix(coords: np.ndarray, start: float, step: float, n: int) -> np.ndarray:
    """Dense linear-interpolation matrix from a regular lattice (start, step, n) to ``coords``."""
    u = np.clip((coords - start) / step, 0.0, n - 1.000001)
    i0 = np.floor(u).astype(int)
    w = (u - i0).astype(np.float32)
    m = np.zeros((coords.size, n), np.float32)
    rows = np.arange(coords.size)
    m[rows, i0] = 1.0 - w
    m[rows, i0 + 1] += w
    return m


def _lattice_noise(seed: int, key: int, axes, step: float, sigma_mm: float) -> np.ndarray:
    """Smooth unit-variance Gaussian noise anchored in physical space, sampled on the grid.

    Each lattice plane z = k * step draws its values from an RNG seeded by (seed, key, k), so the
    field at a physical point does not depend on the slab extent or the voxel size.
    """
    x, y, z = axes
    n_xy = int(round(2 * _LATTICE_HALF / step)) + 1
    pad = int(np.ceil(3 * sigma_mm / step)) + 1
    k0 = int(np.floor(z.min() / step)) - pad
    k1 = int(np.ceil(z.max() / step)) + pad
    planes = np.empty((k1 - k0 + 1, n_xy, n_xy), np.float32)
    for i, k in enumerate(range(k0, k1 + 1)):
        rng = np.random.default_rng([seed, key, k + 1_000_000])
        planes[i] = rng.standard_normal((n_xy, n_xy), dtype=np.float32)
    s = sigma_mm / step
    ndimage.gaussian_filter(planes, s, output=planes, mode="wrap")
    planes *= np.float32(np.sqrt((2.0 * np.sqrt(np.pi) * s) ** 3))  # back to unit variance
    mz = interp_matrix(z, k0 * step, step, planes.shape[0])
    my = interp_matrix(y, -_LATTICE_HALF, step, n_xy)
    mx = interp_matrix(x, -_LATTICE_HALF, step, n_xy)
    a = planes @ mx.T  # (kz, ky, nx)
    a = np.matmul(my, a)  # (kz, ny, nx)
    return np.tensordot(mz, a, axes=(1, 0)).astype(np.float32)  # (nz, ny, nx)


class _Canvas:
    """HU and label arrays painted back to front with soft (partial-volume) edges."""

    def __init__(self, shape, spacing, origin):
        self.hu = np.full(shape, -1000.0, np.float32)
        self.labels = np.zeros(shape, np.uint8)
        self.spacing = np.asarray(spacing, float)  # x, y, z
        self.origin = np.asarray(origin, float)
        self.h = float(np.mean(spacing[:2]))  # edge width in mm

    def alpha(self, depth_mm: np.ndarray) -> np.ndarray:
        """Soft occupancy from a signed depth (mm, > 0 inside)."""
        return np.clip(depth_mm / self.h + 0.5, 0.0, 1.0).astype(np.float32)

    def paint(self, alpha, value, label: str, where=np.s_[...]):
        alpha = np.broadcast_to(alpha, self.hu[where].shape)
        if not np.any(alpha > 0):
            return
        hu = self.hu[where]
        hu += alpha * (np.asarray(value, np.float32) - hu)
        self.hu[where] = hu
        lab = self.labels[where]
        lab[alpha >= 0.5] = LABELS[label]
        self.labels[where] = lab

    def _box(self, lo, hi):
        """Voxel index box [i0, i1) (x, y, z order) covering the physical box lo..hi (mm)."""
        n = np.array(self.hu.shape[::-1])
        i0 = np.maximum(np.floor((lo - self.origin) / self.spacing).astype(int), 0)
        i1 = np.minimum(np.ceil((hi - self.origin) / self.spacing).astype(int) + 1, n)
        return i0, i1

    def tube_alpha(self, p0, p1, radius):
        """Occupancy of capsules (p0[i]-p1[i], radius[i]) as (alpha, where): alpha on a cropped box.

        Each capsule is rasterised by distance-to-segment on its own bounding box; overlaps take
        the maximum. ``where`` is the slice of the full grid the cropped ``alpha`` covers.
        """
        empty = np.zeros((0, 0, 0), np.float32), np.s_[0:0, 0:0, 0:0]
        p0, p1 = np.atleast_2d(p0).astype(float), np.atleast_2d(p1).astype(float)
        radius = np.atleast_1d(np.asarray(radius, float))
        if len(radius) == 0:
            return empty
        pad = radius[:, None] + self.h + self.spacing[2]
        b0, b1 = self._box((np.minimum(p0, p1) - pad).min(0), (np.maximum(p0, p1) + pad).max(0))
        if np.any(b1 <= b0):
            return empty
        out = np.zeros((b1[2] - b0[2], b1[1] - b0[1], b1[0] - b0[0]), np.float32)
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        hz = 0.5 * max(sz, self.h)
        for a, b, r in zip(p0, p1, radius):
            i0, i1 = self._box(np.minimum(a, b) - r - self.h, np.maximum(a, b) + r + self.h)
            if np.any(i1 <= i0):
                continue
            xs = ox + np.arange(i0[0], i1[0]) * sx
            ys = oy + np.arange(i0[1], i1[1]) * sy
            zs = oz + np.arange(i0[2], i1[2]) * sz
            d = b - a
            dd = float(d @ d) or 1e-12
            px = (xs - a[0])[None, None, :]
            py = (ys - a[1])[None, :, None]
            pz = (zs - a[2])[:, None, None]
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
            dist = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)
            # thin tubes: widen the edge to the slice thickness and lower the peak (partial volume)
            edge = self.h if r >= hz else self.h + (hz - r)
            occ = np.clip((r - dist) / edge + 0.5, 0.0, 1.0) * min(1.0, r / (0.5 * self.h)) ** 0.5
            sl = np.s_[
                i0[2] - b0[2] : i1[2] - b0[2], i0[1] - b0[1] : i1[1] - b0[1], i0[0] - b0[0] : i1[0] - b0[0]
            ]
            np.maximum(out[sl], occ.astype(np.float32), out=out[sl])
        return out, np.s_[b0[2] : b1[2], b0[1] : b1[1], b0[0] : b1[0]]

    def paint_tubes(self, p0, p1, radius, value, label):
        alpha, where = self.tube_alpha(p0, p1, radius)
        self.paint(alpha, value, label, where)


def _polyline(points, radius, n_per=1):
    """Segments (p0, p1, r) of a polyline through ``points`` (k, 3), subdivided ``n_per`` times."""
    pts = np.asarray(points, float)
    r = np.broadcast_to(np.asarray(radius, float), (len(pts),))
    if n_per > 1:
        t = np.linspace(0, 1, (len(pts) - 1) * n_per + 1)
        s = np.linspace(0, 1, len(pts))
        pts = np.stack([np.interp(t, s, pts[:, i]) for i in range(3)], axis=1)
        r = np.interp(t, s, r)
    return pts[:-1], pts[1:], 0.5 * (r[:-1] + r[1:])


def _cross(a, b):
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _seg_distance(p, a, b):
    """Distance from points p (n, 3) to segments a-b (m, 3): (n, m)."""
    d = b - a
    dd = np.maximum((d * d).sum(1), 1e-12)
    ap = p[:, None, :] - a[None]
    t = np.clip((ap * d[None]).sum(2) / dd, 0, 1)
    return np.linalg.norm(ap - t[..., None] * d[None], axis=2)


# --------------------------------------------------------------------------------------------
# The analytic anatomy


class _Anatomy:
    """Seeded shape parameters and analytic shape functions (shared by grid and point queries)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.seed = seed
        self.harm = rng.normal(0, 0.012, size=(4, 2))  # body outline harmonics k = 2..5
        self.fat_scale = rng.uniform(0.8, 1.3)
        self.heart_c = np.array([22.0, -32.0, -72.0]) + rng.normal(0, 3, 3)
        self.heart_ax = np.array([62.0, 48.0, 52.0]) * rng.uniform(0.92, 1.08, 3)
        self.dome = rng.uniform(50, 65, 2)  # left, right
        # great vessels: polylines (x, y, z) mm
        self.aorta = np.array(
            [
                [-8, -35, -55],
                [-14, -38, -10],
                [-10, -30, 22],
                [8, -12, 34],
                [22, 8, 26],
                [26, 16, 0],
                [24, 18, -60],
                [18, 18, -200],
            ],
            float,
        )
        self.aorta_r = np.array([14, 14.5, 14, 13, 12, 11.5, 11, 10.5], float)
        self.pa = np.array([[14, -42, -48], [16, -36, -22], [10, -26, -10]], float)
        self.lpa = np.array([[10, -26, -10], [38, -16, -8], [62, -6, -14]], float)
        self.rpa = np.array([[10, -26, -10], [-20, -22, -16], [-58, -12, -20]], float)
        self.trachea = np.array([[0, -8, 140], [0, -6, 60], [0, -4, 0]], float)
        self.rmb = np.array([[0, -4, 0], [-26, -4, -14], [-48, -4, -26]], float)
        self.lmb = np.array([[0, -4, 0], [30, -2, -20], [52, 0, -38]], float)
        self.esophagus = np.array([[2, 8, 140], [10, 6, -40], [22, -2, -180]], float)

    # body outline (2D) ------------------------------------------------------------------
    def body_radius(self, theta):
        s, c = np.sin(theta), np.cos(theta)
        b = np.where(s < 0, _B_ANT, _B_POST)
        p = 2.4
        r = (np.abs(c / _A) ** p + np.abs(s / b) ** p) ** (-1.0 / p)
        for k, (ec, es) in enumerate(self.harm, start=2):
            r = r * (1 + ec * np.cos(k * theta) + es * np.sin(k * theta))
        return r

    def wall(self, theta):
        """Thickness (mm) of skin, fat and muscle along the ray at angle theta."""
        s, c = np.sin(theta), np.cos(theta)
        fat = self.fat_scale * (11 + 4 * np.cos(2 * theta) + 3 * s)
        post = np.clip(s, 0, 1) ** 6  # paraspinal muscles
        muscle = 9 + 10 * np.clip(-s, 0, 1) ** 2 * np.abs(c) ** 0.5 + 28 * post + 6 * np.clip(s, 0, 1)
        return 2.0, fat, muscle

    def polar(self, x, y):
        return np.arctan2(y - _CY, x), np.hypot(x, y - _CY)

    def cavity_depth(self, x, y):
        """Depth (mm, > 0 inside) of the pleural cavity inside the ribs."""
        th, r = self.polar(x, y)
        skin, fat, muscle = self.wall(th)
        return self.body_radius(th) - (skin + fat + muscle + 11.0) - r

    # lungs ------------------------------------------------------------------------------
    def diaphragm_z(self, x, y):
        left = self.dome[0] * np.exp(-((x - 70) ** 2 + (y + 5) ** 2) / (2 * 55.0**2))
        right = self.dome[1] * np.exp(-((x + 70) ** 2 + (y + 5) ** 2) / (2 * 55.0**2))
        return -168.0 + 1.1 * np.maximum(left, right) + 0.15 * np.clip(-(y - _CY), 0, None)

    def apex_z(self, x, y):
        xa = np.where(x > 0, 55.0, -55.0)
        return _Z_APEX - ((x - xa) ** 2 + (y - 5) ** 2) / (2 * 45.0)

    def median_halfwidth(self, y, z):
        """Half-width (mm) of the midline band (mediastinum, spine) the lungs stay out of."""
        m = 14.0 + 8.0 * (z > -5) * np.clip((z + 5) / 20, 0, 1)
        m = m + 22.0 * np.clip((y - (_Y_SPINE - 30)) / 15, 0, 1)  # spine and paravertebral
        m = m - 6.0 * np.clip(-(y - (_CY - 45)) / 20, 0, 1)  # anterior junction
        return m

    def heart_depth(self, x, y, z):
        d = np.stack(np.broadcast_arrays(x - self.heart_c[0], y - self.heart_c[1], z - self.heart_c[2]))
        rho = np.sqrt(((d / self.heart_ax.reshape((3,) + (1,) * (d.ndim - 1))) ** 2).sum(0))
        r = np.sqrt((d**2).sum(0))
        return r / np.maximum(rho, 1e-6) - r  # radial distance to the surface, > 0 inside

    def lung_depth(self, x, y, z):
        """Approximate signed depth (mm) inside either lung (without vessels cut out)."""
        d = self.cavity_depth(x, y)
        d = np.minimum(d, np.abs(x) - self.median_halfwidth(y, z))
        d = np.minimum(d, z - self.diaphragm_z(x, y))
        d = np.minimum(d, self.apex_z(x, y) - z)
        d = np.minimum(d, -self.heart_depth(x, y, z) - 4.0)
        return d

    def lung_points_inside(self, p, margin=0.0):
        """True where points p (n, 3) lie inside a lung by at least ``margin`` mm."""
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        d = self.lung_depth(x, y, z)
        a0, a1, _ = _polyline(self.aorta, self.aorta_r)
        d = np.minimum(
            d, (_seg_distance(p, a0, a1) - 0.5 * (self.aorta_r[:-1] + self.aorta_r[1:])[None]).min(1) - 3
        )
        return d > margin


def _grow_trees(anat: _Anatomy, r_min: float, n_points: int = 3000, r_root: float = 7.0) -> VesselTree:
    """Grow one space-filling vessel tree per lung from the hilum by territory splitting.

    Each lung is represented by ``n_points`` random points inside it (its perfusion territory).
    A branch runs from its start half-way toward the territory point nearest the territory's
    centroid, then the territory is split across its principal axis at a random quantile and each
    half feeds one child. Radii follow Murray's law, r^3 proportional to the territory size, so
    r_child = r * (n_child / n)^(1/3) < r: radii shrink at every bifurcation, from ``r_root`` at
    the hilum to about r_root * n_points^(-1/3) (0.5 mm for 3000 points) at the leaves.
    """
    rng = np.random.default_rng([anat.seed, 2])
    segs: list[tuple] = []  # (p0, p1, r, gen, side, parent)
    for side, hilum in ((1, anat.lpa[-1]), (-1, anat.rpa[-1])):
        cand = np.column_stack(
            [
                side * rng.uniform(0, 150, 12 * n_points),
                rng.uniform(-125, 95, 12 * n_points),
                rng.uniform(-175, 100, 12 * n_points),
            ]
        )
        pts = cand[anat.lung_points_inside(cand, margin=1.0)][:n_points]
        stack = [(np.asarray(hilum, float), np.arange(len(pts)), r_root, 0, -1)]
        while stack:
            p0, terr, r, gen, parent = stack.pop()
            tp = pts[terr]
            if len(terr) == 1:
                p1 = tp[0]
            else:
                c = tp.mean(0)
                m = tp[np.argmin(((tp - c) ** 2).sum(1))]
                p1 = p0 + rng.uniform(0.4, 0.6) * (m - p0)
            idx = len(segs)
            segs.append((p0, p1, r, gen, side, parent))
            if len(terr) < 2:
                continue
            if len(tp) > 32:
                sub = tp if len(tp) <= 256 else tp[rng.choice(len(tp), 256, replace=False)]
                axis = np.linalg.svd(sub - sub.mean(0), full_matrices=False)[2][0]
                proj = (tp - p1) @ axis
            else:
                proj = tp[:, np.argmax(np.ptp(tp, axis=0))]
            order = np.argsort(proj)
            k = int(np.clip(round(rng.uniform(0.3, 0.7) * len(terr)), 1, len(terr) - 1))
            for child in (terr[order[:k]], terr[order[k:]]):
                rc = r * (len(child) / len(terr)) ** (1.0 / 3.0)
                if rc >= r_min:
                    stack.append((p1, child, rc, gen + 1, idx))
    p0, p1, r, g, s, par = zip(*segs)
    return VesselTree(np.array(p0), np.array(p1), np.array(r), np.array(g), np.array(s), np.array(par))


def make_chest_phantom(
    *,
    shape: tuple[int, int, int] = (64, 512, 512),
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.25),
    z_center_mm: float = -30.0,
    seed: int = 0,
    arms: bool = False,
    table: bool = True,
    emphysema: bool = False,
    nodules: bool = True,
    vessel_min_radius_mm: float = 0.3,
    nodule_z_range_mm: tuple[float, float] | None = None,
) -> Phantom:
    """Build a seeded, noise-free chest CT phantom in HU.

    Parameters
    ----------
    shape : (z, y, x) voxels.
    spacing : (sx, sy, sz) mm; in-plane field of view is ``nx * sx`` by ``ny * sy`` mm.
    z_center_mm : height of the slab centre (z = 0 is the carina; lungs span about -170..95 mm).
    seed : anatomy seed; the same seed gives the same anatomy at any shape and spacing.
    arms : draw the arms beside the chest (they may reach past a narrow field of view).
    table : draw the curved carbon-fibre table and its foam pad under the patient.
    emphysema : add low-attenuation (< -950 HU) regions in the upper lungs.
    nodules : add two solid nodules and one ground-glass nodule inside the imaged slab.
    vessel_min_radius_mm : the vessel trees branch until this radius.
    nodule_z_range_mm : (zmin, zmax) mm the nodule positions are drawn from (default: the slab).

    Returns
    -------
    Phantom
        ``.hu`` float32 [z, y, x], ``.labels`` uint8 (ids in :data:`LABELS`), geometry and trees.

    Raises
    ------
    UserError
        If the shape or spacing is not positive or the field of view misses the chest.
    """
    shape, spacing = _checked_geometry(shape, spacing, z_center_mm)
    params = dict(
        shape=shape,
        spacing=spacing,
        z_center_mm=float(z_center_mm),
        seed=int(seed),
        arms=arms,
        table=table,
        emphysema=emphysema,
        nodules=nodules,
        nodule_z_range_mm=nodule_z_range_mm,
        vessel_min_radius_mm=float(vessel_min_radius_mm),
    )
    anat = _Anatomy(int(seed))
    x, y, z = axes = _axes(shape, spacing, z_center_mm)
    origin = (float(x[0]), float(y[0]), float(z[0]))
    cv = _Canvas(shape, spacing, origin)
    X, Y, Z = x[None, None, :], y[None, :, None], z[:, None, None]
    X2, Y2 = x[None, :], y[:, None]

    fine = _lattice_noise(seed, 10, axes, 1.5, 1.5)
    cav, th, body_depth, fat_t = _paint_body_slice(cv, anat, X2, Y2, table=table, arms=arms)
    diaph = anat.diaphragm_z(X2, Y2)
    _paint_abdomen(cv, diaph, cav, z, Z)
    heart = _heart_depth_box(cv, anat, X, Y, Z)
    _paint_lungs(cv, anat, axes, diaph, heart, fine, seed=seed, emphysema=emphysema)
    _paint_mediastinal_organs(cv, anat, heart)
    tree = _grow_trees(anat, vessel_min_radius_mm)
    _paint_lung_vessels(cv, tree, z)
    _paint_airways(cv, anat, tree)
    _paint_bones(cv, anat, X, Y, Z, X2, Y2, th, body_depth, fat_t)
    nod_list: list[dict[str, Any]] = []
    if nodules:
        nod_list = _paint_nodules(cv, anat, X, Y, Z, seed, z_range=nodule_z_range_mm)
    _add_fine_texture(cv, fine)

    return Phantom(
        hu=cv.hu,
        labels=cv.labels,
        spacing=spacing,
        origin=origin,
        params=params,
        vessels=tree,
        nodules=tuple(nod_list),
    )


def _checked_geometry(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], z_center_mm: float
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing as int and float tuples; UserError when not positive or the slab misses the lungs."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"shape must be three positive sizes (z, y, x), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UserError(f"spacing must be three positive mm values (sx, sy, sz), got {spacing}")
    if not -170.0 <= z_center_mm <= 95.0:
        raise UserError(f"z_center_mm must lie in the lungs' range [-170, 95] mm, got {z_center_mm}")
    return shape, spacing


def _paint_table(c2: _Canvas, X2: np.ndarray, Y2: np.ndarray) -> None:
    """The curved carbon-fibre table (two skins) and its foam pad under the patient."""
    top = _CY + _B_POST + 20.0 - X2**2 / (2 * 600.0)
    inside_w = np.clip((165.0 - np.abs(X2)) / c2.h + 0.5, 0, 1)
    c2.paint(np.minimum(c2.alpha(np.minimum(Y2 - (top - 20.0), top - Y2)), inside_w)[None], -750.0, "pad")
    c2.paint(np.minimum(c2.alpha(np.minimum(Y2 - top, top + 24.0 - Y2)), inside_w)[None], -950.0, "table")
    for y0 in (top, top + 22.0):
        c2.paint(np.minimum(c2.alpha(np.minimum(Y2 - y0, y0 + 2.0 - Y2)), inside_w)[None], 200.0, "table")


def _paint_arms(c2: _Canvas, X2: np.ndarray, Y2: np.ndarray) -> None:
    """Both arms beside the chest: skin, fat, muscle and the humerus."""
    for sgn in (-1, 1):
        ax = sgn * (_A + 42.0)
        ra = np.hypot(X2 - ax, (Y2 - _CY - 5) * 1.15)
        c2.paint(c2.alpha(40.0 - ra)[None], 30.0, "skin")
        c2.paint(c2.alpha(38.0 - ra)[None], -100.0, "fat")
        c2.paint(c2.alpha(30.0 - ra)[None], 45.0, "muscle")
        rb = np.hypot(X2 - ax - sgn * 4, Y2 - _CY - 5)
        c2.paint(c2.alpha(11.0 - rb)[None], 1000.0, "bone_cortical")
        c2.paint(c2.alpha(8.0 - rb)[None], 240.0, "bone_cancellous")


def _paint_body_slice(
    cv: _Canvas, anat: _Anatomy, X2: np.ndarray, Y2: np.ndarray, *, table: bool, arms: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint the z-invariant layers (table, pad, body wall, cavity, spine's posterior parts) into every slice.

    They are painted once on a one-slice canvas and copied. Returns the cavity's occupancy and the
    polar angle, body depth and fat thickness the bones are placed with.
    """
    c2 = _Canvas((1,) + cv.hu.shape[1:], cv.spacing, cv.origin)
    th, r = anat.polar(X2, Y2)
    body_depth = anat.body_radius(th) - r
    if table:
        _paint_table(c2, X2, Y2)
    skin, fat_t, muscle_t = anat.wall(th)
    c2.paint(c2.alpha(body_depth)[None], 30.0, "skin")
    c2.paint(c2.alpha(body_depth - skin)[None], -100.0, "fat")
    c2.paint(c2.alpha(body_depth - skin - fat_t)[None], 45.0, "muscle")
    if arms:
        _paint_arms(c2, X2, Y2)
    cav = c2.alpha(anat.cavity_depth(X2, Y2))
    c2.paint(cav[None], -95.0, "mediastinum")
    _paint_spine_2d(c2, X2, Y2)
    cv.hu[:] = c2.hu
    cv.labels[:] = c2.labels
    return cav, th, body_depth, fat_t


def _paint_abdomen(cv: _Canvas, diaph: np.ndarray, cav: np.ndarray, z: np.ndarray, Z: np.ndarray) -> None:
    """The abdomen inside the cavity below the diaphragm (only the slices that reach below it)."""
    k_ab = np.flatnonzero(z < diaph.max() + 3.0 * cv.h)
    if k_ab.size:
        w = np.s_[k_ab[0] : k_ab[-1] + 1]
        a_ab = np.minimum(cav[None], cv.alpha(diaph[None] + 3.0 - Z[w]))
        cv.paint(a_ab, 55.0, "abdomen", w)


def _heart_depth_box(
    cv: _Canvas, anat: _Anatomy, X: np.ndarray, Y: np.ndarray, Z: np.ndarray
) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """Depth inside the heart (mm) on the grid box around it, and that box; None if the slab misses it."""
    hb0, hb1 = cv._box(anat.heart_c - anat.heart_ax - 10, anat.heart_c + anat.heart_ax + 10)
    hsl = np.s_[hb0[2] : hb1[2], hb0[1] : hb1[1], hb0[0] : hb1[0]]
    if not np.all(hb1 > hb0):
        return None
    return anat.heart_depth(X[..., hsl[2]], Y[:, hsl[1]], Z[hsl[0]]), hsl


def _paint_lungs(
    cv: _Canvas,
    anat: _Anatomy,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
    diaph: np.ndarray,
    heart: tuple[np.ndarray, tuple[slice, slice, slice]] | None,
    fine: np.ndarray,
    *,
    seed: int,
    emphysema: bool,
) -> None:
    """Both lungs (textured parenchyma, kept off the heart and the aorta) and optional emphysema."""
    x, y, z = axes
    X, Y, Z = x[None, None, :], y[None, :, None], z[:, None, None]
    X2, Y2 = x[None, :], y[:, None]
    ldepth = np.minimum(anat.cavity_depth(X2, Y2)[None], np.abs(X) - anat.median_halfwidth(Y, Z))
    ldepth = np.minimum(ldepth, Z - diaph[None])
    ldepth = np.minimum(ldepth, anat.apex_z(X2, Y2)[None] - Z)
    if heart is not None:
        hd, hsl = heart
        ldepth[hsl] = np.minimum(ldepth[hsl], -hd - 4.0)
    lung_a = cv.alpha(ldepth)
    del ldepth
    g_alpha, g_where = cv.tube_alpha(*_polyline(anat.aorta, anat.aorta_r + 3.0, 4))
    lung_a[g_where] *= 1.0 - g_alpha
    coarse = _lattice_noise(seed, 11, axes, 3.0, 6.0)
    lung_hu = -870.0 + 22.0 * fine + 12.0 * coarse + 45.0 * np.clip((Y - _CY + 60) / 150, 0, 1)
    del coarse
    cv.paint(lung_a, lung_hu, "lung")
    del lung_hu
    if emphysema:
        em = _lattice_noise(seed, 12, axes, 3.0, 8.0)
        upper = np.clip((Z + 40.0) / 60.0, 0, 1)
        em_a = np.clip((em + 0.8 * upper - 1.3) * 3.0, 0, 1) * (lung_a >= 0.5)
        cv.paint(em_a, -975.0, "emphysema")


def _paint_mediastinal_organs(
    cv: _Canvas, anat: _Anatomy, heart: tuple[np.ndarray, tuple[slice, slice, slice]] | None
) -> None:
    """Heart (with a darker blood pool), aorta, pulmonary arteries and oesophagus."""
    if heart is not None:
        hd, hsl = heart
        cv.paint(cv.alpha(hd), 42.0, "heart", hsl)
        cv.paint(cv.alpha(hd - 9.0), 38.0, "heart", hsl)  # blood pool a little darker
    for pts, rad in (
        (anat.aorta, anat.aorta_r),
        (anat.pa, 13.0),
        (anat.lpa, [11.0, 10.0, 8.0]),
        (anat.rpa, [11.0, 10.0, 8.0]),
    ):
        cv.paint_tubes(*_polyline(pts, rad, 4), 40.0, "great_vessels")
    cv.paint_tubes(*_polyline(anat.esophagus, 8.0, 4), 40.0, "muscle")


def _paint_lung_vessels(cv: _Canvas, tree: VesselTree, z: np.ndarray) -> None:
    """The segments of the lung vessel trees that reach within 20 mm of the slab."""
    zlo, zhi = z.min() - 20, z.max() + 20
    keep = (np.maximum(tree.p0[:, 2], tree.p1[:, 2]) > zlo) & (np.minimum(tree.p0[:, 2], tree.p1[:, 2]) < zhi)
    cv.paint_tubes(tree.p0[keep], tree.p1[keep], tree.radius[keep], 40.0, "lung_vessel")


def _paint_airways(cv: _Canvas, anat: _Anatomy, tree: VesselTree) -> None:
    """Trachea, main bronchi, and lobar and segmental bronchi beside the first two artery generations."""
    aw0, aw1, awr = [], [], []
    for pts, rad in ((anat.trachea, 9.0), (anat.rmb, [7.5, 7.0, 6.0]), (anat.lmb, [7.0, 6.5, 5.5])):
        a, b, rr = _polyline(pts, rad, 4)
        aw0.append(a)
        aw1.append(b)
        awr.append(rr)
    roots = tree.parent < 0
    for gen_mask in (roots, np.isin(tree.parent, np.flatnonzero(roots))):
        off = np.array([0.0, 4.0, 0.0])
        aw0.append(tree.p0[gen_mask] + off)
        aw1.append(tree.p1[gen_mask] + off)
        awr.append(0.8 * tree.radius[gen_mask])
    p0, p1, radius = np.concatenate(aw0), np.concatenate(aw1), np.concatenate(awr)
    cv.paint_tubes(p0, p1, radius + 0.3 + 0.15 * radius, 30.0, "airway_wall")
    cv.paint_tubes(p0, p1, radius, -995.0, "airway")


def _add_fine_texture(cv: _Canvas, fine: np.ndarray) -> None:
    """Fine tissue texture with a per-label amplitude (the lungs got theirs when painted); floor at air."""
    amp = np.zeros(256, np.float32)
    for name, a in _TEXTURE_HU.items():
        amp[LABELS[name]] = a
    cv.hu += amp[cv.labels] * fine
    np.maximum(cv.hu, -1000.0, out=cv.hu)  # nothing is less dense than air


#: Amplitude (HU) of the fine texture added to each label.
_TEXTURE_HU = {
    "pad": 5.0,
    "skin": 4.0,
    "fat": 4.0,
    "muscle": 4.0,
    "bone_cancellous": 15.0,
    "mediastinum": 6.0,
    "abdomen": 4.0,
    "heart": 3.0,
    "great_vessels": 2.0,
    "airway": 3.0,
    "nodule_solid": 5.0,
    "nodule_ggo": 25.0,
    "emphysema": 8.0,
    "bone_cortical": 20.0,
}


def _paint_spine_2d(c2, X2, Y2):
    """Vertebral body (cancellous core), neural arch, canal and processes on the 2D canvas."""
    rv = np.hypot(X2 / 1.1, Y2 - _Y_SPINE)[None]
    c2.paint(c2.alpha(17.0 - rv), 950.0, "bone_cortical")
    c2.paint(c2.alpha(15.2 - rv), 250.0, "bone_cancellous")
    yc = _Y_SPINE + 27.0
    segs = [
        ((0, yc + 10), (0, yc + 34), 5.0),
        ((6, yc - 2), (32, yc + 4), 5.0),
        ((-6, yc - 2), (-32, yc + 4), 5.0),
    ]
    dist = np.min(np.stack([_seg_dist2d(X2, Y2, a, b) - r for a, b, r in segs]), 0)
    c2.paint(c2.alpha(-dist)[None], 950.0, "bone_cortical")
    c2.paint(c2.alpha(-dist - 1.8)[None], 240.0, "bone_cancellous")
    rc = np.hypot(X2, Y2 - yc)[None]
    c2.paint(c2.alpha(14.0 - rc), 950.0, "bone_cortical")
    c2.paint(c2.alpha(9.0 - rc), 15.0, "spinal_canal")


def _paint_bones(cv, anat, X, Y, Z, X2, Y2, th, body_depth, fat_t):
    # intervertebral discs: 5 mm every 27 mm
    b0, b1 = cv._box(np.array([-20.0, _Y_SPINE - 18, -1e4]), np.array([20.0, _Y_SPINE + 18, 1e4]))
    sl = np.s_[b0[2] : b1[2], b0[1] : b1[1], b0[0] : b1[0]]
    rv = np.hypot(X[..., sl[2]] / 1.1, Y[:, sl[1]] - _Y_SPINE)
    disc = np.mod(Z[sl[0]] - 7.0, 27.0) < 5.0
    cv.paint(np.where(disc, cv.alpha(16.0 - rv), 0.0).astype(np.float32), 90.0, "disc", sl)

    # ribs: 12 per side, from the spine round to the front, descending anteriorly
    r0, r1, rr, cart = [], [], [], []
    for k in range(12):
        zk = 92.0 - 22.0 * k
        end = np.pi / 2 - (2.4 + 0.3 * k if k < 2 else (2.7 if k >= 10 else 2.85))
        phis = np.linspace(np.pi / 2 - 0.32, end, 28)
        frac = (np.pi / 2 - 0.32 - phis) / (np.pi / 2 - 0.32 - end)
        zz = zk - 48.0 * frac**1.3 + 3.0 * np.sin(np.pi * frac)
        for sgn in (1, -1):
            thetas = phis if sgn > 0 else np.pi - phis
            w = anat.wall(thetas)
            rad = anat.body_radius(thetas) - (w[0] + w[1] + w[2]) - 5.5
            pts = np.stack([rad * np.cos(thetas), _CY + rad * np.sin(thetas), zz], 1)
            a, b, _ = _polyline(pts, 5.0)
            r0.append(a)
            r1.append(b)
            rr.append(np.full(len(a), 5.0))
            if k < 7:  # costal cartilage to the sternum
                ys = _CY - _B_ANT + 2 + 12 + 10
                cart.append((pts[-1], np.array([sgn * 14.0, ys, zz[-1] - 8.0])))
    zlo, zhi = float(Z.min()) - 12, float(Z.max()) + 12
    r0, r1, rr = np.concatenate(r0), np.concatenate(r1), np.concatenate(rr)
    keep = (np.maximum(r0[:, 2], r1[:, 2]) > zlo) & (np.minimum(r0[:, 2], r1[:, 2]) < zhi)
    cv.paint_tubes(r0[keep], r1[keep], rr[keep], 950.0, "bone_cortical")
    cv.paint_tubes(r0[keep], r1[keep], rr[keep] - 1.6, 240.0, "bone_cancellous")
    if cart:
        c0 = np.array([c[0] for c in cart])
        c1 = np.array([c[1] for c in cart])
        keep = (np.maximum(c0[:, 2], c1[:, 2]) > zlo) & (np.minimum(c0[:, 2], c1[:, 2]) < zhi)
        cv.paint_tubes(c0[keep], c1[keep], np.full(int(keep.sum()), 4.5), 120.0, "cartilage")

    # sternum: anterior midline, body from z=-110 to +45, wider manubrium above
    ys = _CY - _B_ANT + 2 + 12 + 9
    b0, b1 = cv._box(np.array([-30.0, ys - 10, -1e4]), np.array([30.0, ys + 10, 1e4]))
    sl = np.s_[b0[2] : b1[2], b0[1] : b1[1], b0[0] : b1[0]]
    Zs = Z[sl[0]]
    half_w = np.where(Zs > 45, 26.0, 15.0) * ((Zs > -110) & (Zs < 85))
    rs = np.sqrt((X[..., sl[2]] / np.maximum(half_w, 1e-3)) ** 2 + ((Y[:, sl[1]] - ys) / 6.5) ** 2)
    dep = np.where(half_w > 0, (1 - rs) * 6.5, -1e3)
    cv.paint(cv.alpha(dep), 950.0, "bone_cortical", sl)
    cv.paint(cv.alpha(dep - 1.5), 260.0, "bone_cancellous", sl)

    # scapulae: curved plates behind the ribs, z = -45..90, narrowing downward
    k = np.flatnonzero((Z[:, 0, 0] > -45) & (Z[:, 0, 0] < 90))
    if k.size == 0:
        return
    sl = np.s_[k[0] : k[-1] + 1]
    frac = np.clip((Z[sl] + 45.0) / 135.0, 0, 1)
    sc_d = 2 + fat_t + 8.0  # depth from skin (2D)
    dd = np.minimum(body_depth - sc_d, sc_d + 6.0 - body_depth)[None]
    for sgn in (1, -1):
        t = th if sgn > 0 else np.pi - np.where(th < -np.pi / 2, th + 2 * np.pi, th)
        lo = np.pi / 2 - 0.55 - 0.65 * frac
        hi = np.pi / 2 - 0.45
        dep = np.minimum(np.minimum(t[None] - lo, hi - t[None]) * 120.0, dd)
        cv.paint(cv.alpha(dep), 900.0, "bone_cortical", sl)
        cv.paint(cv.alpha(dep - 1.6), 230.0, "bone_cancellous", sl)


def _seg_dist2d(x, y, a, b):
    d = np.asarray(b[:2], float) - np.asarray(a[:2], float)
    dd = float(d @ d) or 1e-12
    px, py = x - a[0], y - a[1]
    t = np.clip((px * d[0] + py * d[1]) / dd, 0, 1)
    return np.hypot(px - t * d[0], py - t * d[1])


def _paint_nodules(cv, anat, X, Y, Z, seed, z_range=None):
    """Two solid nodules and one ground-glass nodule at random lung positions inside the slab.

    ``z_range`` (mm) fixes the range the positions are drawn from, so a taller rebuild of the same
    phantom (breathing motion) places the nodules where the original slab had them.
    """
    rng = np.random.default_rng([seed, 3])
    zmin, zmax = (
        (float(Z.min()), float(Z.max())) if z_range is None else (float(z_range[0]), float(z_range[1]))
    )
    out = []
    for kind, radius_range, hu in (
        ("nodule_solid", (3.0, 8.0), 45.0),
        ("nodule_solid", (3.0, 6.0), 40.0),
        ("nodule_ggo", (5.0, 10.0), -560.0),
    ):
        r = rng.uniform(*radius_range)
        lob = rng.normal(0, 0.12, 3)
        zlo, zhi = zmin + min(r, 0.5 * (zmax - zmin)), max(zmax - r, zmin + min(r, 0.5 * (zmax - zmin)))
        cand = np.column_stack(
            [rng.uniform(-140, 140, 400), rng.uniform(-110, 80, 400), rng.uniform(zlo, zhi, 400)]
        )
        ok = np.flatnonzero(anat.lung_points_inside(cand, margin=r + 3.0))
        if ok.size == 0:
            continue
        c = cand[ok[0]]
        b0, b1 = cv._box(c - 1.5 * r - 2 * cv.h, c + 1.5 * r + 2 * cv.h)
        sl = np.s_[b0[2] : b1[2], b0[1] : b1[1], b0[0] : b1[0]]
        dx, dy, dz = X[..., sl[2]] - c[0], Y[:, sl[1]] - c[1], Z[sl[0]] - c[2]
        d = np.sqrt(dx**2 + dy**2 + dz**2)
        theta = np.arctan2(dy, dx)
        phi = np.arctan2(dz, np.hypot(dx, dy))
        rr = r * (1 + lob[0] * np.cos(3 * theta) + lob[1] * np.sin(2 * phi) + lob[2] * np.cos(5 * theta))
        if kind == "nodule_ggo":
            a = np.clip((rr - d) / (2.5 * cv.h) + 0.5, 0, 1).astype(np.float32)
        else:
            a = cv.alpha(rr - d)
        cv.paint(a, hu, kind, sl)
        out.append({"kind": kind, "centre_mm": [float(v) for v in c], "radius_mm": float(r), "hu": hu})
    return out
