"""Synthetic ULDCT/NDCT cases: files, geometry, noise levels, misalignment, resume, atomic folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_dataset_args

from IPv2DenoiseLib import UserError
from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.io.volumes import read_volume
from IPv2DenoiseLib.synthetic.dataset import CASE_FILES, CaseSpec, make_case
from IPv2DenoiseLib.synthetic.phantom import LABELS

SMALL = {"size": 112, "slices": 6, "spacing_mm": 3.2, "slice_thickness_mm": 5.0}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds") / "case_000"
    record = make_case(CaseSpec(seed=5, amplitude_mm=15.0, z_center_mm=-100.0, **SMALL), folder, device="cpu")
    return folder, record


def test_case_files_geometry_and_record(case) -> None:
    folder, record = case
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.nrrd" for n in CASE_FILES] + ["case.json"]
    )
    volumes = {n: read_volume(folder / f"{n}.nrrd", force=n.startswith("labels")) for n in CASE_FILES}
    first = volumes["ndct"]
    assert first.shape == (6, 112, 112) and first.spacing == pytest.approx((3.2, 3.2, 5.0))
    assert all(v.same_geometry(first) for v in volumes.values())
    assert json.loads((folder / "case.json").read_text()) == record
    assert record["incident_photons_per_ray"] == pytest.approx(record["i0_full_dose"] * 0.02)
    assert set(np.unique(volumes["labels_ndct"].array)) <= set(LABELS.values())


def test_uldct_is_noisier_and_misaligned(case) -> None:
    folder, record = case
    v = {n: read_volume(folder / f"{n}.nrrd", force=n.startswith("labels")).array for n in CASE_FILES}
    muscle = v["labels_ndct"] == LABELS["muscle"]
    muscle_u = v["labels_uldct"] == LABELS["muscle"]
    noise_n = np.std((v["ndct"] - v["ndct_clean"])[muscle])
    noise_u = np.std((v["uldct"] - v["uldct_clean"])[muscle_u])
    assert noise_u > 4 * noise_n  # 2 % dose: about sqrt(50) = 7x the full-dose noise
    # breathing moved the lungs: the two noise-free anatomies differ inside the chest
    lungs = v["labels_ndct"] == LABELS["lung"]
    assert np.mean(v["labels_uldct"][lungs] != LABELS["lung"]) > 0.005
    assert 1.0 < record["motion_mm"]["max_mm"] <= 15.0 + 1e-6


def test_existing_case_is_refused_and_failed_case_leaves_nothing(case, tmp_path) -> None:
    folder, _ = case
    with pytest.raises(UserError, match="already exists"):
        make_case(CaseSpec(seed=5, **SMALL), folder)
    with pytest.raises(UserError, match="dose"):
        make_case(CaseSpec(seed=5, dose=1.5, **SMALL), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_make_dataset_cli_resumes(made_dataset, capsys) -> None:
    made = (made_dataset / "case_001" / "case.json").read_text()
    capsys.readouterr()
    assert main(make_dataset_args(made_dataset)) == 0  # second run keeps the complete cases
    assert (made_dataset / "case_001" / "case.json").read_text() == made
    assert "2 cases" in capsys.readouterr().out


def test_make_dataset_summarises_a_case_without_lungs_and_checks_arguments_first(tmp_path, capsys) -> None:
    """Two slices of 32² px may hold no lung: the case is made and summarised (also on a rerun).
    Sizes, spacings and an --out that is a file are refused in one line before any work."""
    small = ["make-dataset", "--cases", "1", "--size", "32", "--slices", "2", "--device", "cpu"]
    out = tmp_path / "ds"
    assert main([*small, "--out", str(out)]) == 0
    assert main([*small, "--out", str(out)]) == 0  # the rerun summarises the kept case
    assert "no lungs" in capsys.readouterr().out
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    bad = [["--spacing", "nan"], ["--slice-thickness", "-1"], ["--size", "200000"], ["--out", str(plain)]]
    for extra in bad:
        target = [] if "--out" in extra else ["--out", str(tmp_path / "bad")]
        assert main([*small, *target, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("ipv2-denoise make-dataset: error:") == len(bad) and "Traceback" not in err
    assert "--spacing nan" in err and "--size 200000" in err and "plain.txt" in err
    assert not (tmp_path / "bad").exists() and plain.read_text() == "not a folder"


def test_make_dataset_json_progress_is_only_json_and_moves_inside_a_case(tmp_path, capsys) -> None:
    """For a program reading stdout every line is a JSON record (the summary was plain text), and
    the bar moves within a case (one record a case left a default case silent for minutes)."""
    import json

    command = ["make-dataset", "--cases", "1", "--size", "64", "--slices", "4", "--device", "cpu"]
    assert main([*command, "--out", str(tmp_path / "ds"), "--json-progress"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[-1] == {"result": str(tmp_path / "ds"), "cases": 1, "seconds": records[-1]["seconds"]}
    inside = {r["progress"] for r in records if "progress" in r and 0 < r["progress"] < 1}
    assert len(inside) >= 2  # the old command reported 1.0 only, when the case was done
