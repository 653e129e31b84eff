"""ROI metrics in the scene: the before/after table of two volume nodes and its table node."""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util  # noqa: F401  (slicer-core does not import it on ``import slicer``)
import vtk

from IPv2DenoiseLib.app.slicer_support.dicom import check_denoised_from
from IPv2DenoiseLib.app.slicer_support.scene import mrml_scene, volume_from_node
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable


def table_node_from_metrics(table: MetricsTable, *, node=None, name: str = "IPv2 ROI metrics", scene=None):
    """Fill (or create) a ``vtkMRMLTableNode`` with a :class:`MetricsTable`'s columns.

    Columns whose values are all numbers (or None, stored as NaN) become double columns, the rest
    string columns; the order and names are the table's.
    """
    scene = mrml_scene(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    elif not node.GetName().startswith(name):  # a reused table takes the name of what it now holds
        node.SetName(scene.GenerateUniqueName(name))
    vtable = node.GetTable()
    was_modifying = node.StartModify()
    vtable.Initialize()
    for column, values in table.as_dict().items():
        numeric = all(
            v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)) for v in values
        )
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(column)
        for v in values:
            if numeric:
                array.InsertNextValue(float("nan") if v is None else float(v))
            else:
                array.InsertNextValue("" if v is None else str(v))
        vtable.AddColumn(array)
    node.Modified()
    node.EndModify(was_modifying)
    return node


def _numpy_matrix(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _volume_to_world(volume_node) -> np.ndarray:
    """The 4x4 matrix from the volume's RAS to world: where the user sees it, transforms included.

    A volume left under a registration transform (not hardened) is drawn where the transform puts
    it, and the ROI is placed on what is drawn; a non-linear transform has no matrix and is refused.
    """
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise UserError(
            f"ROI metrics: volume {volume_node.GetName()!r} is under a non-linear transform; "
            "harden the transform first (Data module, right click, Harden transform)"
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _numpy_matrix(m)


def roi_mask(volume_node, roi_node) -> np.ndarray:
    """Boolean ``[z, y, x]`` mask of the voxels whose centres lie inside a markups ROI (box).

    Both are taken where the user sees them, in world coordinates: the volume's transform (if it
    is under one) and the ROI's own are applied.
    """
    shape = slicer.util.arrayFromVolume(volume_node).shape
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras_m = _volume_to_world(volume_node) @ _numpy_matrix(m)  # IJK to world
    roi_to_world = roi_node.GetObjectToWorldMatrix()  # box centred at 0 and axis-aligned in "object"
    world_to_roi = np.linalg.inv(_numpy_matrix(roi_to_world))
    half = 0.5 * np.asarray(roi_node.GetSize(), dtype=float)
    # only look at the voxels inside the IJK bounding box of the ROI's 8 corners
    corners = np.array(
        [
            [sx * half[0], sy * half[1], sz * half[2], 1.0]
            for sx in (-1, 1)
            for sy in (-1, 1)
            for sz in (-1, 1)
        ]
    ).T
    roi_to_world_np = np.linalg.inv(world_to_roi)
    corners_ijk = (np.linalg.inv(ijk_to_ras_m) @ roi_to_world_np @ corners)[:3]
    size_ijk = np.array(shape[::-1])
    lo = np.clip(np.floor(corners_ijk.min(axis=1)).astype(int), 0, size_ijk)
    hi = np.clip(np.ceil(corners_ijk.max(axis=1)).astype(int) + 1, 0, size_ijk)
    mask = np.zeros(shape, dtype=bool)
    if np.any(hi <= lo):
        return mask
    k, j, i = np.meshgrid(*(np.arange(lo[a], hi[a], dtype=float) for a in (2, 1, 0)), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    local = (world_to_roi @ ijk_to_ras_m @ ijk)[:3]
    inside = np.all(np.abs(local) <= half[:, None] + 1e-6, axis=0).reshape(k.shape)
    mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = inside
    return mask


def roi_table(
    original_node, denoised_node, *, roi_node=None, segmentation_node=None, segment_id=None
) -> MetricsTable:
    """Before/after ROI table for two volume nodes on the same grid.

    Regions: automatic lung parenchyma, soft tissue and background air (masks of the original
    volume, robust to its noise, used for both so the voxels are the same), plus ``user ROI`` from
    a markups ROI node and/or
    ``segment`` from a segmentation.
    """
    from IPv2DenoiseLib.imaging.metrics import scan_comparison_table  # lazy: needs scikit-image

    check_denoised_from(denoised_node, original_node)
    before, after = volume_from_node(original_node), volume_from_node(denoised_node)
    if not before.same_geometry(after):
        raise UserError("metrics: the original and denoised volumes are on different grids")
    extra = {}
    if roi_node is not None:
        extra["user ROI"] = roi_mask(original_node, roi_node)
    if segmentation_node is not None and segment_id:
        seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, original_node)
        extra[segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()] = seg.astype(bool)
    # the same ROIs and numbers as `ipv2-denoise demo`, `info` and the web app
    return scan_comparison_table(before.array, after.array, spacing=before.spacing, extra_regions=extra)


__all__ = ["roi_mask", "roi_table", "table_node_from_metrics"]
