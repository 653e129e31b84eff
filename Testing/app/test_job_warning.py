"""The denoise child's training-range warning reaches the job status the Slicer panel shows."""

from __future__ import annotations

from IPv2DenoiseLib.app.slicer_support.process import JobStatus


def test_warning_record_is_kept() -> None:
    status = JobStatus()
    status.apply({"device": "CPU"})
    assert status.warnings == []
    status.apply({"warning": "this scan is outside the model's training range: its noise (12 HU) ..."})
    status.apply({"progress": 0.5})
    assert status.warnings[0].startswith("this scan is outside")
    assert status.log[-1].startswith("warning: this scan is outside")
