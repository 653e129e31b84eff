"""MRML side of the module: volume nodes <-> :class:`Volume`, tables, layouts, subject hierarchy.

With dependencies.py, the only package files that import ``slicer``/``vtk`` (app layer). Everything here works on a bare
``vtkMRMLScene`` (PyPI ``slicer-core``, used by the tests) as well as inside the Slicer
application; GUI-only steps (switching the table layout, the DICOM database) are feature-detected.

Geometry: a Volume is ITK/DICOM LPS (``origin``, ``direction`` row-major with the x, y, z axes as
columns); a volume node is RAS (``IJKToRAS``). Converting flips the sign of the first two rows
(L->R, P->A) of the direction matrix and of the origin; spacing is shared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import slicer.util  # noqa: F401  (slicer-core does not import it on ``import slicer``)
import vtk

from IPv2DenoiseLib import __version__ as package_version
from IPv2DenoiseLib.app.process import BackgroundProcess, ExitCode, JobStatus, denoise_command
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled
from IPv2DenoiseLib.core.resources import models_dir
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable

__all__ = [
    "LPS_TO_RAS",
    "SIDE_BY_SIDE_LAYOUT",
    "WINDOW_PRESETS",
    "DenoiseJob",
    "add_volume_node",
    "composite_node",
    "denoise_node",
    "difference_node",
    "dicom_source_files",
    "export_dicom",
    "ijk_to_ras",
    "registered_model_provenance",
    "place_in_study",
    "safe_name",
    "set_window_level",
    "setup_comparison",
    "table_node_from_metrics",
    "update_node_from_volume",
    "volume_from_node",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: ``vtkMRMLLayoutNode.SlicerLayoutSideBySideView``: Red (left) and Yellow (right), both axial.
SIDE_BY_SIDE_LAYOUT = 29
#: (window, level) presets in HU.
WINDOW_PRESETS = {"Lung": (1500.0, -600.0), "Mediastinal": (400.0, 40.0)}


def safe_name(name: str) -> str:
    """A file-name-safe version of a node name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "volume"


def _scene(scene=None):
    scene = scene or slicer.mrmlScene
    if scene is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene = slicer.vtkMRMLScene() outside Slicer")
    return scene


# ---------------------------------------------------------------------------------- geometry


def ijk_to_ras(volume: Volume) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of ``volume`` (i = x, j = y, k = z array axes)."""
    direction = LPS_TO_RAS @ np.asarray(volume.direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(volume.spacing, dtype=float)[None, :]
    m[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin, dtype=float)
    return m


def _node_geometry(node) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
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
    spacing, origin, direction = _node_geometry(node)
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
    scene = _scene(scene)
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
    :class:`DenoiseJob` instead so torch never loads into the Slicer process.
    """
    result = denoise(volume_from_node(input_node))
    return _import_result(input_node, output_node, result, name=name)


def _import_result(input_node, output_node, result: Volume, *, name: str | None = None):
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


# ------------------------------------------------------------------------------- scene hygiene


def copy_display(source_node, target_node) -> None:
    """Same window/level (and colour table) on the target as on the source."""
    src, dst = source_node.GetDisplayNode(), target_node.GetDisplayNode()
    if src is None or dst is None:
        return
    dst.SetAutoWindowLevel(False)
    dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())


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


# ------------------------------------------------------------------------------------- tables


def table_node_from_metrics(table: MetricsTable, *, node=None, name: str = "IPv2 ROI metrics", scene=None):
    """Fill (or create) a ``vtkMRMLTableNode`` with a :class:`MetricsTable`'s columns.

    Columns whose values are all numbers (or None, stored as NaN) become double columns, the rest
    string columns; the order and names are the table's.
    """
    scene = _scene(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
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


# ------------------------------------------------------------------------------------ layouts


def composite_node(view_name: str, *, scene=None):
    """The slice composite node of view ``view_name`` (Red, Yellow, Green), created if absent."""
    scene = _scene(scene)
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetLayoutName() == view_name:
            return node
    node = slicer.vtkMRMLSliceCompositeNode()
    node.SetLayoutName(view_name)
    node.SetSingletonTag(view_name)
    return scene.AddNode(node)


def _layout_node(scene):
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
    scene = _scene(scene)
    layout = _layout_node(scene)
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
    _layout_node(_scene(scene)).SetViewArrangement(int(layout_id))


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


# --------------------------------------------------------------------------------------- DICOM


def dicom_source_files(node, *, database=None) -> list[str] | None:
    """The source DICOM files of a node loaded from DICOM, in the node's k (z) order, or None.

    Uses the node's ``DICOM.instanceUIDs`` attribute and the DICOM database
    (``slicer.dicomDatabase`` inside Slicer), then sorts the files by their position along the
    volume's slice axis so file ``k`` is slice ``k``.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = database if database is not None else getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return None
    files = [database.fileForInstance(uid) for uid in uids]
    if not all(files) or not all(os.path.exists(f) for f in files):
        return None
    import pydicom  # lazy: Slicer loads this module before ensure_in_slicer installs pydicom

    _, origin, direction = _node_geometry(node)
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    keyed = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        ipp = np.asarray(getattr(ds, "ImagePositionPatient", origin), dtype=float)
        keyed.append((float((ipp - np.asarray(origin)) @ normal), f))
    return [f for _, f in sorted(keyed)]


def registered_model_provenance(model_name: str):
    """:class:`ModelProvenance` of a model in ``Resources/Models/models.json`` (no torch needed).

    Shipped models are versioned with the package, as in ``ipv2-denoise denoise --dicom``.
    """
    from IPv2DenoiseLib.io.dicom_export import ModelProvenance  # lazy: needs pydicom

    try:
        registry = json.loads((models_dir() / "models.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UserError):
        registry = {}
    key = registry.get("default") if model_name == "default" else model_name
    entry = (registry.get("models") or {}).get(key) or {}
    card = {"sha256": entry.get("sha256"), "strategy": "ipv2"}
    card_file = models_dir() / Path(entry["file"]).with_suffix(".json") if entry.get("file") else None
    if card_file is not None and card_file.exists():
        card.update(json.loads(card_file.read_text(encoding="utf-8")))
    version = package_version if entry else "unversioned"  # not a shipped model: no version known
    return ModelProvenance.from_card(key or model_name or "unknown", card, default_version=version)


def export_dicom(
    denoised_node,
    out_dir: str | os.PathLike,
    *,
    source_node=None,
    model_name: str = "",
    send_to: str | None = None,
    calling_aet: str | None = None,
    timeout: float = 10.0,
    database=None,
):
    """Write the denoised node as a derived DICOM series, optionally store it on a PACS.

    The same writer as ``ipv2-denoise denoise --dicom`` (:func:`~IPv2DenoiseLib.io.dicom_export.
    export_derived_series`): in the source node's study when it was loaded from DICOM (its files
    come from the DICOM database), otherwise a new CT series. ``send_to`` is ``HOST:PORT:AET`` or a
    DICOMweb URL (the module's *PACS* setting); the files stay in ``out_dir`` whatever the PACS says.

    Returns
    -------
    (list of Path, SendReport or None)

    Raises
    ------
    UserError
        Export problems; PACS unreachable, association rejected, or instances refused (named).
    """
    # lazy: Slicer loads this module before ensure_in_slicer installs pydicom and pynetdicom
    from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions, export_derived_series
    from IPv2DenoiseLib.io.dicom_net import DEFAULT_CALLING_AET, parse_destination, send

    target = parse_destination(send_to) if send_to else None  # a bad setting fails before writing
    sources = dicom_source_files(source_node, database=database) if source_node is not None else None
    options = DerivedSeriesOptions(model=registered_model_provenance(model_name or "default"))
    files = export_derived_series(
        volume_from_node(denoised_node), out_dir, source_files=sources, options=options
    )
    report = None
    if target is not None:
        report = send(files, target, calling_aet=calling_aet or DEFAULT_CALLING_AET, timeout=timeout)
        report.raise_for_failures()
    return files, report


# ---------------------------------------------------------------------------- background job


class DenoiseJob:
    """One non-blocking denoising run of a volume node through the ``ipv2-denoise`` subprocess.

    ``start()`` writes the input to a temp NRRD and launches the child; the caller polls
    :meth:`poll` (a QTimer in the widget) or calls :meth:`wait`; :meth:`finish` imports the
    result into the output node (created only now when None, so a failed or cancelled run
    leaves the scene as it was) and removes the temp folder.

    Parameters
    ----------
    command : list of str, optional
        Replace the command line (tests); ``{input}`` and ``{output}`` are substituted.
    """

    def __init__(
        self,
        input_node,
        output_node=None,
        *,
        model: str,
        device: str = "auto",
        remove_background: bool = True,
        adapt: bool = False,
        ensemble: int = 1,
        python: str | None = None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.input_node = input_node
        self.output_node = output_node
        self.model, self.device, self.remove_background = model, device, remove_background
        self.adapt, self.ensemble = adapt, ensemble
        self.python, self.command, self.env = python, command, env
        self.workdir: Path | None = None
        self.process: BackgroundProcess | None = None

    def start(self) -> DenoiseJob:
        from IPv2DenoiseLib.io.volumes import write_volume  # lazy: needs pydicom (see dicom_source_files)

        volume = volume_from_node(self.input_node)
        self.workdir = Path(tempfile.mkdtemp(prefix="IPv2Denoise-"))
        in_path, out_path = self.workdir / "input.nrrd", self.workdir / "output.nrrd"
        write_volume(volume, in_path)
        if self.command is not None:
            args = [
                str(a).replace("{input}", str(in_path)).replace("{output}", str(out_path))
                for a in self.command
            ]
        else:
            args = denoise_command(
                in_path,
                out_path,
                model=self.model,
                device=self.device,
                remove_background=self.remove_background,
                adapt=self.adapt,
                ensemble=self.ensemble,
                python=self.python,
            )
        env = dict(self.env or {})
        lib_parent = str(Path(__file__).resolve().parent.parent)  # so ``-m IPv2DenoiseLib`` resolves
        env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, os.environ.get("PYTHONPATH", "")) if p)
        self.output_path = out_path
        self.process = BackgroundProcess(args, env=env).start()
        return self

    @property
    def status(self) -> JobStatus:
        return self.process.status if self.process else JobStatus()

    def poll(self) -> JobStatus:
        self.process.poll()
        return self.process.status

    def done(self) -> bool:
        return self.process is not None and self.process.finished()

    def cancel(self) -> None:
        if self.process is not None:
            self.process.cancel()

    def wait(self, timeout: float | None = None):
        self.process.wait(timeout=timeout)
        return self.finish()

    def finish(self):
        """Import the result (returns the output node), or raise; always cleans up.

        Raises
        ------
        UserError
            The child failed (its last stderr line) or was cancelled (``Cancelled``).
        """
        from IPv2DenoiseLib.io.volumes import read_volume  # lazy: needs pydicom

        try:
            self.process.poll()  # fold the last records (result, warning) into the status
            code = self.process.returncode
            if code == ExitCode.CANCELLED or self.process.cancel_requested:
                raise Cancelled("denoising cancelled; the scene was left unchanged")
            if code != ExitCode.OK or not self.output_path.exists():
                raise UserError(f"denoising failed: {self.process.error_message()}")
            result = read_volume(self.output_path, force=True)
            self.output_node = _import_result(self.input_node, self.output_node, result)
            for message in self.process.status.warnings:
                logging.warning("IPv2 Denoise: %s", message)
            return self.output_node
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


# ---------------------------------------------------------------------------------- ROI metrics


def roi_mask(volume_node, roi_node) -> np.ndarray:
    """Boolean ``[z, y, x]`` mask of the voxels whose centres lie inside a markups ROI (box)."""
    shape = slicer.util.arrayFromVolume(volume_node).shape
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras_m = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    roi_to_world = roi_node.GetObjectToWorldMatrix()  # box centred at 0 and axis-aligned in "object"
    world_to_roi = np.linalg.inv(
        np.array([[roi_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
    )
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


def automatic_regions(volume: Volume) -> dict[str, np.ndarray]:
    """Lung parenchyma, soft tissue and background air masks (plus ``lungs_whole`` for LAA-950)."""
    from IPv2DenoiseLib.imaging.masks import standard_rois  # lazy: needs scikit-image

    return standard_rois(volume.array, spacing=volume.spacing)


def roi_table(
    original_node, denoised_node, *, roi_node=None, segmentation_node=None, segment_id=None
) -> MetricsTable:
    """Before/after ROI table for two volume nodes on the same grid.

    Regions: automatic lung parenchyma, soft tissue and background air (masks of the original
    volume, robust to its noise, used for both so the voxels are the same), plus ``user ROI`` from
    a markups ROI node and/or
    ``segment`` from a segmentation.
    """
    from IPv2DenoiseLib.imaging.metrics import roi_comparison_table  # lazy: needs scikit-image

    before, after = volume_from_node(original_node), volume_from_node(denoised_node)
    if not before.same_geometry(after):
        raise UserError("metrics: the original and denoised volumes are on different grids")
    regions = automatic_regions(before)  # the same ROIs as `ipv2-denoise demo` and `info`
    lungs = regions.pop("lungs_whole")
    if roi_node is not None:
        regions["user ROI"] = roi_mask(original_node, roi_node)
    if segmentation_node is not None and segment_id:
        seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, original_node)
        regions[segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()] = seg.astype(bool)
    return roi_comparison_table(
        before.array, after.array, regions, lung_key="lung", soft_tissue_key="soft_tissue", laa_mask=lungs
    )
