"""How TVM builds and onnxruntime degrade when every core is busy with other processes.

For each TVM thread policy, one fresh process (TVM's pool reads its policy once per process) runs
``kernel_benchmark.py --end-to-end --compare-load N``: every model is built once and measured in
alternating rounds idle and with N spinning processes (one per core by default). Both runtimes use
``--threads`` threads and are measured in the same rounds, so each row compares their slowdowns under
the same load:

    python tools/load_benchmark.py --models zoo --threads 2 --policies shared
    python tools/load_benchmark.py --models rec,det,squeezenet --policies shared,dedicated --runs 10
    python tools/load_benchmark.py --models zoo --policies shared --compare-pools  # TVM's and sculpt's pools

Columns: idle and busy medians (ms) of onnxruntime and TVM (sculpt kernels), each one's slowdown
(busy / idle), TVM / onnxruntime idle and busy, and TVM's slowdown over onnxruntime's per round (both
measured in it): the median over the rounds and a 90% bootstrap interval of it, which says whether a
model degraded more than onnxruntime beyond the rounds' spread (an interval above 1). ``--compare-pools`` runs each build on TVM's
pool (the policy given, or shared) and on sculpt's (stealing) in the same process and rounds. The issue's bar: TVM's slowdown no larger than
onnxruntime's."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("kernel_benchmark.py")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="rec", help="comma-separated zoo models (see kernel_benchmark.py), or zoo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default="stealing,shared", help="thread policies, one process each")
    p.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes when loaded")
    p.add_argument("--runs", type=int, default=10)
    # the busy processes start anew every round, and the kernel places them and the model's threads
    # afresh: a model's busy time depends on that placement (AlexNet 23 or 31-48 ms, SqueezeNet 4.5 or 8.8
    # ms, session 22), so a round is one sample of it; 9 rounds changed which models slowed more than
    # onnxruntime from 4 of 17 (3 rounds) to 2
    p.add_argument("--rounds", type=int, default=9, help="idle/busy rounds, each with new busy processes")
    p.add_argument("--compare-pools", action="store_true",
                   help="each build on TVM's pool and on sculpt's (stealing) in the same rounds")
    args = p.parse_args(argv)
    status = 0
    for policy in [q.strip() for q in args.policies.split(",") if q.strip()]:
        cmd = [sys.executable, str(BENCH), "--models", args.models, "--end-to-end", "--threads", str(args.threads),
               "--thread-policy", policy, "--compare-load", str(args.load), "--runs", str(args.runs),
               "--rounds", str(args.rounds)] + (["--compare-pools"] if args.compare_pools else [])
        status = max(status, subprocess.run(cmd).returncode)
    return status


if __name__ == "__main__":
    sys.exit(main())
