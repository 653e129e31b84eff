"""``benchmarks/bench_exposure_control.py``: the predicted dose against the search a doubling at a time."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import write_ct_series

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_exposure_control  # noqa: E402


def test_the_exposure_control_benchmark_ends_at_the_baselines_doses_in_no_more_scans(
    capsys, tmp_path
) -> None:
    """Three real slabs (the shared abdomen, else a written series): the same final dose and noise as
    the search a doubling at a time, in no more scans, and the figures are printed."""
    argv = ["--slabs", "3"]
    if not bench_exposure_control.ABDOMEN.is_dir():
        write_ct_series(tmp_path / "series", 4)
        argv += ["--anatomy", str(tmp_path / "series")]
    assert bench_exposure_control.main(argv) == 0
    printed = capsys.readouterr().out
    base = re.search(r"a doubling at a time \(baseline\): (\d+) scans", printed)
    ours = re.search(r"predicted \(exposure_controlled_scan\): (\d+) scans", printed)
    assert base and ours, printed
    assert 3 <= int(ours.group(1)) <= int(base.group(1))
    match = re.search(
        r"same final dose on every slab: True; largest difference of a slab ([\d.]+) HU", printed
    )
    assert match and float(match.group(1)) < 0.05, printed
