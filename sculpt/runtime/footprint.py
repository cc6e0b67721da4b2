"""What a model costs to run in onnxruntime on this machine: median latency of repeated runs and the
peak memory of loading and running it, each model measured in a fresh process of its own (a peak
resident set is a process's high-water mark: measured in a shared process, the second model would
inherit the first one's peak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from sculpt.common import one_line
from sculpt.errors import RuntimeFailure
from sculpt.ir.model import Model

_CHILD = Path(__file__).with_name("footprint_child.py")
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
TIMEOUT_SECONDS = 900


@dataclass
class Footprint:
    """One model in onnxruntime: median latency (ms) over ``runs`` runs after warm-up, and the growth
    of the peak resident memory (bytes) from before the session was created to after the last run."""

    latency_ms: float | None
    runs: int
    peak_bytes: int
    threads: int | None = None

    def as_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "runs": self.runs, "peak_bytes": self.peak_bytes,
                "threads": self.threads}


def measure_footprint(model: Model, feeds: Mapping[str, np.ndarray], *, runs: int = DEFAULT_RUNS,
                      warmup: int = DEFAULT_WARMUP, threads: int | None = None) -> Footprint:
    """Latency and peak memory of ``model`` on ``feeds`` in onnxruntime's CPU provider, measured in a
    child process; a model onnxruntime cannot load or run is a RuntimeFailure."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0, got {runs} and {warmup}")
    with tempfile.TemporaryDirectory(prefix="sculpt-footprint-") as tmp:
        model_path = Path(tmp) / "model.onnx"
        feeds_path = Path(tmp) / "feeds.npz"
        model.save(model_path)
        np.savez(feeds_path, **{k: np.asarray(v) for k, v in feeds.items()})
        cmd = [sys.executable, str(_CHILD), str(model_path), str(feeds_path), str(runs), str(warmup),
               str(threads or 0)]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"onnxruntime took over {TIMEOUT_SECONDS} s to time the model") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeFailure(f"onnxruntime failed to time the model: {one_line(last)}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Footprint(data["latency_ms"], int(data["latency_runs"]), int(data["peak_bytes"]), threads)
