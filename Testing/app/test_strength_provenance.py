"""``--strength`` through the one pipeline: it reaches the network (with and without ``--adapt``) and is
recorded wherever a run's options are (provenance, the derived series, batch records and summaries,
the Slicer job's command line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from conftest import chest_like_volume

from IPv2DenoiseLib.app.batch.records import read_record
from IPv2DenoiseLib.app.cli import build_parser, main
from IPv2DenoiseLib.app.pipeline import DenoiseOptions, DenoisePipeline
from IPv2DenoiseLib.core.provenance import ModelProvenance
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.io.volumes import read_volume, write_volume

FAST = "unet-nm-ipv2"  # the catalogue's fast tier


def denoise_to_dicom(source: Path, out: Path, capsys, *strength: str) -> tuple[list[pydicom.Dataset], dict]:
    """``denoise SOURCE OUT --dicom`` with the fast tier (and ``--strength``): the derived series'
    datasets and the provenance record the run printed (what the Slicer job keeps on its node)."""
    assert main(["denoise", str(source), str(out), "--dicom", "--model", "fast", "--device", "cpu",
                 "--json-progress", *strength]) == 0  # fmt: skip
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    provenance = next(r["provenance"] for r in records if "provenance" in r)
    return [pydicom.dcmread(f) for f in sorted(out.iterdir())], provenance


def test_denoise_writes_the_strength_into_the_derived_series(ct_series, tmp_path, capsys) -> None:
    source = ct_series(3)
    weaker, record = denoise_to_dicom(source, tmp_path / "weaker", capsys, "--strength", "0.7")
    assert record["strength"] == 0.7 and ModelProvenance.from_record(record).strength == 0.7
    assert "denoising strength 0.7 (the noise level map scaled by it" in weaker[0].DerivationDescription
    assert weaker[0].SeriesDescription.endswith(f"IPv2 denoised ({FAST}, strength 0.7)")

    default, record = denoise_to_dicom(source, tmp_path / "default", capsys)
    assert record["strength"] == 1.0
    assert "strength" not in default[0].DerivationDescription  # as validated: nothing to say
    assert default[0].SeriesDescription.endswith(f"IPv2 denoised ({FAST})")
    # and the pixels are those of the network at that strength
    volume = read_volume(source)
    fast = Denoiser.from_registry("fast")
    for datasets, strength in ((weaker, 0.7), (default, 1.0)):
        expected = fast.denoise(volume, device="cpu", strength=strength).array
        written = np.stack(
            [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
        )
        assert np.abs(written - expected).max() <= 1.0, strength  # stored as whole HU


def test_the_strength_applies_to_the_final_pass_of_an_adapted_run(tmp_path) -> None:
    """``--adapt`` fine-tunes at strength 1 (training/adapt.py builds its own maps); the pipeline
    then denoises at the chosen strength and records both."""
    volume = Volume(chest_like_volume(4, (4, 64, 64)), spacing=(0.7, 0.7, 1.25))
    outcomes = {
        strength: DenoisePipeline(
            DenoiseOptions(model="fast", device="cpu", adapt=True, adapt_steps=3, strength=strength)
        ).denoise(volume)
        for strength in (1.0, 0.7)
    }
    weaker, default = outcomes[0.7], outcomes[1.0]
    assert weaker.adapted["iterations"] == default.adapted["iterations"] == 3
    assert weaker.denoised.meta["strength"] == 0.7 and weaker.provenance.strength == 0.7
    assert "fine-tuned on this scan alone" in weaker.provenance.describe()
    assert "denoising strength 0.7" in weaker.provenance.describe()
    # the same fine-tuning (a fixed step count and seed), a weaker final pass: more of the input kept
    assert np.isfinite(weaker.denoised.array).all()
    kept = [float(np.abs(o.denoised.array - volume.array).mean()) for o in (weaker, default)]
    assert kept[0] < kept[1], kept


def test_batch_records_the_strength_and_redoes_cases_at_another(tmp_path) -> None:
    source = tmp_path / "archive"
    source.mkdir()
    write_volume(Volume(chest_like_volume(1, (4, 64, 64)), (0.7, 0.7, 1.25)), source / "p01.nrrd")
    out = tmp_path / "out"
    at = ["batch", str(source), str(out), "--model", "fast", "--device", "cpu", "--strength", "0.7"]
    assert main(at) == 0
    assert read_record(out, "p01")["settings"]["strength"] == 0.7
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["strength"] == 0.7 and summary["identity"]["strength"] == 0.7
    weaker = read_volume(out / "p01.nrrd").array
    assert main(at) == 0  # verified and skipped at the same strength
    assert json.loads((out / "batch-summary.json").read_text())["cases"][0]["status"] == "skipped"

    assert main(at[:-2]) == 0  # the default strength is another result: redone
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["cases"][0]["status"] == "done" and summary["strength"] == 1.0
    assert "strength" not in read_record(out, "p01")["settings"]  # as the records of earlier versions
    assert "strength" not in summary["identity"]
    assert not np.array_equal(read_volume(out / "p01.nrrd").array, weaker)


def test_the_slicer_jobs_command_line_carries_the_strength() -> None:
    """The Slicer module runs ``denoise`` with ``DenoiseOptions.command_line()``: it parses back into
    the same options, the strength included (and leaves it out at 1)."""
    options = DenoiseOptions(model="fast", device="cpu", strength=0.85, ensemble=2)
    args = options.command_line()
    assert args[args.index("--strength") + 1] == "0.85"
    parsed = build_parser().parse_args(["denoise", "in.nrrd", "out.nrrd", *args])
    assert DenoiseOptions.from_args(parsed) == options
    assert "--strength" not in DenoiseOptions(model="fast").command_line()
