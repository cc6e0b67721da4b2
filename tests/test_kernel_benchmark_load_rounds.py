"""tools/kernel_benchmark.py --compare-load: each runtime is measured idle and busy in every round, and
the runtimes take turns going first, so neither meets the busy processes' placement only early."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

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
