"""Recovery by distillation on the OCR task: PP-OCRv4 rec and PP-OCR cls, original → channel
pruning (least-squares refit) → `distill` (teacher: the original model, data: rendered calibration
lines from a seed other than the evaluation lines'). Prints one table row per model and stage:
character accuracy and exact match (rec), orientation accuracy (cls), MACs, and the pass times.

    python tools/distill_benchmark.py --models rec,cls --count 200 --ratio 0.5 \
        --calibration-count 64 --distill 'steps=100,batch_size=4,learning_rate=3e-4'

``--ratio 0.3,0.5,0.7`` gives a pair of rows (refit only, then distilled) per ratio; ``--compress SPEC``
(repeatable) the same pair for another compression pass, e.g. ``--compress 'low-rank:data_aware=true'``
or ``--compress 'depthwise-separable:multiplier=2'``.

Needs the train extra (pip install -e ".[train]"). Input shapes are fixed as in tools/ocr_benchmark.py.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from sculpt import ocr_task
from sculpt.errors import PipelineError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.models import ppocr_model
from sculpt.passes import Pipeline
from sculpt.passes.pipeline import Instrument

SHAPES = {"rec": [1, 3, 48, 320], "cls": [1, 3, 48, 192]}


class KeepModels(Instrument):
    """The model after each pass, by pass name."""

    def __init__(self):
        self.models = {}

    def after_pass(self, index, pass_, before, result, record):
        self.models[pass_.name] = result.model


def metrics(kind: str, model, data) -> dict:
    m = ocr_task.evaluate(kind, model, data)
    if kind == "rec":
        return {"char acc": f"{100 * m.char_accuracy:.1f}%", "exact match": f"{100 * m.exact_match:.1f}%",
                "orient acc": "—"}
    return {"char acc": "—", "exact match": "—", "orient acc": f"{100 * m.accuracy:.1f}%"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="rec,cls")
    ap.add_argument("--count", type=int, default=200, help="evaluation lines")
    ap.add_argument("--calibration-count", type=int, default=64, help="rendered training lines (other seed)")
    ap.add_argument("--ratio", default="0.5", help="channel-pruning MAC reductions, comma-separated: a pair of rows each")
    ap.add_argument("--compress", action="append", default=[],
                    help="another compression pass spec (NAME:KEY=VALUE,...), then distill: a pair of rows; repeatable")
    ap.add_argument("--distill", default="steps=100,batch_size=4,learning_rate=3e-4",
                    help="options of the distill pass, KEY=VALUE,...")
    ap.add_argument("--iterative", type=int, default=0,
                    help="also prune in this many steps with distill between them (iterative-pruning)")
    ap.add_argument("--iterative-distill", help="distill options of each iterative step (default: --distill)")
    ap.add_argument("--qat", help="also qdq, then distill with these options (quantization-aware fine-tuning)")
    ap.add_argument("--skip-one-shot", action="store_true", help="no channel-pruning rows (--compress, --iterative and --qat rows still come)")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratio.split(",") if r.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
            original = ppocr_model(kind)
            shapes = {"x": SHAPES[kind]}
            data = ocr_task.task_set(kind, args.count)
            calibration = CalibrationSet.from_npz(
                ocr_task.write_calibration(Path(tmp) / f"{kind}.npz", kind, args.calibration_count))
            fixed = original.clone().fix_input_shapes(shapes)
            stages = [("original", fixed, "", "")]
            one_shot = [] if args.skip_one_shot else [
                (f"prune {ratio:.0%}", f"channel-pruning:ratio={ratio}") for ratio in ratios]
            one_shot += [(spec, spec) for spec in args.compress]
            for label, spec in one_shot:
                keep = KeepModels()
                pipe = Pipeline.from_specs(["canonicalize", spec, f"distill:{args.distill}"], input_shapes=shapes,
                                           calibration=calibration, instruments=[keep])
                start = time.perf_counter()
                result = pipe.run(original)
                print(f"{kind}: {label}: pipeline {time.perf_counter() - start:.0f} s", file=sys.stderr)
                compress, distilled = result.records[-2], result.records[-1]
                stats = distilled.stats
                stages += [(label, keep.models[compress.name], f"{compress.seconds:.0f}", ""),
                           (f"{label} + distill", result.model, f"{compress.seconds:.0f}",
                            f"{distilled.seconds:.0f} ({stats['steps']} steps, best {stats['best_step']})")]
                print(f"{kind}: {label}: distill held-out loss {stats['held_out_error_before']:.4g} → "
                      f"{stats['held_out_error_after']:.4g} on {stats['held_out_samples']} lines, trained on "
                      f"{stats['training_samples']}, {stats['trained_weights']} weights; hints {stats['hints']}",
                      file=sys.stderr)
            if args.iterative:
                spec = (f"iterative-pruning:ratio={ratios[-1]},steps={args.iterative},"
                        f"distill=[{args.iterative_distill or args.distill}]")
                iterative = Pipeline.from_specs(["canonicalize", spec], input_shapes=shapes,
                                                calibration=calibration).run(original)
                total = sum(r.seconds for r in iterative.records)
                steps = iterative.records[-1].stats["steps"]
                print(f"{kind}: iterative steps {steps}", file=sys.stderr)
                stages.append((f"iterative {args.iterative} steps + distill", iterative.model, "",
                               f"{total:.0f} (pruning and distill)"))
            if args.qat:
                keep = KeepModels()
                try:
                    quantized = Pipeline.from_specs(["canonicalize", "qdq", f"distill:{args.qat}"], input_shapes=shapes,
                                                    calibration=calibration, instruments=[keep]).run(original)
                except PipelineError as e:  # QAT refused (e.g. the conversion check): the qdq row still comes
                    if "qdq" not in keep.models:
                        raise
                    print(f"{kind}: QAT failed: {e}", file=sys.stderr)
                    stages.append(("qdq", keep.models["qdq"], "", ""))
                else:
                    record = quantized.records[-1]
                    stages += [("qdq", keep.models["qdq"], "", ""),
                               ("qdq + distill (QAT)", quantized.model, "",
                                f"{record.seconds:.0f} ({record.stats['steps']} steps, best {record.stats['best_step']})")]
            for label, model, prune_s, distill_s in stages:
                row = {"model": kind, "config": label, **metrics(kind, model, data),
                       "MACs": f"{cost_of(model, shapes).macs / 1e6:.1f}M", "compress s": prune_s, "distill s": distill_s}
                rows.append(row)
                print(row, file=sys.stderr)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print(f"\n{args.count} evaluation lines (seed {ocr_task.EVAL_SEED}), {args.calibration_count} training lines "
          f"(seed {ocr_task.CALIBRATION_SEED}); distill: {args.distill if not args.skip_one_shot or args.compress else '—'}; "
          f"iterative: {args.iterative_distill or args.distill if args.iterative else '—'}; QAT: {args.qat or '—'}; "
          f"peak memory of the process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
