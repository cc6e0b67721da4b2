"""Block-sparse kernels against dense ones, and sparsified PP-OCR rec end to end.

Part 1 (kernels): for PP-OCR 1×1 conv layer shapes, each block shape and sparsity: the BSR kernel's
median time against the dense TIR kernel of the same shape and style and against onnxruntime's
dense Conv (a one-node model holding the same zero-filled weights), all measured in this run.
Part 2 (end to end, ``--e2e``): PP-OCRv4 rec canonicalized, sparsified per setting (block:sparsity)
and per variant (how the pattern is chosen — ``magnitude`` or ``activation`` saliency — and whether
the kept weights are refit, ``+refit`` = ``sparsify:reconstruct=true``), calibrated on rendered
lines of a seed other than the evaluation set's; built with ``apply_sparse_kernels(mode='auto')``.
Per row: the rendered-text character accuracy and exact-line match (``sculpt.ocr_task``), the
latency of the TVM build after the sparse rewrite (``--kernels``: the pipeline for the rest of the
model, ``sculpt`` = the kernel library, ``default`` = TVM's own; the dense row is the same build of
the dense model) and of onnxruntime on the sparsified ONNX, the max relative difference TVM vs
onnxruntime, and the time the pass took.

    python tools/sparse_benchmark.py                              # kernels, all blocks × 50/70/80/90 %
    python tools/sparse_benchmark.py --e2e --skip-kernels --count 100 --settings 8x1:0.5,8x1:0.9 \
        --variants magnitude,magnitude+refit
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import helper

# (name, Cout, Cin, H, W): the largest 1×1 convs of PP-OCRv4 rec and det (canonicalized, batch 1)
LAYERS = [
    ("rec 240←240 @12×80", 240, 240, 12, 80),
    ("rec 480←480 @3×80", 480, 480, 3, 80),
    ("rec 128←128 @12×160", 128, 128, 12, 160),
    ("det 192←192 @20×20", 192, 192, 20, 20),
    ("det 48←48 @80×80", 48, 48, 80, 80),
    ("256←256 @56×56", 256, 256, 56, 56),
]


def ort_conv_ms(w: np.ndarray, x: np.ndarray, runs: int) -> float:
    from sculpt.runtime import median_latency_ms
    from sculpt.ir.model import Model

    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", 1, list(x.shape))],
                              [helper.make_tensor_value_info("y", 1, None)],
                              initializer=[helper.make_tensor("w", 1, list(w.shape), w.ravel().tolist())])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    return median_latency_ms(model, {"x": x}, runs=runs, warmup=3)


def kernel_table(blocks, sparsities, number: int, repeat: int) -> list[dict]:
    from sculpt.backends.tvm.sparse.bsr import pack_bsr
    from sculpt.backends.tvm.sparse.kernels import (PanelShape, bsr_panel_kernel, dense_panel_kernel, dense_tile,
                                                    sparse_tile_candidates, vector_lanes)
    from sculpt.backends.tvm.sparse.timing import host_target, predicted_speedup, time_functions

    target = host_target()
    lanes = vector_lanes(target)
    rng = np.random.default_rng(0)
    rows = []
    for name, co, ci, h, w in LAYERS:
        x = rng.standard_normal((1, ci, h, w)).astype(np.float32)
        panel = PanelShape(1, co, ci, h * w)
        dense_w = rng.standard_normal((co, ci)).astype(np.float32)
        r_d, v_d = dense_tile(co, h * w, lanes)
        funcs = {"dense": dense_panel_kernel(panel, r_d, v_d, x.shape, (1, co, h, w))}
        args = {"dense": [x, dense_w, np.zeros(co, np.float32), np.zeros((1, co, h, w), np.float32)]}
        settings = []
        for r in blocks:
            for s in sparsities:
                keep = rng.random((-(-co // r), ci)) >= s
                wt = dense_w * np.repeat(keep, r, axis=0)[:co]
                m = pack_bsr(wt, r)
                for tile in sparse_tile_candidates(r, h * w, lanes):
                    key = f"bsr_{r}_{int(s * 100)}_{tile}"
                    funcs[key] = bsr_panel_kernel(panel, m, tile, x.shape, (1, co, h, w))
                    args[key] = [x, *m.kernel_arrays(), np.zeros(co, np.float32), np.zeros((1, co, h, w), np.float32)]
                settings.append((r, s, wt, m))
        ms = time_functions(funcs, args, target, number=number, repeat=repeat)
        for r, s, wt, m in settings:
            tiles = sparse_tile_candidates(r, h * w, lanes)
            best = min(ms[f"bsr_{r}_{int(s * 100)}_{t}"] for t in tiles)
            ort = ort_conv_ms(wt.reshape(co, ci, 1, 1), x, runs=max(10, number * repeat))
            rows.append({"layer": name, "block": f"{r}x1", "sparsity": s, "dense_ms": ms["dense"], "sparse_ms": best,
                         "ort_ms": ort, "vs_dense": ms["dense"] / best, "vs_ort": ort / best,
                         "model_speedup": predicted_speedup(r, m.density)})
    return rows


def print_kernel_table(rows: list[dict]) -> None:
    print("| layer | block | sparsity | dense TIR ms | BSR ms | ORT dense ms | × vs dense TIR | × vs ORT | cost model × | model agrees |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    agree = 0
    for r in rows:
        ok = (r["model_speedup"] > 1.05) == (r["vs_dense"] > 1.05)
        agree += ok
        print(f"| {r['layer']} | {r['block']} | {r['sparsity']:.0%} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['ort_ms']:.3f} | {r['vs_dense']:.2f} | {r['vs_ort']:.2f} | {r['model_speedup']:.2f} | "
              f"{'yes' if ok else 'no'} |")
    print(f"\ncost model agrees with the measured sparse-or-dense decision on {agree}/{len(rows)} rows")


# variant name → sparsify options (every variant runs with the same calibration set)
VARIANTS = {
    "magnitude": {"saliency": "magnitude", "reconstruct": False},
    "activation": {"saliency": "activation", "reconstruct": False},
    "magnitude+refit": {"saliency": "magnitude", "reconstruct": True},
    "activation+refit": {"saliency": "activation", "reconstruct": True},
}


def e2e_table(settings: list[tuple[str, float]], variants: list[str], count: int, runs: int,
              calibration_count: int, kernels: str, number: int, repeat: int) -> None:
    import tvm

    from sculpt import ocr_task
    from sculpt.runtime import make_session, run as ort_run
    from sculpt.backends.tvm import build, import_to_relax
    from sculpt.backends.tvm.sparse import apply_sparse_kernels, layer_names_from_onnx
    from sculpt.backends.tvm.sparse.timing import host_target
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import PassContext, Pipeline, create_pass

    shape = PPOCR_SHAPES["rec"]
    base = Pipeline.from_specs(["canonicalize"], input_shapes={"x": shape}).run(ppocr_model("rec")).model
    data = ocr_task.rec_set(count)
    calibration = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs("rec", calibration_count)},
                                             "rendered lines")
    characters = ocr_task.character_list(base)
    target = host_target()
    spec = {"kind": "llvm", "mcpu": str(target.attrs["mcpu"])}
    x = data.inputs[:1]

    def vm_ms(ex):
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        xt = tvm.runtime.tensor(x)
        for _ in range(2):
            vm["main"](xt)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            vm["main"](xt)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), vm

    dense_ms = None
    print("| setting | pattern | refit | char acc | exact | sparse layers | TVM sparse auto ms | ORT ms | "
          "× vs TVM dense | × vs ORT | max rel diff vs ORT | pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("dense", 0.0, None)] + [(b, s, v) for b, s in settings for v in variants]
    for block, sparsity, variant in rows:
        t = time.perf_counter()
        if variant is None:
            model = base
        else:
            options = {"block": block, "sparsity": sparsity, **VARIANTS[variant]}
            model = create_pass("sparsify", options)(base, PassContext(calibration=calibration)).model
        pass_s = time.perf_counter() - t
        metrics = ocr_task.evaluate_rec(model, data, characters=characters)
        sparse_mod, decisions = apply_sparse_kernels(import_to_relax(model), target, "auto", number=number,
                                                     repeat=repeat, layer_names=layer_names_from_onnx(model))
        sparse_ms, vm = vm_ms(build(sparse_mod, spec, kernels=kernels))
        dense_ms = sparse_ms if variant is None else dense_ms
        ort_ms = ocr_task.median_latency_ms(make_session(model), x, runs=runs)
        ref = list(ort_run(model, {"x": x}).values())[0]
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        diff = float(np.abs(got - ref).max() / np.abs(ref).max())
        label = "dense (canonical)" if variant is None else f"{block} {sparsity:.0%}"
        pattern = "—" if variant is None else VARIANTS[variant]["saliency"]
        refit = "—" if variant is None else ("yes" if VARIANTS[variant]["reconstruct"] else "no")
        vs_dense = "—" if dense_ms is None else f"{dense_ms / sparse_ms:.1f}"
        print(f"| {label} | {pattern} | {refit} | {metrics.char_accuracy:.1%} | {metrics.exact_match:.1%} | "
              f"{sum(d.sparse for d in decisions)}/{len(decisions)} | {sparse_ms:.1f} | {ort_ms:.1f} | "
              f"{vs_dense} | {ort_ms / sparse_ms:.2f} | {diff:.1e} | {pass_s:.0f} |", flush=True)
    print(f"\nTVM build kernels: {kernels}; {count} evaluation lines (seed {ocr_task.EVAL_SEED}), "
          f"calibration {calibration_count} lines "
          f"(seed {ocr_task.CALIBRATION_SEED}); latency: batch 1, median of {runs} runs")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="1,4,8,16")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--number", type=int, default=10, help="kernel timings (also auto's per-layer decision)")
    ap.add_argument("--repeat", type=int, default=5, help="kernel timings (also auto's per-layer decision)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="also PP-OCRv4 rec end to end")
    ap.add_argument("--settings", default="8x1:0.5,8x1:0.7,8x1:0.9,16x1:0.9,4x1:0.9,1x1:0.9",
                    help="end to end: BLOCK:SPARSITY,...")
    ap.add_argument("--variants", default="magnitude,activation+refit",
                    help=f"end to end: how each setting is sparsified, of {', '.join(VARIANTS)}")
    ap.add_argument("--count", type=int, default=100, help="rendered text lines for accuracy")
    ap.add_argument("--calibration-count", type=int, default=64, help="rendered calibration lines")
    ap.add_argument("--kernels", default="sculpt", choices=["default", "sculpt"],
                    help="end to end: TVM build pipeline around the sparse kernels (sculpt.backends.tvm.build)")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"unknown variant '{unknown[0] if unknown else ''}' (known: {', '.join(VARIANTS)})")
    if not args.skip_kernels:
        rows = kernel_table([int(b) for b in args.blocks.split(",")], [float(s) for s in args.sparsities.split(",")],
                            args.number, args.repeat)
        print_kernel_table(rows)
    if args.e2e:
        settings = [(s.split(":")[0], float(s.split(":")[1])) for s in args.settings.split(",") if s]
        e2e_table(settings, variants, args.count, args.runs, args.calibration_count, args.kernels,
                  args.number, args.repeat)


if __name__ == "__main__":
    main()
