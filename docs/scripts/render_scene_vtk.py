"""Render the module's comparison from a real MRML scene with VTK offscreen (no Slicer GUI needed).

    python docs/scripts/render_scene_vtk.py [--out docs/figures/slicer_scene_render.png]

Runs the module's workflow on the bundled sample with the Logic's building blocks
(``app.slicer_support`` on the PyPI ``slicer-core`` scene): load the sample ULDCT as a volume node,
denoise it in-process with the shipped model into a new node, compute the ROI table node, then
render what the side-by-side layout shows — the original (left) and denoised (right) axial slice
through each node's IJK-to-RAS geometry in the lung window, with the table node's rows — in an
offscreen VTK render window (EGL/OSMesa).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import slicer
import vtk

from IPv2DenoiseLib.app.commands.demo import sample_uldct
from IPv2DenoiseLib.app.slicer_support.roi_metrics import roi_table, table_node_from_metrics
from IPv2DenoiseLib.app.slicer_support.scene import add_volume_node, denoise_node
from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.io.volumes import read_volume

LUNG_WINDOW, LUNG_LEVEL = 1500.0, -600.0


def axial_slice_actor(node, k: int) -> vtk.vtkImageActor:
    """Slice k of a volume node, windowed, placed in RAS through the node's IJK-to-RAS matrix."""
    voi = vtk.vtkExtractVOI()
    voi.SetInputData(node.GetImageData())
    nx, ny, _ = node.GetImageData().GetDimensions()
    voi.SetVOI(0, nx - 1, 0, ny - 1, k, k)
    wl = vtk.vtkImageMapToWindowLevelColors()
    wl.SetInputConnection(voi.GetOutputPort())
    wl.SetWindow(LUNG_WINDOW)
    wl.SetLevel(LUNG_LEVEL)
    wl.SetOutputFormatToLuminance()
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputConnection(wl.GetOutputPort())
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    actor.SetUserMatrix(matrix)
    return actor


def text_actor(
    text: str, *, size: int = 14, x: float = 0.02, y: float = 0.95, mono: bool = False
) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(1.0, 1.0, 0.85)
    prop.SetVerticalJustificationToTop()
    if mono:
        prop.SetFontFamilyToCourier()
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    return actor


def table_text(table_node, rows: tuple[str, ...]) -> str:
    table = table_node.GetTable()
    lines = [f"{'metric':<24}{'before':>8}{'after':>8}{'change':>8}"]
    names = [table.GetValue(r, 0).ToString() for r in range(table.GetNumberOfRows())]
    for wanted in rows:
        if wanted in names:
            r = names.index(wanted)
            cells = [table.GetValue(r, c).ToString() for c in range(1, 4)]
            cells = [f"{float(v):8.1f}" if v not in ("", "nan") else " " * 8 for v in cells]
            lines.append(f"{wanted:<24}{''.join(cells)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "figures" / "slicer_scene_render.png")
    )
    args = parser.parse_args()

    slicer.mrmlScene = slicer.vtkMRMLScene()
    original = add_volume_node(read_volume(sample_uldct()), "sample_uldct")
    denoiser = Denoiser.from_registry("default")
    denoised = denoise_node(
        original, denoise=lambda v: denoiser.denoise(v, device="cpu"), name="sample_uldct denoised"
    )
    table_node = table_node_from_metrics(roi_table(original, denoised))

    k = original.GetImageData().GetDimensions()[2] // 2
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(1560, 560)
    viewports = (
        (0.0, 0.12, 0.345, 1.0),
        (0.345, 0.12, 0.69, 1.0),
        (0.69, 0.0, 1.0, 1.0),
        (0.0, 0.0, 0.69, 0.12),
    )
    titles = (f"Red: {original.GetName()} (original)", f"Yellow: {denoised.GetName()}", "", "")
    renderers = []
    for vp, title in zip(viewports, titles):
        ren = vtk.vtkRenderer()
        ren.SetViewport(*vp)
        ren.SetBackground(0.1, 0.1, 0.12)
        if title:
            ren.AddViewProp(text_actor(title))
        window.AddRenderer(ren)
        renderers.append(ren)
    for ren, node in zip(renderers[:2], (original, denoised)):
        ren.AddActor(axial_slice_actor(node, k))
        ren.ResetCamera()
        camera = ren.GetActiveCamera()
        camera.ParallelProjectionOn()
        camera.SetViewUp(0, 1, 0)  # anterior up, as Slicer's axial view
        ren.ResetCamera()
        camera.Zoom(1.35)
    # share one camera: the "linked" views of the layout
    renderers[1].SetActiveCamera(renderers[0].GetActiveCamera())
    rows = (
        "lung mean",
        "lung std",
        "soft_tissue std",
        "background std",
        "lung noise reduction",
        "soft_tissue noise reduction",
        "CNR lung vs soft_tissue",
        "LAA-950",
    )
    renderers[2].AddViewProp(
        text_actor(
            f"Table node: {table_node.GetName()}\n\n" + table_text(table_node, rows), size=12, mono=True
        )
    )
    renderers[3].AddViewProp(
        text_actor(
            "IPv2 Denoise — side-by-side layout, lung preset (W 1500 / L -600), slice "
            f"{k + 1} of {original.GetImageData().GetDimensions()[2]}\n"
            f"model: {denoiser.name}   remove background: on   rendered offscreen by VTK from the MRML scene "
            "(slicer-core), not a Slicer screenshot",
            size=13,
            y=0.8,
        )
    )
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(args.out)
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    print(
        f"wrote {args.out}; table rows: {table_node.GetTable().GetNumberOfRows()}; "
        f"voxels differ: {bool(np.any(slicer.util.arrayFromVolume(original) != slicer.util.arrayFromVolume(denoised)))}"
    )


if __name__ == "__main__":
    main()
