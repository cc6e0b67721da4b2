"""How TVM builds and onnxruntime degrade when every core is busy with other processes.

For each model and TVM thread policy, ``kernel_benchmark.py --end-to-end`` runs twice in a fresh
process (TVM's pool reads its policy once per process): on an idle machine, then with ``--load``
spinning processes (one per core by default). Both runtimes use ``--threads`` threads and are measured
in the same runs, so each row compares their slowdowns under the same load:

    python tools/load_benchmark.py --models rec,det,squeezenet --threads 2
    python tools/load_benchmark.py --models rec --policies shared,dedicated --runs 10

Columns: idle and loaded medians (ms) of onnxruntime and TVM (sculpt kernels), and each one's
slowdown, loaded / idle. The issue's bar: TVM's slowdown no larger than onnxruntime's."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("kernel_benchmark.py")
_ROW = re.compile(r"^(\S+)\s+([\d.]+)\s+(nan|[\d.]+)\s+([\d.]+)\s")


def measure(model: str, threads: int, policy: str, load: int, runs: int, rounds: int) -> tuple[float, float]:
    """(onnxruntime ms, TVM ms) of one model, from a fresh kernel_benchmark process."""
    cmd = [sys.executable, str(BENCH), "--models", model, "--end-to-end", "--skip-default", "--threads", str(threads),
           "--thread-policy", policy, "--load", str(load), "--runs", str(runs), "--rounds", str(rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{model}: kernel_benchmark failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    for line in out.stdout.splitlines():
        m = _ROW.match(line)
        if m and m.group(1) == model:
            return float(m.group(2)), float(m.group(4))
    raise RuntimeError(f"{model}: no result line in kernel_benchmark's output")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="rec", help="comma-separated zoo models (see kernel_benchmark.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default="shared,dedicated", help="TVM thread policies to compare")
    p.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes when loaded")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{'model':12} {'policy':9} {'ort idle':>9} {'ort load':>9} {'ort x':>6} {'tvm idle':>9} {'tvm load':>9} "
          f"{'tvm x':>6}   ({args.threads} threads, {args.load} busy processes when loaded)")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for policy in [q.strip() for q in args.policies.split(",") if q.strip()]:
            ort_idle, tvm_idle = measure(model, args.threads, policy, 0, args.runs, args.rounds)
            ort_load, tvm_load = measure(model, args.threads, policy, args.load, args.runs, args.rounds)
            print(f"{model:12} {policy:9} {ort_idle:9.2f} {ort_load:9.2f} {ort_load / ort_idle:6.2f} "
                  f"{tvm_idle:9.2f} {tvm_load:9.2f} {tvm_load / tvm_idle:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
