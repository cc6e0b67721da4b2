"""Dynamic int8 quantization, sculpt's ``dynamic-quant`` pass against onnxruntime's own
``onnxruntime.quantization.quantize_dynamic``, on accuracy and onnxruntime speed.

    python tools/dynamic_quant_benchmark.py [--models rec,cls,det,ppocrv6-rec-small,squeezenet,shufflenet]
        [--configs fp32,ort,ort-pc,dq,dq-w7,dq-wo,dq-nogroup,dq-matmul] [--count 200] [--error-samples 8]
        [--threads 1] [--runs 20] [--rounds 3] [--json]

Every model starts from the same canonicalized fp32 model with its input shape fixed (PP-OCR:
``sculpt.models``; ``ppocrv6-rec-small``: ``tools/zoo.py``; the others: the onnx wheel's
``backend/test/data/light`` models, whose weights — all 0.02 as shipped — are replaced by seeded
He-normal values, see ``sculpt.models.reweight``, and whose final Softmax is dropped: errors are measured on the
logits). Per model and config:

- output error against the fp32 model on held-out inputs (dynamic quantization uses no calibration
  data, so every input is held out): the relative L2 error ``||y - y_fp32|| / ||y_fp32||`` over all
  outputs and samples, and the largest absolute difference relative to the largest fp32 magnitude;
  real inputs (rendered text lines for rec and cls, rendered text pages for det) for the OCR models,
  normal noise for the light models;
- for the OCR recognizers and the classifier: the OCR task (``sculpt.ocr_task``: exact match and
  character accuracy, or orientation accuracy) on ``--count`` rendered lines;
- file size, and onnxruntime latency: batch 1, median over ``--rounds`` rounds of the median of
  ``--runs`` runs, every config in turn in each round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sculpt import ocr_task  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402
from sculpt.models import PPOCR_SHAPES, backend_test_data_dir, ppocr_model, reweight  # noqa: E402
from sculpt.passes import Pipeline  # noqa: E402
from sculpt.runtime import make_session  # noqa: E402
from sculpt.runtime import interleaved_latency_ms  # noqa: E402
from sculpt.textdata import text_input  # noqa: E402

DEFAULT_MODELS = "rec,cls,det,ppocrv6-rec-small,squeezenet,shufflenet"
ORT = "ort quantize_dynamic"
CONFIGS = {  # key: (name in the table, sculpt pass spec or the keyword arguments of quantize_dynamic)
    "fp32": ("fp32", None),
    "ort": (ORT, {}),
    "ort-pc": (ORT + " per_channel", {"per_channel": True}),
    "ort-rr": (ORT + " reduce_range", {"reduce_range": True}),
    "dq": ("dynamic-quant", "dynamic-quant"),
    "dq-pt": ("dynamic-quant per_channel=false", "dynamic-quant:per_channel=false"),
    "dq-w7": ("dynamic-quant weight_bits=7", "dynamic-quant:weight_bits=7"),
    "dq-pt-w7": ("dynamic-quant per_channel=false,weight_bits=7", "dynamic-quant:per_channel=false,weight_bits=7"),
    "dq-wo": ("dynamic-quant convs=weight-only", "dynamic-quant:convs=weight-only"),
    "dq-nogroup": ("dynamic-quant grouped_convs=false", "dynamic-quant:grouped_convs=false"),
    "dq-matmul": ("dynamic-quant ops=[MatMul,Gemm]", "dynamic-quant:ops=[MatMul,Gemm]"),
    "dq-attn": ("dynamic-quant activation_matmuls=true", "dynamic-quant:activation_matmuls=true"),
}
DEFAULT_CONFIGS = "fp32,ort,ort-pc,dq,dq-w7,dq-wo,dq-nogroup,dq-matmul"


@dataclass
class Row:
    model: str
    config: str
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_model(name: str) -> tuple[Model, str | None]:
    """The canonicalized fp32 model with a fixed input shape, and its OCR task kind (or None)."""
    if name in ("rec", "cls"):
        model, shape, kind = ppocr_model(name), ocr_task.input_shape(name), name
    elif name == "det":
        model, shape, kind = ppocr_model(name), PPOCR_SHAPES[name], "det"
    elif name == "ppocrv6-rec-small":
        import zoo

        entry = zoo.ZOO[name]
        model, shape, kind = Model.load(zoo.fetch(name)), list(entry.input_shape), "rec"
    else:
        model = Model.load(backend_test_data_dir() / "light" / f"light_{name}.onnx")
        shape, kind = None, None
    shapes = {model.input_names[0]: shape} if shape else {}
    canonical = Pipeline.from_specs(["canonicalize"], input_shapes=shapes, statistics=False).run(model).model
    if kind is None:
        reweight(canonical)
        logits_out(canonical)
    return canonical, kind


def logits_out(model: Model) -> None:
    """A final Softmax goes: on random weights it saturates (one class ~1.0 whatever the input), and
    errors are measured on the logits instead."""
    out = model.output_names[0]
    softmax = model.producers().get(out)
    if softmax is None or softmax.op_type != "Softmax":
        return
    before = model.producers()[softmax.input[0]]
    model.remove_node(softmax)
    model.set_output(before, 0, out)
    model.infer_shapes(refresh=True)


def quantize(base: Model, spec, workdir: Path) -> Model:
    if spec is None:
        return base
    if isinstance(spec, str):
        return Pipeline.from_specs([spec], statistics=False).run(base).model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = workdir / "fp32.onnx", workdir / "ort_dynamic.onnx"
    base.save(src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, **spec)
    return Model.load(dst)


def held_out_inputs(model: Model, kind: str | None, count: int) -> list[dict]:
    name = model.input_names[0]
    if kind == "rec" or kind == "cls":
        data = ocr_task.task_set(kind, count, ocr_task.EVAL_SEED + 1)
        return [{name: data.inputs[k:k + 1]} for k in range(len(data))]
    if kind == "det":  # rendered text pages: on noise the probability map is ~0 everywhere
        return [{name: text_input(model.static_shape(name), 500 + k)} for k in range(count)]
    shape = model.static_shape(name)
    rng = np.random.default_rng(12345)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def output_error(reference, candidate, inputs: list[dict]) -> dict:
    num = den = 0.0
    max_abs = scale = 0.0
    for feed in inputs:
        for ref, got in zip(reference.run(None, feed), candidate.run(None, feed)):
            ref, got = ref.astype(np.float64), got.astype(np.float64)
            num += float(((got - ref) ** 2).sum())
            den += float((ref ** 2).sum())
            max_abs = max(max_abs, float(np.abs(got - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    return {"rel_l2": (num / den) ** 0.5 if den else 0.0, "max_rel": max_abs / scale if scale else max_abs}


def task_metrics(kind: str, model: Model, session, data, characters) -> dict:
    if kind == "rec":
        m = ocr_task.evaluate_rec(model, data, characters=characters, session=session)
        return {"exact": m.exact_match, "char_acc": m.char_accuracy}
    m = ocr_task.evaluate_cls(model, data, session=session)
    return {"orientation_acc": m.accuracy}


def bench(name: str, args, workdir: Path) -> list[Row]:
    t = time.perf_counter()
    base, kind = base_model(name)
    inputs = held_out_inputs(base, kind, args.error_samples)
    data = ocr_task.task_set(kind, args.count, ocr_task.EVAL_SEED) if kind in ("rec", "cls") else None
    characters = ocr_task.character_list(base) if kind == "rec" else None
    log(f"{name}: canonicalized in {time.perf_counter() - t:.1f}s")
    reference = make_session(base, threads=args.threads)
    rows, sessions = [], {}
    for config, spec in (CONFIGS[k] for k in args.configs):
        row = Row(name, config)
        rows.append(row)
        try:
            model = quantize(base, spec, workdir)
            if spec is not None and model.serialize() == base.serialize():
                row.error = "nothing quantized"
                continue
            model.verify()
            session = make_session(model, threads=args.threads)
        except Exception as e:  # a config may not apply to a model: say so, go on
            row.error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            log(f"{name} / {config}: {row.error}")
            continue
        row.metrics["size_mb"] = model.byte_size() / 1e6
        row.metrics.update(output_error(reference, session, inputs))
        if data is not None:
            row.metrics.update(task_metrics(kind, model, session, data, characters))
        sessions[config] = session
        log(f"{name} / {config}: {row.metrics}")
    feed = inputs[0]
    latency = interleaved_latency_ms(sessions, feed, rounds=args.rounds, runs=args.runs)
    fp32 = latency["fp32"]
    for row in rows:
        if row.config in latency:
            ms = latency[row.config]
            row.metrics.update({"latency_ms": ms, "speedup": fp32 / ms})
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | config | size MB | rel. L2 error | max rel. error | OCR task | ORT ms | × fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.config} | — | — | — | {r.error} | — | — |")
            continue
        m = r.metrics
        if "char_acc" in m:
            task = f"exact {m['exact']:.1%}, chars {m['char_acc']:.2%}"
        elif "orientation_acc" in m:
            task = f"orientation {m['orientation_acc']:.1%}"
        else:
            task = "—"
        lines.append(f"| {r.model} | {r.config} | {m['size_mb']:.2f} | {m['rel_l2']:.2e} | {m['max_rel']:.2e} | "
                     f"{task} | {m['latency_ms']:.2f} | {m['speedup']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS}); light "
                                                               "models by name: resnet50, inception_v1, ...")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated, from: {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS}); fp32 is always run")
    ap.add_argument("--count", type=int, default=200, help="OCR task lines")
    ap.add_argument("--error-samples", type=int, default=8, help="held-out inputs for the output error")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.configs = ["fp32"] + [c.strip() for c in args.configs.split(",") if c.strip() and c.strip() != "fp32"]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config '{unknown[0]}' (known: {', '.join(CONFIGS)})")
    if min(args.count, args.error_samples, args.runs, args.rounds, args.threads) < 1:
        ap.error("--count, --error-samples, --runs, --rounds and --threads must be ≥ 1")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows += bench(name, args, Path(tmp))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
