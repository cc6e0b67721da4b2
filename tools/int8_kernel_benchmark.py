"""The int8 conv kernel end to end: TVM int8 vs TVM fp32 vs onnxruntime int8 vs onnxruntime fp32, at 1 and 2
threads, in one run.

    python tools/int8_kernel_benchmark.py [--models rec,det,cls,doc-orientation,ppocrv6-rec-small]
                                          [--threads 1,2] [--runs 20] [--rounds 3] [--calibration 8]
                                          [--also-instructions avx2-pmaddwd,avx512-vnni-512,NCHW]

Per model: the canonicalized fp32 model at its static shape, and its QDQ version from sculpt's ``qdq``
pass (calibrated on ``--calibration`` inputs: rendered text lines for PP-OCR, the benchmark's image-like
inputs for the zoo). Builds (host llvm, sculpt's kernels): ``tvm fp32`` (the fp32 model), ``tvm qdq``
(the QDQ model as written: dequantize, float op, quantize — ``sculpt compile``'s default, ``--int8
off``), ``tvm int8 relax`` (the QDQ units as integer Relax ops, ``--int8 relax``) and ``tvm int8
kernel`` (the conv/matmul units on sculpt's int8 kernel with the instruction the host target selects,
``--int8 kernel``), and with ``--also-instructions``, the same kernel build forced onto each of those dot
instructions or activation layouts (``tvm int8 <name>``: e.g. vpmaddwd on a VNNI machine, or the NCHW
kernel, before/after). onnxruntime: the fp32
model and the QDQ model, optimized (its own fused int8 kernels; on a CPU without VNNI they saturate,
see README). Times are the median over ``--rounds`` rounds of the median of ``--runs`` runs, all rows of
a model interleaved in each round; each thread count runs in its own process (TVM's thread pool reads
its size once), with the shared thread policy. Timing holds ``/tmp/sculpt-bench.lock`` (builds do not).

Correctness columns: the int8-kernel build's largest output difference from the QDQ graph run as written
(onnxruntime without optimizations), and whether its outputs equal the ``int8 relax`` build's bit for
bit (both compute the integer QDQ math; float ops between units are shared)."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_benchmark import PPOCR, _feeds, _median_ms, _outputs, _source_model, _text_feeds  # noqa: E402

DEFAULT_MODELS = "rec,det,cls,doc-orientation,ppocrv6-rec-small"
LAYOUTS = ("NCHW", "NHWC")  # the int8 kernel's activation layouts (Int8KernelPolicy.layout)
BUILDS = ("tvm fp32", "tvm qdq", "tvm int8 relax", "tvm int8 kernel")


def instruction_named(name: str):
    from sculpt.backends.tvm.kernels import int8_conv

    known = {v.name: v for v in vars(int8_conv).values() if isinstance(v, int8_conv.DotInstruction)}
    if name not in known:
        raise ValueError(f"--also-instructions: unknown instruction '{name}' (known: {', '.join(sorted(known))})")
    return known[name]


def build_names(args) -> list[str]:
    return list(BUILDS) + [f"tvm int8 {name}" for name in args.also_instructions]
LOCK = "/tmp/sculpt-bench.lock"
SETTLE_S = 0.2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_feeds(kind: str, model) -> dict:
    return _text_feeds(kind) if kind in PPOCR else _feeds(model)


def calibration(kind: str, model, count: int):
    from sculpt import ocr_task
    from sculpt.ir.calibration import CalibrationSet

    if kind in ("rec", "cls"):
        return CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs(kind, count)})
    name = model.input_names[0]
    base = model_feeds(kind, model)[name]
    rng = np.random.default_rng(3)
    return CalibrationSet.from_arrays({name: np.concatenate(
        [np.clip(base + rng.normal(0, 0.05, base.shape).astype(np.float32), base.min(), base.max())
         for _ in range(count)])})


def prepare(kind: str, args, workdir: Path) -> dict:
    """Make the models and the four builds of ``kind`` in ``workdir``; check the int8 build."""
    from sculpt.backends.tvm.int8 import WIDE_MAX_PADDING, int8_kernel_policy, lower_qdq_to_int8
    from sculpt.backends.tvm.relax_import import build, import_to_relax
    from sculpt.passes import Pipeline
    from sculpt.runtime import reference_session

    model, shapes = _source_model(kind)
    fp32 = Pipeline.from_specs(["canonicalize"], input_shapes=shapes).run(model).model
    q = Pipeline.from_specs([f"qdq:samples={args.calibration}"], input_shapes=None,
                            calibration=calibration(kind, fp32, args.calibration)).run(fp32).model
    fp32.save(workdir / f"{kind}.fp32.onnx")
    q.save(workdir / f"{kind}.qdq.onnx")
    feeds = model_feeds(kind, fp32)
    np.savez(workdir / f"{kind}.feeds.npz", **feeds)
    policy = int8_kernel_policy("llvm")
    relax_int8, relax_stats = lower_qdq_to_int8(import_to_relax(q))
    kernel_int8, kernel_stats = lower_qdq_to_int8(import_to_relax(q), policy)
    mods = {"tvm fp32": import_to_relax(fp32), "tvm qdq": import_to_relax(q), "tvm int8 relax": relax_int8,
            "tvm int8 kernel": kernel_int8}
    for name in args.also_instructions:  # the host policy with another instruction or layout
        forced = dataclasses.replace(policy, layout=name) if name in LAYOUTS else \
            dataclasses.replace(policy, instruction=instruction_named(name), wide_instruction=None)
        mods[f"tvm int8 {name}"] = lower_qdq_to_int8(import_to_relax(q), forced)[0]
    outputs = {}
    for name, mod in mods.items():
        t = time.perf_counter()
        executable = build(mod)
        path = workdir / f"{kind}.{name.replace(' ', '_')}.so"
        executable.export_library(str(path))
        log(f"{kind}: built {name} in {time.perf_counter() - t:.0f} s")
        outputs[name] = _run_once(path, feeds, fp32.input_names)
    ref = reference_session(q).run(None, feeds)
    kernel_out, relax_out = outputs["tvm int8 kernel"], outputs["tvm int8 relax"]
    forced_equal = {name: all(np.array_equal(a, b) for a, b in zip(outputs[f"tvm int8 {name}"], relax_out))
                    for name in args.also_instructions}
    return {"model": kind, "input": {k: list(v.shape) for k, v in feeds.items()},
            "instruction": policy.instruction.name + (f" ({policy.wide_instruction.name} for the units it pads"
                                                      f" at most {WIDE_MAX_PADDING}x)" if policy.wide_instruction else ""),
            "forced_equal_relax": forced_equal,
            "units": f"{kernel_stats.int8_kernel} + {kernel_stats.int8_depthwise} depthwise of {kernel_stats.conv2d} "
                     f"conv + {kernel_stats.matmul} matmul"
                     + (f" ({kernel_stats.layout})" if kernel_stats.layout else ""),
            "left_float": kernel_stats.left_float, "relax_units": relax_stats.total,
            "max_abs_vs_qdq_graph": max(float(np.abs(g - r).max()) for g, r in zip(kernel_out, ref)),
            "output_scale": max(float(np.abs(r).max()) for r in ref),
            "kernel_equals_relax": all(np.array_equal(a, b) for a, b in zip(kernel_out, relax_out))}


def _run_once(path: Path, feeds: dict, order: list[str]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    return _outputs(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), tvm.cpu()) for n in order]))


def time_child(args) -> int:
    """In a process of its own (``--child``): time every row of every model at ``args.threads`` threads."""
    from sculpt.backends.tvm import thread_policy

    threads = int(args.threads)
    thread_policy.apply("shared", threads)  # before TVM's pool starts
    import tvm
    from tvm import relax

    from sculpt.ir.model import Model
    from sculpt.runtime import make_session

    workdir = Path(args.child)
    result = {}
    for kind in args.models:
        feeds = dict(np.load(workdir / f"{kind}.feeds.npz"))
        runners = {}
        for name in build_names(args):
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(workdir / f"{kind}.{name.replace(' ', '_')}.so")),
                                      tvm.cpu())
            tensors = [tvm.runtime.tensor(v, tvm.cpu()) for v in feeds.values()]
            runners[name] = (lambda vm=vm, tensors=tensors: vm["main"](*tensors))
        for name, file in (("ort fp32", "fp32"), ("ort int8", "qdq")):
            sess = make_session(Model.load(workdir / f"{kind}.{file}.onnx"), threads=threads)
            runners[name] = (lambda sess=sess: sess.run(None, feeds))
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                time.sleep(SETTLE_S)  # the other runtime's threads may still spin
                times[name].append(_median_ms(run, args.runs, budget_s=15))
        result[kind] = {name: statistics.median(v) for name, v in times.items()}
        log(f"{kind} @ {threads} thread(s): " + ", ".join(f"{k} {v:.2f}" for k, v in result[kind].items()))
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated (kernel_benchmark's names)")
    p.add_argument("--threads", default="1,2", help="thread counts, each in its own process")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calibration", type=int, default=8, help="calibration inputs of the qdq pass")
    p.add_argument("--workdir", default=None, help="keep the models and builds here (default: a temp folder)")
    p.add_argument("--also-instructions", default="",
                   help="comma-separated dot instructions (int8_conv's names, e.g. avx2-pmaddwd) or activation "
                        "layouts (NCHW, NHWC) to build the int8 kernel with besides the host's own instruction "
                        "and the default layout, each a row 'tvm int8 <name>'")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.also_instructions = [m.strip() for m in args.also_instructions.split(",") if m.strip()]
    if args.child:
        return time_child(args)
    from kernel_benchmark import zoo_names

    try:
        for name in args.also_instructions:
            if name not in LAYOUTS:
                instruction_named(name)
    except ValueError as e:
        print(f"int8_kernel_benchmark: error: {e}", file=sys.stderr)
        return 2
    bad = [m for m in args.models if m not in zoo_names()]
    if bad:
        print(f"int8_kernel_benchmark: error: unknown model(s) {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        print(f"int8_kernel_benchmark: error: --threads takes numbers like 1,2, got '{args.threads}'", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sculpt-int8-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checks = [prepare(kind, args, workdir) for kind in args.models]
    timings = {}
    with open(LOCK, "w") as lock:
        log(f"waiting for {LOCK}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = os.getloadavg()
        for threads in thread_counts:
            cmd = [sys.executable, __file__, "--child", str(workdir), "--threads", str(threads), "--models",
                   ",".join(args.models), "--runs", str(args.runs), "--rounds", str(args.rounds),
                   "--also-instructions", ",".join(args.also_instructions)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            sys.stderr.write(out.stderr)
            timings[threads] = json.loads(out.stdout.strip().splitlines()[-1])
        load_after = os.getloadavg()
    if args.json:
        print(json.dumps({"checks": checks, "timings": timings, "load": [load, load_after]}))
        return 0
    print_tables(checks, timings, thread_counts, args, load, load_after)
    return 0


def print_tables(checks, timings, thread_counts, args, load, load_after) -> None:
    cols = ("ort fp32", "ort int8", "tvm fp32", "tvm qdq", "tvm int8 relax", "tvm int8 kernel") \
        + tuple(f"tvm int8 {name}" for name in args.also_instructions)
    print(f"int8 kernel instruction selected for this host: {checks[0]['instruction'] if checks else '-'}\n")
    print("| model | threads | " + " | ".join(f"{c} ms" for c in cols)
          + " | kernel / tvm fp32 | kernel / ort int8 | kernel / ort fp32 |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    for check in checks:
        kind = check["model"]
        for threads in thread_counts:
            t = timings[threads][kind]
            k = t["tvm int8 kernel"]
            print(f"| {kind} | {threads} | " + " | ".join(f"{t[c]:.2f}" for c in cols)
                  + f" | {k / t['tvm fp32']:.2f} | {k / t['ort int8']:.2f} | {k / t['ort fp32']:.2f} |")
    print()
    forced = "".join(f" | {name} == int8 relax" for name in args.also_instructions)
    print("| model | input | on the int8 kernels (conv and matmul units + depthwise units) | left float | kernel == int8 relax (bitwise)" + forced
          + " | max abs diff vs the QDQ graph (output scale) |")
    print("|---|---|---|---|---|" + "---|" * len(args.also_instructions) + "---|")
    for c in checks:
        same = "".join(f" | {'yes' if c['forced_equal_relax'][name] else 'no'}" for name in args.also_instructions)
        print(f"| {c['model']} | {c['input']} | {c['units']} | {c['left_float'] or '-'} | "
              f"{'yes' if c['kernel_equals_relax'] else 'no'}{same} | "
              f"{c['max_abs_vs_qdq_graph']:.3g} ({c['output_scale']:.3g}) |")
    print(f"\nmedian of {args.rounds} rounds x median of {args.runs} runs; load average "
          f"{load[0]:.1f} before timing, {load_after[0]:.1f} after (2 cores)")


if __name__ == "__main__":
    sys.exit(main())
