"""The volume contract shared by every step: float32 HU ``[z, y, x]`` plus geometry and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units with its physical geometry.

    Attributes
    ----------
    array : float32 ndarray, shape (z, y, x)
        Voxel values in HU. Treated as read-only by every step; steps return new volumes.
    spacing : (sx, sy, sz) in mm, ITK order (x first).
    origin : (ox, oy, oz) in mm, LPS patient coordinates (ITK/DICOM convention).
    direction : 3x3 direction cosines, row-major, ITK order (columns are the x, y, z axes).
    meta : identifiers and acquisition values (patient/study/series ids, kVp, mAs, CTDI, source).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D [z, y, x], got shape {arr.shape}")
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.ravel(self.direction)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm³ / 1000)."""
        sx, sy, sz = self.spacing
        return sx * sy * sz / 1000.0

    def with_array(self, array: np.ndarray, **meta_updates: Any) -> Volume:
        """A new volume with the same geometry and ``array`` (shape must match)."""
        array = np.asarray(array, dtype=np.float32)
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return replace(self, array=array, meta={**self.meta, **meta_updates})

    def same_geometry(self, other: Volume, *, atol: float = 1e-3) -> bool:
        """True when shape, spacing, origin and direction agree within ``atol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )
