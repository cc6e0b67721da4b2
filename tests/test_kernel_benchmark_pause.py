"""tools/kernel_benchmark.py --pause-ms: every timed run follows an idle pause (one inference per camera
frame), and the pause is not counted in the run's time."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import kernel_benchmark as kb  # noqa: E402


def test_each_timed_run_follows_the_pause_and_the_pause_is_not_timed(monkeypatch):
    monkeypatch.setattr(kb, "_pause_s", 0.03)
    starts = []
    median = kb._median_ms(lambda: starts.append(time.perf_counter()), runs=5, warmup=1)
    gaps = [b - a for a, b in zip(starts[1:], starts[2:])]  # between timed runs (the first is warm-up)
    assert len(starts) == 6 and min(gaps) >= 0.03
    assert median < 5.0  # ms: the run itself, not the 30 ms before it


def test_a_zero_pause_does_not_sleep(monkeypatch):
    monkeypatch.setattr(kb, "_pause_s", 0.0)
    begin = time.perf_counter()
    kb._median_ms(lambda: None, runs=200, warmup=0)
    assert time.perf_counter() - begin < 0.5
