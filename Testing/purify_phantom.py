"""A small synthetic chest pair for the mask and purification tests (not a test module itself).

Body ellipse (40 HU) with a spine, two lungs (-850 HU) with vessels, a trachea joining them by two
bronchi, a gas bubble enclosed in the abdomen, a full-width table below the patient, two arms
beside the trunk, outside air -1000 HU. The ULDCT's lungs are shifted by ``shift_px`` (breathing)
and it is much noisier than the NDCT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACING = (1.5, 1.5, 2.5)  # (sx, sy, sz) mm
SHAPE = (20, 96, 112)
BODY_CENTRE, BODY_AXES = (44, 56), (30, 40)
LUNG_CENTRE_Z, LUNG_AXES = 11, (9, 18, 13)
LUNG_X = (36, 76)
TRACHEA = dict(y=34, x=56, r=3, z_stop=8)  # z 0..7 a separate tube, bronchi at z == 8
BUBBLE = dict(y=64, x=36, r=3, z=(17, 20))
TABLE_ROWS = (80, 83)
ARM_X = (7, 105)


@dataclass
class Chest:
    hu: np.ndarray
    body: np.ndarray  # trunk incl. lungs, no table/arms (filled)
    lungs: np.ndarray  # lung ellipsoids incl. vessels
    trachea: np.ndarray  # the separate tube part (z < z_stop)
    bubble: np.ndarray
    table: np.ndarray
    arms: np.ndarray


def chest(*, lung_shift_px: int = 0, noise_hu: float = 0.0, seed: int = 0, shape=SHAPE) -> Chest:
    nz, ny, nx = shape
    z, y, x = np.mgrid[:nz, :ny, :nx].astype(np.float32)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - BODY_CENTRE[0]) / BODY_AXES[0]) ** 2 + ((x - BODY_CENTRE[1]) / BODY_AXES[1]) ** 2 <= 1
    hu[body] = 40.0
    spine = (y - 66) ** 2 + (x - 56) ** 2 <= 25
    hu[spine] = 400.0
    lungs = np.zeros(shape, dtype=bool)
    for cx in LUNG_X:
        lungs |= ((z - LUNG_CENTRE_Z) / LUNG_AXES[0]) ** 2 + (
            (y - 42 - lung_shift_px) / LUNG_AXES[1]
        ) ** 2 + ((x - cx) / LUNG_AXES[2]) ** 2 <= 1
    hu[lungs] = -850.0
    vessels = np.zeros(shape, dtype=bool)
    for vy, vx in ((40, 32), (48, 40), (38, 78), (50, 72)):
        vessels |= ((y - vy - lung_shift_px) ** 2 + (x - vx) ** 2 <= 2.5) & lungs
    hu[vessels] = 40.0
    tube = ((y - TRACHEA["y"]) ** 2 + (x - TRACHEA["x"]) ** 2 <= TRACHEA["r"] ** 2) & (z < TRACHEA["z_stop"])
    bronchi = (z == TRACHEA["z_stop"]) & (np.abs(y - TRACHEA["y"]) <= 1) & (np.abs(x - 56) <= 12)
    hu[tube | bronchi] = -1000.0
    bubble = (
        ((y - BUBBLE["y"]) ** 2 + (x - BUBBLE["x"]) ** 2 <= BUBBLE["r"] ** 2)
        & (z >= BUBBLE["z"][0])
        & (z < BUBBLE["z"][1])
    )
    hu[bubble] = -1000.0
    table = (y >= TABLE_ROWS[0]) & (y < TABLE_ROWS[1])
    hu[table] = 200.0
    arms = np.zeros(shape, dtype=bool)
    for ax in ARM_X:
        arms |= ((y - 44) / 12) ** 2 + ((x - ax) / 5) ** 2 <= 1
    hu[arms] = 40.0
    if noise_hu:
        hu = hu + np.random.default_rng(seed).normal(0.0, noise_hu, shape).astype(np.float32)
    return Chest(hu.astype(np.float32), body, lungs, tube, bubble, table, arms)


def misaligned_pair(*, shift_px: int = 3, u_noise: float = 60.0, n_noise: float = 8.0, shape=SHAPE):
    """(U, N, chest_U, chest_N): ULDCT noisier and with the lungs shifted by ``shift_px`` in y."""
    cu = chest(lung_shift_px=shift_px, noise_hu=u_noise, seed=1, shape=shape)
    cn = chest(lung_shift_px=0, noise_hu=n_noise, seed=2, shape=shape)
    return cu.hu, cn.hu, cu, cn
