"""``--ensemble`` in the provenance, as ``--strength`` is (test_strength_provenance.py): the JSON record
a run prints, the derived series' DerivationDescription, the Slicer node's record; a scene file's
ensemble is checked like its other fields."""

from __future__ import annotations

import json

import pytest
from conftest import chest_like_volume
from test_strength_provenance import denoise_to_dicom  # the same run, with --ensemble instead

from IPv2DenoiseLib.app.batch.records import read_record
from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.core.provenance import ModelProvenance
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume

#: What DerivationDescription adds for an ensemble of N (N > 1).
CLAUSE = "averaged over {} flipped and rotated passes (test-time ensemble)"


def test_denoise_writes_the_ensemble_into_the_derived_series(ct_series, tmp_path, capsys) -> None:
    source = ct_series(3)
    averaged, record = denoise_to_dicom(source, tmp_path / "averaged", capsys, "--ensemble", "2")
    assert record["ensemble"] == 2 and ModelProvenance.from_record(record).ensemble == 2
    assert CLAUSE.format(2) in averaged[0].DerivationDescription
    equipment = averaged[0].ContributingEquipmentSequence[0]
    assert CLAUSE.format(2) in equipment.ContributionDescription

    single, record = denoise_to_dicom(source, tmp_path / "single", capsys)
    assert record["ensemble"] == 1
    assert "test-time ensemble" not in single[0].DerivationDescription  # one pass: nothing to say
    assert len(single[0].DerivationDescription) < len(averaged[0].DerivationDescription)


def test_a_provenance_record_round_trips_its_ensemble_and_describes_it_once() -> None:
    provenance = ModelProvenance.from_card("unet-nm-ipv2", {"sha256": "0" * 64}, ensemble=8)
    assert ModelProvenance.from_record(provenance.to_record()) == provenance
    assert provenance.describe().count(CLAUSE.format(8)) == 1
    older = {k: v for k, v in provenance.to_record().items() if k != "ensemble"}  # before it was kept
    assert ModelProvenance.from_record(older).ensemble == 1
    everything = ModelProvenance.from_card(
        "x" * 64, {"sha256": "0" * 64, "adapted": {"iterations": 50, "seconds": 30.0}},
        refined=True, strength=2.0, ensemble=8,
    )  # fmt: skip
    assert len(everything.describe()) < 1024  # DerivationDescription's limit


@pytest.mark.parametrize("value", ["2", True, 0, -1, 2.0])
def test_a_scene_files_ensemble_must_be_a_whole_number_of_passes(value) -> None:
    """A scene file is input like any other: a text, a boolean, a float or a count below 1 is refused."""
    record = ModelProvenance(name="unet-nm-ipv2").to_record() | {"ensemble": value}
    with pytest.raises(ValueError, match="'ensemble'"):
        ModelProvenance.from_record(record)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.7])
def test_a_scene_files_strength_must_be_a_positive_number(value) -> None:
    """The strength of a record is checked too: NaN, infinity, zero or a negative is refused."""
    record = ModelProvenance(name="unet-nm-ipv2").to_record() | {"strength": value}
    with pytest.raises(ValueError, match="'strength'"):
        ModelProvenance.from_record(record)
    assert ModelProvenance.from_record(record | {"strength": 0.7}).strength == 0.7


def test_the_slicer_node_keeps_the_ensemble_for_its_export(tmp_path) -> None:
    """The denoised node's record names the ensemble; a node whose run reported no provenance (or a
    damaged one) is described from that record, an unusable ensemble there read as one pass."""
    pytest.importorskip("slicer.util", reason="slicer-core not installed")
    import slicer
    from conftest import chest_like_volume

    from IPv2DenoiseLib.app.pipeline import DenoiseOptions
    from IPv2DenoiseLib.app.slicer_support.dicom import (
        PROVENANCE_ATTRIBUTE,
        node_provenance,
        store_provenance,
    )
    from IPv2DenoiseLib.app.slicer_support.scene import add_volume_node
    from IPv2DenoiseLib.core.volume import Volume

    slicer.mrmlScene = slicer.vtkMRMLScene()
    try:
        node = add_volume_node(Volume(chest_like_volume(0, (2, 16, 16)), (0.7, 0.7, 1.25)), "ULDCT")
        store_provenance(node, DenoiseOptions(model="fast", ensemble=4))
        record = json.loads(node.GetAttribute(PROVENANCE_ATTRIBUTE))
        assert record["ensemble"] == 4 and record["provenance"] is None
        provenance, _ = node_provenance(node)
        assert provenance.ensemble == 4 and CLAUSE.format(4) in provenance.describe()

        node.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(record | {"ensemble": "eight"}))
        assert node_provenance(node)[0].ensemble == 1
    finally:
        slicer.mrmlScene.Clear(True)


def test_batch_records_the_ensemble_in_its_summary_and_records(tmp_path) -> None:
    """The summary's top level names the ensemble beside the strength (the identity and the done
    records already did): a reader of one archive's summary sees how its cases were made."""
    source = tmp_path / "archive"
    source.mkdir()
    write_volume(Volume(chest_like_volume(1, (4, 64, 64)), (0.7, 0.7, 1.25)), source / "p01.nrrd")
    out = tmp_path / "out"
    assert (
        main(["batch", str(source), str(out), "--model", "fast", "--device", "cpu", "--ensemble", "2"]) == 0
    )
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["ensemble"] == 2 and summary["identity"]["ensemble"] == 2
    assert read_record(out, "p01")["settings"]["ensemble"] == 2
