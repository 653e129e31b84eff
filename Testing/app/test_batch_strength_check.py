"""``batch --strength`` refuses a network without a noise map before any work, from the model card
alone: the main process loads no network (its workers load it, each once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from IPv2DenoiseLib.app.cli import main
from IPv2DenoiseLib.denoiser.model_reference import ModelReference

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "sample_uldct.nrrd"


def test_batch_refuses_a_plain_network_without_loading_it(tmp_path, capsys, monkeypatch) -> None:
    def load(self, **_):
        pytest.fail(f"batch loaded {self.name} in its main process to check --strength")

    monkeypatch.setattr(ModelReference, "load", load)
    out = tmp_path / "out"
    assert (
        main(["batch", str(SAMPLE), str(out), "--model", "unet-ipv2", "--strength", "0.8", "--device", "cpu"])
        == 2
    )
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "strength 0.8: model unet-ipv2 takes no noise level map, so only strength 1 applies" in error
    assert not out.exists()  # refused before OUT was touched
