"""`sculpt optimize` without a metric (the fidelity proxy) on real models of other families, each checked
afterwards on samples no part of the search saw, and timed against its input in onnxruntime in the same run.

    python tools/optimize_models.py --models doc-orientation ppocrv6-rec-small light_squeezenet --json out.json

Inputs are rendered pages of text (sculpt.textdata), turned by 0/90/180/270 degrees, at each model's
shape: what a document classifier or text recognizer sees, and varied enough that a classifier's
answers differ. Per model: the proxy the search used (top-1 agreement or relative output error) on its
held-out calibration samples and again on ``--check`` fresh samples (other seeds), latency of input and
chosen model in onnxruntime (1 thread, interleaved rounds, medians), MACs, search time. "Never slower"
is the last column: the chosen model's measured time over the input's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from sculpt.ir.calibration import CalibrationSet  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
from sculpt.models import backend_test_cases  # noqa: E402
from sculpt.optimizer import optimize  # noqa: E402
from sculpt.optimizer.metric import proxy_metric  # noqa: E402
from sculpt.runtime import interleaved_latency_ms, make_session  # noqa: E402
from sculpt.textdata import text_input  # noqa: E402


def model_and_shape(name: str) -> tuple[Path, str, tuple]:
    if name in zoo.ZOO:
        entry = zoo.ZOO[name]
        return zoo.fetch(name), entry.input_name, entry.input_shape
    case = next((c for c in backend_test_cases(("light",)) if c.name == name), None)
    if case is None:
        raise SystemExit(f"unknown model '{name}': a zoo name ({', '.join(zoo.ZOO)}) or an onnx light model")
    model = Model.load(case.model_path)
    name = model.input_names[0]  # old exports list the initializers among the inputs too
    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in model.input_shapes()[name])
    return case.model_path, name, shape


def rendered(shape: tuple, count: int, seed: int) -> np.ndarray:
    """``count`` text pages at ``shape`` (N, C, H, W), each turned by a multiple of 90 degrees."""
    _, c, h, w = shape
    out = np.empty((count, c, h, w), np.float32)
    for k in range(count):
        turns = (seed + k) % 4
        hh, ww = (w, h) if turns % 2 else (h, w)
        page = text_input((1, 3, hh, ww), seed * 1000 + k)[0]
        page = np.rot90(page, turns, axes=(1, 2))
        out[k] = page[:c] if c <= 3 else np.repeat(page[:1], c, axis=0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["doc-orientation", "ppocrv6-rec-small", "light_squeezenet"])
    p.add_argument("--calibration", type=int, default=160, help="calibration samples")
    p.add_argument("--held-out", type=int, default=120,
                   help="of them held out for the proxy (top-1 agreement moves in steps of 100/N points)")
    p.add_argument("--check", type=int, default=32, help="fresh samples the chosen model is checked on")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--max-knobs", type=int, default=16)
    p.add_argument("--out", default="optimize_models")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    con = Console(stderr=True)
    rows = []
    for name in args.models:
        path, input_name, shape = model_and_shape(name)
        shape = (1,) + tuple(shape[1:])
        cal = CalibrationSet.from_arrays({input_name: rendered(shape, args.calibration, seed=11)},
                                         f"{args.calibration} rendered pages")
        start = time.perf_counter()
        result = optimize(path, cal, out / name, input_shapes={input_name: list(shape)}, held_out=args.held_out,
                          budget_minutes=args.budget_minutes, max_knobs=args.max_knobs,
                          progress=lambda text, c: con.print(f"  {name}: {text}"))
        seconds = time.perf_counter() - start
        source = Model.load(path)
        check = [{input_name: x[None]} for x in rendered(shape, args.check, seed=97)]
        checker = proxy_metric(source, check, kind=result.metric.kind)
        chosen = Model.load(result.files["model"])
        check_drop = checker.drop(checker.evaluate(source, Path(path)), checker.evaluate(chosen, result.files["model"]))
        ms = interleaved_latency_ms({"input": make_session(source, threads=1), "chosen": make_session(chosen, threads=1)},
                                    check[0], rounds=7, runs=20)
        rows.append({"model": name, "proxy": result.metric.name, "max_drop": result.max_drop,
                     "search_drop": result.chosen.drop, "check_drop": check_drop, "check_samples": len(check),
                     "ort_ms_input": ms["input"], "ort_ms_chosen": ms["chosen"],
                     "time_ratio": ms["chosen"] / ms["input"], "macs_input": result.input.macs,
                     "macs_chosen": result.chosen.macs, "candidates": len(result.candidates),
                     "search_seconds": round(seconds, 1), "nothing_helped": result.nothing_helped,
                     "plan": result.chosen.plan})
    table = Table(title="sculpt optimize without --metric (fidelity proxy), onnxruntime 1 thread")
    for col in ("model", "proxy (budget)", "drop: search / fresh samples", "ort ms input → chosen",
                "chosen / input time", "MACs", "candidates", "search time", "result"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], f"{r['proxy']} ({r['max_drop']:g})",
                      f"{r['search_drop']:.3g} / {r['check_drop']:.3g}",
                      f"{r['ort_ms_input']:.2f} → {r['ort_ms_chosen']:.2f}", f"{r['time_ratio']:.2f}",
                      f"{r['macs_input'] / 1e6:.0f}M → {r['macs_chosen'] / 1e6:.0f}M", str(r["candidates"]),
                      f"{r['search_seconds'] / 60:.1f} min", "input returned" if r["nothing_helped"] else "compressed")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
