"""Measure `canonicalize` on the real models: graph size, params, MACs, output error, onnxruntime
latency before/after (medians of repeated runs in one process), and whether TVM Relax imports and
compiles the result for llvm.

    python tools/canonicalize_report.py [--runs 20] [--models det,rec,cls,resnet50,...] [--no-tvm] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


from sculpt.runtime import compare_models, median_latency_ms
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, backend_test_data_dir, ppocr_model
from sculpt.passes import Pipeline
from sculpt.textdata import text_input

LIGHT = ["resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19"]


def load(name: str) -> tuple[Model, dict[str, list[int]]]:
    if name in PPOCR_SHAPES:
        return ppocr_model(name), {"x": PPOCR_SHAPES[name]}
    m = Model.load(backend_test_data_dir() / "light" / f"light_{name}.onnx")
    return m, {}


def median_ms(model: Model, feeds: dict, runs: int) -> float:
    return median_latency_ms(model, feeds, runs=runs, warmup=1, threads=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="det,rec,cls," + ",".join(LIGHT))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model, shapes = load(name)
        fixed = model.clone().fix_input_shapes(shapes) if shapes else model.clone()
        t = time.perf_counter()
        res = Pipeline.from_specs(["canonicalize"], input_shapes=shapes, statistics=False).run(model)
        secs = time.perf_counter() - t
        out = res.model
        if name in PPOCR_SHAPES:  # rendered text: the inputs these models are made for
            feeds = [{"x": text_input(shapes["x"], seed)} for seed in range(2)]
        else:
            feeds = list(CalibrationSet.random(fixed, count=2, low=-1.0, high=1.0))
        cmp = compare_models(fixed, out, feeds)
        b, a = cost_of(fixed), cost_of(out)
        # alternate the two models so that drift in machine load hits both alike
        t_before, t_after = [], []
        for _ in range(3):
            t_before.append(median_ms(fixed, feeds[0], args.runs))
            t_after.append(median_ms(out, feeds[0], args.runs))
        row = {"model": name, "nodes_before": len(fixed.graph.node), "nodes_after": len(out.graph.node),
               "params_before": b.params, "params_after": a.params, "macs_before": b.macs, "macs_after": a.macs,
               "max_rel_error": cmp.max_rel, "seconds": secs, "ort_ms_before": statistics.median(t_before),
               "ort_ms_after": statistics.median(t_after)}
        if not args.no_tvm:
            from sculpt.backends.tvm import build, import_to_relax

            for label, m in (("tvm_original", fixed), ("tvm_canonical", out)):
                try:
                    build(import_to_relax(m), "llvm")
                    row[label] = "ok"
                except Exception as e:  # report, don't stop
                    row[label] = "fails: " + str(e).split(":")[0][:40]
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["model", "nodes", "params", "MACs", "max rel. err", "ort ms before", "ort ms after", "ratio", "pass s"]
    if not args.no_tvm:
        head += ["TVM import+build (orig / canon)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], f"{r['nodes_before']} → {r['nodes_after']}",
                 f"{r['params_before'] / 1e6:.3f}M → {r['params_after'] / 1e6:.3f}M",
                 f"{r['macs_before'] / 1e9:.3f}G → {r['macs_after'] / 1e9:.3f}G", f"{r['max_rel_error']:.1e}",
                 f"{r['ort_ms_before']:.2f}", f"{r['ort_ms_after']:.2f}",
                 f"{r['ort_ms_after'] / r['ort_ms_before']:.2f}", f"{r['seconds']:.1f}"]
        if not args.no_tvm:
            cells.append(f"{r['tvm_original']} / {r['tvm_canonical']}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
