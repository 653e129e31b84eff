"""Volume nodes and the scene: node <-> :class:`Volume` with exact geometry, new nodes, studies.

Everything here works on a bare ``vtkMRMLScene`` (PyPI ``slicer-core``, used by the tests) as
well as inside the Slicer application.

Geometry: a Volume is ITK/DICOM LPS (``origin``, ``direction`` row-major with the x, y, z axes as
columns); a volume node is RAS (``IJKToRAS``). Converting flips the sign of the first two rows
(L->R, P->A) of the direction matrix and of the origin; spacing is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import slicer
import slicer.util  # noqa: F401  (slicer-core does not import it on ``import slicer``)
import vtk

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def safe_name(name: str) -> str:
    """A file-name-safe version of a node name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "volume"


def mrml_scene(scene=None):
    scene = scene or slicer.mrmlScene
    if scene is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene = slicer.vtkMRMLScene() outside Slicer")
    return scene


def ijk_to_ras(volume: Volume) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of ``volume`` (i = x, j = y, k = z array axes)."""
    direction = LPS_TO_RAS @ np.asarray(volume.direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(volume.spacing, dtype=float)[None, :]
    m[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin, dtype=float)
    return m


def node_geometry(node) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, LPS origin, LPS direction row-major) of a volume node."""
    ras_dirs = np.zeros((3, 3))
    node.GetIJKToRASDirections(ras_dirs)
    spacing = tuple(float(s) for s in node.GetSpacing())
    origin = tuple(LPS_TO_RAS @ np.asarray(node.GetOrigin(), dtype=float))
    direction = tuple((LPS_TO_RAS @ ras_dirs).ravel())
    return spacing, origin, direction


def volume_from_node(node) -> Volume:
    """A :class:`Volume` (float32 HU copy) with the node's exact geometry.

    Raises
    ------
    UserError
        The node has no image data, is not 3-D scalar, or lies under a non-linear transform.
    """
    if node is None or node.GetImageData() is None:
        raise UserError(f"input volume: {getattr(node, 'GetName', lambda: node)()!r} has no image data")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise UserError(f"input volume: {node.GetName()!r} is a label map (a segmentation), not a CT image")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise UserError(f"input volume: {node.GetName()!r} is not a scalar (grey-level) volume")
    if (
        node.GetParentTransformNode() is not None
        and not node.GetParentTransformNode().IsTransformToWorldLinear()
    ):
        raise UserError(f"input volume: {node.GetName()!r} is under a non-linear transform; harden it first")
    array = np.array(slicer.util.arrayFromVolume(node), dtype=np.float32, copy=True)
    if array.ndim != 3:
        raise UserError(f"input volume: {node.GetName()!r} has array shape {array.shape}; need a 3-D volume")
    spacing, origin, direction = node_geometry(node)
    meta: dict[str, Any] = {"name": node.GetName()}
    uids = node.GetAttribute("DICOM.instanceUIDs")
    if uids:
        meta["source"] = "dicom"
        meta["SOPInstanceUIDs"] = uids.split()
    return Volume(array, spacing=spacing, origin=origin, direction=direction, meta=meta)


def update_node_from_volume(node, volume: Volume) -> None:
    """Put ``volume``'s voxels and geometry into an existing scalar volume node."""
    m = ijk_to_ras(volume)
    vtk_m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_m.SetElement(r, c, m[r, c])
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array, dtype=np.float32))
    node.SetIJKToRASMatrix(vtk_m)
    node.Modified()


def add_volume_node(volume: Volume, name: str, *, scene=None):
    """A new ``vtkMRMLScalarVolumeNode`` (with display node) holding ``volume``."""
    scene = mrml_scene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def denoise_node(
    input_node,
    output_node=None,
    *,
    denoise: Callable[[Volume], Volume],
    name: str | None = None,
):
    """Denoise in-process: node -> Volume -> ``denoise`` -> node (created when ``output_node`` is None).

    The synchronous scripting path (and the tests' path with a tiny model); the GUI uses
    :class:`~IPv2DenoiseLib.app.slicer_support.job.DenoiseJob` instead so torch never loads into the Slicer process.
    """
    result = denoise(volume_from_node(input_node))
    return import_result(input_node, output_node, result, name=name)


def import_result(input_node, output_node, result: Volume, *, name: str | None = None):
    """Put a result into ``output_node`` (created when None) with the input's display, transform and study.

    Raises
    ------
    UserError
        The input left its scene while the result was made (the scene was closed, perhaps for the
        next patient, or the node deleted): the result is not put anywhere.
    """
    if input_node.GetScene() is None:
        raise UserError(
            f"input volume {input_node.GetName()!r} left the scene (scene closed or node deleted) while it was "
            "being denoised; the result was discarded"
        )
    if output_node is not None and output_node.GetScene() is None:
        output_node = None  # the chosen output was deleted meanwhile: make a new one
    if output_node is None:
        output_node = add_volume_node(
            result, name or f"{input_node.GetName()} denoised", scene=input_node.GetScene()
        )
    else:
        update_node_from_volume(output_node, result)
        if output_node.GetDisplayNode() is None:
            output_node.CreateDefaultDisplayNodes()
    copy_display(input_node, output_node)
    output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    place_in_study(input_node, output_node)
    return output_node


def copy_display(source_node, target_node) -> None:
    """Same window/level (and colour table) on the target as on the source."""
    src, dst = source_node.GetDisplayNode(), target_node.GetDisplayNode()
    if src is None or dst is None:
        return
    dst.SetAutoWindowLevel(False)
    dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())


def place_in_study(input_node, output_node) -> int | None:
    """Parent the output's subject-hierarchy item under the input's (its study); returns the parent."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(input_node.GetScene())
    if sh is None:
        return None
    in_item = sh.GetItemByDataNode(input_node)
    if not in_item:
        return None
    parent = sh.GetItemParent(in_item)
    if not parent or parent == sh.GetSceneItemID():
        return None
    out_item = sh.GetItemByDataNode(output_node)
    if out_item:
        sh.SetItemParent(out_item, parent)
    else:  # no SH plugin logic (slicer-core): create the item ourselves
        sh.CreateItem(parent, output_node)
    return parent


__all__ = [
    "LPS_TO_RAS",
    "add_volume_node",
    "copy_display",
    "denoise_node",
    "ijk_to_ras",
    "import_result",
    "mrml_scene",
    "node_geometry",
    "place_in_study",
    "safe_name",
    "update_node_from_volume",
    "volume_from_node",
]
