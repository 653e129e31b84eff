"""The ``ipv2-denoise`` command line: info on real inputs, one-line errors for bad inputs, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from IPv2DenoiseLib import Volume
from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.io.volumes import write_volume
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> Path:
    """A small synthetic chest (with table) written as NRRD and NIfTI."""
    folder = tmp_path_factory.mktemp("chest")
    ph = make_chest_phantom(shape=(6, 96, 96), spacing=(3.6, 3.6, 5.0), seed=1)
    volume = Volume(ph.hu, ph.spacing, (-170.0, -160.0, 40.0))
    write_volume(volume, folder / "chest.nrrd")
    write_volume(volume, folder / "chest.nii.gz")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "IPv2DenoiseLib", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["chest.nrrd", "chest.nii.gz"])
def test_info_json_on_image_files(chest, name, capsys) -> None:
    assert main(["info", str(chest / name), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["shape_zyx"] == [6, 96, 96]
    assert facts["spacing_xyz_mm"] == pytest.approx([3.6, 3.6, 5.0])
    assert facts["hu_min"] < -900 and facts["hu_max"] > 300  # air and bone
    ml = facts["volume_ml"]
    assert 0 < ml["lungs"] < ml["body"]  # lungs inside the body
    assert ml["background"] > 0
    lung = facts["roi_stats_hu"]["lung"]
    assert -950 < lung["mean"] < -700  # parenchyma about -850 HU with vessels


def test_info_text_on_dicom_folder(ct_series, capsys) -> None:
    folder = ct_series(3)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "128 x 128 x 3" in out and "series_choice" in out and "kVp" in out


def test_info_never_prints_a_tag_s_escape_sequences(ct_series, capsys) -> None:
    """A SeriesDescription holding a terminal escape (clear screen) and a line break that forges a
    second line: ``info`` prints it on one line without them (it printed them as they were)."""
    import pydicom

    folder = ct_series(2)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "chest\x1b[2J\nwarning      all clear"
        ds.save_as(path)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "chest[2Jwarning      all clear" in out
    assert not any(line.startswith("warning      all clear") for line in out.splitlines())


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("not an image")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32) - 1000), str(tmp / "flat.nrrd"))
    rgb = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp / "rgb.nrrd"))
    nan = np.full((4, 8, 8), -1000, np.float32)
    nan[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp / "nan.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), 100, np.float32)), str(tmp / "noair.nrrd"))
    whole = np.random.default_rng(0).normal(-500, 300, (16, 32, 32)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(whole), str(tmp / "full.nrrd"), useCompression=False)
    data = (tmp / "full.nrrd").read_bytes()
    (tmp / "truncated.nrrd").write_bytes(data[: len(data) // 2])
    return {
        "missing": ([str(tmp / "nope.nrrd")], "not found"),
        "no dicom": ([str(tmp / "empty")], "no DICOM"),
        "non-image": ([str(tmp / "notes.txt")], "no DICOM image"),
        "MR": ([get_testdata_file("MR_small.dcm")], "modality MR"),
        "2D": ([str(tmp / "flat.nrrd")], "2-D"),
        "RGB": ([str(tmp / "rgb.nrrd")], "components"),
        "NaN": ([str(tmp / "nan.nrrd")], "NaN"),
        "no air": ([str(tmp / "noair.nrrd")], "Hounsfield"),
        "truncated": ([str(tmp / "truncated.nrrd")], "cut short"),
    }


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_2(tmp_path) -> None:
    for case, (args, expected) in _bad_inputs(tmp_path).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = run_cli("info", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (case, result.stderr)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (case, result.stderr)
        assert expected in lines[0], (case, lines[0])
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_mr_reads_when_forced_for_info(capsys) -> None:
    # MR_small is not in HU (no air below -500), so forcing skips both checks
    assert main(["info", get_testdata_file("MR_small.dcm"), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["Modality"] == "MR"


@pytest.mark.slow
def test_demo_with_given_input_and_weights(chest, tmp_path) -> None:
    from IPv2DenoiseLib.denoiser.models import UNet
    from IPv2DenoiseLib.denoiser.weights import save_model

    weights = tmp_path / "tiny.safetensors"
    save_model(UNet(in_slices=3, base_channels=4, levels=2), weights, {"strategy": "ipv2"})
    out = tmp_path / "demo"
    result = run_cli(
        "demo",
        "--input",
        str(chest / "chest.nrrd"),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    for name in ("denoised.nrrd", "before_after.png", "metrics.csv", "metrics.md"):
        assert (out / name).stat().st_size > 0, name
    csv = (out / "metrics.csv").read_text()
    assert "lung" in csv and "background" in csv
    assert "figure:" in result.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left

    # an existing output is never replaced silently; --overwrite replaces a demo output only
    args = ["demo", "--input", str(chest / "chest.nrrd"), "--weights", str(weights), "--device", "cpu"]
    again = run_cli(*args, "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    (out / "metrics.md").write_text("older run")
    assert run_cli(*args, "--out", str(out), "--overwrite").returncode == 0
    assert (out / "metrics.md").read_text() != "older run"
    (out / "my-notes.txt").write_text("keep")
    refused = run_cli(*args, "--out", str(out), "--overwrite")
    assert refused.returncode == 2 and "my-notes.txt" in refused.stderr
    assert (out / "my-notes.txt").read_text() == "keep"
    (out / "my-notes.txt").unlink()
    # the input inside the output: --overwrite must not replace the folder it is read from
    inside = ["demo", "--input", str(out / "denoised.nrrd"), "--weights", str(weights), "--device", "cpu"]
    before = (out / "denoised.nrrd").read_bytes()
    refused = run_cli(*inside, "--out", str(out), "--overwrite")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert (out / "denoised.nrrd").read_bytes() == before
    missing = run_cli(*args, "--out", str(tmp_path / "d2"), "--reference", str(tmp_path / "no.nrrd"))
    assert missing.returncode == 2 and "--reference" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "d2").exists()
