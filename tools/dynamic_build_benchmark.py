"""What a symbolic-shape TVM build costs against a static one (issue 16 item 2).

For each model: canonicalize with the dynamic dimensions kept, then build for the host CPU
(a) static at the reference shape with sculpt's kernels, (b) static with TVM's own loops, (c) with
symbolic batch and width (TVM's own loops: sculpt's kernels need static shapes), and (d) symbolic for
mali (compile only). Prints build seconds and median latency of (a)-(c) at the reference shape, of (c)
at other shapes too, and onnxruntime's at each; every TVM output is checked against onnxruntime (1e-4).

    python tools/dynamic_build_benchmark.py --runs 10 --models ppocr-cls

The builds run first; the timings then run holding /tmp/sculpt-bench.lock (the machine's shared
timing lock), so other timings do not wait for the builds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import time
import warnings

import numpy as np

from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax
from sculpt.models import ppocr_model
from sculpt.passes.pipeline import Pipeline
from sculpt.runtime import make_session

MODELS = {  # name: (symbolic input shape, reference shape, other shapes)
    "ppocr-rec": (["N", 3, 48, "W"], [1, 3, 48, 320], [[1, 3, 48, 640], [2, 3, 48, 320]]),
    "ppocr-cls": (["N", 3, 48, 192], [1, 3, 48, 192], [[4, 3, 48, 192]]),
}


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@contextlib.contextmanager
def bench_lock(path: str = "/tmp/sculpt-bench.lock"):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        symbolic, reference, others = MODELS[name]
        model = ppocr_model(name.split("-")[1])
        model.fix_input_shapes({"x": symbolic})
        model = Pipeline.from_specs(["canonicalize"], sample_shapes={"x": reference}).run(model).model
        session = make_session(model)
        feeds = {tuple(s): np.random.default_rng(0).random(s, dtype=np.float32) for s in [reference] + others}

        def check(executable, shape):
            got = run_relax(executable, {"x": feeds[tuple(shape)]}, ["x"])[0]
            want = session.run(None, {"x": feeds[tuple(shape)]})[0]
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            assert err < 1e-4, (name, shape, err)
            return err

        builds = {}
        for label, shapes, kernels, symbolic_import in (
                ("static, sculpt kernels", {"x": reference}, "sculpt", False),
                ("static, TVM loops", {"x": reference}, "default", False),
                ("symbolic, TVM loops", None, "default", True)):
            mod = import_to_relax(model, shapes, canonicalized=True, symbolic=symbolic_import)
            start = time.perf_counter()
            executable = build(mod, "llvm", kernels=kernels)
            builds[label] = (executable, time.perf_counter() - start)
        with bench_lock():
            for label, (executable, seconds) in builds.items():
                for shape in [reference] + (others if label.startswith("symbolic") else []):
                    err = check(executable, shape)
                    x = feeds[tuple(shape)]
                    tvm_ms = median_ms(lambda: run_relax(executable, {"x": x}, ["x"]), args.runs)
                    ort_ms = median_ms(lambda: session.run(None, {"x": x}), args.runs)
                    rows.append((name, label, "x".join(map(str, shape)), f"{seconds:.0f}", f"{tvm_ms:.2f}",
                                 f"{ort_ms:.2f}", f"{ort_ms / tvm_ms:.2f}", f"{err:.1e}"))
        mod = import_to_relax(model, None, canonicalized=True, symbolic=True)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                build(mod, {"kind": "opencl", "device": "mali", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}})
                verdict = "builds"
            except Exception as e:  # noqa: BLE001 - reported in the table
                verdict = f"fails: {str(e)[:120]}"
        fell_back = [str(w.message)[:80] for w in caught if "schedule rule" in str(w.message)]
        rows.append((name, "symbolic, mali (compile only)", "-", f"{time.perf_counter() - start:.0f}", verdict,
                     "-", "-", "; ".join(fell_back) or "-"))
    head = ("model", "build", "input", "build s", "TVM ms", "onnxruntime ms", "ort / TVM", "max rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmedians of {args.runs} runs after one warm-up; 1 process, default threads")


if __name__ == "__main__":
    main()
