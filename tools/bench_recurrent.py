"""Unrolled vs loop LSTM in the TVM backend: compile time and run time (1-thread runtime), checked
against onnxruntime.

Each (model, mode) is built and timed in its own process (TVM's thread pool reads TVM_NUM_THREADS once,
and the processes do not share caches): the model is canonicalized as ``sculpt compile`` does, imported
with ``import_to_relax(..., recurrent=mode)``, built for the host with sculpt's kernels, then ``main``
is timed ``--runs`` times per round (median) over ``--rounds`` rounds (median of the round medians).

Models: ``ddddocr-captcha`` (tools/zoo.py's CNN+BiLSTM captcha recognizer, hidden 512; its logits, the
ArgMax input, are an output too, so the check sees floats) and synthetic
``lstm:<steps>:<hidden>[:<input>]`` / ``gru:...``, a bidirectional LSTM / GRU (linear_before_reset 0) at batch 1 (random weights, scale 1/sqrt(hidden)).

    flock /tmp/sculpt-bench.lock python tools/bench_recurrent.py ddddocr-captcha lstm:100:128 lstm:200:256 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_lstm(steps: int, hidden: int, inputs: int, op: str = "LSTM") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(hidden)
    gates = 4 if op == "LSTM" else 3
    W = (rng.standard_normal((2, gates * hidden, inputs)) * scale).astype(np.float32)
    R = (rng.standard_normal((2, gates * hidden, hidden)) * scale).astype(np.float32)
    B = (rng.standard_normal((2, 2 * gates * hidden)) * 0.1).astype(np.float32)
    outputs = ["y", "y_h", "y_c"] if op == "LSTM" else ["y", "y_h"]
    node = helper.make_node(op, ["x", "W", "R", "B"], outputs, name=op.lower(),
                            hidden_size=hidden, direction="bidirectional")
    graph = helper.make_graph([node], "bilstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              [steps, 1, inputs])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, n) for n, v in (("W", W), ("R", R), ("B", B))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def model_and_feeds(spec: str, folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    if spec == "ddddocr-captcha":
        import zoo

        proto = onnx.load(zoo.fetch(spec))
        argmax = next(n for n in proto.graph.node if n.op_type == "ArgMax")  # compare the logits too
        proto.graph.output.append(helper.make_tensor_value_info(argmax.input[0], TensorProto.FLOAT, None))
        path = folder / "ddddocr_logits.onnx"
        onnx.save(proto, path)
        entry = zoo.ZOO[spec]
        return path, {entry.input_name: rng.uniform(-1, 1, entry.input_shape).astype(np.float32)}
    op, steps, hidden, *rest = spec.split(":")
    inputs = int(rest[0]) if rest else 64
    path = folder / f"bi{op}_{steps}_{hidden}_{inputs}.onnx"
    onnx.save(synthetic_lstm(int(steps), int(hidden), inputs, op.upper()), path)
    return path, {"x": rng.standard_normal((int(steps), 1, inputs)).astype(np.float32)}


def measure_one(spec: str, mode: str, runs: int, rounds: int) -> dict:
    """In this process: compile ``spec`` with ``mode`` and time it."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.artifact import prepare_model
    from sculpt.backends.tvm.relax_import import build, import_to_relax
    from sculpt.backends.tvm.rpc import time_vm
    from sculpt.ir.model import Model

    folder = Path(tempfile.mkdtemp(prefix="bench-recurrent-"))
    path, feeds = model_and_feeds(spec, folder)
    model = Model.load(path)
    start = time.perf_counter()
    work, _ = prepare_model(model, {k: list(v.shape) for k, v in feeds.items()})
    mod = import_to_relax(work, canonicalized=True, recurrent=mode)
    executable = build(mod, "llvm", kernels="sculpt")
    compile_s = time.perf_counter() - start
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    order = [i.name for i in work.graph.input if i.name in feeds]
    args = [tvm.runtime.tensor(feeds[n], dev) for n in order]
    medians = []
    outputs = None
    for _ in range(rounds):
        timed = time_vm(vm, dev, args, runs, warmup=2)
        medians.append(timed.median_ms)
        outputs = timed.outputs
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    reference = session.run(None, feeds)
    errors = [float(np.abs(g.astype(np.float64) - r).max() / max(float(np.abs(r).max()), 1e-3))
              for g, r in zip(outputs, reference) if r.dtype.kind == "f"]
    start = time.perf_counter()
    ort_ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        ort_ms.append((time.perf_counter() - t0) * 1e3)
    return {"model": spec, "mode": mode, "compile_s": round(compile_s, 2), "run_ms": round(statistics.median(medians), 3),
            "round_medians_ms": [round(m, 3) for m in medians], "max_rel_vs_onnxruntime": max(errors, default=0.0),
            "onnxruntime_1thread_ms": round(statistics.median(ort_ms), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="ddddocr-captcha and/or lstm|gru:<steps>:<hidden>[:<input>]")
    ap.add_argument("--modes", default="unroll,loop")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every (model, mode) this many times, alternating the modes (ABAB: a busy "
                         "machine's noise falls on both); the summary gives the medians")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.models[0], args.modes, args.runs, args.rounds)))
        return 0
    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    results = []
    for spec in args.models:
        for mode in args.modes.split(",") * args.repeat:
            p = subprocess.run([sys.executable, __file__, spec, "--modes", mode, "--runs", str(args.runs),
                                "--rounds", str(args.rounds), "--one"], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{spec} / {mode}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{spec:18s} {mode:7s} compile {row['compile_s']:7.1f} s  run {row['run_ms']:9.3f} ms  "
                  f"(onnxruntime 1 thread {row['onnxruntime_1thread_ms']:.3f} ms)  max rel {row['max_rel_vs_onnxruntime']:.1e}",
                  flush=True)
    print("summary (medians over the repeats):")
    for spec in args.models:
        for mode in args.modes.split(","):
            rows = [r for r in results if r["model"] == spec and r["mode"] == mode]
            if rows:
                print(f"{spec:18s} {mode:7s} compile {statistics.median(r['compile_s'] for r in rows):7.1f} s  "
                      f"run {statistics.median(r['run_ms'] for r in rows):9.3f} ms  "
                      f"onnxruntime {statistics.median(r['onnxruntime_1thread_ms'] for r in rows):9.3f} ms  "
                      f"max rel {max(r['max_rel_vs_onnxruntime'] for r in rows):.1e}  ({len(rows)} processes)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
