"""``benchmarks/bench_train_step.py``: a leg's iterations per second at one slab per step and at a fraction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train_step  # noqa: E402


def test_the_training_speed_benchmark_times_both_settings_on_the_trainers_own_step(tmp_path, capsys) -> None:
    """Four steps each: the baseline makes a slab every step, ``--refresh 0.25`` one in four; both
    rates and their ratio are printed and written (the figure itself is the benchmark's, not a
    test's: nothing here asserts a speed)."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "speed.json"
    args = ["--iterations", "4", "--pool", "1", "--batch", "4", "--refresh", "0.25", "--json", str(out)]
    assert bench_train_step.main(args) == 0
    result = json.loads(out.read_text())
    base, cheap = result["runs"]
    assert (base["refresh"], cheap["refresh"]) == (1.0, 0.25)
    assert (base["slabs_made"], cheap["slabs_made"]) == (4, 1)
    assert base["iterations"] == cheap["iterations"] == 4 and base["seconds"] > 0 and cheap["seconds"] > 0
    assert result["ratio"] == cheap["iterations_per_s"] / base["iterations_per_s"]
    printed = capsys.readouterr().out
    assert "--noise-refresh 1: " in printed and "--noise-refresh 0.25: " in printed
    assert f"ratio: {result['ratio']:.2f}x" in printed
    assert torch.get_num_threads() == threads  # the benchmark's one thread does not outlive it
