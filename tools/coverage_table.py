"""Coverage table: every real model sculpt has at hand x {canonicalize, channel-pruning, qdq, compile and
verify for host, arm64 (under qemu), mali, adreno (on PoCL)}, each cell pass or fail with its reason.

The models: PP-OCR det/rec/cls (sculpt.models), the onnx wheel's light models and its LSTM/GRU/RNN
node tests (W, R, B as initializers), the zoo of tools/zoo.py (ddddocr's CRNN among them) and nudenet's
YOLOv8n detector (``nudenet/320n.onnx``, shipped inside the nudenet wheel). Each cell is a real command:

- canonicalize / channel-pruning / qdq: ``sculpt run MODEL --pass ...`` with ``--sample-shape`` (dynamic
  dimensions stay dynamic) and, for the data-fitted ones, ``--calibration random:8``. A cell passes when
  the command succeeds (the output passes onnx's full check) and, for canonicalize, the output matches
  the input model at 1e-4 (relative) or 1e-6 (absolute). The cell also says whether the output kept the dynamic dims.
- host / arm64 / adreno: ``sculpt compile MODEL --target T --input-shape ...`` then ``sculpt verify``
  (host: the deploy runner; arm64: the same runner under qemu-aarch64; adreno: the OpenCL kernels on
  PoCL), which compares with onnxruntime at rtol 1e-4. mali: ``sculpt compile`` only.

Every cell runs in its own process with a time limit; results go to a JSON file as they come
(``--json``, default coverage.json), and a cell already there is not run again (``--redo`` runs it).
A failing cell's reason is the command's last error line; a reason that matches a known TVM limitation
gets its one-line explanation and upstream reference (``KNOWN_LIMITATIONS``).

    nice -n 10 python tools/coverage_table.py                        # everything (hours on 2 cores)
    nice -n 10 python tools/coverage_table.py --models ppocr-rec,ddddocr-captcha --columns host,arm64
    python tools/coverage_table.py --print-only                      # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402  (tools/zoo.py)

# a model shipped inside another PyPI wheel: nudenet's YOLOv8n detector (12 MB), used by nudenet at 320x320
zoo.ZOO.setdefault("nudenet-yolov8n", zoo.ZooModel(
    "nudenet==3.4.2", "nudenet/320n.onnx", "images", (1, 3, 320, 320),
    "nudenet's YOLOv8n detector: C2f blocks, SPPF, anchor-free head with Split/Concat/Softmax (DFL)"))

PASS_COLUMNS = ("canonicalize", "channel-pruning", "qdq")
COMPILE_COLUMNS = ("host", "arm64", "mali", "adreno")
COLUMNS = PASS_COLUMNS + COMPILE_COLUMNS
COLUMN_TITLES = {"canonicalize": "canonicalize", "channel-pruning": "channel-pruning", "qdq": "qdq",
                 "host": "host (compile + verify)", "arm64": "arm64 (compile + verify under qemu)",
                 "mali": "mali (compile)", "adreno": "adreno (compile + verify on PoCL)"}
PASS_SPECS = {"canonicalize": ["canonicalize"], "channel-pruning": ["canonicalize", "channel-pruning:ratio=0.3"],
              "qdq": ["canonicalize", "qdq:samples=8"]}
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-6  # canonicalize: either bound, as --verify-each (outputs near 0 have no scale)

# (pattern in the failing command's error line, one-line explanation, upstream reference)
KNOWN_LIMITATIONS: list[tuple[str, str, str]] = []


class CoverageModel(NamedTuple):
    name: str
    path: Callable[[Path], Path]  # given the work folder, the .onnx (made or fetched on first use)
    shapes: dict[str, list[int]]  # the static shape of every input (the model's own, or the one its package uses)
    description: str


def _ppocr(kind: str) -> CoverageModel:
    from sculpt.models import PPOCR_SHAPES, ppocr_model_path

    return CoverageModel(f"ppocr-{kind}", lambda work: ppocr_model_path(kind), {"x": list(PPOCR_SHAPES[kind])},
                         f"PP-OCR {kind} (rapidocr-onnxruntime)")


def _light(name: str) -> CoverageModel:
    from sculpt.ir.model import Model
    from sculpt.models import backend_test_data_dir, light_model

    shipped = backend_test_data_dir() / "light" / f"light_{name}.onnx"
    shapes = {k: [int(d) for d in v] for k, v in Model.load(shipped).input_shapes().items()}

    # seeded weights (sculpt.models.reweight), made on first use (VGG-19's are 548 MB): as shipped every
    # weight is 0.02, every channel the same and the softmax uniform, so no error could see a wrong channel
    def path(work):
        out = Path(work) / f"light_{name}.onnx"
        if not out.exists():
            light_model(name).save(out)
        return out

    return CoverageModel(f"light-{name}", path, shapes, f"onnx wheel light/{name}, seeded weights")


def _zoo(name: str) -> CoverageModel:
    entry = zoo.ZOO[name]
    return CoverageModel(name, lambda work: zoo.fetch(name), {entry.input_name: list(entry.input_shape)},
                         entry.description)


RECURRENT_CASES = ("test_lstm_defaults", "test_gru_with_initial_bias", "test_simple_rnn_with_initial_bias",
                   "test_lstm_with_peepholes")


def _recurrent(case: str) -> CoverageModel:
    def make(work: Path) -> Path:
        target = work / "models" / f"{case}.v2.onnx"  # v2: sequence_lens a constant
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            proto = _recurrent_model(case)
            onnx.save(proto, str(target))
        return target

    proto = _recurrent_model(case)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in proto.graph.input}
    return CoverageModel(case.replace("test_", "onnx-node-"), make, shapes, f"onnx backend node test {case}")


def _recurrent_model(case: str) -> onnx.ModelProto:
    """The onnx wheel's node test ``case`` as a model: W, R, B, P initializers, X (and the rest) inputs."""
    from onnx import helper, numpy_helper

    from sculpt.models import recurrent_node_cases

    found = {name: (node, inputs) for node, inputs, _, name in recurrent_node_cases()}
    node, inputs = found[case]
    constant_positions = (1, 2, 3, 4, 7)  # W, R, B, sequence_lens (valid lengths, not random ones), P
    graph_inputs, inits = [], []
    for position, (name, value) in enumerate(zip(node.input, inputs)):
        if not name:
            continue
        if position in constant_positions:
            inits.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                              value.shape))
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], case, graph_inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def all_models() -> list[CoverageModel]:
    models = [_recurrent(c) for c in RECURRENT_CASES]
    models += [_ppocr(k) for k in ("det", "rec", "cls")]
    models += [_zoo(n) for n in zoo.ZOO]
    models += [_light(n) for n in ("squeezenet", "shufflenet", "inception_v1", "resnet50", "bvlc_alexnet",
                                   "zfnet512", "densenet121", "inception_v2", "vgg19")]
    return models


def _shape_args(flag: str, shapes: dict[str, list[int]]) -> list[str]:
    out = []
    for name, dims in shapes.items():
        out += [flag, f"{name}={','.join(map(str, dims))}"]
    return out


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, f"timed out after {timeout:.0f} s", time.perf_counter() - start


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("sculpt: error:")] or lines or ["(no message)"]
    return errors[-1].removeprefix("sculpt: error:").strip()[:400]


def _warnings(stderr: str) -> list[str]:
    return [ln.strip().removeprefix("sculpt: warning:").strip()[:300] for ln in stderr.splitlines()
            if ln.startswith("sculpt: warning:")]


def _declared(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return {vi.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                      for d in vi.type.tensor_type.shape.dim] for vi in proto.graph.input if vi.name not in inits}


def _is_dynamic(dims: list) -> bool:
    return any(not isinstance(d, int) or d <= 0 for d in dims)


def run_pass_cell(model: CoverageModel, column: str, path: Path, work: Path, timeout: float) -> dict:
    out = work / "out" / f"{model.name}.{column}.onnx"
    report = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    declared = _declared(path)
    cmd = [sys.executable, "-m", "sculpt", "run", str(path), "-o", str(out), "--report", str(report),
           "--latency-runs", "0"]
    for spec in PASS_SPECS[column]:
        cmd += ["--pass", spec]
    cmd += _shape_args("--sample-shape", {k: v for k, v in model.shapes.items() if k in declared})
    if column != "canonicalize":
        cmd += ["--calibration", "random:8"]
    rc, _, err, seconds = _run(cmd, timeout)
    cell = {"ok": False, "seconds": round(seconds, 1), "command": " ".join(cmd[2:])}
    if rc != 0:
        cell["reason"] = _error_line(err)
        return cell
    data = json.loads(report.read_text())
    error, error_abs = data["error"]["max_rel"], data["error"]["max_abs"]
    kept = _declared(out)
    dynamic_in = [n for n, d in declared.items() if _is_dynamic(d)]
    cell.update(error=error, params_ratio=round(data["after"]["params"] / max(1, data["before"]["params"]), 3),
                dims_kept=all(_is_dynamic(kept.get(n, [])) for n in dynamic_in) if dynamic_in else None,
                warnings=_warnings(err))
    if column == "canonicalize" and not (error <= EXACT_RTOL or error_abs <= EXACT_ATOL):
        cell["reason"] = f"canonicalize changed the outputs by {error:.3g} (relative), {error_abs:.3g} (absolute)"
        return cell
    if not np.isfinite(error):
        cell["reason"] = "non-finite error"
        return cell
    if dynamic_in and not cell["dims_kept"]:
        cell["reason"] = f"the output lost the dynamic dims of {', '.join(dynamic_in)}: {kept}"
        return cell
    cell["ok"] = True
    return cell


def run_compile_cell(model: CoverageModel, column: str, path: Path, work: Path, timeout: float) -> dict:
    lib = work / "build" / f"{model.name}.{column}.so"
    lib.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sculpt", "compile", str(path), "--target", column, "-o", str(lib)]
    cmd += _shape_args("--input-shape", model.shapes)
    rc, _, err, seconds = _run(cmd, timeout)
    cell = {"ok": False, "compile_seconds": round(seconds, 1), "warnings": _warnings(err)}
    if rc != 0:
        cell["reason"] = "compile: " + _error_line(err)
        return cell
    if column == "mali":
        cell["ok"] = True
        return cell
    feeds = []
    folder = lib.parent / f"{model.name}.inputs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    proto = onnx.load(str(path), load_external_data=False)
    types = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in proto.graph.input}
    for name, dims in model.shapes.items():
        dtype = types.get(name, np.float32)
        value = rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else np.full(dims, dims[0] if dims else 1, dtype=dtype)
        file = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".npy")  # input names may hold '/'
        np.save(file, value)
        feeds += ["--input", f"{name}={file}"]
    cmd = [sys.executable, "-m", "sculpt", "verify", str(lib), "--model", str(path), "--json"] + feeds
    rc, out, err, seconds = _run(cmd, timeout)
    cell["verify_seconds"] = round(seconds, 1)
    if rc != 0:
        cell["reason"] = "verify: " + _error_line(err)
        return cell
    try:
        data = json.loads(out)
        cell["max_rel"] = max((o.get("max_rel", 0.0) for o in data.get("outputs", [])), default=None)
    except (json.JSONDecodeError, AttributeError, TypeError):
        pass
    cell["ok"] = True
    for f in lib.parent.glob(f"{model.name}.{column}.*"):  # artifacts are large: keep only the verdict
        if f.is_file():
            f.unlink()
    return cell


def known_limitation(reason: str) -> tuple[str, str] | None:
    for pattern, text, reference in KNOWN_LIMITATIONS:
        if re.search(pattern, reason):
            return text, reference
    return None


def table(results: dict, models: list[str], columns: list[str]) -> str:
    head = "| model | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    notes: list[str] = []
    for name in models:
        row = [name]
        for column in columns:
            cell = results.get(name, {}).get(column)
            if cell is None:
                row.append("not run")
            elif cell["ok"]:
                extra = ""
                if column in PASS_COLUMNS and cell.get("dims_kept"):
                    extra = ", dims kept"
                if column in ("host", "arm64", "adreno") and cell.get("max_rel") is not None:
                    extra = f", {cell['max_rel']:.1e}"
                if any("fell back" in w or "schedule rule" in w for w in cell.get("warnings", [])):
                    extra += ", schedule fallback"
                row.append("pass" + extra)
            else:
                notes.append(f"{name} / {column}: {cell['reason']}")
                known = known_limitation(cell["reason"])
                if known:
                    notes[-1] += f" — TVM limitation: {known[0]} ({known[1]})"
                row.append(f"**fail** [{len(notes)}]")
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--columns", help=f"comma-separated, of {', '.join(COLUMNS)} (default: all)")
    ap.add_argument("--json", default="coverage.json", help="results file, read and extended (default coverage.json)")
    ap.add_argument("--work", default=None, help="folder for outputs and builds (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    ap.add_argument("--redo", action="store_true", help="run cells already in the JSON again")
    ap.add_argument("--print-only", action="store_true", help="print the table from the JSON, run nothing")
    args = ap.parse_args(argv)
    every = all_models()
    by_name = {m.name: m for m in every}
    names = args.models.split(",") if args.models else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"unknown model {unknown[0]!r} (known: {', '.join(by_name)})", file=sys.stderr)
        return 2
    columns = args.columns.split(",") if args.columns else list(COLUMNS)
    if any(c not in COLUMNS for c in columns):
        print(f"unknown column (known: {', '.join(COLUMNS)})", file=sys.stderr)
        return 2
    json_path = Path(args.json)
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if not args.print_only:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sculpt-coverage-"))
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            model = by_name[name]
            for column in columns:
                if column in results.get(name, {}) and not args.redo:
                    continue
                try:
                    path = model.path(work)
                    runner = run_pass_cell if column in PASS_COLUMNS else run_compile_cell
                    cell = runner(model, column, path, work, args.timeout)
                except Exception as e:  # noqa: BLE001 - a model that cannot be had is a red cell, not a crash
                    cell = {"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                results.setdefault(name, {})[column] = cell
                json_path.write_text(json.dumps(results, indent=1))
                print(f"{name} / {column}: {'pass' if cell['ok'] else 'FAIL: ' + cell['reason']}", flush=True)
    print(table(results, names, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
