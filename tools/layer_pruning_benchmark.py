"""Layer (block) pruning on real models: how many residual blocks each model has, what removing the
cheapest 1, 2, ... of them costs, with and without the least-squares refit.

    python tools/layer_pruning_benchmark.py [--models resnet50,det,rec] [--counts 1,2,4]
        [--calibration 32] [--held-out 8] [--plain] [--lines 200] [--threads 1] [--runs 10] [--rounds 3] [--json]

Every model starts canonicalized with its input shape fixed. Calibration and held-out samples are
disjoint: rendered text (``sculpt.textdata.text_input``) for PP-OCR det, rendered text lines of
the OCR task's calibration seeds for rec (``sculpt.ocr_task.calibration_inputs``), normal noise for
the onnx wheel's light resnet50 (whose weights are all 0.02: the model is a topology, not a
trained network; its final Softmax is dropped, errors are measured on the logits). Per model and removal count: MACs, the relative L2 output error on the held-out
samples, for rec the OCR task (exact match and character accuracy on ``--lines`` lines of the
evaluation seed), and onnxruntime latency (median over rounds of the median of repeated runs, all
variants of a model in turn in each round).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamic_quant_benchmark import logits_out  # noqa: E402

from sculpt import ocr_task  # noqa: E402
from sculpt.ir.calibration import CalibrationSet  # noqa: E402
from sculpt.ir.cost import cost_of  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
from sculpt.models import PPOCR_SHAPES, backend_test_data_dir, ppocr_model  # noqa: E402
from sculpt.passes import PassContext, Pipeline, create_pass  # noqa: E402
from sculpt.passes.layer_pruning import OutputReference  # noqa: E402
from sculpt.runtime import interleaved_latency_ms, make_session  # noqa: E402
from sculpt.textdata import text_input  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(name: str) -> tuple[Model, CalibrationSet, CalibrationSet]:
    """The canonicalized model, its calibration samples and its held-out samples."""
    if name in ("det", "rec", "cls"):
        model, shape = ppocr_model(name), PPOCR_SHAPES[name]
    else:
        model = Model.load(backend_test_data_dir() / "light" / f"light_{name}.onnx")
        shape = None
    x = model.input_names[0]
    base = Pipeline.from_specs(["canonicalize"], input_shapes={x: shape} if shape else {},
                               statistics=False).run(model).model
    if shape is None:
        logits_out(base)
    shape = list(base.static_shape(x))
    return base, *(CalibrationSet.from_arrays({x: samples(name, shape, n, seed)}, f"{name} {what}")
                   for n, seed, what in ((ARGS.calibration, 1000, "calibration"), (ARGS.held_out, 2000, "held-out")))


def samples(name: str, shape: list[int], count: int, seed: int) -> np.ndarray:
    if name in ("rec", "cls"):
        return ocr_task.calibration_inputs(name, count, seed=seed)
    if name == "det":
        return np.concatenate([text_input(shape, seed + k) for k in range(count)])
    rng = np.random.default_rng(seed)
    return rng.standard_normal([count] + shape[1:]).astype(np.float32)


def bench(name: str) -> list[dict]:
    t = time.perf_counter()
    base, calibration, held_out = load(name)
    log(f"{name}: canonicalized, {len(calibration)} calibration and {len(held_out)} held-out samples "
        f"({time.perf_counter() - t:.1f}s)")
    reference = OutputReference(base, list(held_out))
    data = ocr_task.rec_set(ARGS.lines) if name == "rec" else None
    characters = ocr_task.character_list(base) if name == "rec" else None
    variants = {"original": (base, {})}
    kinds = [(False, False), (False, True)] + ([(True, True)] if ARGS.plain else [])
    for count in ARGS.counts:
        for plain, refit in kinds:
            t = time.perf_counter()
            ctx = PassContext(calibration=calibration)
            options = {"count": count, "refit": refit, "samples": ARGS.calibration, "plain_layers": plain}
            result = create_pass("layer-pruning", options)(base, ctx)
            if not result.modified:
                log(f"{name}: count={count}: nothing removed ({result.stats.get('reason')})")
                continue
            result.model.verify()
            label = f"count={count}" + (", refit" if refit else "") + (", plain_layers" if plain else "")
            variants[label] = (result.model, result.stats)
            log(f"{name} / {label}: removed {[r['node'] for r in result.stats['removed']]} "
                f"({time.perf_counter() - t:.1f}s)")
    rows = []
    macs0 = cost_of(base).macs
    for label, (model, stats) in variants.items():
        row = {"model": name, "variant": label, "candidates": stats.get("candidates"),
               "removed": [r["node"] for r in stats.get("removed", [])],
               "macs_ratio": cost_of(model).macs / macs0, "held_out_error": reference.error(model)}
        if "refit" in stats:
            row["refit_layers"] = stats["refit"]["layers"] if stats["refit"].get("kept") else 0
        if data is not None:
            m = ocr_task.evaluate_rec(model, data, characters=characters, threads=ARGS.threads)
            row.update({"exact": m.exact_match, "char_acc": m.char_accuracy})
        rows.append(row)
        log(f"{name} / {label}: {row}")
    sessions = {label: make_session(m, threads=ARGS.threads) for label, (m, _) in variants.items()}
    feed = {base.input_names[0]: held_out[0][base.input_names[0]]}
    latency = interleaved_latency_ms(sessions, feed, rounds=ARGS.rounds, runs=ARGS.runs)
    base_ms = latency["original"]
    for row in rows:
        ms = latency[row["variant"]]
        row.update({"latency_ms": ms, "speedup": base_ms / ms})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | variant | removed | MACs | held-out rel. L2 error | OCR task | ORT ms | × original |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        task = f"exact {r['exact']:.1%}, chars {r['char_acc']:.2%}" if "exact" in r else "—"
        removed = ", ".join(r["removed"]) if r["removed"] else f"— ({r['candidates'] or 0} blocks)"
        out.append(f"| {r['model']} | {r['variant']} | {removed} | {r['macs_ratio']:.3f}× | {r['held_out_error']:.3g} | "
                   f"{task} | {r['latency_ms']:.2f} | {r['speedup']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,det,rec")
    ap.add_argument("--counts", default="1,2,4", help="blocks to remove, one variant each")
    ap.add_argument("--calibration", type=int, default=32)
    ap.add_argument("--plain", action="store_true", help="also variants with plain_layers=true (refit)")
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--lines", type=int, default=200, help="OCR task lines (rec)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ARGS = ap.parse_args(argv)
    try:
        ARGS.counts = [int(c) for c in ARGS.counts.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--counts: integers separated by commas, got {ARGS.counts!r}")
    if min(ARGS.counts + [ARGS.held_out, ARGS.lines, ARGS.runs, ARGS.rounds, ARGS.threads]) < 1 or ARGS.calibration < 2:
        ap.error("--counts, --held-out, --lines, --runs, --rounds, --threads must be ≥ 1, --calibration ≥ 2")
    rows = []
    for name in [m.strip() for m in ARGS.models.split(",") if m.strip()]:
        rows += bench(name)
    print(json.dumps(rows, indent=1) if ARGS.json else table(rows))
    return 0


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())
