"""The load benchmarks' busy processes (tools/kernel_benchmark.busy_processes) never outlive the
benchmark: one killed by a signal (so its `with` block never exits) leaves no spinner behind to load
the machine for whatever is measured next."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_spinner_stops_when_the_benchmark_is_killed():
    code = (f"import sys, time; sys.path.insert(0, {str(TOOLS)!r}); import kernel_benchmark as kb\n"
            "spinners = kb.busy_processes(1).__enter__()\n"
            "print(spinners.procs[0].pid, flush=True)\n"
            "time.sleep(60)\n")
    benchmark = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    spinner = int(benchmark.stdout.readline())
    time.sleep(0.5)
    assert _running(spinner)
    benchmark.terminate()  # SIGTERM, as `timeout` sends: no __exit__
    benchmark.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _running(spinner) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _running(spinner)
    if alive:
        os.kill(spinner, 9)
    assert not alive
