"""``benchmarks/bench_lowdose.py``: the projector against scikit-image, and the NUFFT tolerance's cost."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_lowdose  # noqa: E402


def test_the_projector_benchmark_prints_every_row_and_the_tolerance_costs_no_accuracy(capsys) -> None:
    """Two small slices: every row is printed with its rate; the default tolerance's sinogram and
    FBP stay within 1e-3 of the tighter one's (the benchmark's figure of 3e-5 / 1e-4 is at 512²)."""
    bench_lowdose.main(["--slices", "2", "--size", "64", "--views", "60"])
    printed = capsys.readouterr().out
    for row in ("scikit-image radon+iradon", "ours (finufft) fwd+FBP", "simulate_low_dose parallel", "fan"):
        assert row in printed
    match = re.search(
        r"ours at eps 1e-05 fwd\+FBP\s+:\s+([\d.]+) slices/s\s+default eps 0.0001 is\s+([\d.]+)x faster; "
        r"relative difference: sinogram ([\d.e+-]+), FBP ([\d.e+-]+)",
        printed,
    )
    assert match, printed
    rate, ratio, sinogram, fbp = (float(g) for g in match.groups())
    assert rate > 0 and ratio > 0
    assert 0 < sinogram < 1e-3 and 0 < fbp < 1e-3
