"""Run every registered pass on every model of the corpus; one outcome per (model, pass).

The corpus: every model of the onnx wheel's backend test data (``light/``, ``pytorch-converted/``,
``pytorch-operator/``, ``simple/``) and the PP-OCR det/rec/cls models of the rapidocr-onnxruntime
wheel (plus any ``--extra`` ONNX file). Each model has its input shapes fixed (the shapes of the
inputs shipped beside it; PP-OCR: ``sculpt.models.PPOCR_SHAPES``; otherwise the model's own static
shapes), then goes through ``canonicalize``; every other pass runs on the canonicalized model
(on the shape-fixed raw model when canonicalize itself did not apply), ``canonicalize`` on the raw
one. Passes run with default options; a pass that needs calibration data gets
``CalibrationSet.random`` of 4 samples.

Outcomes:

- ``applied``: the pass ran, its output passes ``Model.verify()``, runs in onnxruntime (or, for
  models onnxruntime cannot run, onnx's reference evaluator) and its outputs are measured against
  the pass's input on the shipped inputs (else 2 random ones): ``max_rel`` / ``max_abs``. An exact
  pass must stay within 1e-5 relative (to each output's scale) or 1e-6 absolute.
- ``skipped``: the pass raised a SculptError (dynamic shapes, nothing it can handle, ...) or no
  runtime can run the pass's input model; ``reason`` says which.
- ``failed``: any other exception, an invalid output model, an output that does not run, an exact
  pass that changed the outputs (``MISMATCH``), a lossy pass whose outputs changed shape or became
  NaN, a pass that edited its input, a crash or a timeout.

Every case runs in its own forked process, at most ``--jobs`` at a time, killed after
``--timeout-per-case`` seconds (``failed: timeout``), so one hang or crash cannot stop the run.

    python tools/corpus_runner.py --jobs 2 --json corpus.json
    python tools/corpus_runner.py --passes fold-batchnorm,canonicalize --models 'light/*'

Prints a markdown table (applied / skipped / failed per pass) and the failures; exits with status 1
when any case failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import multiprocessing
import os
import pickle
import resource
import signal
import shutil
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXACT_RTOL = 1e-5
EXACT_ATOL = 1e-6
CALIBRATION_SAMPLES = 4
RANDOM_SAMPLES = 2
# options the runner sets instead of the defaults, to keep a full run within ~15 minutes on 2 cores
# (reported in the JSON and under the table). The random calibration set has 4 samples anyway.
RUNNER_OPTIONS: dict[str, dict[str, Any]] = {
    "channel-pruning": {"samples": 2, "positions": 1024},
    "depthwise-separable": {"samples": 2, "positions": 512, "iterations": 1},
    "fire-module": {"samples": 2, "positions": 512},
    "group-shuffle": {"samples": 2, "positions": 512, "iterations": 1},
}
PREP_PASS = "canonicalize"


# ------------------------------------------------------------------------------------------ the corpus
@dataclass
class CorpusModel:
    id: str
    path: str
    input_paths: list[str] = field(default_factory=list)  # shipped inputs (TensorProto files)
    shapes: dict[str, list[int]] | None = None  # fixed input shapes; None: from the shipped inputs / model
    weight: int = 0  # rough cost, to start the slow models first


def corpus_models(patterns: list[str] | None = None, extra: list[str] | None = None) -> list[CorpusModel]:
    from sculpt.models import PPOCR_FILES, PPOCR_SHAPES, backend_test_cases, ppocr_model_path

    models: list[CorpusModel] = []
    for kind in PPOCR_FILES:
        try:
            path = ppocr_model_path(kind)
        except Exception:  # rapidocr-onnxruntime not installed: the PP-OCR models are left out
            continue
        models.append(CorpusModel(f"ppocr/{kind}", str(path), [], {"x": list(PPOCR_SHAPES[kind])},
                                  weight=3 if kind != "cls" else 1))
    for case in backend_test_cases():
        models.append(CorpusModel(case.id, str(case.model_path), [str(p) for p in case.input_paths], None,
                                  weight=2 if case.suite == "light" else 0))
    for p in extra or []:
        models.append(CorpusModel(f"file/{Path(p).stem}", str(Path(p).resolve()), [], None, weight=1))
    if patterns:
        models = [m for m in models if any(fnmatch.fnmatch(m.id, pat) for pat in patterns)]
    return models


# ------------------------------------------------------------------------------------------ one case
def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return (text or (type(e).__name__ if isinstance(e, BaseException) else ""))[:limit]


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


class _NoRuntime(Exception):
    pass


class _Runner:
    """Runs a model on feeds with onnxruntime, or with onnx's reference evaluator for models
    onnxruntime cannot load (old opsets it no longer implements)."""

    def __init__(self, reference):
        from sculpt.runtime import make_session

        self.kind = "onnxruntime"
        try:
            make_session(reference)
        except Exception as e:
            ort_error = _one_line(e)
            try:
                from onnx.reference import ReferenceEvaluator

                ReferenceEvaluator(reference.proto)
            except Exception as e2:
                raise _NoRuntime(f"no runtime can run the model: {ort_error}; onnx reference: "
                                 f"{_one_line(e2)}") from None
            self.kind = "onnx-reference"

    def run(self, model, feeds: dict) -> dict:
        names = set(model.input_names)
        feeds = {k: v for k, v in feeds.items() if k in names}
        if self.kind == "onnxruntime":
            from sculpt.runtime import run

            return run(model, feeds)
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(model.proto).run(None, feeds)
        return dict(zip(model.output_names, values))


def _compare(ref: dict, got: dict) -> list[dict]:
    import numpy as np

    from sculpt.runtime import output_error

    out = []
    for name, a in ref.items():
        if name not in got:
            out.append({"output": name, "max_abs": math.inf, "max_rel": math.inf, "shape_match": False,
                        "missing": True})
            continue
        a, b = np.asarray(a), np.asarray(got[name])
        if a.dtype.kind in "OUSV" or b.dtype.kind in "OUSV":
            same = a.shape == b.shape and bool((a == b).all())
            out.append({"output": name, "max_abs": 0.0 if same else math.inf, "max_rel": 0.0 if same else math.inf,
                        "shape_match": a.shape == b.shape})
            continue
        e = output_error(name, b, a)
        nan_new = bool(b.dtype.kind in "fc" and np.isnan(b).any() and not np.isnan(a).any())
        out.append({"output": name, "max_abs": e.max_abs, "max_rel": e.max_rel, "shape_match": e.shape_match,
                    "nan": nan_new})
    return out


def _track_range(ranges: dict[str, list[float]], outputs: dict) -> None:
    """Smallest and largest finite value of each numeric output, over all samples seen."""
    import numpy as np

    for name, v in outputs.items():
        v = np.asarray(v)
        if v.dtype.kind not in "fiub" or v.size == 0:
            ranges[name] = [0.0, math.inf]  # not comparable this way: never "constant"
            continue
        v = v.astype(np.float64)
        v = v[np.isfinite(v)]
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if name in ranges:
            lo, hi = min(lo, ranges[name][0]), max(hi, ranges[name][1])
        ranges[name] = [lo, hi]


def _needs_calibration(p) -> bool:
    return bool(getattr(type(p), "needs_calibration", False) or getattr(p, "needs_calibration", False)
                or getattr(p, "uses_calibration", False) or getattr(p, "data_driven", False))


def ctx_calibration_missing(e: BaseException) -> bool:
    return "calibration" in str(e).lower() and ("need" in str(e).lower() or "give" in str(e).lower())


def apply_and_check(model, pass_name: str, options: dict, feeds: list[dict], shapes: dict,
                    sink: list | None = None, input_verified: bool = False) -> dict:
    """Run one pass on ``model`` and classify the outcome (see the module docstring). The output
    model of an ``applied`` case is appended to ``sink``. ``input_verified``: the input already
    passed Model.verify() (an unchanged output is then not verified again)."""
    options = {k: v for k, v in options.items() if k in _option_names(pass_name)}
    from sculpt.errors import InvalidModelError, SculptError
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.passes import PassContext, create_pass

    rec: dict[str, Any] = {"pass": pass_name, "options": options}

    def done(outcome: str, reason: str = "", **kw) -> dict:
        rec.update(outcome=outcome, reason=reason, **kw)
        return rec

    p = create_pass(pass_name, options)
    rec["exact"] = bool(p.exact)
    digest = model.sha256()

    def calibration():
        cal = CalibrationSet.random(model, count=CALIBRATION_SAMPLES, input_shapes=shapes or None)
        rec["calibration"] = f"random:{CALIBRATION_SAMPLES}"
        return cal

    start = time.perf_counter()
    try:
        try:
            ctx = PassContext(calibration=calibration() if _needs_calibration(p) else None,
                              input_shapes=dict(shapes or {}), seed=0)
            result = p(model, ctx)
        except SculptError as e:
            # a pass whose options (not its class) make it data-aware says so: give it the random set
            if ctx_calibration_missing(e) and "calibration" not in rec:
                ctx = PassContext(calibration=calibration(), input_shapes=dict(shapes or {}), seed=0)
                result = p(model, ctx)
            else:
                raise
    except SculptError as e:
        rec["seconds"] = time.perf_counter() - start
        if "produced an invalid model" in str(e):
            # the pass protocol caught its own broken output: the pass's fault, unless the input was broken
            try:
                model.verify()
            except SculptError as e_in:
                return done("skipped", f"the input model is not valid: {_one_line(e_in)}")
            return done("failed", f"invalid output model: {type(e).__name__}: {_one_line(e)}")
        return done("skipped", f"{type(e).__name__}: {_one_line(e)}")
    except Exception as e:
        rec["seconds"] = time.perf_counter() - start
        rec["traceback"] = traceback.format_exc()[-3000:]
        return done("failed", f"{type(e).__name__}: {_one_line(e)}")
    rec["seconds"] = time.perf_counter() - start
    if sink is not None:
        sink.append(result.model)
    if model.sha256() != digest:
        return done("failed", "the pass edited its input model (passes work on a copy)")
    out = result.model
    changed = out.sha256() != digest
    rec.update(modified=bool(result.modified), changed=changed, stats=_small(_jsonable(result.stats)))
    try:
        if changed or not input_verified:
            out.verify()
    except InvalidModelError as e:
        try:
            model.verify()
        except InvalidModelError as e_in:
            return done("skipped", f"the input model is not valid either: {_one_line(e_in)}")
        return done("failed", f"invalid output model: {_one_line(e)}")
    except Exception as e:
        return done("failed", f"Model.verify() crashed on the output: {type(e).__name__}: {_one_line(e)}")
    if not changed:
        return done("applied", max_rel=0.0, max_abs=0.0, runtime=None)
    # ---- numerically, against the pass's input
    try:
        runner = _Runner(model)
    except _NoRuntime as e:
        return done("skipped", str(e))
    out_runner = runner
    if runner.kind != "onnxruntime":  # a pass may raise an old opset onnxruntime cannot run to one it can
        try:
            out_runner = _Runner(out)
        except _NoRuntime:
            pass
    rec["runtime"] = runner.kind if out_runner.kind == runner.kind else f"{runner.kind} → {out_runner.kind}"
    errors: list[dict] = []
    ref_range: dict[str, list[float]] = {}
    for k, f in enumerate(feeds):
        try:
            ref = runner.run(model, f)
        except Exception as e:
            return done("skipped", f"{runner.kind} cannot run the input model: {_one_line(e)}")
        _track_range(ref_range, ref)
        try:
            got = out_runner.run(out, f)
        except Exception as e:
            return done("failed", f"{out_runner.kind} cannot run the output model: {_one_line(e)}")
        for e in _compare(ref, got):
            prev = next((x for x in errors if x["output"] == e["output"]), None)
            if prev is None:
                errors.append(e)
            else:
                prev["max_abs"] = max(prev["max_abs"], e["max_abs"])
                prev["max_rel"] = max(prev["max_rel"], e["max_rel"])
                prev["shape_match"] = prev["shape_match"] and e["shape_match"]
                prev["nan"] = prev.get("nan", False) or e.get("nan", False)
    max_rel = max((e["max_rel"] for e in errors), default=0.0)
    max_abs = max((e["max_abs"] for e in errors), default=0.0)
    # an output that is the same number everywhere, for every input (the light/ models: constant
    # weights, a softmax of equal logits) makes the measured error meaningless: say so
    constant = bool(ref_range) and all(hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1e-30)
                                       for lo, hi in ref_range.values())
    if constant:
        rec["reference_constant"] = True
    rec.update(max_rel=_finite(max_rel), max_abs=_finite(max_abs), samples=len(feeds),
               outputs=[{k: (_finite(v) if isinstance(v, float) else v) for k, v in e.items()} for e in errors])
    missing = [e["output"] for e in errors if e.get("missing")]
    if missing:
        return done("failed", f"output '{missing[0]}' is gone from the output model")
    bad_shape = [e["output"] for e in errors if not e["shape_match"]]
    if bad_shape:
        return done("failed", f"output '{bad_shape[0]}' changed shape")
    if p.exact:
        bad = [e for e in errors if not (e["max_rel"] <= EXACT_RTOL or e["max_abs"] <= EXACT_ATOL)]
        if bad:
            w = max(bad, key=lambda e: e["max_rel"])
            return done("failed", f"MISMATCH: exact pass changed output '{w['output']}': max abs "
                                  f"{w['max_abs']:.3g}, relative {w['max_rel']:.3g}")
    else:
        nan = [e["output"] for e in errors if e.get("nan")]
        if nan:
            return done("failed", f"output '{nan[0]}' has NaN where the input model has none")
        if not result.modified and max_abs > 0:
            return done("failed", "the pass reported no change, but the outputs changed")
    return done("applied")


def _small(stats: dict, limit: int = 2000) -> dict:
    """A pass's statistics, without the entries that would make one record large (per-layer lists)."""
    if len(json.dumps(stats)) <= limit:
        return stats
    out = {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}
    out["omitted"] = sorted(k for k in stats if k not in out)
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return _jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return _jsonable(obj.tolist()) if obj.size <= 64 else f"<array {obj.shape}>"
    except ImportError:
        pass
    return str(obj)


# ------------------------------------------------------------------------------------------ child jobs
def _load_feeds(cm: CorpusModel, model) -> tuple[list[dict], dict[str, list[int]]]:
    """The shipped inputs (one sample) or random ones; and the shapes to fix."""
    import onnx
    from onnx import numpy_helper

    from sculpt.errors import ShapeError

    if cm.input_paths:
        arrays = [numpy_helper.to_array(onnx.load_tensor(p)) for p in cm.input_paths]
        names = model.input_names
        if len(arrays) != len(names):
            raise ShapeError(f"{len(arrays)} shipped inputs for {len(names)} model inputs")
        feeds = dict(zip(names, arrays))
        # the shipped shapes are fixed in the model; an empty (0-sized) input stays dynamic
        shapes = {k: list(v.shape) for k, v in feeds.items()
                  if v.dtype.kind not in "OUS" and v.ndim > 0 and all(d > 0 for d in v.shape)}
        return [feeds], shapes
    return [], dict(cm.shapes or {})


def job_prepare(cm: CorpusModel, workdir: str) -> dict:
    """Load, fix shapes, pick inputs; write raw.onnx + feeds.pkl; then the canonicalize case, whose
    output (when applied) is canon.onnx, the input of every other pass."""
    from sculpt.runtime import random_inputs
    from sculpt.errors import SculptError
    from sculpt.ir.model import Model

    try:
        model = Model.load(cm.path)
        feeds, shapes = _load_feeds(cm, model)
        if shapes:
            model.fix_input_shapes(shapes)
        model.infer_shapes()
        if not feeds:
            feeds = [random_inputs(model, seed=k) for k in range(RANDOM_SAMPLES)]
    except SculptError as e:
        return {"status": "skipped", "reason": f"{type(e).__name__}: {_one_line(e)}"}
    except Exception as e:
        return {"status": "failed", "reason": f"preparing the model: {type(e).__name__}: {_one_line(e)}",
                "traceback": traceback.format_exc()[-3000:]}
    raw = os.path.join(workdir, "raw.onnx")
    model.save(raw)
    with open(os.path.join(workdir, "feeds.pkl"), "wb") as f:
        pickle.dump({"feeds": feeds, "shapes": shapes}, f)
    info: dict[str, Any] = {"status": "ok", "shapes": shapes}
    # the canonicalize case doubles as the preparation of the others (it always runs)
    sink: list = []
    rec = _guarded(apply_and_check, model, PREP_PASS, _options(PREP_PASS), feeds, shapes, sink)
    rec["input"] = "raw"
    info["record"] = rec
    if rec["outcome"] == "applied":
        sink[0].save(os.path.join(workdir, "canon.onnx"))
    return info


def job_case(workdir: str, pass_name: str, input_kind: str) -> dict:
    from sculpt.ir.model import Model

    with open(os.path.join(workdir, "feeds.pkl"), "rb") as f:
        data = pickle.load(f)
    model = Model.load(os.path.join(workdir, "canon.onnx" if input_kind == "canonicalized" else "raw.onnx"))
    # canon.onnx is canonicalize's output, verified in the preparation
    rec = apply_and_check(model, pass_name, _options(pass_name), data["feeds"], data["shapes"],
                          input_verified=input_kind == "canonicalized")
    rec["input"] = input_kind
    return rec


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:
        return {"pass": args[1], "outcome": "failed", "reason": f"{type(e).__name__}: {_one_line(e)}",
                "traceback": traceback.format_exc()[-3000:]}


def _options(pass_name: str) -> dict:
    return dict(RUNNER_OPTIONS.get(pass_name, {}))


def _option_names(pass_name: str) -> set[str]:
    from sculpt.passes import get_pass_class

    return {o.name for o in get_pass_class(pass_name).options()}


def _child(fn, args, result_path: str, log_path: str, memory_gb: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # quiet: the child's own output goes to a log file, kept for crash reports
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import faulthandler

    faulthandler.disable()  # a crash dump goes to the case's log (its tail becomes the reason), not the parent's
    faulthandler.enable(file=2)
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = fn(*args)
    except MemoryError:
        result = {"outcome": "failed", "reason": f"MemoryError (over the {memory_gb:g} GiB limit)"}
    except BaseException as e:  # noqa: BLE001 - everything is an outcome
        result = {"outcome": "failed", "reason": f"{type(e).__name__}: {_one_line(e)}",
                  "traceback": traceback.format_exc()[-3000:]}
    if isinstance(result, dict):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu"] = ru.ru_utime + ru.ru_stime
        result["max_rss_mb"] = ru.ru_maxrss / 1024
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(result), f)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------ scheduler
@dataclass
class _Task:
    kind: str  # "prep" | "case"
    model: CorpusModel
    workdir: str
    pass_name: str = ""
    input_kind: str = ""
    seq: int = 0


def run_corpus(models: list[CorpusModel], passes: list[str], *, timeout: float = 600.0, jobs: int = 2,
               memory_gb: float = 16.0, progress=None, keep_dir: str | None = None) -> list[dict]:
    """One record per (model, pass), in corpus order."""
    ctx = multiprocessing.get_context("fork")
    root = keep_dir or tempfile.mkdtemp(prefix="sculpt-corpus-")
    os.makedirs(root, exist_ok=True)
    results: dict[tuple[str, str], dict] = {}
    ready: deque[_Task] = deque()
    order = sorted(range(len(models)), key=lambda i: (-models[i].weight, i))
    for i in order:
        wd = os.path.join(root, f"m{i:04d}")
        os.makedirs(wd, exist_ok=True)
        ready.append(_Task("prep", models[i], wd))
    others = [p for p in passes if p != PREP_PASS]
    run_canon = PREP_PASS in passes
    running: dict[Any, tuple[_Task, float, str, str]] = {}
    total = len(models) * len(passes)
    seq = 0

    def record(cm: CorpusModel, rec: dict) -> None:
        rec["model"] = cm.id
        results[(cm.id, rec["pass"])] = rec
        if progress:
            progress(len(results), total, rec)

    def finish(task: _Task, res: dict | None, why: str | None, wall: float) -> None:
        cm = task.model
        if task.kind == "case":
            if res is not None:
                res["wall"] = wall
            if res is None:
                res = {"outcome": "failed", "reason": why}
            res.setdefault("pass", task.pass_name)
            res.setdefault("input", task.input_kind)
            res["pass"] = task.pass_name
            record(cm, res)
            return
        # preparation
        if res is None:
            res = {"status": "failed", "reason": why}
        status = res.get("status", "failed")
        raw_ok = os.path.exists(os.path.join(task.workdir, "raw.onnx")) and \
            os.path.exists(os.path.join(task.workdir, "feeds.pkl"))
        if status not in ("ok",) and not raw_ok:
            outcome = "skipped" if status == "skipped" else "failed"
            for p in passes:
                record(cm, {"pass": p, "outcome": outcome, "reason": f"model preparation: {res.get('reason')}",
                            "traceback": res.get("traceback")})
            return
        canon_ok = os.path.exists(os.path.join(task.workdir, "canon.onnx"))
        if run_canon:
            rec = res.get("record") or {"pass": PREP_PASS, "outcome": "failed",
                                        "reason": res.get("reason") or why, "input": "raw"}
            rec.update(wall=wall, cpu=res.get("cpu"), max_rss_mb=res.get("max_rss_mb"))
            record(cm, rec)
        input_kind = "canonicalized" if canon_ok else "raw"
        # at the front of the queue (a started model finishes early), the slow pass first
        for p in reversed(sorted(others, key=lambda n: n != "channel-pruning")):
            ready.appendleft(_Task("case", cm, task.workdir, p, input_kind))
    try:
        while ready or running:
            while ready and len(running) < jobs:
                task = ready.popleft()
                seq += 1
                tag = f"{task.kind}-{task.pass_name or 'prep'}-{seq}"
                result_path = os.path.join(task.workdir, tag + ".json")
                log_path = os.path.join(task.workdir, tag + ".log")
                if task.kind == "prep":
                    fn, args = job_prepare, (task.model, task.workdir)
                else:
                    fn, args = job_case, (task.workdir, task.pass_name, task.input_kind)
                proc = ctx.Process(target=_child, args=(fn, args, result_path, log_path, memory_gb), daemon=True)
                proc.start()
                running[proc] = (task, time.monotonic(), result_path, log_path)
            time.sleep(0.02)
            for proc in list(running):
                task, started, result_path, log_path = running[proc]
                if not proc.is_alive():
                    proc.join()
                    del running[proc]
                    res, why = None, None
                    if os.path.exists(result_path):
                        with open(result_path) as f:
                            res = json.load(f)
                    else:
                        tail = ""
                        if os.path.exists(log_path):
                            with open(log_path, errors="replace") as f:
                                text = f.read()
                            fatal = [ln for ln in text.splitlines() if ln.startswith("Fatal Python error")]
                            tail = _one_line(fatal[0] if fatal else text[-400:])
                        why = f"crashed (exit code {proc.exitcode})" + (f": {tail}" if tail else "")
                    finish(task, res, why, time.monotonic() - started)
                elif time.monotonic() - started > timeout:
                    proc.kill()
                    proc.join()
                    del running[proc]
                    finish(task, None, f"timeout (over {timeout:g} s)", time.monotonic() - started)
    finally:
        for proc in running:
            proc.kill()
        if keep_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    out = []
    for cm in models:
        for p in passes:
            rec = results.get((cm.id, p))
            if rec is None:  # cannot happen; never drop a case silently
                rec = {"model": cm.id, "pass": p, "outcome": "failed", "reason": "no result recorded"}
            out.append(_ordered(rec))
    return out


_KEY_ORDER = ["model", "pass", "outcome", "reason", "input", "exact", "modified", "changed", "max_rel", "max_abs",
              "reference_constant",
              "runtime", "samples", "seconds", "wall", "cpu", "max_rss_mb", "options", "calibration", "outputs", "stats", "traceback"]


def _ordered(rec: dict) -> dict:
    out = {k: rec[k] for k in _KEY_ORDER if k in rec and rec[k] is not None}
    out.update({k: v for k, v in rec.items() if k not in out and v is not None})
    return out


# ------------------------------------------------------------------------------------------ report
def summarize(results: list[dict], passes: list[str]) -> dict[str, dict[str, int]]:
    summary = {p: {"applied": 0, "changed": 0, "skipped": 0, "failed": 0, "mismatch": 0} for p in passes}
    for r in results:
        s = summary.setdefault(r["pass"], {"applied": 0, "changed": 0, "skipped": 0, "failed": 0, "mismatch": 0})
        s[r["outcome"]] += 1
        if r["outcome"] == "applied" and r.get("changed"):
            s["changed"] += 1
        if r["outcome"] == "failed" and str(r.get("reason", "")).startswith("MISMATCH"):
            s["mismatch"] += 1
    return summary


def vacuous(results: list[dict]) -> list[dict]:
    """Changed, applied cases whose reference outputs are constant: their measured error is 0 by
    construction, not by evidence."""
    return [r for r in results if r["outcome"] == "applied" and r.get("changed") and r.get("reference_constant")]


def markdown_table(summary: dict[str, dict[str, int]], models: int) -> str:
    lines = [f"| pass ({models} models) | applied | of which changed | skipped | failed | exact mismatches |",
             "|---|---:|---:|---:|---:|---:|"]
    tot = {"applied": 0, "changed": 0, "skipped": 0, "failed": 0, "mismatch": 0}
    for p, s in summary.items():
        lines.append(f"| `{p}` | {s['applied']} | {s['changed']} | {s['skipped']} | {s['failed']} | {s['mismatch']} |")
        for k in tot:
            tot[k] += s[k]
    lines.append(f"| total | {tot['applied']} | {tot['changed']} | {tot['skipped']} | {tot['failed']} | "
                 f"{tot['mismatch']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", action="append", help="pass names, comma-separated (default: every registered "
                                                       "pass except test-*); may repeat")
    ap.add_argument("--models", action="append", help="fnmatch glob on model ids (e.g. 'light/*', 'ppocr/det'); "
                                                       "may repeat")
    ap.add_argument("--extra", action="append", default=[], help="an extra ONNX file to include (id file/<stem>)")
    ap.add_argument("--timeout-per-case", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run in parallel (default 2)")
    ap.add_argument("--memory-limit-gb", type=float, default=16.0, help="address-space limit per case (0: none)")
    ap.add_argument("--json", help="write the full results here")
    ap.add_argument("--keep-dir", help="keep the prepared models and logs in this folder")
    ap.add_argument("--list", action="store_true", help="list the model ids and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case as it finishes")
    args = ap.parse_args(argv)

    # one BLAS thread per case when the cases fill the cores: parallel SVDs / solves otherwise thrash
    # (set before numpy is first imported; an explicit setting in the environment wins)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))

    from sculpt.passes import registered_passes

    known = [n for n in registered_passes() if not n.startswith("test-")]
    if args.passes:
        passes = [p.strip() for item in args.passes for p in item.split(",") if p.strip()]
        unknown = [p for p in passes if p not in known]
        if unknown:
            ap.error(f"unknown pass '{unknown[0]}' (known: {', '.join(known)})")
    else:
        passes = known
    if args.jobs < 1 or args.timeout_per_case <= 0:
        ap.error("--jobs and --timeout-per-case must be positive")
    for p in args.extra:
        if not os.path.isfile(p):
            ap.error(f"--extra {p}: no such file")
    models = corpus_models(args.models, args.extra)
    if args.list:
        print("\n".join(m.id for m in models))
        return 0
    if not models:
        ap.error("no model matches --models")

    def progress(k, n, rec):
        if args.verbose or rec["outcome"] == "failed":
            extra = f": {rec.get('reason')}" if rec.get("reason") else ""
            print(f"[{k}/{n}] {rec['model']} {rec['pass']} {rec['outcome']} ({rec.get('wall', 0):.1f} s){extra}",
                  file=sys.stderr, flush=True)

    # a plain `kill` stops the running cases and removes the temporary folder too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.perf_counter()
    results = run_corpus(models, passes, timeout=args.timeout_per_case, jobs=args.jobs,
                         memory_gb=args.memory_limit_gb, progress=progress, keep_dir=args.keep_dir)
    wall = time.perf_counter() - start
    summary = summarize(results, passes)
    print(markdown_table(summary, len(models)))
    notes = [f"{p}: {', '.join(f'{k}={v}' for k, v in o.items())}" for p, o in RUNNER_OPTIONS.items() if p in passes]
    cpu = sum(r.get("cpu") or 0 for r in results)
    print(f"\n{len(results)} cases, {len(models)} models, {wall:.0f} s wall ({cpu:.0f} s CPU in the cases), "
          f"--jobs {args.jobs}. Default options"
          + (f" except {'; '.join(notes)}" if notes else "") + f"; calibration: random, {CALIBRATION_SAMPLES} samples.")
    vac = vacuous(results)
    if vac:
        ms = sorted({r["model"] for r in vac})
        print(f"{len(vac)} changed cases were measured on models whose outputs are constant for every input "
              f"({', '.join(ms[:6])}{' ...' if len(ms) > 6 else ''}): their error of 0 says nothing.")
    failed = [r for r in results if r["outcome"] == "failed"]
    if failed:
        print("\nFailures:")
        for r in failed:
            print(f"- {r['model']} / {r['pass']}: {r.get('reason')}")
    if args.json:
        doc = {"command": " ".join(["tools/corpus_runner.py"] + list(argv if argv is not None else sys.argv[1:])),
               "wall_seconds": wall, "cpu_seconds": cpu, "jobs": args.jobs, "timeout_per_case": args.timeout_per_case,
               "calibration": f"random:{CALIBRATION_SAMPLES}", "runner_options": RUNNER_OPTIONS,
               "exact_tolerance": {"rtol": EXACT_RTOL, "atol": EXACT_ATOL},
               "models": [m.id for m in models], "passes": passes, "summary": summary,
               "constant_reference_cases": [[r["model"], r["pass"]] for r in vac], "results": results}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable(doc), f, indent=1, allow_nan=False)
        os.replace(tmp, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
