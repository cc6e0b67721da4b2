"""The `sculpt` command: inspect, run, passes, compare, demo.

Errors a user can cause print one line (``sculpt: error: ...``) naming the file, pass, option or
input at fault, exit with status 2, and write nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from sculpt import __version__
from sculpt.errors import OptionError, SculptError, ShapeError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise OptionError(f"{self.prog}: {message}")


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
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise ShapeError(f"--input-shape '{item}': dimensions must be integers, like x=1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise ShapeError(f"--input-shape '{item}': dimensions must be positive integers, like x=1,3,224,224")
        shapes[name.strip()] = shape
    return shapes


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

    model = _load(args.model)
    shapes = _resolve_shapes(model, parse_input_shapes(args.input_shape))
    work = model.clone()
    if shapes:
        work.fix_input_shapes(shapes)
    report = cost_of(work, model_bytes=os.path.getsize(args.model))
    if args.json:
        data = report.as_dict()
        data["model"] = args.model
        data["opset"] = model.opset
        data["inputs"] = work.input_shapes()
        data["outputs"] = model.output_names
        print(json.dumps(data))
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
    con.print(table)
    dyn = work.dynamic_inputs()
    con.print(f"inputs: " + ", ".join(f"{n}={s}" for n, s in work.input_shapes().items()))
    con.print(f"total: {len(report.layers)} nodes, params {_fmt_int(report.params)}, MACs {_fmt_int(report.macs)}, "
              f"weights {_fmt_bytes(report.weight_bytes)}, file {_fmt_bytes(report.model_bytes)}")
    if report.unknown_macs:
        hint = f"; give --input-shape {next(iter(dyn))}=..." if dyn else ""
        con.print(f"[yellow]{len(report.unknown_macs)} nodes have unknown shapes, their MACs are not counted{hint}[/]")
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
        self.status = self.console.status(f"[{index}/{self.total}] {pass_.describe()} ...")
        self.status.start()

    def after_pass(self, index, pass_, before, result, record):
        if self.status:
            self.status.stop()
        mark = "changed" if result.modified else "no change"
        self.console.print(f"[{index}/{self.total}] {pass_.name}: {mark} ({record.seconds:.2f} s)")

    def after_pipeline(self, result):
        if self.status:
            self.status.stop()


def cmd_run(args) -> int:
    from rich.table import Table

    from sculpt.backends.ort import compare_models
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.cost import cost_of
    from sculpt.passes.pipeline import Pipeline

    if bool(args.pipeline) == bool(args.pass_specs):
        raise OptionError("sculpt run: give either --pipeline FILE or at least one --pass NAME[:KEY=VALUE,...]")
    out = Path(args.output)
    if out.exists() and out.is_dir():
        raise OptionError(f"{out}: is a directory; -o takes the output .onnx file")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise OptionError(f"{out}: the folder {out.parent} does not exist")
    if os.path.exists(args.model) and out.exists() and os.path.samefile(args.model, out):
        raise OptionError(f"{out}: refusing to overwrite the input model; choose another -o")
    if args.report and Path(args.report).exists() and Path(args.report).is_dir():
        raise OptionError(f"{args.report}: is a directory; --report takes a .json file")

    model = _load(args.model)
    shapes = _resolve_shapes(model, parse_input_shapes(args.input_shape))
    kwargs = dict(verify_each=args.verify_each, dump_dir=args.dump_dir, seed=args.seed)
    if args.pipeline:
        pipeline = Pipeline.from_file(args.pipeline, **kwargs)
        merged = dict(pipeline.input_shapes)
        merged.update(shapes)
        pipeline.input_shapes = merged
        cal_spec = args.calibration or pipeline.calibration_spec
    else:
        pipeline = Pipeline.from_specs(args.pass_specs, input_shapes=shapes, **kwargs)
        cal_spec = args.calibration
    # validate shapes now, before any pass runs
    probe = model.clone()
    if pipeline.input_shapes:
        probe.fix_input_shapes(pipeline.input_shapes)
    probe.require_static_inputs("sculpt run")
    if cal_spec:
        pipeline.calibration = CalibrationSet.from_source(cal_spec, probe, pipeline.input_shapes)
        pipeline.calibration.check(probe)

    con = _console(stderr=True)
    pipeline.extra_instruments.append(_ProgressInstrument(con, len(pipeline.passes)))
    start = time.perf_counter()
    result = pipeline.run(model)
    elapsed = time.perf_counter() - start
    final = result.model
    final.verify()

    # measured error of the whole pipeline: calibration samples if any, else random inputs
    samples = None
    if pipeline.calibration is not None:
        samples = [s for _, s in zip(range(args.compare_samples), pipeline.calibration)]
    cmp = compare_models(probe, final, samples, count=args.compare_samples, seed=args.seed)

    before = cost_of(probe, model_bytes=probe.byte_size())
    after = cost_of(final, model_bytes=final.byte_size())
    # write outputs only now that everything succeeded
    final.save(out)
    report = {
        "input": args.model, "output": str(out), "seconds": elapsed,
        "passes": [r.as_dict() for r in result.records],
        "before": before.as_dict()["totals"], "after": after.as_dict()["totals"],
        "error": cmp.as_dict(),
    }
    if args.report:
        from sculpt.ir.model import _atomic_write_bytes

        _atomic_write_bytes(Path(args.report), json.dumps(report, indent=2, default=str).encode())

    table = Table(title=f"{args.model} -> {out}")
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
    out_con = _console()
    out_con.print(table)
    out_con.print(f"max error vs input model over {cmp.samples} sample(s): abs {cmp.max_abs:.3g}, "
                  f"relative {cmp.max_rel:.3g}; {elapsed:.2f} s")
    return 0


# ------------------------------------------------------------------ compare
def cmd_compare(args) -> int:
    from sculpt.backends.ort import compare_models
    from sculpt.ir.calibration import CalibrationSet

    ref = _load(args.reference)
    cand = _load(args.candidate)
    shapes = _resolve_shapes(ref, parse_input_shapes(args.input_shape))
    probe = ref.clone()
    if shapes:
        probe.fix_input_shapes(shapes)
    probe.require_static_inputs("sculpt compare")
    samples = None
    if args.calibration:
        cal = CalibrationSet.from_source(args.calibration, probe, shapes)
        samples = [s for _, s in zip(range(args.samples), cal)]
    cmp = compare_models(probe, cand, samples, count=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(cmp.as_dict()))
    else:
        for o in cmp.outputs:
            print(f"{o.name}: max abs {o.max_abs:.3g}, relative {o.max_rel:.3g}"
                  + ("" if o.shape_match else " (shape mismatch or missing)"))
    ok = cmp.within(args.rtol, args.atol)
    if not ok:
        print(f"sculpt: outputs differ beyond rtol={args.rtol:g} / atol={args.atol:g}", file=sys.stderr)
    return 0 if ok else 1


# ------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    from rich.table import Table

    from sculpt.backends.ort import compare_models
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.ir.cost import cost_of
    from sculpt.passes.pipeline import Pipeline

    con = _console()
    jobs = []
    from sculpt.examples import tiny_convnet

    jobs.append(("tiny_convnet (built in)", tiny_convnet(), {"input": [1, 3, 32, 32]}))
    try:
        from sculpt.models import ppocr_model

        jobs.append(("PP-OCR mobile v2.0 cls", ppocr_model("cls"), {"x": [1, 3, 48, 192]}))
    except SculptError as e:
        con.print(f"[yellow]skipping the PP-OCR classifier: {e}[/]")
    outdir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sculpt-demo-"))
    outdir.mkdir(parents=True, exist_ok=True)
    table = Table(title="sculpt demo: canonicalize (exact)")
    for col in ("model", "nodes", "params", "MACs", "file size", "max rel. error", "time"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, model, shapes in jobs:
        start = time.perf_counter()
        pipeline = Pipeline.from_specs(["canonicalize"], input_shapes=shapes, verify_each=True)
        res = pipeline.run(model)
        secs = time.perf_counter() - start
        fixed = model.clone().fix_input_shapes(shapes)
        cal = CalibrationSet.random(fixed, count=2, low=0.0, high=1.0)
        cmp = compare_models(fixed, res.model, list(cal))
        b, a = cost_of(fixed), cost_of(res.model)
        path = outdir / (label.split(" ")[0].replace("(", "") + ".canonical.onnx")
        res.model.verify()
        res.model.save(path)
        table.add_row(label, f"{len(b.layers)} -> {len(a.layers)}", f"{_fmt_int(b.params)} -> {_fmt_int(a.params)}",
                      f"{_fmt_int(b.macs)} -> {_fmt_int(a.macs)}",
                      f"{_fmt_bytes(b.model_bytes)} -> {_fmt_bytes(a.model_bytes)}", f"{cmp.max_rel:.2g}",
                      f"{secs:.1f} s")
    con.print(table)
    con.print(f"outputs written to {outdir}")
    return 0


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
    r.add_argument("--seed", type=int, default=0)
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
    d.set_defaults(func=cmd_demo)
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
        print(f"sculpt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sculpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in sculpt: one line, the traceback on request
        if os.environ.get("SCULPT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"sculpt: internal error: {type(e).__name__}: {first} (set SCULPT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
