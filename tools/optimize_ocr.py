"""`sculpt optimize` on the PP-OCR models with the OCR task's accuracy as the metric, checked afterwards on
text lines of another seed, and timed against the input model in onnxruntime in the same run.

    python tools/optimize_ocr.py --models rec cls --max-drop 1 --budget-minutes 25 --json ocr_optimize.json

Per model: the metric during the search (tools/ocr_metric.py, lines of the evaluation seed), the same
metric on lines of another seed (``--check-seed``), latency of input and chosen model in onnxruntime
(1 thread, interleaved rounds, medians), MACs and size, the search's run time. The output folders
(model, pipeline.yaml, report.html, ...) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ocr_metric  # noqa: E402

from sculpt import ocr_task  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
from sculpt.models import ppocr_model_path  # noqa: E402
from sculpt.optimizer import optimize  # noqa: E402
from sculpt.runtime import interleaved_latency_ms, make_session  # noqa: E402

METRICS = {"rec": "rec_char_accuracy", "cls": "cls_accuracy"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rec", "cls"], choices=sorted(METRICS))
    p.add_argument("--max-drop", type=float, default=1.0, help="points of the metric (percent)")
    p.add_argument("--budget-minutes", type=float, default=25.0)
    p.add_argument("--calibration", type=int, default=64, help="calibration lines (seed ocr_task.CALIBRATION_SEED)")
    p.add_argument("--check-seed", type=int, default=4242, help="seed of the lines the chosen model is checked on")
    p.add_argument("--check-lines", type=int, default=300)
    p.add_argument("--max-knobs", type=int, default=24)
    p.add_argument("--out", default="ocr_optimize", help="folder of the per-model output folders")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    con = Console(stderr=True)
    for kind in args.models:
        cal = out / f"{kind}_calibration.npz"
        ocr_task.write_calibration(cal, kind, count=args.calibration)
        metric_fn = getattr(ocr_metric, METRICS[kind])
        start = time.perf_counter()
        result = optimize(ppocr_model_path(kind), str(cal), out / kind, input_shapes={"x": list(ocr_task.input_shape(kind))},
                          metric=f"{Path(ocr_metric.__file__)}:{METRICS[kind]}", max_drop=args.max_drop,
                          budget_minutes=args.budget_minutes, max_knobs=args.max_knobs,
                          progress=lambda text, c: con.print(f"  {kind}: {text}"))
        seconds = time.perf_counter() - start
        chosen = result.files["model"]
        check_data = ocr_task.task_set(kind, args.check_lines, args.check_seed)
        evaluate = ocr_task.evaluate_rec if kind == "rec" else ocr_task.evaluate_cls
        field = "char_accuracy" if kind == "rec" else "accuracy"
        check_in = 100 * getattr(evaluate(ppocr_model_path(kind), check_data), field)
        check_out = 100 * getattr(evaluate(str(chosen), check_data), field)
        feeds = {"x": check_data.inputs[:1]}
        sessions = {"input": make_session(Model.load(ppocr_model_path(kind)), threads=1),
                    "chosen": make_session(Model.load(chosen), threads=1)}
        ms = interleaved_latency_ms(sessions, feeds, rounds=7, runs=30)
        rows.append({"model": kind, "metric": metric_fn.__name__, "max_drop": args.max_drop,
                     "search_metric_input": result.input.metric, "search_metric_chosen": result.chosen.metric,
                     "check_seed": args.check_seed, "check_lines": args.check_lines,
                     "check_metric_input": check_in, "check_metric_chosen": check_out,
                     "check_drop": check_in - check_out, "ort_ms_input": ms["input"], "ort_ms_chosen": ms["chosen"],
                     "speedup": ms["input"] / ms["chosen"], "macs_input": result.input.macs,
                     "macs_chosen": result.chosen.macs, "bytes_input": result.input.bytes,
                     "bytes_chosen": result.chosen.bytes, "candidates": len(result.candidates),
                     "search_seconds": round(seconds, 1), "nothing_helped": result.nothing_helped,
                     "plan": result.chosen.plan, "report": str(result.report_path)})
    table = Table(title="sculpt optimize on PP-OCR, --metric = the OCR task's accuracy (percent)")
    for col in ("model", "budget", "search: input → chosen", "check seed: input → chosen (drop)",
                "ort ms input → chosen (1 thread)", "speedup", "MACs", "candidates", "search time"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], f"{r['max_drop']:g} pt",
                      f"{r['search_metric_input']:.2f} → {r['search_metric_chosen']:.2f}",
                      f"{r['check_metric_input']:.2f} → {r['check_metric_chosen']:.2f} ({r['check_drop']:.2f})",
                      f"{r['ort_ms_input']:.2f} → {r['ort_ms_chosen']:.2f}", f"{r['speedup']:.2f}×",
                      f"{r['macs_input'] / 1e6:.0f}M → {r['macs_chosen'] / 1e6:.0f}M", str(r["candidates"]),
                      f"{r['search_seconds'] / 60:.1f} min")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
