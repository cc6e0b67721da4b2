"""`sculpt optimize`: the fastest model within an accuracy budget, latency measured on the runtime it will
run on. ``optimize(...)`` is the Python form of the command; the strategy is in search.py, the knobs in
space.py, the measures in metric.py and latency.py, the output folder's files in report.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from sculpt.common import atomic_write_bytes, existing_ancestor, one_line, to_plain_json
from sculpt.errors import CalibrationError, OptionError, ShapeError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.optimizer.latency import LatencyMeter, make_meter
from sculpt.optimizer.metric import Metric, MetricError, default_max_drop, load_user_metric, proxy_metric
from sculpt.optimizer.report import candidates_csv, candidates_json, layer_rows, layer_times_ms, report_html
from sculpt.optimizer.search import CONFIRM_MIN_SAMPLES, Cache, Candidate, Decision, Search, SearchResult
from sculpt.optimizer.space import DEFAULT_TECHNIQUES, Knob, SearchSpace, search_space
from sculpt.passes import Pipeline

OUTPUT_FILES = ("model.onnx", "pipeline.yaml", "candidates.json", "candidates.csv", "report.html")


@dataclass
class OptimizeResult:
    """What ``optimize`` returns: the chosen model, every candidate, and where the files went."""

    model: Model
    chosen: Candidate
    input: Candidate
    candidates: list[Candidate]
    decisions: list[Decision]
    passes: list[dict]
    nothing_helped: bool
    metric: Metric
    max_drop: float
    runtime: str
    seconds: float
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def report_path(self) -> Path:
        return self.files["report"]

    @property
    def speedup(self) -> float:
        return 1.0 / self.chosen.latency_ratio if self.chosen.latency_ratio else 1.0


def check_output_dir(path: str | os.PathLike, *protected: str | os.PathLike) -> Path:
    """``-o`` must be a folder (created if missing) that would not overwrite the input files."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a folder; -o takes the output folder")
    if not os.access(existing_ancestor(out), os.W_OK | os.X_OK):
        raise OptionError(f"{out}: cannot create files there (the folder {existing_ancestor(out)} is not writable)")
    for src in protected:
        if src and os.path.exists(src):
            for name in OUTPUT_FILES:
                if os.path.realpath(out / name) == os.path.realpath(src):
                    raise OptionError(f"{out / name}: would overwrite the input {src}; choose another -o folder")
    return out


def _static_shapes(model: Model, shapes: Mapping[str, Sequence[int]], calibration: CalibrationSet | None
                   ) -> dict[str, list[int]]:
    """The input shapes the search works at: given ones, else the model's static ones, else the first
    calibration sample's."""
    out = {k: [int(d) for d in v] for k, v in shapes.items()}
    unknown = [k for k in out if k not in model.input_names]
    if unknown:
        raise ShapeError(f"--input-shape names '{unknown[0]}', not an input of the model "
                         f"(inputs: {', '.join(model.input_names)})")
    sample = calibration[0] if calibration is not None and calibration.count else {}
    for name, dims in model.input_shapes().items():
        if name in out:
            continue
        if all(isinstance(d, int) and d > 0 for d in dims):
            out[name] = list(dims)
        elif name in sample:
            out[name] = list(np.asarray(sample[name]).shape)
        else:
            raise ShapeError(f"input '{name}' has dynamic dims {dims}: give --input-shape {name}=...")
    return out


def _metric(metric, held_out) -> Metric:
    if metric is None:
        return None
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return load_user_metric(metric)
    if callable(metric):
        name = getattr(metric, "__qualname__", repr(metric))

        def evaluate(model, path):
            from sculpt.optimizer.metric import _finite_number

            try:
                value = metric(str(path))
            except Exception as e:
                raise MetricError(f"metric {name} failed: {one_line(e, 300)}") from None
            return _finite_number(value, f"metric {name}")

        return Metric(name, True, "the metric's own units", f"callable:{getattr(metric, '__module__', '')}.{name}",
                      evaluate, "user")
    raise OptionError(f"metric must be FILE.py:FUNC, a function of a model path or None, got {type(metric).__name__}")


def optimize(model: str | os.PathLike | Model, calibration: str | Mapping | CalibrationSet, output_dir: str | os.PathLike,
             *, input_shapes: Mapping[str, Sequence[int]] | None = None,
             metric: str | Callable[[str], float] | Metric | None = None, max_drop: float | None = None,
             proxy: str = "auto", runtime: str = "ort", target: str | None = None, device=None,
             budget_minutes: float | None = None, techniques: Sequence[str] | None = None, max_knobs: int = 24,
             threads: int = 1, seed: int = 0, held_out: int | None = None, cache_dir: str | os.PathLike | None = None,
             distill_steps: int = 0, latency_rounds: int = 5, latency_runs: int = 10,
             progress: Callable[[str, Candidate | None], None] | None = None) -> OptimizeResult:
    """Search for the fastest model within ``max_drop`` of ``metric`` (see the module and search.py),
    and write ``model.onnx``, ``pipeline.yaml`` (``sculpt run --pipeline`` reproduces the model),
    ``candidates.json``/``.csv``, ``report.html`` (and ``model.so`` when ``target`` is given) into
    ``output_dir``. ``metric``: ``FILE.py:FUNC``, a function of a model path (higher is better), or None
    for the fidelity proxy on held-out calibration samples (``proxy``: auto | agreement | error).
    ``device``: a tune.RemoteDevice measuring the TVM builds (``runtime='tvm'``)."""
    source = model if not isinstance(model, Model) else None
    out = check_output_dir(output_dir, *(p for p in (source, calibration if isinstance(calibration, str) else None)
                                         if p))
    if max_drop is not None and (not np.isfinite(max_drop) or max_drop < 0):
        raise OptionError(f"--max-drop must be a finite number ≥ 0, got {max_drop}")
    if budget_minutes is not None and (not np.isfinite(budget_minutes) or budget_minutes <= 0):
        raise OptionError(f"--budget-minutes must be a finite number > 0, got {budget_minutes}")
    if distill_steps < 0:
        raise OptionError(f"--distill-steps must be ≥ 0, got {distill_steps}")
    if max_knobs < 0:
        raise OptionError(f"--max-knobs must be ≥ 0, got {max_knobs}")
    user_metric = _metric(metric, None)  # a bad FILE.py:FUNC fails before anything is loaded or run
    if user_metric is not None and max_drop is None:
        default_max_drop(user_metric)  # raises: a user metric's units are the user's
    techniques = tuple(techniques) if techniques else DEFAULT_TECHNIQUES + (("sparsify",) if runtime == "tvm" else ())
    if "sparsify" in techniques and runtime != "tvm":
        raise OptionError("--techniques sparsify: block sparsity pays only in the TVM build's sparse kernels; "
                          "give --runtime tvm")
    recovery: list[dict] = []
    if distill_steps:
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # the optional extra
            raise OptionError("--distill-steps needs PyTorch: pip install 'sculpt[train]'")
        recovery = [{"distill": {"steps": int(distill_steps), "seed": int(seed)}}]

    input_model = model.clone() if isinstance(model, Model) else Model.load(model)
    input_model.drop_conflicting_shapes()
    if isinstance(calibration, CalibrationSet):
        cal, cal_spec = calibration, None
    else:
        cal_spec = calibration
        if isinstance(calibration, (str, os.PathLike)) and os.path.exists(calibration):
            cal_spec = str(Path(calibration).resolve())
        probe = input_model.clone()
        if input_shapes:
            probe.fix_input_shapes(input_shapes)
        cal = CalibrationSet.from_source(cal_spec, probe, input_shapes or {})
    if cal.count < 2:
        raise CalibrationError(f"calibration data ({cal.description}) has {cal.count} sample(s): optimize needs at "
                               "least 2, so that errors are measured on samples no pass fitted to")
    shapes = _static_shapes(input_model, input_shapes or {}, cal)
    cal.check(input_model.clone().fix_input_shapes(shapes))
    split = cal.split(held_out)
    held = split.held_out.count
    base_pipeline = Pipeline.from_dict({"passes": ["canonicalize"], "input_shapes": shapes}, source="optimize")
    base = base_pipeline.run(input_model).model
    held_samples = list(split.held_out)
    confirm_metric = None
    if user_metric is None and len(held_samples) >= CONFIRM_MIN_SAMPLES:
        # every third held-out sample confirms the result and is never scored by the search
        search_samples = [x for i, x in enumerate(held_samples) if i % 3 != 2]
        chosen_metric = proxy_metric(input_model, search_samples, kind=proxy)
        confirm_metric = proxy_metric(input_model, held_samples[2::3], kind=chosen_metric.kind)
    else:
        chosen_metric = user_metric or proxy_metric(input_model, held_samples, kind=proxy)
    if max_drop is None:
        max_drop = default_max_drop(chosen_metric)
    meter: LatencyMeter = make_meter(runtime, held_samples[0], target=target, device=device, threads=threads,
                                     runs=latency_runs, rounds=latency_rounds)
    space = search_space(base, techniques, max_knobs=max_knobs)
    context = json.dumps({"model": input_model.sha256(), "metric": chosen_metric.identity, "runtime": meter.identity,
                          "calibration": cal.description, "count": cal.count, "held_out": held, "seed": seed,
                          "shapes": shapes, "max_drop": max_drop, "recovery": recovery}, sort_keys=True)
    cache = Cache(Path(cache_dir) if cache_dir else out / "cache", context)
    search = Search(input_model, base, cal, chosen_metric, float(max_drop), meter, space, held_out=held, seed=seed,
                    budget_s=budget_minutes * 60 if budget_minutes else None, cache=cache, progress=progress,
                    recovery=recovery, confirm=confirm_metric)
    result = search.run()
    files = _write_outputs(out, result, chosen_metric, meter, float(max_drop), shapes, cal_spec, held, seed,
                           held_samples[0], target)
    return OptimizeResult(result.model, result.chosen, result.input, result.candidates, result.decisions,
                          result.passes, result.nothing_helped, chosen_metric, float(max_drop), meter.describe(),
                          result.seconds, out, files)


def _write_outputs(out: Path, result: SearchResult, metric: Metric, meter: LatencyMeter, max_drop: float,
                   shapes: dict, cal_spec, held: int, seed: int, feeds: Mapping, target: str | None) -> dict[str, Path]:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    files = {name.split(".")[0] if name != "candidates.csv" else "candidates_csv": out / name for name in OUTPUT_FILES}
    result.model.save(files["model"])
    pipeline: dict = {"passes": result.passes or [{"canonicalize": {}}], "input_shapes": shapes, "seed": seed,
                      "held_out": held}
    if cal_spec is not None:
        pipeline["calibration"] = cal_spec
    header = (f"# written by sculpt optimize: `sculpt run MODEL --pipeline {files['pipeline'].name} -o OUT.onnx` "
              "makes the same model\n")
    if result.nothing_helped:
        header += ("# nothing helped within the budget: model.onnx is the input model itself; this pipeline gives "
                   "its canonicalized equivalent (exact)\n")
    atomic_write_bytes(files["pipeline"], (header + yaml.safe_dump(to_plain_json(pipeline), sort_keys=False)).encode())
    atomic_write_bytes(files["candidates"], json.dumps(to_plain_json(candidates_json(result, metric, meter, max_drop)),
                                                       indent=1).encode())
    atomic_write_bytes(files["candidates_csv"], candidates_csv(result.candidates).encode())
    rows = layer_rows(layer_times_ms(result.input_model, feeds), layer_times_ms(result.model, feeds))
    atomic_write_bytes(files["report"], report_html(result, metric, meter, max_drop, layer_rows=rows).encode())
    if target:
        from sculpt.backends.tvm.artifact import compile_model, export_artifact

        library = out / "model.so"
        compiled = compile_model(result.model, target)
        export_artifact(compiled, library, source_model=files["model"])
        files["artifact"] = library
    return files


__all__ = ["Knob", "Metric", "OptimizeResult", "SearchSpace", "optimize", "proxy_metric", "load_user_metric",
           "search_space"]
