"""`sculpt demo`: compress the built-in example and the PP-OCR classifier, print what it bought."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.table import Table

from sculpt import models, ocr_task
from sculpt.cli.common import fmt_bytes, fmt_int, make_console
from sculpt.errors import OptionError, SculptError
from sculpt.examples import tiny_convnet
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.passes.pipeline import Pipeline
from sculpt.runtime import compare_models, median_latency_ms


def register_demo(sub) -> None:
    d = sub.add_parser("demo", help="compress the built-in example and the PP-OCR classifier; print the table")
    d.add_argument("-o", "--output-dir", help="where to write the models (default: a new temporary folder)")
    d.add_argument("--ratio", type=float, default=0.3, help="fraction of MACs channel pruning removes")
    d.set_defaults(func=cmd_demo)


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    """Compress two models and print what it bought: the built-in tiny CNN (random calibration data)
    and, when the rapidocr-onnxruntime wheel is installed, the PP-OCR text-orientation classifier
    (calibrated and evaluated on rendered text lines)."""
    con = make_console()
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise OptionError(f"{args.output_dir}: exists and is not a folder; -o takes a folder")
    passes = ["canonicalize", "dead-channel-elimination", f"channel-pruning:ratio={args.ratio}"]
    jobs = [("tiny_convnet (built in)", "tiny_convnet", tiny_convnet(), {"input": [1, 3, 32, 32]}, None)]
    try:
        jobs.append(("PP-OCR mobile v2.0 cls", "ppocr_cls", models.ppocr_model("cls"), {"x": ocr_task.input_shape("cls")},
                     "cls"))
    except SculptError as e:
        con.print(f"[yellow]skipping the PP-OCR classifier: {e}[/]")
    outdir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sculpt-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"sculpt demo: {' → '.join(passes)}")
    for col in ("model", "params", "MACs", "file size", "onnxruntime ms", "accuracy", "time"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, stem, model, shapes, task in jobs:
        fixed = model.clone().fix_input_shapes(shapes)
        if task:
            cal = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs(task, 32)}, "rendered text lines")
        else:
            cal = CalibrationSet.random(fixed, count=16, low=0.0, high=1.0)
        start = time.perf_counter()
        res = Pipeline.from_specs(passes, input_shapes=shapes, calibration=cal, statistics=False).run(model)
        secs = time.perf_counter() - start
        out = res.model
        out.verify()
        out.save(outdir / f"{stem}.sculpt.onnx")
        b, a = cost_of(fixed), cost_of(out)
        feed = next(iter(cal))
        t_before, t_after = _median_ms(fixed, feed), _median_ms(out, feed)
        if task:
            data = ocr_task.task_set(task, count=200)
            acc_b = ocr_task.evaluate(task, fixed, data).accuracy
            acc_a = ocr_task.evaluate(task, out, data).accuracy
            accuracy = f"{acc_b:.1%} -> {acc_a:.1%} (orientation, 200 lines)"
        else:
            cmp = compare_models(fixed, out, list(res.split.held_out))  # samples the passes did not fit to
            accuracy = f"max rel. output error {cmp.max_rel:.2g} ({cmp.samples} held-out samples)"
        table.add_row(label, f"{fmt_int(b.params)} -> {fmt_int(a.params)}",
                      f"{fmt_int(b.macs)} -> {fmt_int(a.macs)} ({a.macs / b.macs:.0%})",
                      f"{fmt_bytes(b.model_bytes)} -> {fmt_bytes(a.model_bytes)}",
                      f"{t_before:.2f} -> {t_after:.2f}", accuracy, f"{secs:.1f} s")
    con.print(table)
    con.print(f"models written to {outdir}")
    return 0


def _median_ms(model, feed, runs: int = 30) -> float:
    return median_latency_ms(model, feed, runs=runs, warmup=1, threads=2)
