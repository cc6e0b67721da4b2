"""`sculpt optimize`: the fastest model within an accuracy budget, latency measured on the runtime."""

from __future__ import annotations

import json

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sculpt.cli.common import SHAPE_HELP, check_number_flag, fmt_bytes, fmt_int, make_console, parse_input_shapes
from sculpt.common import to_plain_json
from sculpt.errors import OptionError


def register_optimize(sub) -> None:
    o = sub.add_parser("optimize", help="search for the fastest model within an accuracy budget",
                       description="Try every knob (per-group channel pruning, per-layer low-rank, int8 with the "
                                   "most sensitive layers in float, block sparsity on TVM) alone, allocate them by "
                                   "latency saved per accuracy lost, validate the combination and back off until "
                                   "the budget holds, then add left-out steps one at a time, each measured. Latency is measured on the runtime; the result is never "
                                   "slower than the input model.")
    o.add_argument("model")
    o.add_argument("--calibration", required=True,
                   help="calibration data (an .npz, an image folder, random[:COUNT]); a part is held out for the "
                        "proxy metric and every error")
    o.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                   help="the output folder: model.onnx, pipeline.yaml, candidates.json/.csv, report.html "
                        "(model.so with --target), cache/ (the measurements, to resume)")
    o.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=SHAPE_HELP)
    o.add_argument("--metric", metavar="FILE.py:FUNC",
                   help="your metric: FUNC(model_path) -> float, higher is better (default: a fidelity proxy "
                        "against the input model on held-out calibration samples)")
    o.add_argument("--max-drop", type=float, default=None, metavar="X",
                   help="the drop allowed, absolute, in the metric's units (with a metric in percent, 1 allows one "
                        "point); default for the proxy: 1 point of top-1 agreement or a relative error of 0.05")
    o.add_argument("--proxy", choices=("auto", "agreement", "error"), default="auto",
                   help="without --metric: top-1 agreement (classifier-like outputs) or relative output error")
    o.add_argument("--runtime", choices=("ort", "tvm"), default="ort",
                   help="where latency is measured: onnxruntime, or the TVM build (sculpt's kernels)")
    o.add_argument("--target", default=None, help="the TVM target (with --runtime tvm; also compiles model.so)")
    o.add_argument("--rpc", metavar="HOST:PORT", help="measure the TVM builds on devices at this RPC tracker")
    o.add_argument("--device-key", metavar="KEY", help="the devices' key at the tracker")
    o.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="stop measuring new candidates after M minutes (the best so far is returned)")
    o.add_argument("--techniques", default=None, metavar="LIST",
                   help="comma-separated: prune, low-rank, separable, sparsify, int8 "
                        "(default: prune,low-rank,int8; + sparsify with --runtime tvm)")
    o.add_argument("--max-knobs", type=int, default=24, metavar="N",
                   help="per-layer knobs measured: the N touching the most MACs (default 24)")
    o.add_argument("--threads", type=int, default=1, help="threads of the measured runtime (default 1)")
    o.add_argument("--held-out", type=int, default=None, metavar="N",
                   help="calibration samples held out (default: a quarter)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--cache", default=None, metavar="DIR", help="where measurements are cached (default OUT_DIR/cache)")
    o.add_argument("--distill-steps", type=int, default=0, metavar="N",
                   help="recover the combined model by N steps of distillation from the input model "
                        "(needs the train extra)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.set_defaults(func=cmd_optimize)


def cmd_optimize(args) -> int:
    from sculpt.optimizer import optimize

    check_number_flag("--max-drop", args.max_drop)
    check_number_flag("--budget-minutes", args.budget_minutes, positive=True)
    if args.threads < 1:
        raise OptionError(f"--threads must be ≥ 1, got {args.threads}")
    if args.held_out is not None and args.held_out < 1:
        raise OptionError(f"--held-out must be at least 1, got {args.held_out}")
    device = None
    if args.rpc or args.device_key:
        if args.runtime != "tvm":
            raise OptionError("--rpc measures TVM builds on devices: give --runtime tvm")
        from sculpt.backends.tvm.rpc import probe
        from sculpt.backends.tvm.tune import RemoteDevice

        if not args.rpc:
            raise OptionError("--device-key needs --rpc HOST:PORT (the tracker)")
        device = RemoteDevice.parse(args.rpc, args.device_key)
        probe(device)
    techniques = [t.strip() for t in args.techniques.split(",") if t.strip()] if args.techniques else None
    shapes = parse_input_shapes(args.input_shape)
    if "" in shapes:
        from sculpt.cli.common import load_model, resolve_input_shapes

        shapes = resolve_input_shapes(load_model(args.model), shapes)
    con = make_console(stderr=True)
    # the bar starts with the first measurement: an option refused before that leaves stderr one line
    bar = Progress(SpinnerColumn(), TextColumn("[bold]optimize[/]"), BarColumn(),
                   TextColumn("{task.completed} candidates"), TimeElapsedColumn(), TextColumn("{task.description}"),
                   console=con, transient=True)
    task = bar.add_task("measuring the input model", total=None)
    best = {"ms": None, "started": False}

    def progress(text, cand) -> None:
        if not best["started"]:
            bar.start()
            best["started"] = True
        if cand is not None and cand.stage != "input" and cand.drop is not None and cand.latency_ms is not None \
                and cand.failed is None and (best["ms"] is None or cand.latency_ms < best["ms"]):
            best["ms"] = cand.latency_ms
        extra = f" | fastest so far {best['ms']:.3f} ms" if best["ms"] is not None else ""
        bar.update(task, advance=1, description=text + extra)

    try:
        result = optimize(args.model, args.calibration, args.output, input_shapes=shapes, metric=args.metric,
                          max_drop=args.max_drop, proxy=args.proxy, runtime=args.runtime, target=args.target,
                          device=device, budget_minutes=args.budget_minutes, techniques=techniques,
                          max_knobs=args.max_knobs, threads=args.threads, seed=args.seed, held_out=args.held_out,
                          cache_dir=args.cache, distill_steps=args.distill_steps, progress=progress)
    finally:
        if best["started"]:
            bar.stop()
    summary = {"metric": result.metric.describe(), "max_drop": result.max_drop, "runtime": result.runtime,
               "nothing_helped": result.nothing_helped, "input": result.input.as_dict(),
               "chosen": result.chosen.as_dict(), "speedup": round(result.speedup, 3),
               "candidates": len(result.candidates), "seconds": round(result.seconds, 1),
               "decisions": [d.as_dict() for d in result.decisions],
               "files": {k: str(v) for k, v in result.files.items()}}
    if args.json:
        print(json.dumps(to_plain_json(summary), indent=1))
        return 0
    out = make_console()
    table = Table(title=f"sculpt optimize: {len(result.candidates)} candidates in {result.seconds:.0f} s")
    for col in ("", "input model", "chosen model"):
        table.add_column(col, justify="left" if not col else "right")
    a, b = result.input, result.chosen
    table.add_row(result.metric.name, f"{a.metric:.4g}", f"{b.metric:.4g} (drop {b.drop:.3g}, budget "
                                                          f"{result.max_drop:g})")
    table.add_row("latency", f"{a.latency_ms:.3f} ms", f"{b.latency_ms:.3f} ms ({result.speedup:.2f}× faster)")
    table.add_row("MACs", fmt_int(a.macs), fmt_int(b.macs))
    table.add_row("file size", fmt_bytes(a.bytes), fmt_bytes(b.bytes))
    out.print(table)
    out.print(f"metric: {result.metric.describe()}")
    out.print(f"latency: {result.runtime}")
    if result.nothing_helped:
        out.print("[bold]nothing helped[/]: the input model is returned unchanged (" + result.decisions[-1].why + ")")
    for d in result.decisions:
        out.print(f"  - {d.what}: {d.why}")
    out.print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return 0
