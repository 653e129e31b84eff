"""The Slicer module's Export on a real vtkMRMLScene (slicer-core): derived series in the source's study, sent to Orthanc."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

pytest.importorskip("slicer.util", reason="slicer-core not installed")
import slicer  # noqa: E402
from conftest import write_ct_series  # noqa: E402

from IPv2DenoiseLib.app.slicer_support.dicom import export_dicom, unused_folder  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.scene import add_volume_node  # noqa: E402
from IPv2DenoiseLib.core.errors import UserError  # noqa: E402
from IPv2DenoiseLib.core.resources import models_dir  # noqa: E402
from IPv2DenoiseLib.io.volumes import read_volume  # noqa: E402


class FileDatabase:
    """What :func:`~IPv2DenoiseLib.app.slicer_support.dicom.dicom_source_files` asks of ``slicer.dicomDatabase`` (a CTK/Qt
    object slicer-core does not have): the file of a SOP Instance UID."""

    def __init__(self, files) -> None:
        self.files = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}

    def fileForInstance(self, uid: str) -> str:  # noqa: N802 (CTK's name)
        return self.files.get(uid, "")


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(True)


def test_export_writes_derived_series_and_sends_it_to_the_pacs(scene, orthanc, tmp_path) -> None:
    files = write_ct_series(tmp_path / "src", 3)
    volume = read_volume(tmp_path / "src")
    source = add_volume_node(volume, "ULDCT")
    source.SetAttribute("DICOM.instanceUIDs", " ".join(volume.meta["SOPInstanceUIDs"]))
    denoised = add_volume_node(volume.with_array(volume.array - 3.0), "ULDCT denoised")

    written, report = export_dicom(
        denoised,
        tmp_path / "out",
        source_node=source,
        model_name="default",
        send_to=orthanc.node,
        calling_aet="SLICER",
        database=FileDatabase(files),
    )
    assert report is not None and report.ok and len(written) == 3
    ds = pydicom.dcmread(written[0])
    registry = json.loads((models_dir() / "models.json").read_text())
    shipped = registry["models"][registry["default"]]
    assert shipped["sha256"] in ds.DerivationDescription and registry["default"] in ds.DerivationDescription
    in_pacs = orthanc.series_instances(ds.SeriesInstanceUID)
    assert len(in_pacs) == 3
    source_uids = set(volume.meta["SOPInstanceUIDs"])
    for path in written:
        derived = pydicom.dcmread(path)
        assert derived.StudyInstanceUID == volume.meta["StudyInstanceUID"]
        assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids


def test_export_refuses_a_dicom_source_whose_files_left_the_database(scene, tmp_path) -> None:
    """A node loaded from DICOM whose files were moved: the old export invented a new anonymous
    patient and study and sent it to the PACS as an orphan; now it says so and writes nothing."""
    files = write_ct_series(tmp_path / "src", 2)
    node = add_volume_node(read_volume(files[0].parent), "CT")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(pydicom.dcmread(f).SOPInstanceUID) for f in files))
    for database in (FileDatabase(files[:1]), None):
        with pytest.raises(UserError, match="1 of its 2 source files|2 of its 2 source files"):
            export_dicom(node, tmp_path / "out", source_node=node, database=database)
    assert not (tmp_path / "out").exists()


def test_a_volume_slicer_resampled_from_its_series_is_exported_in_that_study(scene, tmp_path) -> None:
    """Slicer regularises a tilted or gapped series when it loads it: the node's instance UIDs are
    the series' files but not its slices one to one. The old export refused it ("got 3 files for a
    volume of 5 slices"); now the derived series goes into the source's patient and study."""
    from IPv2DenoiseLib.core.volume import Volume

    files = write_ct_series(tmp_path / "src", 3)
    source = read_volume(files[0].parent)
    finer = np.repeat(source.array, 2, axis=0)[:5]  # as if resampled at half the slice step
    spacing = (source.spacing[0], source.spacing[1], source.spacing[2] / 2)
    node = add_volume_node(Volume(finer, spacing, source.origin, source.direction), "CT")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(pydicom.dcmread(f).SOPInstanceUID) for f in files))
    derived, _ = export_dicom(node, tmp_path / "out", source_node=node, database=FileDatabase(files))
    first = pydicom.dcmread(files[0])
    assert len(derived) == 5
    for path in derived:
        ds = pydicom.dcmread(path)
        assert (ds.PatientID, ds.StudyInstanceUID, ds.StudyDate) == (
            first.PatientID,
            first.StudyInstanceUID,
            first.StudyDate,
        )
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID and "SourceImageSequence" not in ds


def test_a_second_export_of_a_volume_goes_beside_the_first(scene, tmp_path) -> None:
    """The panel names the folder after the volume: a second export used to be refused with a
    command-line flag (--overwrite) the panel does not have."""
    node = add_volume_node(read_volume(write_ct_series(tmp_path / "src", 2)[0].parent), "CT denoised")
    first = unused_folder(tmp_path / "CT_denoised_dicom")
    export_dicom(node, first)
    second = unused_folder(tmp_path / "CT_denoised_dicom")
    assert first.name == "CT_denoised_dicom" and second.name == "CT_denoised_dicom_2"
    export_dicom(node, second)
    assert len(list(first.glob("*.dcm"))) == len(list(second.glob("*.dcm"))) == 2


def test_export_refuses_a_bad_pacs_setting_before_writing(scene, tmp_path) -> None:
    volume = read_volume(write_ct_series(tmp_path / "src", 2)[0].parent)
    node = add_volume_node(volume, "CT")
    with pytest.raises(UserError, match="HOST:PORT:AET"):
        export_dicom(node, tmp_path / "out", send_to="pacs-without-port")
    assert not (tmp_path / "out").exists()


def test_a_failed_send_after_the_export_says_the_series_was_written(scene, tmp_path) -> None:
    """Export with "send to PACS" and the PACS down: the error says the files were written and
    where, and how to send them again (the panel showed only "DICOM export failed", and a second
    export to that folder is refused because it holds files)."""
    from orthanc_server import free_port

    volume = read_volume(write_ct_series(tmp_path / "src", 2)[0].parent)
    node = add_volume_node(volume, "CT")
    down = f"127.0.0.1:{free_port()}:PACS"
    with pytest.raises(
        UserError, match=r"wrote 2 DICOM files to .*out, but sending them failed: .*ipv2-denoise send"
    ):
        export_dicom(node, tmp_path / "out", send_to=down, timeout=2)
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 2


def test_an_adapted_run_in_slicer_says_so_in_its_exported_series(scene, tmp_path) -> None:
    """The Slicer job runs the real ``ipv2-denoise denoise --adapt --refine`` in its background process; the
    denoised node remembers it, and Export writes "fine-tuned on this scan" and the warnings, as
    ``denoise --dicom`` does (the note was lost when the export looked the model up by name)."""
    from conftest import chest_like_volume

    from IPv2DenoiseLib.app.pipeline import DenoiseOptions
    from IPv2DenoiseLib.app.slicer_support.job import DenoiseJob
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.models import UNet
    from IPv2DenoiseLib.denoiser.weights import save_model

    weights = tmp_path / "tiny.safetensors"
    save_model(UNet(in_slices=3, base_channels=4, levels=2), weights, {"strategy": "ipv2"})
    node = add_volume_node(Volume(chest_like_volume(5, (6, 64, 64)), (0.7, 0.7, 1.25)), "ULDCT")
    options = DenoiseOptions(weights=str(weights), device="cpu", adapt=True, adapt_seconds=2, refine=True)
    job = DenoiseJob(node, options=options).start()
    denoised = job.wait(timeout=300)
    assert job.status.adapted and job.status.adapted["iterations"] > 0
    files, _ = export_dicom(denoised, tmp_path / "derived")
    description = pydicom.dcmread(files[0]).DerivationDescription
    assert "fine-tuned on this scan alone" in description and "tiny.safetensors" in description
    assert "refined by collaborative Wiener filtering" in description  # denoise --refine, from the node


def test_a_run_at_another_strength_in_slicer_says_so_in_its_exported_series(scene, tmp_path) -> None:
    """The panel's strength goes to the background ``denoise --strength``; the node keeps it and
    Export writes it into DerivationDescription and the SeriesDescription."""
    from conftest import chest_like_volume

    from IPv2DenoiseLib.app.pipeline import DenoiseOptions
    from IPv2DenoiseLib.app.slicer_support.dicom import PROVENANCE_ATTRIBUTE
    from IPv2DenoiseLib.app.slicer_support.job import DenoiseJob
    from IPv2DenoiseLib.core.volume import Volume

    node = add_volume_node(Volume(chest_like_volume(5, (6, 64, 64)), (0.7, 0.7, 1.25)), "ULDCT")
    job = DenoiseJob(node, options=DenoiseOptions(model="fast", device="cpu", strength=1.25)).start()
    assert job.process.args[job.process.args.index("--strength") + 1] == "1.25"
    denoised = job.wait(timeout=300)
    assert json.loads(denoised.GetAttribute(PROVENANCE_ATTRIBUTE))["strength"] == 1.25
    files, _ = export_dicom(denoised, tmp_path / "derived")
    derived = pydicom.dcmread(files[0])
    assert "denoising strength 1.25 (the noise level map scaled by it" in derived.DerivationDescription
    assert derived.SeriesDescription.endswith("strength 1.25)")


def test_a_saved_denoised_node_keeps_the_weights_that_made_it_after_they_change(scene, tmp_path) -> None:
    """The denoised node keeps what the run said about its weights (name, sha256). Exported after
    the weights changed under that name (an upgrade ships a new default; a user retrains into the
    same file), the derived series still names the weights that made its pixels: it named the new
    ones, read from the catalogue or the file at export time."""
    from conftest import chest_like_volume

    from IPv2DenoiseLib.app.pipeline import DenoiseOptions
    from IPv2DenoiseLib.app.slicer_support.job import DenoiseJob
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.denoiser.model_reference import read_card
    from IPv2DenoiseLib.denoiser.models import UNet
    from IPv2DenoiseLib.denoiser.weights import save_model

    weights = tmp_path / "mine.safetensors"
    save_model(UNet(in_slices=3, base_channels=4, levels=2), weights, {"strategy": "ipv2"})
    made_by = read_card(weights)["sha256"]
    node = add_volume_node(Volume(chest_like_volume(5, (6, 64, 64)), (0.7, 0.7, 1.25)), "ULDCT")
    denoised = (
        DenoiseJob(node, options=DenoiseOptions(weights=str(weights), device="cpu")).start().wait(timeout=300)
    )

    retrained = UNet(in_slices=3, base_channels=4, levels=2)
    torch = pytest.importorskip("torch")
    torch.nn.init.normal_(retrained.head.weight, std=0.1)
    save_model(retrained, weights, {"strategy": "ipv2"})
    assert read_card(weights)["sha256"] != made_by
    files, _ = export_dicom(denoised, tmp_path / "derived")
    description = pydicom.dcmread(files[0]).DerivationDescription
    assert f"weights sha256 {made_by}" in description

    # a scene file is input like any other: a damaged record falls back to the weights' own card
    from IPv2DenoiseLib.app.slicer_support.dicom import PROVENANCE_ATTRIBUTE

    record = json.loads(denoised.GetAttribute(PROVENANCE_ATTRIBUTE))
    record["provenance"] = {"name": "mine.safetensors", "sha256": 12345}
    denoised.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(record))
    files, _ = export_dicom(denoised, tmp_path / "derived2")
    assert f"weights sha256 {read_card(weights)['sha256']}" in pydicom.dcmread(files[0]).DerivationDescription
