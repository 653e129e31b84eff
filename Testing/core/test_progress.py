"""Progress reporting shared by every front end (``core/progress.py``)."""

from __future__ import annotations

import io

import pytest

from IPv2DenoiseLib.core import progress as progress_module
from IPv2DenoiseLib.core.progress import EtaEstimator, PlainLinesProgress


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_the_eta_is_the_rate_of_the_work_not_of_the_set_up_before_it(clock) -> None:
    eta = EtaEstimator()
    clock.now += 300.0  # five minutes of set-up (a noise pool) before the first iteration
    assert eta.eta(1, 1000) == pytest.approx(300.0 * 999)  # one report: the rate since the start
    clock.now += 99.0
    assert eta.eta(100, 1000) == pytest.approx(900.0)  # 1 s per iteration since the first report
    clock.now += 450.0
    assert eta.eta(550, 1000) == pytest.approx(450.0)
    assert eta.eta(1000, 1000) == 0.0


def test_a_job_reporting_from_zero_gets_its_eta_from_the_start_of_its_work(clock) -> None:
    eta = EtaEstimator()
    clock.now += 50.0
    assert eta.eta(0, 10) is None
    clock.now += 20.0
    assert eta.eta(2, 10) == pytest.approx(80.0)


def test_plain_lines_show_the_whole_elapsed_time_and_the_eta_of_the_work(clock) -> None:
    stream = io.StringIO()
    bar = PlainLinesProgress("train", every_s=0.0, stream=stream)
    clock.now += 300.0
    bar(1, 1000, "loss 0.1")
    clock.now += 99.0
    bar(100, 1000, "loss 0.1")
    first, second = stream.getvalue().splitlines()
    assert first.startswith("train:   0% (300 s, about ")
    assert second == "train:  10% (399 s, about 15 min 00 s left) loss 0.1"


def test_the_terminal_bar_counts_its_rate_from_the_first_report_too() -> None:
    import time

    from tqdm import tqdm

    from IPv2DenoiseLib.core.progress import TqdmProgress

    bar = TqdmProgress("train", disable=False)
    try:
        time.sleep(2.0)  # set-up
        bar(1, 100)
        time.sleep(0.2)
        bar(21, 100)
        state = bar.bar.format_dict
        assert state["initial"] == 1 and state["elapsed"] < 1.5
        rate = (state["n"] - state["initial"]) / state["elapsed"]
        assert (state["total"] - state["n"]) / rate < 4.0  # ~0.8 s; counting the set-up: ~8 s
        assert "train" in tqdm.format_meter(**state)
    finally:
        bar.close()


def test_a_long_call_reports_inside_the_steps_it_stands_for() -> None:
    """One call that counts as several steps (a volume's dose simulation, a model's training)
    moves the bar inside them instead of leaving it still until it returns."""
    from IPv2DenoiseLib.core.progress import Steps

    seen: list[tuple[float, str]] = []
    steps = Steps(4, lambda done, total, message="": seen.append((done / total, message)))
    steps("first")
    inner = steps.within("simulating", units=2)
    for done in (1, 2, 3, 4):
        inner(done, 4, "slices")
    steps.done += 1
    steps("after")
    assert seen == [
        (0.25, "first"),
        (0.375, "simulating"),
        (0.5, "simulating"),
        (0.625, "simulating"),
        (0.75, "simulating"),
        (0.75, "after"),
    ]
