"""The `sculpt` command: inspect, run, passes, compare, demo.

Errors a user can cause print one line (``sculpt: error: ...``) naming the file, pass, option or
input at fault, exit with status 2, and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from sculpt import __version__
from sculpt.common import (atomic_write_bytes, check_output_file, existing_ancestor, give_default_mode, one_line,
                           same_path, to_plain_json)
from sculpt.common.messages import LINE_LIMIT
from sculpt.errors import OptionError, SculptError, ShapeError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise OptionError(message if self.prog == "sculpt" else f"{self.prog}: {message}")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # outside a terminal (pipes, CI logs) use a wide fixed width instead of rich's 80 columns
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    """``NAME=1,3,48,320`` (or just ``1,3,48,320`` for a single-input model, keyed by '')."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        if not sep:
            name, dims = "", item
        name = name.strip()
        pieces = [d.strip() for d in dims.replace("x", ",").split(",")]
        if not dims.strip() or any(not d for d in pieces):
            raise ShapeError(f"--input-shape '{item}': give the dimensions separated by commas, like x=1,3,224,224")
        try:
            shape = [int(d) for d in pieces]
        except ValueError:
            raise ShapeError(f"--input-shape '{item}': dimensions must be integers, like x=1,3,224,224") from None
        if any(d <= 0 for d in shape):
            raise ShapeError(f"--input-shape '{item}': dimensions must be positive integers, like x=1,3,224,224")
        if name in shapes and shapes[name] != shape:
            shown = f"input '{name}'" if name else "the input"
            raise ShapeError(f"--input-shape given twice for {shown}: {shapes[name]} and {shape}")
        shapes[name] = shape
    return shapes


def check_number_flag(flag: str, value: float | None, *, positive: bool = False) -> None:
    """A numeric command-line flag must be finite and not negative (``positive``: above 0); NaN would
    fail every comparison made with it and pass silently."""
    import math

    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise OptionError(f"{flag} must be a finite number {'> 0' if positive else '≥ 0'}, got {value}")


def _resolve_shapes(model, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    if "" in shapes:
        names = model.input_names
        if len(names) != 1:
            raise ShapeError(f"--input-shape without a name is only for single-input models; this one has "
                             f"{', '.join(names)}")
        shapes = {names[0] if k == "" else k: v for k, v in shapes.items()}
    return shapes


def _load(path: str):
    from sculpt.ir.model import Model

    return Model.load(path)


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------ inspect
def cmd_inspect(args) -> int:
    from rich.table import Table

    from sculpt.ir.cost import cost_of
    from sculpt.plain_table import print_table

    if args.top < 0:
        raise OptionError(f"--top must not be negative, got {args.top}")
    model = _load(args.model)
    shapes = _resolve_shapes(model, parse_input_shapes(args.input_shape))
    work = model.clone()
    if shapes:
        work.fix_input_shapes(shapes)
    report = cost_of(work, model_bytes=os.path.getsize(args.model))
    if args.groups:
        return _print_groups(work, args)
    if args.json:
        data = report.as_dict()
        data["model"] = args.model
        data["opset"] = model.opset
        data["inputs"] = work.input_shapes()
        data["outputs"] = model.output_names
        print(json.dumps(to_plain_json(data), allow_nan=False))
        return 0
    con = _console()
    table = Table(title=f"{args.model}  (opset {model.opset})", show_lines=False)
    for col, just in (("#", "right"), ("node", "left"), ("op", "left"), ("output shape", "left"),
                      ("params", "right"), ("MACs", "right"), ("weights", "right")):
        table.add_column(col, justify=just)
    layers = report.layers
    if args.top:
        layers = sorted(layers, key=lambda l: -(l.macs or 0))[: args.top]
    for i, layer in enumerate(layers, 1):
        if not args.all and not args.top and not layer.params and not layer.macs:
            continue
        table.add_row(str(i), layer.name, layer.op_type,
                      "x".join(map(str, layer.output_shape)) if layer.output_shape is not None else "?",
                      _fmt_int(layer.params), _fmt_int(layer.macs), _fmt_bytes(layer.weight_bytes))
    print_table(con, table)  # rich takes a minute on 50,000 rows; the same text, written directly
    dyn = work.dynamic_inputs()
    con.print("inputs: " + ", ".join(f"{n}={s}" for n, s in work.input_shapes().items()))
    con.print(f"total: {len(report.layers)} nodes, params {_fmt_int(report.params)}, MACs {_fmt_int(report.macs)}, "
              f"weights {_fmt_bytes(report.weight_bytes)}, file {_fmt_bytes(report.model_bytes)}")
    if report.unknown_macs:
        hint = f"; give --input-shape {next(iter(dyn))}=..." if dyn else ""
        con.print(f"[yellow]{len(report.unknown_macs)} nodes have unknown shapes, their MACs are not counted{hint}[/]")
    return 0


def _print_group_reports(console, records) -> None:
    """Per-group table for the passes that removed channels (channel-pruning reports them)."""
    from rich.table import Table

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
                          f"{_fmt_int(g.get('macs_before'))} -> {_fmt_int(g.get('macs_after'))}",
                          f"{_fmt_int(g.get('params_before'))} -> {_fmt_int(g.get('params_after'))}")
        console.print(table)


def _print_groups(work, args) -> int:
    """The channel-dependency groups of the (canonicalized) model: what pruning can touch."""
    from rich.table import Table

    from sculpt.ir.channels import ChannelGraph
    from sculpt.passes import create_pass

    work.require_static_inputs("--groups")
    canonical = create_pass("canonicalize")(work).model
    cg = ChannelGraph.build(canonical)
    rows = cg.summary()
    if args.json:
        print(json.dumps({"model": args.model, "groups": rows,
                          "unknown_ops": sorted(set(cg.unknown_ops.values()))}))
        return 0
    table = Table(title=f"{args.model}: channel groups (after canonicalize)")
    for col in ("group", "channels", "prunable", "sources", "readers", "frozen because"):
        table.add_column(col, justify="right" if col in ("group", "channels", "prunable") else "left")
    for r in rows:
        srcs = ", ".join(r["sources"][:4]) + (f" +{len(r['sources']) - 4}" if len(r["sources"]) > 4 else "")
        cons = ", ".join(r["consumers"][:4]) + (f" +{len(r['consumers']) - 4}" if len(r["consumers"]) > 4 else "")
        table.add_row(str(r["group"]), str(r["channels"]), str(r["prunable_channels"]), srcs, cons,
                      "; ".join(r["frozen"][:2]) or "-")
    con = _console()
    con.print(table)
    prunable = sum(1 for r in rows if r["prunable_channels"])
    con.print(f"{len(rows)} groups with a weighted producer, {prunable} prunable"
              + (f"; ops without a channel handler: {', '.join(sorted(set(cg.unknown_ops.values())))}"
                 if cg.unknown_ops else ""))
    return 0


# ------------------------------------------------------------------ passes
def cmd_passes(args) -> int:
    from rich.table import Table

    from sculpt.passes.base import registered_passes

    passes = registered_passes()
    if args.json:
        print(json.dumps({name: {"exact": cls.exact, "doc": (cls.__doc__ or "").strip().split("\n\n")[0],
                                 "options": [{"name": o.name, "type": o.type_name(), "default": o.default,
                                              "help": o.help} for o in cls.options()]}
                          for name, cls in passes.items()}, default=str))
        return 0
    table = Table(title="registered passes", show_lines=True)
    table.add_column("pass")
    table.add_column("kind")
    table.add_column("what it does")
    table.add_column("options (default)")
    for name, cls in passes.items():
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        opts = "\n".join(f"{o.name}: {o.type_name()} = {o.default!r}" for o in cls.options()) or "-"
        table.add_row(name, "exact" if cls.exact else "lossy", doc, opts)
    _console().print(table)
    return 0


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
        self.console.print(f"[{index}/{self.total}] {pass_.name}: {mark} ({record.seconds:.2f} s)")

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
    from sculpt.errors import CalibrationError

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
    import onnx

    from sculpt.errors import CalibrationError

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


def _pipeline_from_file(path: str, overrides: dict):
    from sculpt.passes.pipeline import Pipeline

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
    from sculpt.passes.pipeline import read_pipeline_file

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
    from rich.table import Table

    from sculpt.runtime import compare_models
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.cost import cost_of
    from sculpt.passes.pipeline import Pipeline

    if bool(args.pipeline) == bool(args.pass_specs):
        raise OptionError("sculpt run: give either --pipeline FILE or at least one --pass NAME[:KEY=VALUE,...]")
    if args.compare_samples < 1:
        raise OptionError(f"--compare-samples must be at least 1, got {args.compare_samples}")
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
    model = _load(args.model)
    shapes = _resolve_shapes(model, parse_input_shapes(args.input_shape))
    overrides: dict = {}
    if args.verify_each:
        overrides["verify_each"] = True
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.pipeline:
        pipeline = _pipeline_from_file(args.pipeline, overrides)
        merged = dict(pipeline.input_shapes)
        merged.update(shapes)
        pipeline.input_shapes = merged
        cal_spec, cal_where = ((args.calibration, "--calibration") if args.calibration
                               else (pipeline.calibration_spec, args.pipeline))
    else:
        pipeline = Pipeline.from_specs(args.pass_specs, input_shapes=shapes, **overrides)
        cal_spec, cal_where = args.calibration, "--calibration"
    seed = pipeline.seed
    probe = model.clone()
    if pipeline.input_shapes:
        probe.fix_input_shapes(pipeline.input_shapes)
    probe.require_static_inputs("sculpt run")
    if cal_spec:
        _check_calibration_spec(cal_spec, cal_where)
        calibration = CalibrationSet.from_source(cal_spec, probe, pipeline.input_shapes)
        calibration.check(probe)
        _check_calibration_sample(calibration, probe)
        pipeline.calibration = calibration
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
    con = _console(stderr=True)
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

        # measured error of the whole pipeline: calibration samples if any, else random inputs
        samples = None
        if pipeline.calibration is not None:
            samples = [s for _, s in zip(range(args.compare_samples), pipeline.calibration)]
        cmp = compare_models(probe, final, samples, count=args.compare_samples, seed=seed)

        before = cost_of(probe, model_bytes=probe.byte_size())
        after = cost_of(final, model_bytes=final.byte_size())
        for r in result.records:
            if r.dump and tmp_dump is not None:
                r.dump = str(dump_dir / Path(r.dump).name)
        report = {
            "input": args.model, "output": str(out), "seconds": elapsed,
            "passes": [dict(r.as_dict(), options=p.config()) for r, p in zip(result.records, pipeline.passes)],
            "before": before.as_dict()["totals"], "after": after.as_dict()["totals"],
            "error": cmp.as_dict(),
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
    except BaseException:
        for path in reversed(written):
            _remove(path)
        raise
    finally:
        progress.close()
        if tmp_dump is not None:
            shutil.rmtree(tmp_dump, ignore_errors=True)

    out_con = _console()
    out_con.print(f"{args.model} -> {out}")
    table = Table()
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")

    def row(label, a, b, fmt):
        table.add_row(label, fmt(a), fmt(b), f"{b / a:.3f}" if a else "-")

    row("params", before.params, after.params, _fmt_int)
    row("MACs", before.macs, after.macs, _fmt_int)
    row("weights", before.weight_bytes, after.weight_bytes, _fmt_bytes)
    row("file size", before.model_bytes, after.model_bytes, _fmt_bytes)
    row("nodes", len(before.layers), len(after.layers), str)
    out_con.print(table)
    for label, rep in (("before", before), ("after", after)):
        if rep.unknown_macs:
            out_con.print(f"MACs {label}: {len(rep.unknown_macs)} nodes of unknown output shape are not counted")
    _print_group_reports(out_con, result.records)
    out_con.print(f"max error vs input model over {cmp.samples} sample(s): abs {cmp.max_abs:.3g}, "
                  f"relative {cmp.max_rel:.3g}; {elapsed:.2f} s")
    if report_path is not None:
        out_con.print(f"report: {report_path}")
    if dump_dir is not None:
        out_con.print(f"IR after each pass: {dump_dir}")
    return 0


# ------------------------------------------------------------------ compare
def cmd_compare(args) -> int:
    from sculpt.runtime import compare_models

    if args.samples < 1:
        raise OptionError(f"--samples must be at least 1, got {args.samples}")
    check_number_flag("--rtol", args.rtol)
    check_number_flag("--atol", args.atol)
    ref = _load(args.reference)
    cand = _load(args.candidate)
    shapes = _resolve_shapes(ref, parse_input_shapes(args.input_shape))
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
    samples = None
    if args.calibration:
        from sculpt.ir.calibration import CalibrationSet

        _check_calibration_spec(args.calibration, "--calibration")
        fixed_shapes = {n: s for n, s in probe.input_shapes().items()}
        cal = CalibrationSet.from_source(args.calibration, probe, fixed_shapes)
        cal.check(probe)
        _check_calibration_sample(cal, probe)
        samples = [s for _, s in zip(range(args.samples), cal)]
    cmp = compare_models(probe, cand, samples, count=args.samples, seed=args.seed)
    ok = cmp.within(args.rtol, args.atol)
    if args.json:
        data = cmp.as_dict()
        data.update(equal=ok, rtol=args.rtol, atol=args.atol)
        print(json.dumps(to_plain_json(data), allow_nan=False))
    else:
        for o in cmp.outputs:
            print(f"{o.name}: max abs {o.max_abs:.3g}, relative {o.max_rel:.3g}"
                  + ("" if o.shape_match else " (shape mismatch or missing)"))
    if not ok:
        print(f"sculpt: outputs differ beyond rtol={args.rtol:g} / atol={args.atol:g}", file=sys.stderr)
    return 0 if ok else 1


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    """Compress two models and print what it bought: the built-in tiny CNN (random calibration data)
    and, when the rapidocr-onnxruntime wheel is installed, the PP-OCR text-orientation classifier
    (calibrated and evaluated on rendered text lines)."""
    from rich.table import Table

    from sculpt.runtime import compare_models
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.cost import cost_of
    from sculpt.passes.pipeline import Pipeline

    con = _console()
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise OptionError(f"{args.output_dir}: exists and is not a folder; -o takes a folder")
    from sculpt.examples import tiny_convnet

    passes = ["canonicalize", "dead-channel-elimination", f"channel-pruning:ratio={args.ratio}"]
    jobs = [("tiny_convnet (built in)", "tiny_convnet", tiny_convnet(), {"input": [1, 3, 32, 32]}, None)]
    try:
        from sculpt import ocr_task
        from sculpt.models import ppocr_model

        jobs.append(("PP-OCR mobile v2.0 cls", "ppocr_cls", ppocr_model("cls"), {"x": ocr_task.input_shape("cls")},
                     "cls"))
    except SculptError as e:
        con.print(f"[yellow]skipping the PP-OCR classifier: {e}[/]")
    outdir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sculpt-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"sculpt demo: {' → '.join(passes)}")
    for col in ("model", "params", "MACs", "file size", "onnxruntime ms", "accuracy", "time"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, stem, model, shapes, task in jobs:
        fixed = model.clone().fix_input_shapes(shapes)
        if task:
            cal = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs(task, 32)}, "rendered text lines")
        else:
            cal = CalibrationSet.random(fixed, count=16, low=0.0, high=1.0)
        start = time.perf_counter()
        res = Pipeline.from_specs(passes, input_shapes=shapes, calibration=cal, statistics=False).run(model)
        secs = time.perf_counter() - start
        out = res.model
        out.verify()
        out.save(outdir / f"{stem}.sculpt.onnx")
        b, a = cost_of(fixed), cost_of(out)
        feed = next(iter(cal))
        t_before, t_after = _median_ms(fixed, feed), _median_ms(out, feed)
        if task:
            data = ocr_task.task_set(task, count=200)
            acc_b = ocr_task.evaluate(task, fixed, data).accuracy
            acc_a = ocr_task.evaluate(task, out, data).accuracy
            accuracy = f"{acc_b:.1%} -> {acc_a:.1%} (orientation, 200 lines)"
        else:
            cmp = compare_models(fixed, out, list(cal.take(4)))
            accuracy = f"max rel. output error {cmp.max_rel:.2g}"
        table.add_row(label, f"{_fmt_int(b.params)} -> {_fmt_int(a.params)}",
                      f"{_fmt_int(b.macs)} -> {_fmt_int(a.macs)} ({a.macs / b.macs:.0%})",
                      f"{_fmt_bytes(b.model_bytes)} -> {_fmt_bytes(a.model_bytes)}",
                      f"{t_before:.2f} -> {t_after:.2f}", accuracy, f"{secs:.1f} s")
    con.print(table)
    con.print(f"models written to {outdir}")
    return 0


def _median_ms(model, feed, runs: int = 30) -> float:
    from sculpt.runtime import median_latency_ms

    return median_latency_ms(model, feed, runs=runs, warmup=1, threads=2)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sculpt", description="Model-compression compiler for ONNX models.")
    p.add_argument("--version", action="version", version=f"sculpt {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    shape_help = "fix an input's shape: NAME=1,3,224,224 (repeatable; the name may be left out for one input)"

    q = sub.add_parser("inspect", help="per-layer params, MACs and bytes, and totals")
    q.add_argument("model")
    q.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    q.add_argument("--json", action="store_true", help="print one JSON object: totals and layers")
    q.add_argument("--top", type=int, default=0, help="only the N layers with the most MACs")
    q.add_argument("--all", action="store_true", help="also list nodes without params or MACs")
    q.add_argument("--groups", action="store_true",
                   help="list the channel-dependency groups (what channel pruning can remove, and what freezes)")
    q.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="run passes (a pipeline) on a model and write the result")
    r.add_argument("model")
    r.add_argument("--pipeline", help="a YAML or JSON pipeline file")
    r.add_argument("--pass", dest="pass_specs", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="a pass with options (repeatable; run in order)")
    r.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    r.add_argument("--calibration", help="calibration data: an .npz, an image folder, or random[:COUNT]")
    r.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    r.add_argument("--verify-each", action="store_true",
                   help="check every exact pass against its input through onnxruntime")
    r.add_argument("--dump-dir", help="write the model after each pass as NNN_<pass>.onnx")
    r.add_argument("--report", help="write a JSON report (per pass: time, stats, cost, error)")
    r.add_argument("--compare-samples", type=int, default=2, help="samples for the final error measurement")
    r.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: the pipeline's, 0)")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("passes", help="list the registered passes and their options")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_passes)

    c = sub.add_parser("compare", help="run two models through onnxruntime; max errors per output")
    c.add_argument("reference")
    c.add_argument("candidate")
    c.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=shape_help)
    c.add_argument("--calibration", help="inputs to use (as for run); default random")
    c.add_argument("--samples", type=int, default=2)
    c.add_argument("--rtol", type=float, default=1e-4, help="relative to each output's largest magnitude")
    c.add_argument("--atol", type=float, default=1e-6)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="compress the built-in example and the PP-OCR classifier; print the table")
    d.add_argument("-o", "--output-dir", help="where to write the models (default: a new temporary folder)")
    d.add_argument("--ratio", type=float, default=0.3, help="fraction of MACs channel pruning removes")
    d.set_defaults(func=cmd_demo)

    from sculpt.backends.tvm.cli import register as register_tvm_commands  # TVM itself loads only when a command runs

    register_tvm_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args.func(args) or 0)
    except SculptError as e:
        print(f"sculpt: error: {one_line(e, LINE_LIMIT)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a file the user named cannot be read or written (permissions, disk full)
        if os.environ.get("SCULPT_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"sculpt: error: {where}{one_line(e.strerror or e, LINE_LIMIT)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sculpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in sculpt: one line, the traceback on request
        if os.environ.get("SCULPT_DEBUG"):
            raise
        print(f"sculpt: internal error: {type(e).__name__}: {one_line(e, LINE_LIMIT)} (set SCULPT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
