"""MRML side of the module on a real vtkMRMLScene (PyPI slicer-core): nodes, geometry, tables, layout."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("slicer.util", reason="slicer-core not installed")
import slicer  # noqa: E402
import vtk  # noqa: E402

from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.app.slicer_support.job import DenoiseJob  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.roi_metrics import roi_mask, roi_table, table_node_from_metrics  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.scene import (  # noqa: E402
    LPS_TO_RAS,
    add_volume_node,
    denoise_node,
    ijk_to_ras,
    volume_from_node,
)
from IPv2DenoiseLib.app.slicer_support.views import (  # noqa: E402
    SIDE_BY_SIDE_LAYOUT,
    composite_node,
    difference_node,
    restore_layout,
    setup_comparison,
)
from IPv2DenoiseLib.core.errors import UserError  # noqa: E402
from IPv2DenoiseLib.core.progress import Cancelled  # noqa: E402
from IPv2DenoiseLib.core.volume import Volume  # noqa: E402
from IPv2DenoiseLib.imaging.metrics import roi_comparison_table  # noqa: E402


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(True)


def _oblique_volume(shape=(6, 24, 28), seed=0):
    """A noisy 'chest': air, a body disk at 40 HU with two lungs at -850 HU; oblique geometry."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - cy) / (0.45 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 < 1
    hu[body] = 40.0
    for sx in (-1, 1):
        lung = ((y - cy) / (0.25 * shape[1])) ** 2 + (
            (x - cx - sx * 0.2 * shape[2]) / (0.12 * shape[2])
        ) ** 2 < 1
        hu[lung] = -850.0
    hu += rng.normal(0, 60, shape).astype(np.float32)
    t = np.deg2rad(15)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    return Volume(hu, spacing=(0.7, 0.8, 2.5), origin=(-12.0, 30.5, -100.0), direction=rot.ravel())


def _geometry(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_volume_node_round_trip_keeps_lps_geometry(scene):
    vol = _oblique_volume()
    node = add_volume_node(vol, "chest")
    # IJK->RAS of the node is the LPS geometry with the first two rows negated
    np.testing.assert_allclose(_geometry(node), ijk_to_ras(vol), atol=1e-9)
    ras_origin = np.array(node.GetOrigin())
    np.testing.assert_allclose(ras_origin, [12.0, -30.5, -100.0])
    back = volume_from_node(node)
    assert back.same_geometry(vol, atol=1e-9)
    np.testing.assert_array_equal(back.array, vol.array)
    # voxel (i, j, k) lands at the same physical point both ways
    i, j, k = 3, 5, 2
    lps = np.asarray(vol.origin) + np.asarray(vol.direction).reshape(3, 3) @ (
        np.array([i, j, k]) * vol.spacing
    )
    ras = _geometry(node) @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(ras[:3], LPS_TO_RAS @ lps, atol=1e-9)


def test_denoise_node_with_tiny_model_keeps_geometry_and_study(scene):
    torch = pytest.importorskip("torch")
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.denoiser.models import UNet

    torch.manual_seed(0)
    denoiser = Denoiser(UNet(in_slices=3, base_channels=4))
    vol = _oblique_volume()
    node = add_volume_node(vol, "chest")
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(1500, -600)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    item = sh.GetItemByDataNode(node)
    if item:  # Slicer's SH plugin logic made one
        sh.SetItemParent(item, study)
    else:  # bare slicer-core scene
        sh.CreateItem(study, node)

    out = denoise_node(node, denoise=lambda v: denoiser.denoise(v, device="cpu", remove_background=True))
    assert out.GetName() == "chest denoised"
    np.testing.assert_allclose(_geometry(out), _geometry(node), atol=1e-9)
    result = slicer.util.arrayFromVolume(out)
    assert result.shape == vol.shape and np.isfinite(result).all()
    # background removed: the corners (outside air) are blended to -1000 HU (#13: the blend spans
    # 3 mm beside tissue, and this 24 x 28 image holds no air farther from the body)
    from IPv2DenoiseLib.imaging.masks import background_weight

    weight = background_weight(vol.array, spacing=vol.spacing)[:, 0, 0]
    kept = denoiser.denoise(vol, device="cpu", remove_background=False).array[:, 0, 0]
    assert (weight > 0.5).all()
    np.testing.assert_allclose(result[:, 0, 0], kept + weight * (-1000.0 - kept), atol=1e-3)
    assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study
    assert (out.GetDisplayNode().GetWindow(), out.GetDisplayNode().GetLevel()) == (1500, -600)
    # the input is untouched
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), vol.array)


def test_table_node_matches_metrics_table(scene):
    vol = _oblique_volume()
    after = vol.with_array(vol.array * 0.5 + 0.5 * np.round(vol.array / 100) * 100)
    lung = vol.array < -500
    lung[:, :, : vol.shape[2] // 4] = False
    regions = {
        "lung": lung & (np.abs(np.indices(vol.shape)[1] - 12) < 4),
        "soft_tissue": np.abs(vol.array - 40) < 50,
    }
    table = roi_comparison_table(vol.array, after.array, regions)
    node = table_node_from_metrics(table)
    vt = node.GetTable()
    assert [vt.GetColumnName(c) for c in range(vt.GetNumberOfColumns())] == table.columns
    assert vt.GetNumberOfRows() == len(table.rows)
    for r, row in enumerate(table.rows):
        for c, value in enumerate(row):
            cell = vt.GetValue(r, c)
            if isinstance(value, str):
                assert cell.ToString() == value
            elif value is None or (isinstance(value, float) and np.isnan(value)):
                assert np.isnan(cell.ToDouble()) or cell.ToString() == ""
            else:
                assert cell.ToDouble() == pytest.approx(float(value), rel=1e-12)
    # refill the same node with a different table: no stale rows
    small = roi_comparison_table(vol.array, after.array, {"lung": regions["lung"]})
    assert table_node_from_metrics(small, node=node) is node
    assert node.GetTable().GetNumberOfRows() == len(small.rows)


def test_comparison_layout_links_views_and_sets_window(scene):
    vol = _oblique_volume()
    a = add_volume_node(vol, "before")
    b = add_volume_node(vol.with_array(vol.array * 0.9), "after")
    previous = setup_comparison(a, b, preset="Lung")
    layout = scene.GetNodesByClass("vtkMRMLLayoutNode").GetItemAsObject(0)
    assert (
        layout.GetViewArrangement()
        == SIDE_BY_SIDE_LAYOUT
        == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    )
    red, yellow = composite_node("Red"), composite_node("Yellow")
    assert red.GetBackgroundVolumeID() == a.GetID() and yellow.GetBackgroundVolumeID() == b.GetID()
    assert red.GetLinkedControl() and red.GetHotLinkedControl() and yellow.GetHotLinkedControl()
    for n in (a, b):
        assert (n.GetDisplayNode().GetWindow(), n.GetDisplayNode().GetLevel()) == (1500, -600)
    setup_comparison(a, b, preset="Mediastinal")
    assert (b.GetDisplayNode().GetWindow(), b.GetDisplayNode().GetLevel()) == (400, 40)
    restore_layout(previous)
    assert layout.GetViewArrangement() == previous
    diff = difference_node(a, b)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(diff), -0.1 * vol.array, atol=1e-3)


def test_volume_from_node_rejects_empty_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UserError, match="no image data"):
        volume_from_node(node)


# A stand-in for ``ipv2-denoise denoise``: same protocol, reads/writes through IPv2DenoiseLib.io.volumes.
FAKE_DENOISER = textwrap.dedent(
    """
    import json, sys, time
    from IPv2DenoiseLib.io.volumes import read_volume, write_volume
    src, dst, mode = sys.argv[1:4]
    print(json.dumps({"device": "CPU (1 threads)"}), flush=True)
    if mode == "fail":
        sys.stderr.write("ipv2-denoise denoise: error: model 'nope' is unknown\\n"); sys.exit(2)
    if mode == "hang":
        print(json.dumps({"progress": 0.1, "eta_s": 60, "message": "slab 1/10"}), flush=True)
        time.sleep(60)
    v = read_volume(src, force=True)
    print(json.dumps({"progress": 1.0, "eta_s": 0, "message": "done"}), flush=True)
    write_volume(v.with_array(v.array * 0.5 - 500), dst)
    print(json.dumps({"result": dst, "seconds": 0.1}), flush=True)
    """
)


@pytest.mark.parametrize("mode", ["ok", "fail", "hang"])
def test_denoise_job_subprocess(scene, mode):
    vol = _oblique_volume(shape=(4, 20, 22))
    node = add_volume_node(vol, "chest")
    n_nodes = scene.GetNumberOfNodes()
    job = DenoiseJob(
        node,
        options=DenoiseOptions(model="unet-ipv2"),
        command=[sys.executable, "-c", FAKE_DENOISER, "{input}", "{output}", mode],
    ).start()
    workdir = job.workdir
    if mode == "ok":
        out = job.wait(timeout=60)
        assert job.status.device == "CPU (1 threads)" and job.status.fraction == 1.0
        np.testing.assert_allclose(slicer.util.arrayFromVolume(out), vol.array * 0.5 - 500, atol=1e-3)
        np.testing.assert_allclose(_geometry(out), _geometry(node), atol=1e-6)
    elif mode == "fail":
        with pytest.raises(UserError, match="model 'nope' is unknown"):
            job.wait(timeout=60)
        assert scene.GetNumberOfNodes() == n_nodes
    else:
        import time

        deadline = time.monotonic() + 30
        while job.poll().fraction < 0.1 and time.monotonic() < deadline:
            time.sleep(0.05)
        job.cancel()
        with pytest.raises(Cancelled):
            job.wait(timeout=30)
        assert scene.GetNumberOfNodes() == n_nodes
    assert not workdir.exists()


def test_a_job_never_overwrites_its_input_nor_another_scans_result(scene):
    """The output selector lists every volume: the input itself is refused (the old job replaced the
    original scan), and the last run's output of another scan, still selected, is not reused."""
    fake = [sys.executable, "-c", FAKE_DENOISER, "{input}", "{output}", "ok"]
    options = DenoiseOptions(model="unet-ipv2")
    vol_a, vol_b = _oblique_volume(shape=(4, 20, 22), seed=1), _oblique_volume(shape=(4, 20, 22), seed=2)
    node_a, node_b = add_volume_node(vol_a, "CaseA"), add_volume_node(vol_b, "CaseB")
    with pytest.raises(UserError, match="output volume is the input 'CaseA'.*replace the original"):
        DenoiseJob(node_a, node_a, options=options, command=fake).start()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node_a), vol_a.array)
    out_a = DenoiseJob(node_a, options=options, command=fake).start().wait(timeout=60)
    again = DenoiseJob(node_a, out_a, options=options, command=fake).start().wait(timeout=60)
    assert again is out_a  # the same scan again: its own output is replaced, as asked
    out_b = DenoiseJob(node_b, out_a, options=options, command=fake).start().wait(timeout=60)
    assert out_b is not out_a and out_b.GetName() == "CaseB denoised"
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out_a), vol_a.array * 0.5 - 500, atol=1e-3)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out_b), vol_b.array * 0.5 - 500, atol=1e-3)


def test_another_scans_output_is_never_paired_with_the_selected_input(scene, tmp_path):
    """The panel keeps the last output selected when another input is picked. Export then wrote
    scan A's pixels under patient B's identity (and could send them to the PACS), and the ROI table
    set two scans side by side as before and after; both now refuse, naming the two volumes."""
    from IPv2DenoiseLib.app.slicer_support.dicom import export_dicom

    fake = [sys.executable, "-c", FAKE_DENOISER, "{input}", "{output}", "ok"]
    node_a = add_volume_node(_oblique_volume(shape=(4, 20, 22), seed=1), "CaseA")
    node_b = add_volume_node(_oblique_volume(shape=(4, 20, 22), seed=2), "CaseB")
    out_a = (
        DenoiseJob(node_a, options=DenoiseOptions(model="unet-ipv2"), command=fake).start().wait(timeout=60)
    )
    with pytest.raises(
        UserError, match="'CaseA denoised' was denoised from another volume, not from 'CaseB'"
    ):
        export_dicom(out_a, tmp_path / "out", source_node=node_b)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="denoised from another volume"):
        roi_table(node_b, out_a)
    table = roi_table(node_a, out_a)  # its own input: fine
    reused = table_node_from_metrics(table, name="CaseA denoised ROI metrics")
    table_node_from_metrics(table, node=reused, name="CaseB denoised ROI metrics")
    assert reused.GetName().startswith("CaseB denoised ROI metrics")  # it kept CaseA's name before


def test_a_job_that_cannot_start_leaves_no_copy_of_the_scan(scene, tmp_path, monkeypatch):
    """The input is written to a temporary folder before the child starts; a child that cannot
    start (or a full disk) left that copy of the patient's scan behind."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    node = add_volume_node(_oblique_volume(shape=(4, 20, 22)), "CaseA")
    job = DenoiseJob(
        node, options=DenoiseOptions(model="unet-ipv2"), command=[str(tmp_path / "no-such-program")]
    )
    with pytest.raises(OSError):
        job.start()
    assert list(tmp_path.glob("IPv2Denoise-*")) == []


def test_closing_the_scene_during_a_run_discards_the_result(scene):
    """Closing the scene (the next patient) while a run goes on: its result must not appear in the
    new scene (the old job imported it there, under the previous patient's name)."""
    node = add_volume_node(_oblique_volume(shape=(4, 20, 22)), "CaseA")
    fake = [sys.executable, "-c", FAKE_DENOISER, "{input}", "{output}", "ok"]
    job = DenoiseJob(node, options=DenoiseOptions(model="unet-ipv2"), command=fake).start()
    workdir = job.workdir
    scene.Clear(False)
    with pytest.raises(UserError, match="'CaseA' left the scene .* result was discarded"):
        job.wait(timeout=60)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
    assert not workdir.exists()


def test_a_job_refuses_non_ct_inputs_under_the_nodes_name(scene):
    """An image that is not HU, or a label map, is refused in the panel's words: the node's name,
    not the child's temporary file, and no command-line flag the panel does not have."""
    options = DenoiseOptions(model="unet-ipv2")
    stored = _oblique_volume(shape=(4, 20, 22))
    raw = add_volume_node(stored.with_array(stored.array + 1024.0), "CT stored 0..4095")
    with pytest.raises(UserError, match="input volume 'CT stored 0..4095': no voxel below") as info:
        DenoiseJob(raw, options=options).start()
    assert "--force" not in str(info.value) and "input.nrrd" not in str(info.value)
    labels = add_volume_node(stored.with_array((stored.array > -500).astype(np.float32)), "lungs")
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lungs-label")
    label_node.SetAndObserveImageData(labels.GetImageData())
    with pytest.raises(UserError, match="'lungs-label' is a label map"):
        DenoiseJob(label_node, options=options).start()


def test_roi_mask_and_roi_table(scene):
    vol = _oblique_volume(shape=(6, 40, 44))
    vol = Volume(vol.array, spacing=(0.7, 0.8, 2.5), origin=(-12.0, 30.5, -100.0))  # axis-aligned
    before = add_volume_node(vol, "before")
    smooth = vol.with_array(np.where(vol.array > -900, np.round(vol.array / 200) * 200, -1000.0))
    after = add_volume_node(smooth, "after")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    # a box over voxels i 10..19, j 5..14, k 1..3 (RAS: x and y negated)
    lo = np.array(vol.origin) + np.array([10, 5, 1]) * vol.spacing - 1e-3
    hi = np.array(vol.origin) + np.array([19, 14, 3]) * vol.spacing + 1e-3
    center_lps, size = (lo + hi) / 2, hi - lo
    roi.SetCenter(*(LPS_TO_RAS @ center_lps))
    roi.SetSize(*size)
    mask = roi_mask(before, roi)
    expected = np.zeros(vol.shape, bool)
    expected[1:4, 5:15, 10:20] = True
    np.testing.assert_array_equal(mask, expected)
    table = roi_table(before, after, roi_node=roi)
    metrics = table.as_dict()["metric"]
    assert "user ROI std" in metrics and "lung noise reduction" in metrics
    row = table.rows[metrics.index("user ROI mean")]
    assert row[1] == pytest.approx(float(vol.array[expected].mean()), rel=1e-5)
    assert row[2] == pytest.approx(float(smooth.array[expected].mean()), rel=1e-5)


def test_roi_mask_follows_a_volume_left_under_a_registration_transform(scene):
    """The ROI is placed on the volume as drawn: a linear transform on the volume moves its voxels."""
    vol = Volume(
        _oblique_volume(shape=(6, 40, 44)).array, spacing=(0.7, 0.8, 2.5), origin=(-12.0, 30.5, -100.0)
    )
    before = add_volume_node(vol, "before")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    lo = np.array(vol.origin) + np.array([10, 5, 1]) * vol.spacing - 1e-3
    hi = np.array(vol.origin) + np.array([19, 14, 3]) * vol.spacing + 1e-3
    roi.SetCenter(*(LPS_TO_RAS @ ((lo + hi) / 2)))
    roi.SetSize(*(hi - lo))
    shift = vtk.vtkMatrix4x4()  # move the volume by 3 voxels in i and 2 in j (RAS: x, y negated)
    shift.SetElement(0, 3, -3 * 0.7)
    shift.SetElement(1, 3, -2 * 0.8)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(shift)
    before.SetAndObserveTransformNodeID(transform.GetID())
    expected = np.zeros(vol.shape, bool)
    expected[1:4, 3:13, 7:17] = True  # the box now covers voxels 3 and 2 lower (the old code: 5:15, 10:20)
    np.testing.assert_array_equal(roi_mask(before, roi), expected)
    bend = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    transform.SetAndObserveTransformNodeID(bend.GetID())
    assert not transform.IsTransformToWorldLinear()
    with pytest.raises(UserError, match="non-linear transform; harden"):
        roi_mask(before, roi)


def test_a_wait_that_times_out_stops_the_child_and_removes_the_copy(scene):
    """``logic.process`` waits synchronously; a wait that ends early (a timeout, Ctrl-C in the
    Python console) left the child running unseen and the copy of the scan in /tmp."""
    import subprocess

    import psutil

    node = add_volume_node(_oblique_volume(shape=(4, 20, 22)), "CaseA")
    slow = [sys.executable, "-c", "import time; time.sleep(60)", "{input}", "{output}"]
    job = DenoiseJob(node, options=DenoiseOptions(model="unet-ipv2"), command=slow).start()
    workdir, pid = job.workdir, job.process.pid
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait(timeout=1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert job.workdir is None and not workdir.exists()
