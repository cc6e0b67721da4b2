"""tools/kernel_benchmark.py --compare-load: each runtime is measured idle and busy in every round, and
the runtimes take turns going first, so neither meets the busy processes' placement only early; the
per-round ratio of the slowdowns comes with an interval that says whether it stands out of the rounds'
spread."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import kernel_benchmark as kb  # noqa: E402


def test_runtimes_take_turns_going_first_idle_and_busy(monkeypatch):
    loads, calls = [], []

    @contextlib.contextmanager
    def fake_busy(n):  # records the load of each block instead of starting processes
        loads.append(n)
        yield

    monkeypatch.setattr(kb, "busy_processes", fake_busy)
    monkeypatch.setattr(kb.time, "sleep", lambda s: None)
    runners = {name: (lambda name=name: calls.append((len(loads), name))) for name in ("ort", "stealing")}
    times = kb._idle_and_busy_rounds(runners, rounds=4, load=2, runs=3)

    assert loads == [0, 2] * 4  # idle, then busy, every round
    assert sorted(times) == ["ort busy", "ort idle", "stealing busy", "stealing idle"]
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())
    first = [next(name for block, name in calls if block == b) for b in range(1, 9)]
    assert first == ["ort", "ort", "stealing", "stealing"] * 2  # per block: round 0 idle, busy; round 1 ...


def _rounds(sculpt_x, ort_x):
    n = len(sculpt_x)
    return {"ort idle": [2.0] * n, "ort busy": [2.0 * x for x in ort_x],
            "stealing idle": [1.0] * n, "stealing busy": list(sculpt_x)}


def test_the_per_round_slowdown_ratio_and_its_interval():
    # the same ratio every round: the interval is that value
    assert kb._paired_slowdown_ratio(_rounds([2.2] * 9, [2.0] * 9), "stealing") == pytest.approx((1.1, 1.1, 1.1))
    # clearly worse in every round: the interval lies above 1
    median, low, high = kb._paired_slowdown_ratio(_rounds([3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 2.8, 3.0, 3.1], [2.0] * 9),
                                                  "stealing")
    assert median == pytest.approx(1.5) and 1.0 < low <= median <= high
    # two groups of rounds (the busy processes' placement): a median a little over 1, an interval across it
    sculpt_x = [2.1, 2.2, 3.8, 2.0, 3.9, 2.2, 3.7, 2.1, 3.6]
    ort_x = [2.0, 3.5, 2.1, 3.6, 2.2, 2.0, 3.9, 2.1, 2.0]
    median, low, high = kb._paired_slowdown_ratio(_rounds(sculpt_x, ort_x), "stealing")
    assert median > 1.0 and low < 1.0 < high
