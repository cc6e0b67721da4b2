"""`sculpt inspect` (per-layer cost, channel groups) and `sculpt passes` (the registered passes)."""

from __future__ import annotations

import json
import os

from rich.table import Table

from sculpt.cli.common import (SHAPE_HELP, fmt_bytes, fmt_int, load_model, make_console, parse_input_shapes,
                               resolve_input_shapes)
from sculpt.common import to_plain_json
from sculpt.errors import OptionError
from sculpt.ir.channels import ChannelGraph
from sculpt.ir.cost import cost_of
from sculpt.passes import create_pass
from sculpt.passes.base import registered_passes
from sculpt.cli.plain_table import print_table


def register_inspect(sub) -> None:
    q = sub.add_parser("inspect", help="per-layer params, MACs and bytes, and totals")
    q.add_argument("model")
    q.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=SHAPE_HELP)
    q.add_argument("--json", action="store_true", help="print one JSON object: totals and layers")
    q.add_argument("--top", type=int, default=0, help="only the N layers with the most MACs")
    q.add_argument("--all", action="store_true", help="also list nodes without params or MACs")
    q.add_argument("--groups", action="store_true",
                   help="list the channel-dependency groups (what channel pruning can remove, and what freezes)")
    q.set_defaults(func=cmd_inspect)


def register_passes(sub) -> None:
    s = sub.add_parser("passes", help="list the registered passes and their options")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_passes)


# ------------------------------------------------------------------ inspect
def cmd_inspect(args) -> int:
    if args.top < 0:
        raise OptionError(f"--top must not be negative, got {args.top}")
    model = load_model(args.model)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
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
    con = make_console()
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
                      fmt_int(layer.params), fmt_int(layer.macs), fmt_bytes(layer.weight_bytes))
    print_table(con, table)  # rich takes a minute on 50,000 rows; the same text, written directly
    dyn = work.dynamic_inputs()
    con.print("inputs: " + ", ".join(f"{n}={s}" for n, s in work.input_shapes().items()))
    con.print(f"total: {len(report.layers)} nodes, params {fmt_int(report.params)}, MACs {fmt_int(report.macs)}, "
              f"weights {fmt_bytes(report.weight_bytes)}, file {fmt_bytes(report.model_bytes)}")
    if report.unknown_macs:
        hint = f"; give --input-shape {next(iter(dyn))}=..." if dyn else ""
        con.print(f"[yellow]{len(report.unknown_macs)} nodes have unknown shapes, their MACs are not counted{hint}[/]")
    return 0


def _print_groups(work, args) -> int:
    """The channel-dependency groups of the (canonicalized) model: what pruning can touch."""
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
    con = make_console()
    con.print(table)
    prunable = sum(1 for r in rows if r["prunable_channels"])
    con.print(f"{len(rows)} groups with a weighted producer, {prunable} prunable"
              + (f"; ops without a channel handler: {', '.join(sorted(set(cg.unknown_ops.values())))}"
                 if cg.unknown_ops else ""))
    return 0


# ------------------------------------------------------------------ passes
def cmd_passes(args) -> int:
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
    make_console().print(table)
    return 0
