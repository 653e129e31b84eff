"""The comparison views: side-by-side linked layout, window presets, the difference overlay, tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import slicer
import slicer.util  # noqa: F401  (slicer-core does not import it on ``import slicer``)

from IPv2DenoiseLib.app.slicer_support.scene import (
    add_volume_node,
    mrml_scene,
    place_in_study,
    update_node_from_volume,
    volume_from_node,
)
from IPv2DenoiseLib.core.display import DISPLAY_PRESETS
from IPv2DenoiseLib.core.errors import UserError

#: ``vtkMRMLLayoutNode.SlicerLayoutSideBySideView``: Red (left) and Yellow (right), both axial.
SIDE_BY_SIDE_LAYOUT = 29
#: (window, level) presets in HU, by name (from :data:`IPv2DenoiseLib.core.display.DISPLAY_PRESETS`).
WINDOW_PRESETS = {name: (w.width, w.level) for name, w in DISPLAY_PRESETS.items()}


def set_window_level(nodes: Sequence[Any], window: float, level: float) -> None:
    """Fixed window/level (HU) on every volume node's display node."""
    for node in nodes:
        if node is None:
            continue
        display = node.GetDisplayNode()
        if display is None:
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(float(window), float(level))


def difference_node(original_node, denoised_node, *, name: str | None = None, existing=None):
    """A volume ``denoised - original`` (HU) with the original's geometry (W/L 200/0)."""
    before, after = volume_from_node(original_node), volume_from_node(denoised_node)
    if before.shape != after.shape:
        raise UserError(f"difference: shapes differ ({before.shape} vs {after.shape})")
    diff = before.with_array(after.array - before.array)
    if existing is not None:
        update_node_from_volume(existing, diff)
        node = existing
    else:
        node = add_volume_node(
            diff, name or f"{denoised_node.GetName()} difference", scene=original_node.GetScene()
        )
    set_window_level([node], 200.0, 0.0)
    place_in_study(original_node, node)
    return node


def composite_node(view_name: str, *, scene=None):
    """The slice composite node of view ``view_name`` (Red, Yellow, Green), created if absent."""
    scene = mrml_scene(scene)
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetLayoutName() == view_name:
            return node
    node = slicer.vtkMRMLSliceCompositeNode()
    node.SetLayoutName(view_name)
    node.SetSingletonTag(view_name)
    return scene.AddNode(node)


def layout_node(scene):
    """The scene's layout node (created when absent, as in a bare scene)."""
    nodes = scene.GetNodesByClass("vtkMRMLLayoutNode")
    if nodes.GetNumberOfItems():
        return nodes.GetItemAsObject(0)
    node = slicer.vtkMRMLLayoutNode()
    node.SetSingletonTag("vtkMRMLLayoutNode")
    return scene.AddNode(node)


def setup_comparison(original_node, denoised_node, *, preset: str = "Lung", scene=None) -> int:
    """Side-by-side layout: original in Red (left), denoised in Yellow (right), linked views.

    Both views get hot-linked control (pan/zoom/slice follow while dragging) and the same
    window/level ``preset`` (see :data:`WINDOW_PRESETS`). Returns the previous layout id, for
    a "Restore layout" button.
    """
    scene = mrml_scene(scene)
    layout = layout_node(scene)
    previous = int(layout.GetViewArrangement())
    layout.SetViewArrangement(SIDE_BY_SIDE_LAYOUT)
    for view, node in (("Red", original_node), ("Yellow", denoised_node)):
        comp = composite_node(view, scene=scene)
        comp.SetBackgroundVolumeID(node.GetID())
        comp.SetForegroundVolumeID(None)
        comp.SetLinkedControl(True)
        comp.SetHotLinkedControl(True)
    window, level = WINDOW_PRESETS[preset]
    set_window_level([original_node, denoised_node], window, level)
    crosshairs = scene.GetNodesByClass("vtkMRMLCrosshairNode")
    for i in range(crosshairs.GetNumberOfItems()):
        crosshairs.GetItemAsObject(i).SetCrosshairMode(slicer.vtkMRMLCrosshairNode.ShowSmallBasic)
    if hasattr(slicer, "app") and slicer.app is not None:  # inside Slicer: fit both views
        lm = slicer.app.layoutManager()
        if lm is not None:
            for view in ("Red", "Yellow"):
                widget = lm.sliceWidget(view)
                if widget is not None:
                    widget.sliceLogic().FitSliceToAll()
    return previous


def restore_layout(layout_id: int, *, scene=None) -> None:
    """Go back to the layout :func:`setup_comparison` returned."""
    layout_node(mrml_scene(scene)).SetViewArrangement(int(layout_id))


def show_table(table_node) -> None:
    """Inside Slicer: switch to the current layout plus a table view showing ``table_node``."""
    if not (hasattr(slicer, "app") and hasattr(slicer, "modules")):
        return
    lm = slicer.app.layoutManager()
    tables_logic = slicer.modules.tables.logic()
    lm.setLayout(tables_logic.GetLayoutWithTable(lm.layout))
    selection = slicer.app.applicationLogic().GetSelectionNode()
    selection.SetActiveTableID(table_node.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()


__all__ = [
    "SIDE_BY_SIDE_LAYOUT",
    "WINDOW_PRESETS",
    "composite_node",
    "difference_node",
    "layout_node",
    "restore_layout",
    "set_window_level",
    "setup_comparison",
    "show_table",
]
