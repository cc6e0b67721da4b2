"""Latency of 4-bit weights in sculpt's TVM CPU build (kernels/int4_matmul) against the float32 build.

Two modes, both TVM in process on ``--threads`` threads (default 1), alternating rounds, medians:

    # PP-OCRv4 rec's weight MatMul shapes ([1, 40, K] x [K, N] + bias) as one-layer models,
    # float32 weights against the same weights quantized by weight-quant (group 32 by default)
    flock /tmp/sculpt-bench.lock python tools/int4_matmul_benchmark.py --layers --rounds 9 --runs 50

    # exported artifacts ('sculpt compile ... -o X.so'), e.g. rec fp32 against rec with 4-bit MatMuls
    flock /tmp/sculpt-bench.lock python tools/int4_matmul_benchmark.py --artifacts rec_fp32.so rec_w4.so

Each artifact's size is printed beside its latency. Run it under the shared benchmark lock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REC_MATMULS = ((120, 360), (120, 120), (120, 240), (240, 120), (120, 6625))  # (K, N), rows 40


def _timer(lib, feeds):
    import numpy as np
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in feeds]

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            vm["main"](*args)
        return (time.perf_counter() - start) * 1e3 / n

    run(3)
    return run


def _alternate(timers: dict, rounds: int, runs: int, best: bool = False) -> dict:
    """Each timer's median (``best``: minimum) over ``rounds`` rounds of ``runs`` runs, in turn."""
    times: dict = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            times[name].append(run(runs))
    return {name: (min(t) if best else statistics.median(t)) for name, t in times.items()}


def _layer_model(k: int, n: int, rows: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from sculpt.ir.model import Model

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"], name="b")],
        "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto)


def layers(args) -> None:
    import numpy as np
    import tvm

    from sculpt.backends.tvm.kernels import compile_with_kernels, host_target
    from sculpt.backends.tvm.relax_import import import_to_relax
    from sculpt.passes import create_pass

    target = tvm.target.Target(host_target("llvm"))
    print(f"| K x N (rows {args.rows}) | fp32 ms | int4 g{args.group_size} ms | int4 / fp32 |  (minimum of "
          f"{args.rounds} rounds x {args.runs} runs, {args.threads} thread(s))")
    print("|---|---|---|---|")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else REC_MATMULS
    for k, n in shapes:
        fp32 = _layer_model(k, n, args.rows)
        int4 = create_pass("weight-quant", {"group_size": args.group_size, "min_elements": 16})(fp32.clone()).model
        x = np.random.default_rng(1).standard_normal((1, args.rows, k)).astype(np.float32)
        timers = {}
        for name, model in (("fp32", fp32), ("int4", int4)):
            canon = create_pass("canonicalize")(model.clone()).model
            timers[name] = _timer(compile_with_kernels(import_to_relax(canon), target), [x])
        ms = _alternate(timers, args.rounds, args.runs, best=True)
        print(f"| {k} x {n} | {ms['fp32']:.4f} | {ms['int4']:.4f} | {ms['int4'] / ms['fp32']:.2f} |", flush=True)


def artifacts(args) -> None:
    import numpy as np
    import tvm

    from sculpt.backends.tvm.artifact import load_artifact

    timers, sizes = {}, {}
    for path in args.artifacts:
        artifact = load_artifact(path)
        rng = np.random.default_rng(0)
        feeds = [rng.random(t.shape).astype(t.dtype) for t in artifact.inputs]
        timers[path] = _timer(tvm.runtime.load_module(str(artifact.library)), feeds)
        sizes[path] = artifact.library.stat().st_size
    ms = _alternate(timers, args.rounds, args.runs)
    first = args.artifacts[0]
    print(f"| artifact | bytes | ms ({args.threads} thread(s), median of {args.rounds} rounds x {args.runs}) "
          f"| x {os.path.basename(first)} |")
    print("|---|---|---|---|")
    for path in args.artifacts:
        print(f"| {os.path.basename(path)} | {sizes[path]:,} | {ms[path]:.2f} | {ms[path] / ms[first]:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--layers", action="store_true", help="rec's MatMul shapes as one-layer models")
    mode.add_argument("--artifacts", nargs="+", help="exported .so artifacts (the first is the baseline)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--shapes", help="KxN,KxN,... instead of rec's MatMul shapes (with --layers)")
    args = parser.parse_args(argv)
    # TVM's pool reads these once, before its first parallel call: the shared policy, not pinned
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    (layers if args.layers else artifacts)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
