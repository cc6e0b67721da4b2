"""Int8 QDQ quantization on a real task: PP-OCRv4 rec and PP-OCR cls on rendered text lines, side by side
in one run — fp32, onnxruntime's own ``quantize_static`` (QDQ, per channel, the same calibration set,
after the opset upgrade it needs) and sculpt's ``qdq`` pass with each calibration method, with and
without cross-layer equalization and bias correction.

    python tools/qdq_benchmark.py [--models rec,cls] [--count 300] [--calibration-count 64] [--threads 1,2]
                                  [--config NAME=SPEC;SPEC ...]... [--no-tvm] [--json]

Every model starts from the same canonicalized fp32 model with the input shape fixed. Reported per
model and config: exact match and character accuracy (rec) or orientation accuracy (cls), agreement
with the fp32 model's predictions, onnxruntime latency (batch 1, median over rounds of the median of
repeated runs, all configs in turn in each round) and its ratio to fp32, and — unless ``--no-tvm`` —
TVM latency on the host (llvm; the fp32 model, and the QDQ models lowered to int8 compute by
``sculpt.backends.tvm.int8``, all built with the same ``--tvm-kernels``: sculpt's kernel library or
TVM's default naive loops) with its ratio to the fp32 TVM build, and how the TVM int8 build agrees with onnxruntime on the same QDQ model (decoded
predictions on ``--tvm-lines`` lines, and the largest output difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr_benchmark import (Config, add_latency_options, agreement, check_config, fmt_pct, log, one_line,  # noqa: E402
                           parse_config, parse_threads_and_models)

from sculpt import ocr_task  # noqa: E402
from sculpt.ir.calibration import CalibrationSet  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
from sculpt.models import ppocr_model  # noqa: E402
from sculpt.passes import Pipeline  # noqa: E402

ORT_QUANTIZER = "ort-quantize_static"
DEFAULT_CONFIGS = [
    "qdq-minmax=qdq:calibration=minmax",
    "qdq-percentile=qdq:calibration=percentile",
    "qdq-entropy=qdq:calibration=entropy",
    "qdq-mse (default)=qdq",
    "qdq-mse+cle=qdq:equalize=true",
    "qdq-mse+biascorr=qdq:bias_correction=true",
    "qdq-mse+cle+biascorr=qdq:equalize=true,bias_correction=true",
    "qdq-mse min_macs 1M=qdq:min_macs=1000000",
    "qdq-mse +Add,Mul=qdq:ops=[Conv,Gemm,MatMul,Add,Mul]",
]


@dataclass
class Row:
    model: str
    config: str
    specs: list[str]
    metrics: dict = field(default_factory=dict)
    agreement: float | None = None
    ort_ms: dict = field(default_factory=dict)
    ort_ratio: dict = field(default_factory=dict)
    tvm_ms: float | None = None
    tvm_ratio: float | None = None
    tvm_units: str = ""
    tvm_agreement: float | None = None
    tvm_max_abs: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def ort_quantize_static(model: Model, calibration: np.ndarray, workdir: Path) -> Model:
    """onnxruntime.quantization.quantize_static, QDQ format, per channel, uint8 activations and int8
    weights (its defaults otherwise), on the opset-13 upgrade of ``model`` (per-channel
    DequantizeLinear needs it), calibrated on the same samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calibration[k:k + 1]} for k in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    src = workdir / "ort_input.onnx"
    dst = workdir / "ort_qdq.onnx"
    model.clone().upgrade_opset(13).save(src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Model.load(dst)


def evaluate(kind: str, model: Model, data, characters):
    sess = ocr_task.session_for(model, threads=2, shape=ocr_task.input_shape(kind))
    if kind == "rec":
        return ocr_task.evaluate_rec(model, data, characters=characters, session=sess)
    return ocr_task.evaluate_cls(model, data, session=sess)


def decode(kind: str, outputs: np.ndarray, characters) -> list:
    if kind == "rec":
        return ocr_task.ctc_greedy_decode(outputs, characters)
    return outputs.argmax(axis=1).tolist()


def tvm_measure(kind: str, model: Model, quantized: bool, data, characters, args) -> dict:
    """Build with TVM (int8-lowered when ``quantized``), time it, and compare with onnxruntime."""
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.int8 import compile_int8
    from sculpt.backends.tvm.relax_import import build, import_to_relax

    shapes = {"x": ocr_task.input_shape(kind)}
    if quantized:
        executable, stats = compile_int8(model, shapes, kernels=args.tvm_kernels)
        units = f"{stats.conv2d} conv + {stats.matmul} matmul int8"
        if stats.left_float:
            units += ", float: " + ", ".join(f"{v} {k.split('.')[-1]}" for k, v in stats.left_float.items())
    else:
        executable, units = build(import_to_relax(model, shapes), kernels=args.tvm_kernels), "fp32"
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    sess = ocr_task.session_for(model, threads=2, shape=shapes["x"])
    same, max_abs = [], 0.0
    for k in range(min(args.tvm_lines, len(data))):
        x = data.inputs[k:k + 1]
        out = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
        ref = sess.run(None, {"x": x})[0]
        max_abs = max(max_abs, float(np.max(np.abs(out - ref))))
        got, want = decode(kind, out, characters), decode(kind, ref, characters)
        if kind == "rec":
            got, want = [ocr_task.normalize_text(t) for t in got], [ocr_task.normalize_text(t) for t in want]
        same.append(got == want)
    feed = tvm.runtime.tensor(data.inputs[:1], dev)
    vm["main"](feed)
    times = []
    for _ in range(args.tvm_runs):
        t = time.perf_counter()
        vm["main"](feed)
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "units": units, "agreement": sum(same) / max(len(same), 1),
            "max_abs": max_abs}


def bench_model(kind: str, configs: list[Config], args, workdir: Path) -> list[Row]:
    shape = ocr_task.input_shape(kind)
    shapes = {"x": shape}
    characters = ocr_task.character_list(ppocr_model(kind)) if kind == "rec" else None
    fp32 = Pipeline.from_specs(["canonicalize"], input_shapes=shapes, statistics=False).run(ppocr_model(kind)).model
    cal_inputs = ocr_task.calibration_inputs(kind, args.calibration_count)
    calibration = CalibrationSet.from_arrays({"x": cal_inputs}, f"{len(cal_inputs)} rendered {kind} lines")
    data = ocr_task.task_set(kind, args.count, ocr_task.EVAL_SEED)
    log(f"{kind}: {len(data)} evaluation lines, {len(calibration)} calibration lines")

    rows: list[Row] = []
    models: dict[str, Model] = {}
    results = {}
    entries = [Config("fp32", []), Config(ORT_QUANTIZER, ["onnxruntime.quantization.quantize_static"])] + configs
    for cfg in entries:
        row = Row(kind, cfg.name, cfg.specs)
        rows.append(row)
        if cfg.error:
            row.error = cfg.error
            continue
        t = time.perf_counter()
        try:
            if cfg.name == "fp32":
                model = fp32
            elif cfg.name == ORT_QUANTIZER:
                model = ort_quantize_static(fp32, cal_inputs, workdir)
            else:
                pipe = Pipeline.from_specs(cfg.specs, input_shapes=shapes, calibration=calibration, statistics=False)
                model = pipe.run(fp32).model
            row.seconds = time.perf_counter() - t
            metrics = evaluate(kind, model, data, characters)
        except Exception as e:  # report the config's failure in one line, go on with the others
            row.error = one_line(f"{type(e).__name__}: {e}")
            log(f"{kind} / {cfg.name}: FAILED: {row.error}")
            continue
        row.metrics = metrics.as_dict()
        results[cfg.name], models[cfg.name] = metrics, model
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            model.save(Path(args.save_dir) / f"{kind}_{cfg.name.split()[0]}.onnx")
        log(f"{kind} / {cfg.name}: {row.metrics} ({row.seconds:.1f}s)")
    for row in rows:
        if row.config in results and "fp32" in results:
            row.agreement = agreement(results[row.config], results["fp32"])

    live = [r for r in rows if r.config in models]
    feed = data.inputs[:1]
    for threads in args.threads:
        sessions = {r.config: ocr_task.session_for(models[r.config], threads=threads, shape=shape) for r in live}
        fastest = min(ocr_task.median_latency_ms(s, feed, 5) for s in sessions.values())
        runs = max(args.runs, int(args.min_ms / max(fastest, 1e-3)) + 1)
        times: dict[str, list[float]] = {r.config: [] for r in live}
        for _ in range(args.rounds):
            for r in live:
                times[r.config].append(ocr_task.median_latency_ms(sessions[r.config], feed, runs))
        base = statistics.median(times["fp32"]) if "fp32" in times else None
        for r in live:
            r.ort_ms[threads] = statistics.median(times[r.config])
            r.ort_ratio[threads] = r.ort_ms[threads] / base if base else None
        log(f"{kind}: onnxruntime latency at {threads} thread(s): {args.rounds} rounds x {runs} runs")

    if args.tvm:
        for r in live:
            try:
                m = tvm_measure(kind, models[r.config], r.config != "fp32", data, characters, args)
            except Exception as e:
                r.tvm_units = one_line(f"failed: {type(e).__name__}: {e}", 120)
                log(f"{kind} / {r.config}: TVM {r.tvm_units}")
                continue
            r.tvm_ms, r.tvm_units, r.tvm_agreement, r.tvm_max_abs = m["ms"], m["units"], m["agreement"], m["max_abs"]
            log(f"{kind} / {r.config}: TVM {m}")
        base = next((r.tvm_ms for r in live if r.config == "fp32"), None)
        for r in live:
            if r.tvm_ms is not None and base:
                r.tvm_ratio = r.tvm_ms / base
    return rows


def table(rows: list[Row], threads: list[int], tvm: bool) -> str:
    head = ["model", "config", "exact match", "char acc", "orient acc", "agree w/ fp32"]
    for t in threads:
        head += [f"ort ms ({t} thr)", f"× fp32 ({t} thr)"]
    if tvm:
        head += ["TVM ms", "× fp32 TVM", "TVM = ort (lines)", "TVM max Δ", "TVM units"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            continue
        m = r.metrics
        cells = [r.model, r.config, fmt_pct(m.get("exact_match")), fmt_pct(m.get("char_accuracy")),
                 fmt_pct(m.get("accuracy")), fmt_pct(r.agreement)]
        for t in threads:
            ms, ratio = r.ort_ms.get(t), r.ort_ratio.get(t)
            cells += ["—" if ms is None else f"{ms:.2f}", "—" if ratio is None else f"{ratio:.2f}"]
        if tvm:
            cells += ["—" if r.tvm_ms is None else f"{r.tvm_ms:.1f}",
                      "—" if r.tvm_ratio is None else f"{r.tvm_ratio:.2f}",
                      fmt_pct(r.tvm_agreement), "—" if r.tvm_max_abs is None else f"{r.tvm_max_abs:.1e}",
                      r.tvm_units or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default="rec,cls", help="rec, cls or rec,cls")
    ap.add_argument("--count", type=int, default=ocr_task.DEFAULT_COUNT, help="evaluation lines per model")
    ap.add_argument("--calibration-count", type=int, default=64, help="calibration lines per model")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=SPEC;SPEC",
                    help="a sculpt pipeline to quantize with (repeatable); default: qdq with each calibration "
                         "method, with and without CLE and bias correction")
    add_latency_options(ap, threads="1,2")
    ap.add_argument("--no-tvm", dest="tvm", action="store_false", help="skip the TVM builds")
    ap.add_argument("--tvm-kernels", default="sculpt", choices=["sculpt", "default"],
                    help="TVM CPU kernels for every build, fp32 and int8 alike: sculpt's kernel library or TVM's "
                         "default pipeline (naive loops)")
    ap.add_argument("--tvm-runs", type=int, default=5, help="timed TVM runs per model")
    ap.add_argument("--tvm-lines", type=int, default=20, help="lines on which TVM is compared with onnxruntime")
    ap.add_argument("--save-dir", help="save each config's model here as <model>_<config>.onnx")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = ap.parse_args(argv)
    if min(args.count, args.calibration_count, args.runs, args.rounds, args.tvm_runs, args.tvm_lines) <= 0:
        ap.error("counts, runs and rounds must be positive")
    kinds = parse_threads_and_models(ap, args)
    configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    names = [c.name for c in configs]
    if {"fp32", ORT_QUANTIZER} & set(names) or len(set(names)) != len(names):
        ap.error(f"config names must be unique and not fp32 or {ORT_QUANTIZER} (always measured)")
    for cfg in configs:
        check_config(cfg)
        if cfg.error:
            print(f"config '{cfg.name}': skipped: {one_line(cfg.error)}", flush=True)

    import tempfile

    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="qdq_benchmark_") as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for kind in kinds:
            rows += bench_model(kind, configs, args, workdir)
    seconds = time.perf_counter() - start
    failed = [f"{r.model} / {r.config}: {r.error}" for r in rows if r.error]
    if args.json:
        print(json.dumps({"count": args.count, "seconds": seconds, "threads": args.threads, "failed": failed,
                          "rows": [r.as_dict() for r in rows]}, indent=2, default=str))
        return 0
    print(table(rows, args.threads, args.tvm))
    for f in failed:
        print(f"failed: {f}")
    print(f"\n{args.count} lines per model (seed {ocr_task.EVAL_SEED}), calibration {args.calibration_count} lines "
          f"(seed {ocr_task.CALIBRATION_SEED}); onnxruntime batch 1, median over {args.rounds} rounds of the median "
          f"of ≥ {args.runs} runs; TVM llvm host build with {args.tvm_kernels} kernels, median of {args.tvm_runs} "
          f"runs; total {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
