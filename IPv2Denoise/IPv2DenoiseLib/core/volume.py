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

    def axial_plan(self) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]] | None:
        """How to make the slices axial: ``(order, flips)`` for :meth:`reoriented`, None when they are.

        ``order[j]`` is the ITK axis (0 = x, 1 = y, 2 = z) that becomes axis ``j`` so that the new
        axes point along L, P, S (DICOM patient axes), ``flips[j]`` whether it is reversed. A
        volume whose z axis already runs along the patient's S-I axis needs nothing (None); so does
        an oblique one whose axes are not each closest to a different patient axis.
        """
        axes = np.asarray(self.direction, dtype=float).reshape(3, 3)
        patient_axis = np.argmax(np.abs(axes), axis=0)  # for each array axis, its closest patient axis
        if sorted(patient_axis.tolist()) != [0, 1, 2] or patient_axis[2] == 2:
            return None
        order = tuple(int(np.flatnonzero(patient_axis == j)[0]) for j in range(3))
        flips = tuple(bool(axes[j, order[j]] < 0) for j in range(3))
        return order, flips  # type: ignore[return-value]

    def reoriented(self, order: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
        """The same voxels with the array axes permuted/reversed (exact: no interpolation).

        New ITK axis ``j`` is old axis ``order[j]``, reversed when ``flips[j]``; the geometry is
        updated so every voxel keeps its physical position. See :meth:`axial_plan`.
        """
        axes = np.asarray(self.direction, dtype=float).reshape(3, 3)
        size_xyz = self.shape[::-1]
        origin = np.asarray(self.origin, dtype=float).copy()
        columns, spacing = [], []
        for j in range(3):
            a = order[j]
            column = axes[:, a] * (-1.0 if flips[j] else 1.0)
            if flips[j]:
                origin += (size_xyz[a] - 1) * self.spacing[a] * axes[:, a]
            columns.append(column)
            spacing.append(self.spacing[a])
        # numpy axis of ITK axis a is 2 - a
        array = np.transpose(self.array, [2 - order[2], 2 - order[1], 2 - order[0]])
        flip_axes = tuple(2 - j for j in range(3) if flips[j])
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        return replace(
            self,
            array=np.ascontiguousarray(array),
            spacing=tuple(spacing),
            origin=tuple(origin),
            direction=tuple(np.column_stack(columns).ravel()),
        )

    @staticmethod
    def inverse_plan(
        order: tuple[int, int, int], flips: tuple[bool, bool, bool]
    ) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """The ``(order, flips)`` that undoes :meth:`reoriented` with ``(order, flips)``."""
        inverse = [0, 0, 0]
        inverse_flips = [False, False, False]
        for j, a in enumerate(order):
            inverse[a], inverse_flips[a] = j, flips[j]
        return tuple(inverse), tuple(inverse_flips)  # type: ignore[return-value]

    def same_geometry(self, other: Volume, *, atol: float = 1e-3) -> bool:
        """True when shape, spacing, origin and direction agree within ``atol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )
