"""Host latency of the PP-OCR models: onnxruntime vs TVM (TVM's default pipeline, sculpt's kernels,
MetaSchedule-tuned), each model measured by `sculpt bench` in one process (medians of rounds of runs).

    python tools/tvm_bench_report.py [--models det,rec,cls] [--tune 64] [--runs 20] [--rounds 3] [--threads 2]

Prints a markdown table; the raw JSON of each run goes to --json-dir if given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sculpt.models import PPOCR_SHAPES, ppocr_model_path


def bench(kind: str, args) -> dict:
    shape = ",".join(map(str, PPOCR_SHAPES[kind]))
    command = [sys.executable, "-m", "sculpt", "bench", str(ppocr_model_path(kind)), "--input-shape", f"x={shape}",
               "--runs", str(args.runs), "--rounds", str(args.rounds), "--threads", str(args.threads), "--json"]
    if args.kernels:
        command += ["--kernels", args.kernels]
    if args.tune:
        command += ["--tune", str(args.tune)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind}: sculpt bench failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cls,rec,det")
    p.add_argument("--tune", type=int, default=64, help="MetaSchedule trials per model (0: no tuned column)")
    p.add_argument("--kernels", default="both", help="as for sculpt bench (both: TVM default and sculpt kernels)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-dir", help="write each model's JSON result here")
    args = p.parse_args()
    rows = []
    for kind in args.models.split(","):
        result = bench(kind, args)
        if args.json_dir:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.json_dir) / f"{kind}.json").write_text(json.dumps(result, indent=2))
        rows.append((kind, result))
        print(f"{kind}: {json.dumps(result)}", file=sys.stderr, flush=True)
    columns = [("tvm_default_ms", "TVM default"), ("tvm_sculpt_ms", "TVM sculpt kernels"), ("tvm_ms", "TVM"),
               ("tvm_tuned_ms", "TVM tuned")]
    present = [(k, label) for k, label in columns if any(k in r for _, r in rows)]
    header = ["model", "input", "onnxruntime ms"] + [f"{label} ms (ort/TVM)" for _, label in present] + \
        ["tuning trials (tasks)", "max rel. error"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind, r in rows:
        cells = [kind, "x".join(map(str, PPOCR_SHAPES[kind])), f"{r['ort_ms']:.2f}"]
        for key, _ in present:
            cells.append(f"{r[key]:.2f} ({r['ort_ms'] / r[key]:.2f})" if key in r else "-")
        tuning = r.get("tuning")
        cells.append(f"{tuning['trials']} ({tuning['tasks']})" if tuning else "-")
        errors = [v for k, v in r.items() if k.endswith("_max_rel_error")]
        cells.append(f"{max(errors):.1e}" if errors else "-")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
