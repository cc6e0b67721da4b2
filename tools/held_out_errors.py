"""The output error of lossy passes on samples they fitted to against samples held out of their fitting
(issue 19): the number `sculpt run` used to print, and the one it prints now.

For each model and pass, ``sculpt run MODEL --pass canonicalize --pass PASS --calibration DATA.npz``
runs with the default split (a quarter of the samples held out); the held-out error is the run's own
report, and the same output model is also measured here on the samples its passes fitted to: the
first two of them (what `sculpt run` printed before it held samples out: `--compare-samples 2` on the
first calibration samples, which the passes had fitted to) and all of them. Both are max |a-b| / max |b| over the samples and outputs, through onnxruntime. The run's
latency rows (onnxruntime on this machine) are shown too.

Calibration data: rendered text lines for PP-OCR rec and cls (``sculpt.ocr_task``, the calibration
seed), rendered text pages rotated by 0/90/180/270 degrees for ``doc-orientation`` (tools/zoo.py,
ImageNet normalisation).

    python tools/held_out_errors.py                           # cls, rec, doc-orientation; 3 passes each
    python tools/held_out_errors.py --models cls --passes sparsify:sparsity=0.5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSES = ["channel-pruning:ratio=0.3", "low-rank:data_aware=true", "sparsify:sparsity=0.5"]
MODELS = ["cls", "rec", "doc-orientation"]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def model_and_data(name: str, samples: int) -> tuple[Path, list[int], np.ndarray]:
    """(model path, static input shape, inputs [samples, C, H, W])."""
    if name in ("cls", "rec"):
        from sculpt import ocr_task
        from sculpt.models import PPOCR_SHAPES, ppocr_model_path

        return ppocr_model_path(name), PPOCR_SHAPES[name], ocr_task.calibration_inputs(name, samples)
    import zoo
    from sculpt.textdata import render_text_image

    entry = zoo.ZOO[name]
    _, _, h, w = entry.input_shape
    pages = []
    for k in range(samples):
        image, _ = render_text_image(h, w, seed=1000 + k, words_per_line=4)
        image = np.rot90(image, k % 4)  # square: the shape stays
        arr = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        pages.append(arr.transpose(2, 0, 1))
    return zoo.fetch(name), list(entry.input_shape), np.stack(pages).astype(np.float32)


def measure(model_name: str, spec: str, samples: int, work: Path) -> dict:
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.model import Model
    from sculpt.runtime import compare_models

    path, shape, inputs = model_and_data(model_name, samples)
    input_name = Model.load(path).input_names[0]
    data = work / f"{model_name}.npz"
    np.savez(data, **{input_name: inputs})
    out, report = work / "out.onnx", work / "report.json"
    shape_arg = f"{input_name}=" + ",".join(map(str, shape))
    cmd = [sys.executable, "-m", "sculpt", "run", str(path), "--input-shape", shape_arg, "--pass", "canonicalize",
           "--pass", spec, "--calibration", str(data), "-o", str(out), "--report", str(report)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"model": model_name, "pass": spec, "failed": (done.stderr.strip().splitlines() or ["?"])[-1]}
    rep = json.loads(report.read_text())
    reference = Model.load(path)
    reference.fix_input_shapes({input_name: shape})
    split = CalibrationSet.from_npz(data).split()
    candidate = Model.load(out)
    fitted = compare_models(reference, candidate, list(split.fitting))
    # what `sculpt run` printed before the split: the first two calibration samples, both fitted to
    first_two = compare_models(reference, candidate, list(split.fitting.take(2)))
    return {"model": model_name, "pass": spec, "old": first_two.max_rel,
            "fitted": fitted.max_rel, "fitted_samples": fitted.samples,
            "held_out": rep["error"]["max_rel"], "held_out_samples": rep["error"]["samples"],
            "macs": (rep["before"]["macs"], rep["after"]["macs"]),
            "latency_ms": (rep["before"].get("latency_ms"), rep["after"].get("latency_ms")),
            "warnings": len(rep["warnings"]), "seconds": seconds}


def markdown(rows: list[dict]) -> str:
    head = ("| model | pass | on 2 fitted samples (the old report) | on the held-out samples (now) | "
            "on all fitted samples | MACs | latency (ort) | run time |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | `{r['pass']}` | failed: {r['failed']} | | | | | |")
            continue
        lat = r["latency_ms"]
        lines.append(f"| {r['model']} | `{r['pass']}` | {r['old']:.2g} | {r['held_out']:.2g} ({r['held_out_samples']})"
                     f"{' ⚠' if r['warnings'] else ''} | {r['fitted']:.2g} ({r['fitted_samples']}) | "
                     f"{r['macs'][1] / r['macs'][0]:.2f}× | {lat[0]:.2f} → {lat[1]:.2f} ms | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--passes", action="append", help=f"pass specs (default: {', '.join(PASSES)})")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--json", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for spec in args.passes or PASSES:
                rows.append(measure(model, spec, args.samples, Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
