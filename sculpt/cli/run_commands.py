"""`sculpt run` (passes over a model, written atomically, nothing written on failure) and
`sculpt compare` (two models through onnxruntime)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
from rich.table import Table

from sculpt.cli.common import (SAMPLE_SHAPE_HELP, SHAPE_HELP, check_number_flag, fmt_bytes, fmt_int, load_model,
                               make_console, parse_input_shapes, resolve_input_shapes)
from sculpt.common import (atomic_write_bytes, check_output_file, existing_ancestor, give_default_mode, one_line,
                           same_path, to_plain_json)
from sculpt.common.messages import LINE_LIMIT
from sculpt.errors import CalibrationError, OptionError, SculptError, ShapeError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.passes.pipeline import (DEFAULT_WARN_ERROR, ErrorBudgetExceeded, ErrorSamples, Pipeline, check_error,
                                    nonfinite_weights, read_pipeline_file)
from sculpt.passes.working_shapes import working_shapes_for
from sculpt.runtime import compare_models
from sculpt.runtime.footprint import DEFAULT_RUNS, measure_footprint


def register_run(sub) -> None:
    r = sub.add_parser("run", help="run passes (a pipeline) on a model and write the result")
    r.add_argument("model")
    r.add_argument("--pipeline", help="a YAML or JSON pipeline file")
    r.add_argument("--pass", dest="pass_specs", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="a pass with options (repeatable; run in order)")
    r.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help=SHAPE_HELP + "; without it, dynamic dimensions stay dynamic in the output")
    r.add_argument("--sample-shape", action="append", metavar="NAME=DIMS", help=SAMPLE_SHAPE_HELP)
    r.add_argument("--calibration", help="calibration data: an .npz, an image folder, or random[:COUNT]")
    r.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    r.add_argument("--verify-each", action="store_true",
                   help="check every exact pass against its input through onnxruntime")
    r.add_argument("--dump-dir", help="write the model after each pass as NNN_<pass>.onnx")
    r.add_argument("--report", help="write a JSON report (per pass: time, stats, cost, error)")
    r.add_argument("--compare-samples", type=int, default=None,
                   help="at most this many held-out samples for the final error (default: all of them; "
                        "2 random inputs without --calibration)")
    r.add_argument("--held-out", type=int, default=None, metavar="N",
                   help="calibration samples kept apart from every pass and used to measure errors "
                        "(default: a quarter, at least 1)")
    r.add_argument("--max-error", type=float, default=None, metavar="X",
                   help="fail (exit 1, nothing written) when a lossy pass or the whole pipeline moves the "
                        "outputs by more than X (max |a-b| / max |b| on the held-out samples); without it, "
                        f"errors above {DEFAULT_WARN_ERROR:g} print a warning")
    r.add_argument("--latency-runs", type=int, default=DEFAULT_RUNS, metavar="N",
                   help="onnxruntime runs timed for the latency rows (median; 0: no latency and memory rows)")
    r.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: the pipeline's, 0)")
    r.set_defaults(func=cmd_run)


def register_compare(sub) -> None:
    c = sub.add_parser("compare", help="run two models through onnxruntime; max errors per output")
    c.add_argument("reference")
    c.add_argument("candidate")
    c.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=SHAPE_HELP)
    c.add_argument("--calibration", help="inputs to use (as for run); default random")
    c.add_argument("--samples", type=int, default=None,
                   help="at most this many samples (default: all held-out ones; 2 random inputs)")
    c.add_argument("--held-out", type=int, default=None, metavar="N",
                   help="compare on the N samples `sculpt run --held-out N` keeps apart from the passes "
                        "(default: the same quarter as run; the number of samples: all of them)")
    c.add_argument("--rtol", type=float, default=1e-4, help="relative to each output's largest magnitude")
    c.add_argument("--atol", type=float, default=1e-6)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)


# ------------------------------------------------------------------ run
class _ProgressInstrument:
    """Shows each pass as it runs (rich status line), and its time when done."""

    def __init__(self, console, total: int):
        self.console = console
        self.total = total
        self.status = None

    def before_pipeline(self, pipeline, model):
        pass

    def before_pass(self, index, pass_, model, record):
        self.close()
        self.status = self.console.status(f"[{index}/{self.total}] {pass_.describe()} ...")
        self.status.start()

    def after_pass(self, index, pass_, before, result, record):
        self.close()
        mark = "changed" if result.modified else "no change"
        error = record.error or {}
        measured = f", error {error['max_rel']:.3g} on {error['samples']} {error['on']} sample(s)" \
            if not pass_.exact and error.get("on") and error.get("samples") else ""
        self.console.print(f"[{index}/{self.total}] {pass_.name}: {mark} ({record.seconds:.2f} s{measured})")

    def after_pipeline(self, result):
        self.close()

    def close(self):
        """Stop the status line (also when a pass failed: the pipeline then skips after_pipeline)."""
        if self.status is not None:
            self.status.stop()
            self.status = None


# ------------------------------------------------------------------ run: checks before any pass runs
def _check_calibration_spec(spec, where: str) -> None:
    """Catch what CalibrationSet.from_source would only notice late (or report as a crash)."""
    count = None
    source = spec
    if isinstance(spec, dict):
        source = spec.get("source")
        count = spec.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
            raise CalibrationError(f"{where}: calibration 'count' must be a positive integer, got {count!r}")
    if source is None:
        return  # from_source names the missing 'source' key
    text = str(source)
    if text.startswith("random:"):
        n = text.split(":", 1)[1].strip()
        if not n.isdigit() or int(n) <= 0:
            raise CalibrationError(f"{where}: calibration '{text}': the count must be a positive integer, "
                                   "like random:8")


def _check_calibration_sample(cal, model) -> None:
    """Read the first sample now (decodes an image, reads the .npz) and check its dtypes."""
    if not len(cal):
        raise CalibrationError(f"calibration data ({cal.description}) has no samples")
    sample = cal[0]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input if vi.type.HasField("tensor_type")}
    for name, arr in sample.items():
        elem = types.get(name)
        if not elem:
            continue
        try:
            want = onnx.helper.tensor_dtype_to_np_dtype(elem)
        except Exception:
            continue
        if arr.dtype != want:
            raise CalibrationError(f"calibration input '{name}' ({cal.description}) is {arr.dtype}, "
                                   f"the model expects {want}")


def _require_sample_shapes(model, sample_shapes) -> None:
    """Without calibration data, errors are measured on random inputs: a dynamic input needs --sample-shape."""
    for name, dims in model.dynamic_inputs().items():
        if name not in sample_shapes:
            shown = ",".join(str(d) if (isinstance(d, int) and d > 0) or (isinstance(d, str) and d) else "?"
                             for d in dims)
            raise ShapeError(f"input '{name}' has a dynamic shape [{shown}]: give --sample-shape {name}=... (where "
                             f"random samples are drawn; the output keeps its dynamic dimensions), --calibration, "
                             f"or --input-shape {name}=... (fixes them)")


def _pipeline_from_file(path: str, overrides: dict):
    try:
        return Pipeline.from_file(path, **overrides)
    except OptionError as e:
        if str(e).startswith(str(path)):
            raise
        raise OptionError(f"{path}: {e}") from None  # name the file: 'unknown pass' alone does not say where
    except (ValueError, TypeError) as e:  # e.g. 'seed: abc' or 'input_shapes: {x: [1, a]}'
        why = _explain_pipeline(path)
        raise OptionError(f"{path}: {why}" if why else f"{path}: invalid pipeline ({one_line(e, LINE_LIMIT)})") from None


def _explain_pipeline(path: str) -> str | None:
    """Which value of a pipeline file is of the wrong kind (Pipeline.from_dict converts them blindly)."""
    try:
        spec = read_pipeline_file(path)
    except SculptError:
        return None
    if not isinstance(spec, dict):
        return None
    shapes = spec.get("input_shapes") or {}
    if isinstance(shapes, dict):
        for name, dims in shapes.items():
            if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                return f"input_shapes: input '{name}' must be a list of integers, got {dims!r}"
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"'seed' must be an integer, got {seed!r}"
    return None


def _give_default_mode_quietly(path: Path) -> None:
    """A file moved or written into place gets the mode a plain open() would give, if it can."""
    with contextlib.suppress(OSError):
        give_default_mode(path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def cmd_run(args) -> int:
    if bool(args.pipeline) == bool(args.pass_specs):
        raise OptionError("sculpt run: give either --pipeline FILE or at least one --pass NAME[:KEY=VALUE,...]")
    if args.compare_samples is not None and args.compare_samples < 1:
        raise OptionError(f"--compare-samples must be at least 1, got {args.compare_samples}")
    if args.held_out is not None and args.held_out < 1:
        raise OptionError(f"--held-out must be at least 1, got {args.held_out}")
    if args.latency_runs < 0:
        raise OptionError(f"--latency-runs must be 0 or more, got {args.latency_runs}")
    check_number_flag("--max-error", args.max_error)
    # ---- where the results go: checked before anything is loaded or run
    out = check_output_file(args.output, "-o", "the output .onnx file")
    report_path = check_output_file(args.report, "--report", "a .json file") if args.report else None
    dump_dir = Path(args.dump_dir) if args.dump_dir else None
    if dump_dir is not None and dump_dir.exists() and not dump_dir.is_dir():
        raise OptionError(f"{dump_dir}: exists and is not a folder; --dump-dir takes a folder")
    if dump_dir is not None and not os.access(existing_ancestor(dump_dir), os.W_OK | os.X_OK):
        raise OptionError(f"{dump_dir}: cannot create files there (the folder {existing_ancestor(dump_dir)} "
                          "is not writable)")
    protected = [(args.model, "the input model")]
    if args.pipeline:
        protected.append((args.pipeline, "the pipeline file"))
    if args.calibration and os.path.exists(args.calibration):
        protected.append((args.calibration, "the calibration data"))
    protected = [(p, what) for p, what in protected if os.path.exists(p)]
    for path, flag in [(out, "-o")] + ([(report_path, "--report")] if report_path else []):
        for src, what in protected:
            if same_path(path, src):
                raise OptionError(f"{path}: {flag} would overwrite {what}; choose another path")
    if report_path and same_path(report_path, out):
        raise OptionError(f"{report_path}: --report and -o name the same file")
    if dump_dir is not None:
        for path, what in protected + [(out, "the -o file")] + ([(report_path, "the --report file")]
                                                               if report_path else []):
            if same_path(dump_dir, path):
                raise OptionError(f"{dump_dir}: --dump-dir is {what}")

    # ---- the model, the pipeline, the shapes and the calibration data
    model = load_model(args.model)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
    sample_shapes = resolve_input_shapes(model, parse_input_shapes(args.sample_shape, "--sample-shape"),
                                         "--sample-shape")
    overrides: dict = {}
    if args.verify_each:
        overrides["verify_each"] = True
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.held_out is not None:
        overrides["held_out"] = args.held_out
    if args.max_error is not None:
        overrides["max_error"] = args.max_error
    if args.pipeline:
        pipeline = _pipeline_from_file(args.pipeline, overrides)
        pipeline.input_shapes = {**pipeline.input_shapes, **shapes}
        pipeline.sample_shapes = {**pipeline.sample_shapes, **sample_shapes}
        cal_spec, cal_where = ((args.calibration, "--calibration") if args.calibration
                               else (pipeline.calibration_spec, args.pipeline))
    else:
        pipeline = Pipeline.from_specs(args.pass_specs, input_shapes=shapes, sample_shapes=sample_shapes, **overrides)
        cal_spec, cal_where = args.calibration, "--calibration"
    seed = pipeline.seed
    probe = model.clone()  # the input model, at --input-shape (which the output keeps); dynamic otherwise
    if pipeline.input_shapes:
        probe.fix_input_shapes(pipeline.input_shapes)
    if pipeline.sample_shapes:
        probe.clone().fix_input_shapes(pipeline.sample_shapes)  # the same checks: names, ranks, static dims
    if not cal_spec:
        _require_sample_shapes(probe, pipeline.sample_shapes)
    if cal_spec:
        _check_calibration_spec(cal_spec, cal_where)
        calibration = CalibrationSet.from_source(cal_spec, probe, {**pipeline.sample_shapes, **pipeline.input_shapes})
        calibration.check(probe)
        _check_calibration_sample(calibration, probe)
        pipeline.calibration = calibration
        if pipeline.held_out is not None and pipeline.held_out >= calibration.count:
            raise OptionError(f"--held-out {pipeline.held_out} leaves none of the {calibration.count} calibration "
                              "samples to fit to")
    if pipeline.calibration is None and args.held_out is not None:
        raise OptionError("--held-out needs --calibration (samples to hold out)")
    for p in pipeline.passes:
        if getattr(p, "needs_calibration", False) and pipeline.calibration is None:
            raise OptionError(f"pass '{p.name}' needs calibration data: give --calibration (an .npz, an image "
                              "folder or random:COUNT)")
    if dump_dir is not None:
        for index, p in enumerate(pipeline.passes, start=1):
            target = dump_dir / f"{index:03d}_{p.name}.onnx"
            for path, what in protected + [(out, "the -o file")] + ([(report_path, "the --report file")]
                                                                   if report_path else []):
                if same_path(target, path):
                    raise OptionError(f"{target}: the dump of pass {index} would overwrite {what}")

    # ---- run; nothing is written where the user can see it until everything succeeded
    con = make_console(stderr=True)
    progress = _ProgressInstrument(con, len(pipeline.passes))
    pipeline.extra_instruments.append(progress)
    tmp_dump: Path | None = None
    written: list[Path] = []  # removed again if a later step fails
    try:
        if dump_dir is not None:
            # dumps go to a private folder first and are moved into --dump-dir only on success
            tmp_dump = Path(tempfile.mkdtemp(prefix=".sculpt-dump-", dir=existing_ancestor(dump_dir)))
            pipeline.dump_dir = str(tmp_dump)
        start = time.perf_counter()
        result = pipeline.run(model)
        elapsed = time.perf_counter() - start
        progress.close()
        final = result.model
        final.verify()
        bad_weights = nonfinite_weights(final)
        if bad_weights and not nonfinite_weights(probe):
            raise SculptError(f"the output model has NaN or Inf in weight '{bad_weights[0]}'; nothing written")

        # measured error of the whole pipeline: the held-out samples (random inputs without calibration)
        error_samples = ErrorSamples(result.split, seed, count=args.compare_samples or 2, shapes=pipeline.sample_shapes)
        samples = error_samples.samples(probe)[:args.compare_samples]
        cmp = compare_models(probe, final, samples)
        where = error_samples.describe(cmp.samples)
        if cmp.nonfinite_outputs:
            raise SculptError(f"the output model gives NaN or Inf in output '{cmp.nonfinite_outputs[0]}' on "
                              f"{where} (the input model's values are finite there); nothing written")
        warning_lines = list(result.warnings)
        final_warning = check_error("the pipeline", cmp.max_rel, where, warn_error=pipeline.warn_error,
                                    max_error=pipeline.max_error, passes_run=[p.name for p in pipeline.passes])
        if final_warning:
            warning_lines.append(final_warning)

        measured_at = pipeline.working_shapes(probe)  # {} for a static model
        before = cost_of(probe, measured_at, model_bytes=probe.byte_size(), sparsity=True)
        after = cost_of(final, working_shapes_for(final, measured_at), model_bytes=final.byte_size(), sparsity=True)
        footprints = None
        if args.latency_runs:
            feeds = samples[0]
            with con.status("timing the input and output models in onnxruntime ..."):
                footprints = (measure_footprint(probe, feeds, runs=args.latency_runs),
                              measure_footprint(final, feeds, runs=args.latency_runs))
        for r in result.records:
            if r.dump and tmp_dump is not None:
                r.dump = str(dump_dir / Path(r.dump).name)
        report = {
            "input": args.model, "output": str(out), "seconds": elapsed,
            "passes": [dict(r.as_dict(), options=p.config()) for r, p in zip(result.records, pipeline.passes)],
            "before": _summary_totals(before, footprints and footprints[0]),
            "after": _summary_totals(after, footprints and footprints[1]),
            "error": dict(cmp.as_dict(), on=error_samples.kind, **_split_counts(result.split)),
            "warnings": warning_lines,
        }
        report_bytes = json.dumps(to_plain_json(report), indent=2, allow_nan=False).encode()

        # ---- write: the dumps, the model, the report
        if tmp_dump is not None:
            if not dump_dir.exists():
                root = Path(os.path.abspath(dump_dir))
                while not root.parent.exists():
                    root = root.parent
                dump_dir.mkdir(parents=True)
                written.append(root)
            for f in sorted(tmp_dump.iterdir()):
                target = dump_dir / f.name
                if not target.exists():
                    written.append(target)
                shutil.move(str(f), str(target))
                _give_default_mode_quietly(target)
        if not out.exists():
            written.append(out)
        final.save(out)
        _give_default_mode_quietly(out)
        if report_path is not None:
            if not report_path.exists():
                written.append(report_path)
            atomic_write_bytes(report_path, report_bytes)
    except ErrorBudgetExceeded as e:  # the budget the user set: a verdict on the model, exit 1
        for path in reversed(written):
            _remove(path)
        progress.close()
        print(f"sculpt: error: {one_line(e, LINE_LIMIT)}; nothing written", file=sys.stderr)
        return 1
    except BaseException:
        for path in reversed(written):
            _remove(path)
        raise
    finally:
        progress.close()
        if tmp_dump is not None:
            shutil.rmtree(tmp_dump, ignore_errors=True)

    for text in warning_lines:
        print(f"sculpt: warning: {one_line(text, LINE_LIMIT)}", file=sys.stderr)

    out_con = make_console()
    out_con.print(f"{args.model} -> {out}")
    table = Table()
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")

    def row(label, a, b, fmt):
        table.add_row(label, fmt(a), fmt(b), f"{b / a:.3f}" if a else "-")

    for label, a, b, fmt in summary_rows(before, after, footprints):
        row(label, a, b, fmt)
    out_con.print(table)
    for label, rep in (("before", before), ("after", after)):
        if rep.unknown_macs:
            out_con.print(f"MACs {label}: {len(rep.unknown_macs)} nodes of unknown output shape are not counted")
    if footprints:
        out_con.print(f"latency: median of {footprints[0].runs} onnxruntime runs on this machine; peak memory: "
                      "resident memory added by loading and running the model")
    _print_group_reports(out_con, result.records)
    out_con.print(f"max error vs input model on {where}: abs {cmp.max_abs:.3g}, "
                  f"relative {cmp.max_rel:.3g}; {elapsed:.2f} s")
    if report_path is not None:
        out_con.print(f"report: {report_path}")
    if dump_dir is not None:
        out_con.print(f"IR after each pass: {dump_dir}")
    return 0


SHOW_NONZERO_BELOW = 0.9  # the summary counts nonzero params when a tenth or more of them are zero


def summary_rows(before, after, footprints=None) -> list[tuple]:
    """(label, before, after, format) rows of the run summary. Quantized and sparse models get the
    rows that say what changed: the bytes of their 8-bit weights and the MACs that run in int8; the
    nonzero parameters and the weight bytes with block-sparse weights stored as BSR."""
    rows = [("params", before.params, after.params, fmt_int)]
    if before.nonzero_params is not None and (before.sparse_weights or after.sparse_weights
                                              or after.nonzero_params < SHOW_NONZERO_BELOW * after.params):
        rows.append(("non-zero params", before.nonzero_params, after.nonzero_params, fmt_int))
    rows.append(("MACs", before.macs, after.macs, fmt_int))
    if before.int8_macs or after.int8_macs:
        rows.append(("MACs in int8", before.int8_macs, after.int8_macs, fmt_int))
    rows.append(("weights", before.weight_bytes, after.weight_bytes, fmt_bytes))
    if before.quantized_weight_bytes or after.quantized_weight_bytes:
        rows.append(("int8/int4 weights", before.quantized_weight_bytes, after.quantized_weight_bytes, fmt_bytes))
    if before.sparse_weights or after.sparse_weights:
        rows.append(("weights, block-sparse", before.sparse_weight_bytes, after.sparse_weight_bytes, fmt_bytes))
    rows.append(("file size", before.model_bytes, after.model_bytes, fmt_bytes))
    rows.append(("nodes", len(before.layers), len(after.layers), str))
    if footprints:
        rows.append(("latency (ort)", footprints[0].latency_ms, footprints[1].latency_ms, _fmt_ms))
        rows.append(("peak memory (ort)", footprints[0].peak_bytes, footprints[1].peak_bytes, fmt_bytes))
    return rows


def _split_counts(split) -> dict:
    """How many calibration samples the passes fitted to and how many were held out."""
    if split is None:
        return {"fitting_samples": 0, "held_out_samples": 0}
    return {"fitting_samples": split.fitting.count,
            "held_out_samples": split.held_out.count if split.held_out is not None else 0}


def _fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def _summary_totals(report, footprint) -> dict:
    totals = dict(report.as_dict()["totals"], **report.quantized_totals(), **(report.sparsity_totals() or {}))
    if footprint is not None:
        totals.update(latency_ms=footprint.latency_ms, latency_runs=footprint.runs, peak_bytes=footprint.peak_bytes)
    return totals


# ------------------------------------------------------------------ compare
def cmd_compare(args) -> int:

    if args.samples is not None and args.samples < 1:
        raise OptionError(f"--samples must be at least 1, got {args.samples}")
    if args.held_out is not None and args.held_out < 1:
        raise OptionError(f"--held-out must be at least 1, got {args.held_out}")
    if args.held_out is not None and not args.calibration:
        raise OptionError("--held-out needs --calibration (samples to hold out)")
    check_number_flag("--rtol", args.rtol)
    check_number_flag("--atol", args.atol)
    ref = load_model(args.reference)
    cand = load_model(args.candidate)
    shapes = resolve_input_shapes(ref, parse_input_shapes(args.input_shape))
    probe = ref.clone()
    if shapes:
        probe.fix_input_shapes(shapes)
    dyn = probe.dynamic_inputs()
    if dyn and not cand.dynamic_inputs():
        # the candidate (e.g. the output of `sculpt run`) has static inputs: compare at its shapes
        fixed = {n: s for n, s in cand.input_shapes().items() if n in dyn and s}
        if fixed:
            try:
                probe.fix_input_shapes(fixed)
            except ShapeError:
                pass  # shapes that do not fit the reference: require_static_inputs says what to give
    probe.require_static_inputs("sculpt compare")
    split = None
    if args.calibration:
        _check_calibration_spec(args.calibration, "--calibration")
        fixed_shapes = {n: s for n, s in probe.input_shapes().items()}
        cal = CalibrationSet.from_source(args.calibration, probe, fixed_shapes)
        cal.check(probe)
        _check_calibration_sample(cal, probe)
        split = cal.split(args.held_out)  # the samples `sculpt run` keeps apart from its passes
    error_samples = ErrorSamples(split, args.seed, count=args.samples or 2)
    samples = error_samples.samples(probe)[:args.samples]
    cmp = compare_models(probe, cand, samples)
    ok = cmp.within(args.rtol, args.atol)
    if args.json:
        data = cmp.as_dict()
        data.update(equal=ok, rtol=args.rtol, atol=args.atol, on=error_samples.kind)
        print(json.dumps(to_plain_json(data), allow_nan=False))
    else:
        print(f"on {error_samples.describe(cmp.samples)}"
              + (f" of {cal.description}" if split is not None else ""))
        for o in cmp.outputs:
            print(f"{o.name}: max abs {o.max_abs:.3g}, relative {o.max_rel:.3g}"
                  + ("" if o.shape_match else " (shape mismatch or missing)"))
    if not ok:
        print(f"sculpt: outputs differ beyond rtol={args.rtol:g} / atol={args.atol:g}", file=sys.stderr)
    return 0 if ok else 1


def _print_group_reports(console, records) -> None:
    """Per-group table for the passes that removed channels (channel-pruning reports them)."""
    for rec in records:
        groups = rec.stats.get("groups") if isinstance(rec.stats, dict) else None
        if not isinstance(groups, list) or not groups or "channels_before" not in groups[0]:
            continue
        table = Table(title=f"{rec.name}: channels removed per group")
        for col in ("group", "producing layers", "channels", "MACs", "params"):
            table.add_column(col, justify="left" if col == "producing layers" else "right")
        for g in groups:
            srcs = ", ".join(g["sources"][:3]) + (f" +{len(g['sources']) - 3}" if len(g["sources"]) > 3 else "")
            table.add_row(str(g["group"]), srcs, f"{g['channels_before']} -> {g['channels_after']}",
                          f"{fmt_int(g.get('macs_before'))} -> {fmt_int(g.get('macs_after'))}",
                          f"{fmt_int(g.get('params_before'))} -> {fmt_int(g.get('params_after'))}")
        console.print(table)
