"""`sculpt verify` on the QDQ build of every zoo model, end to end and unit by unit, in one table.

    python tools/qdq_verify_table.py [--models rec,det,cls,doc-orientation,...] [--builds off,kernel]
                                     [--calibration 8] [--workdir DIR] [--json FILE]

Per model: the canonicalized model at its static shape quantized by sculpt's ``qdq`` pass (calibrated on
``--calibration`` inputs: rendered text lines for PP-OCR rec/cls, image-like inputs near the benchmark's
for the others, as tools/int8_kernel_benchmark.py does), compiled for the host as ``sculpt compile`` does
(``--int8 off``, the default: dequantize, float op, quantize; ``--int8 kernel``: sculpt's int8 conv
kernel), and verified as ``sculpt verify --qdq-units always`` does on random inputs (seed 0): the
end-to-end error against onnxruntime's graph as written, then every quantized unit on the build's own
int8 inputs (sculpt.backends.tvm.qdq_verify). The verdict is `sculpt verify`'s at its default tolerance
(rtol 1e-4): within it end to end, or else every unit within its bound. Builds are not timed; the check's
time is the verification build (a compile) plus the runs and the comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODELS = ("rec,det,cls,doc-orientation,layout-cdla,ppocrv6-det-small,ppocrv6-rec-small,ddddocr-captcha,"
                  "squeezenet,shufflenet")
LABELS = {"off": "compile (default)", "kernel": "compile --int8 kernel", "relax": "compile --int8 relax"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def qdq_model(kind: str, calibration_count: int, workdir: Path) -> Path:
    """The QDQ model of ``kind`` (made once per workdir)."""
    from int8_kernel_benchmark import calibration
    from kernel_benchmark import _source_model

    from sculpt.passes import Pipeline

    path = workdir / f"{kind}.qdq.onnx"
    if path.exists():
        return path
    model, shapes = _source_model(kind)
    fp32 = Pipeline.from_specs(["canonicalize"], input_shapes=shapes).run(model).model
    q = Pipeline.from_specs([f"qdq:samples={calibration_count}"], input_shapes=None,
                            calibration=calibration(kind, fp32, calibration_count)).run(fp32).model
    q.save(path)
    return path


def row(kind: str, build: str, path: Path, workdir: Path) -> dict:
    from sculpt.backends.tvm.artifact import compile_model, export_artifact
    from sculpt.backends.tvm.deploy import verify_artifact
    from sculpt.ir.model import Model

    t = time.perf_counter()
    artifact = export_artifact(compile_model(Model.load(path), "host", int8=build), workdir / f"{kind}.{build}.so",
                               source_model=path)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    result = verify_artifact(artifact, path, qdq_units="always")
    verify_s = time.perf_counter() - t
    check = result.unit_check
    flipped = [u for u in check.units if u.off_by_one]
    return {"model": kind, "build": LABELS[build], "end_to_end_rel": result.comparison.max_rel,
            "end_to_end_ok": result.end_to_end_ok, "units": len(check.units), "units_with_flips": len(flipped),
            "off_by_one_elements": check.off_by_one, "elements": check.elements,
            "worst_steps": max((u.worst_steps for u in check.units), default=0),
            "largest_unit_flip_fraction": max((u.off_by_one / u.elements for u in check.units if u.elements), default=0),
            "largest_flip_tie_distance": max((u.flip_tie_distance for u in check.units if u.off_by_one), default=0.0),
            "tails_rel": max((o.max_rel for o in check.tails), default=0.0), "consistent": check.consistent,
            "units_ok": check.ok, "verdict": "pass" if (result.end_to_end_ok or check.ok) else "FAIL",
            "failing": [u.as_dict() for u in check.failing_units][:5], "check_s": round(check.seconds, 1),
            "verify_s": round(verify_s, 1), "compile_s": round(compile_s, 1), "notes": check.notes}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | build | end-to-end error (rel.) | units checked | units off by 1 step (elements) | worst step "
             "| flips' distance from a tie (steps) | float tails (rel.) | artifact = verification build | verdict "
             "| time of the check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['build']} | - | - | - | - | - | - | - | error: {r['error']} | - |")
            continue
        e2e = f"{r['end_to_end_rel']:.2g}" + ("" if r["end_to_end_ok"] else " (> 1e-4)")
        lines.append(f"| {r['model']} | {r['build']} | {e2e} | {r['units']} | {r['units_with_flips']} "
                     f"({r['off_by_one_elements']} of {r['elements']:,}) | {r['worst_steps']} | "
                     f"{'≤ %.2g' % r['largest_flip_tie_distance'] if r.get('largest_flip_tie_distance') else '-'} | "
                     f"{r['tails_rel']:.2g} | "
                     f"{'yes' if r['consistent'] else 'NO'} | {r['verdict']} | {r['check_s']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--builds", default="off,kernel", help="--int8 modes of sculpt compile: off, kernel, relax")
    p.add_argument("--calibration", type=int, default=8, help="calibration inputs of the qdq pass")
    p.add_argument("--workdir", default=None, help="keep the models and artifacts here (default: a temp folder)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON lines (appended per row)")
    p.add_argument("--from-json", default=None, metavar="FILE", help="only print the table of rows written by --json")
    args = p.parse_args(argv)
    if args.from_json:
        print(markdown([json.loads(line) for line in Path(args.from_json).read_text().splitlines() if line.strip()]))
        return 0
    from kernel_benchmark import zoo_names

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    bad = [m for m in models if m not in zoo_names()] + [b for b in builds if b not in LABELS]
    if bad:
        print(f"qdq_verify_table: error: unknown model or build: {', '.join(bad)}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sculpt-qdq-verify-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in models:
        try:
            path = qdq_model(kind, args.calibration, workdir)
        except Exception as e:  # a model the qdq pass or canonicalize refuses: one row says so
            rows.extend({"model": kind, "build": LABELS[b], "error": f"qdq model: {str(e)[:200]}"} for b in builds)
            log(f"{kind}: {rows[-1]['error']}")
            continue
        for build in builds:
            try:
                r = row(kind, build, path, workdir)
            except Exception as e:
                r = {"model": kind, "build": LABELS[build], "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            log(json.dumps(r))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(markdown(rows))
    return 0 if all(r.get("verdict") == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
