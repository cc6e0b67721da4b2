"""onnxruntime latency of weight-quant's MatMul layouts on PP-OCRv4 rec: DequantizeLinear -> MatMul
against com.microsoft MatMulNBits (accuracy_level 0 and 4), at onnxruntime's default optimization
level (ORT_ENABLE_ALL, which fuses DequantizeLinear + MatMul into MatMulNBits itself) and at
ORT_ENABLE_BASIC (no such fusion).

    python tools/low_bit_layout_benchmark.py [--part head|rec|both] [--rounds 9] [--runs 15]
    python tools/low_bit_layout_benchmark.py --saved out/rec_*.onnx   # saved rec files against the original

``head``: rec's head MatMul alone ([1, 40, 120] x its real [120, 6625] weight), 4-bit per channel and
per group of 32, and ternary; ``rec``: the whole model with only its MatMul weights quantized
(``ops=[MatMul]``; convs stay float, so the difference is the layout's); ``--saved``: rec models saved by
``tools/ocr_benchmark.py --save-dir`` against the canonicalized original, at ORT_ENABLE_ALL. All sessions are built
first, then measured in turn in each round (median of ``--runs`` runs per round, median over rounds),
2 intra-op threads, batch 1. Run it under ``flock /tmp/sculpt-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sculpt.ir.model import Model
from sculpt.models import ppocr_model_path
from sculpt.passes import create_pass, parse_pass_spec

HEAD_CONFIGS = {
    "fp32": "",
    "4-bit per channel, dequantize": "weight-quant",
    "4-bit per channel, matmulnbits acc 0": "weight-quant:layout=matmulnbits",
    "4-bit per channel, matmulnbits acc 4": "weight-quant:layout=matmulnbits,accuracy_level=4",
    "4-bit group 32, dequantize": "weight-quant:group_size=32",
    "4-bit group 32, matmulnbits acc 0": "weight-quant:group_size=32,layout=matmulnbits",
    "4-bit group 32, matmulnbits acc 4": "weight-quant:group_size=32,layout=matmulnbits,accuracy_level=4",
    "ternary, dequantize (int2)": "weight-quant:bits=2",
    "ternary, matmulnbits 2-bit acc 0": "weight-quant:bits=2,layout=matmulnbits",
    "ternary, matmulnbits 2-bit acc 4": "weight-quant:bits=2,layout=matmulnbits,accuracy_level=4",
}
REC_CONFIGS = {name: spec.replace("weight-quant", "weight-quant:ops=[MatMul]").replace("[MatMul]:", "[MatMul],")
               for name, spec in HEAD_CONFIGS.items() if "ternary" not in name}
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def rec_model() -> Model:
    return create_pass("canonicalize")(Model.load(ppocr_model_path("rec"))).model


def head_model(rec: Model) -> Model:
    weight = rec.get_constant(rec.node_by_name("p2o.MatMul.24").input[1])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="head")], "head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    return Model.wrap(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))


def measure(base: Model, configs: dict[str, str], feeds: dict, rounds: int, runs: int,
            saved: dict[str, bytes] | None = None, levels: tuple[str, ...] = tuple(LEVELS)) -> list[tuple]:
    """Rows (name, level, median ms, fastest round, slowest round, × fp32) of ``base`` under each pass
    spec of ``configs`` ("" for base itself, named fp32), and of the serialized models of ``saved``."""
    models = {}
    for name, spec in configs.items():
        model = base.clone()
        if spec:
            model = create_pass(*parse_pass_spec(spec))(model).model
        models[name] = model.serialize()
    models.update(saved or {})
    sessions = {}
    for name, data in models.items():
        for level_name in levels:
            level = LEVELS[level_name]
            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
            so.graph_optimization_level = level
            session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            session.run(None, feeds)
            sessions[(name, level_name)] = session
    samples: dict[tuple, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            samples[key].append(statistics.median(times))
    ref = {lv: statistics.median(samples[("fp32", lv)]) for lv in levels}
    return [(name, lv, statistics.median(v) * 1e3, min(v) * 1e3, max(v) * 1e3, statistics.median(v) / ref[lv])
            for (name, lv), v in samples.items()]


def table(title: str, rows: list[tuple], rounds: int, runs: int) -> str:
    lines = [f"| {title} | onnxruntime level | ms (median of {rounds} rounds × {runs} runs; range of rounds) "
             "| × fp32 at that level |", "|---|---|---|---|"]
    lines += [f"| {name} | {lv} | {med:.3g} ({lo:.3g}–{hi:.3g}) | {ratio:.2f} |" for name, lv, med, lo, hi, ratio in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("head", "rec", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--saved", nargs="+", metavar="FILE", help="rec .onnx files to measure against the original "
                                                                "(instead of --part)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        ap.error("--rounds and --runs must be positive")
    rec = rec_model()
    rng = np.random.default_rng(0)
    if args.saved:
        saved = {Path(f).stem: Path(f).read_bytes() for f in args.saved}
        feeds = {"x": rng.random((1, 3, 48, 320)).astype(np.float32)}
        rows = measure(rec, {"fp32": ""}, feeds, args.rounds, args.runs, saved, ("all",))
        print(table("rec file", rows, args.rounds, args.runs))
        return 0
    if args.part in ("head", "both"):
        feeds = {"x": rng.random((1, 40, 120)).astype(np.float32)}
        rows = measure(head_model(rec), HEAD_CONFIGS, feeds, args.rounds, args.runs)
        print(table("rec head MatMul [1,40,120]×[120,6625]", rows, args.rounds, args.runs) + "\n")
    if args.part in ("rec", "both"):
        feeds = {"x": rng.random((1, 3, 48, 320)).astype(np.float32)}
        rows = measure(rec, REC_CONFIGS, feeds, args.rounds, args.runs)
        print(table("rec, MatMul weights only", rows, args.rounds, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
