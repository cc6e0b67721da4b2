"""`sculpt targets`, `sculpt compile`, `sculpt verify`, `sculpt bench`: the TVM backend's commands.

``register_tvm_commands(subparsers)`` adds them to the `sculpt` parser. The backend modules imported
here do not import TVM at module level: TVM itself loads only when a command runs.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sculpt.backends.tvm import relax_import
from sculpt.backends.tvm.adreno_texture import texture_target
from sculpt.backends.tvm.artifact import check_artifact_path, compile_model, export_artifact, load_artifact
from sculpt.backends.tvm.bench import benchmark, build_supports
from sculpt.backends.tvm.deploy import verify_artifact
from sculpt.backends.tvm.rpc import probe
from sculpt.backends.tvm.targets import TARGETS, get_target
from sculpt.backends.tvm.tune import RemoteDevice, database_dir_for
from sculpt.cli.common import check_number_flag, load_model, make_console, parse_input_shapes, resolve_input_shapes
from sculpt.common import one_line, to_plain_json
from sculpt.errors import OptionError

SHAPE_HELP = "fix an input's shape: NAME=1,3,48,320 (repeatable; the name may be left out for one input)"


def register_tvm_commands(subparsers) -> None:
    kernels = _kernel_choices()

    t = subparsers.add_parser("targets", help="list the named TVM targets and their TVM target JSON")
    t.add_argument("--json", action="store_true", help="print one JSON object: name -> target")
    t.set_defaults(func=cmd_targets)

    c = subparsers.add_parser("compile", help="compile a model with TVM into a deployable artifact (.so + manifest)")
    c.add_argument("model")
    c.add_argument("--target", default="host",
                   help="host, arm64, cortex-a53, cortex-a72, cortex-a76, mali, adreno, or a TVM target JSON dict")
    c.add_argument("-o", "--output", required=True, help="the artifact library, ending in .so (manifest: .json beside it)")
    c.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=SHAPE_HELP)
    c.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="tune with MetaSchedule, about TRIALS trials in all (at least one per task); the database "
                        "goes beside the artifact (<name>.tuning/) and is reused by the next compile")
    c.add_argument("--tuning-db", metavar="DIR", help="the tuning database folder (default: beside the artifact)")
    _add_strategy_option(c)
    c.add_argument("--search-tiles", type=int, default=0, metavar="N",
                   help="host only: first time the N best candidate tiles of every sculpt kernel on this machine and "
                        "cache the fastest (~/.cache/sculpt/kernel_tiles.json; later builds use it)")
    c.add_argument("--no-canonicalize", action="store_true",
                   help="import the model as is (by default 'canonicalize' runs first; TVM's importer needs it)")
    _add_device_options(c)
    _add_build_options(c, kernels)
    c.add_argument("--int8", choices=["off", "relax", "kernel"], default="off",
                   help="a QDQ model's quantized units: off (default: dequantize, float op, quantize), relax "
                        "(integer Relax ops), kernel (sculpt's int8 conv kernel: vpdpbusd on x86 with VNNI, vpmaddwd "
                        "without, sdot on aarch64 with dotprod)")
    c.add_argument("--gpu-memory", choices=["buffer", "texture"], default="buffer",
                   help="adreno only: buffer (default: TVM's default GPU pipeline) or texture (TVM's Adreno texture "
                        "lowering: convolutions read and write OpenCL images)")
    c.add_argument("--thread-policy", choices=["stealing", "shared", "dedicated"], default="stealing",
                   help="the CPU thread pool the artifact expects, recorded in its manifest: stealing (default: "
                        "sculpt's pool, a thread takes over the unstarted work of a late one, for devices that run "
                        "other apps), shared (TVM's pool, workers neither pinned nor spinning) or dedicated (TVM's "
                        "pinned, spinning pool)")
    c.add_argument("--json", action="store_true", help="print the manifest as JSON")
    c.set_defaults(func=cmd_compile)

    v = subparsers.add_parser("verify", help="run an artifact (ARM under qemu, Mali/Adreno kernels on PoCL) and "
                                             "compare it with onnxruntime")
    v.add_argument("artifact", help="the .so written by 'sculpt compile' (its .json manifest beside it)")
    v.add_argument("--model", required=True, help="the ONNX model to compare with (through onnxruntime)")
    v.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="an input from a .npy file (repeatable; default: random inputs)")
    v.add_argument("--rtol", type=float, default=1e-4, help="relative to each output's largest magnitude")
    v.add_argument("--atol", type=float, default=1e-6)
    v.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    v.add_argument("--timeout", type=float, default=None, help="seconds the run may take (default: no limit)")
    v.add_argument("--compile-only", action="store_true",
                   help="Mali/Adreno artifacts: only compile the OpenCL kernels on PoCL (by default they also run "
                        "there, in TVM's launch order, and are compared with onnxruntime)")
    v.add_argument("--qdq-units", choices=["auto", "always", "off"], default="auto",
                   help="a QDQ model on a CPU: check each quantized unit on the build's own int8 inputs (a "
                        "verification build exposes them) when the end-to-end error exceeds the tolerance (auto, "
                        "default: one-step rounding flips at .5 ties propagate), always, or never (off)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    b = subparsers.add_parser("bench", help="median latency of onnxruntime and TVM on the same model, in one run")
    b.add_argument("model")
    b.add_argument("--target", default="host", help="as for compile (default: host)")
    b.add_argument("--input-shape", action="append", metavar="NAME=DIMS", help=SHAPE_HELP)
    b.add_argument("--runs", type=int, default=20, help="runs per round (default 20)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--rounds", type=int, default=3, help="rounds; each reports a median, the result is their median")
    b.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: all cores)")
    b.add_argument("--layers", action="store_true",
                   help="also time every kernel of the TVM build (this machine only): kernel used, ms, share")
    b.add_argument("--thread-policy", choices=["stealing", "shared", "dedicated"], default=None,
                   help="the CPU thread pool: stealing (default: sculpt's, a thread takes over the unstarted work "
                        "of a late one, for cores other processes use too), shared (TVM's, workers neither pinned "
                        "nor spinning) or dedicated (TVM's pinned, spinning pool)")
    b.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="also measure a build tuned with TRIALS trials")
    b.add_argument("--tuning-db", metavar="DIR", help="tuning database to use and extend (default: a temporary one)")
    _add_strategy_option(b)
    _add_device_options(b)
    _add_build_options(b, kernels, allow_both=True)
    b.add_argument("--json", action="store_true", help='print one JSON object {"ort_ms": ..., "tvm_ms": ..., ...}')
    b.set_defaults(func=cmd_bench)


def _kernel_choices() -> list[str]:
    """The values of relax_import.build's ``kernels`` option, if this TVM backend has one."""
    return list(getattr(relax_import, "KERNEL_CHOICES", ())) if build_supports("kernels") else []


def _add_strategy_option(p) -> None:
    p.add_argument("--tune-strategy", choices=["evolutionary", "random"], default="evolutionary",
                   help="evolutionary: MetaSchedule's cost-model-guided search (default); random: candidates "
                        "sampled at random, much cheaper, for trying the flow")


def _add_device_options(p) -> None:
    p.add_argument("--rpc", metavar="HOST:PORT", help="a TVM RPC tracker: measure (and tune) on a remote device")
    p.add_argument("--device-key", metavar="KEY", help="the key the device registered with at the tracker")


def _add_build_options(p, kernels: list[str], allow_both: bool = False) -> None:
    if kernels:
        p.add_argument("--kernels", choices=kernels + (["both"] if allow_both else []), default=None,
                       help="CPU kernels: sculpt's (the default) or TVM's own pipeline" + ("; both: measure each" if allow_both else "")
                       + ("; a tuned build (--tune) uses MetaSchedule's schedules instead" if allow_both else ""))
    p.add_argument("--sparse", choices=["auto", "on", "off"], default="off",
                   help="block-sparse kernels for pruned weights: auto (where faster), on, off (default)")


def _device(args):
    if args.rpc is None:
        if args.device_key:
            raise OptionError("--device-key needs --rpc HOST:PORT (the tracker)")
        return None
    device = RemoteDevice.parse(args.rpc, args.device_key)
    probe(device)  # before any compiling: an unreachable tracker or unknown key is reported at once
    return device


@contextmanager
def _status(console, enabled: bool = True):
    """A status line updated by the returned callback; a progress bar for tuning trials."""
    status = console.status("") if enabled else None
    bar = {"progress": None, "task": None}

    def say(message: str) -> None:
        if status is not None:
            status.update(message)

    def tuning_started(total: int) -> None:
        if not enabled:
            return
        if status is not None:
            status.stop()
        progress = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=False)
        progress.start()
        bar.update(progress=progress, task=progress.add_task("tuning", total=total))

    def trials_done(n: int) -> None:
        if bar["progress"] is not None:
            bar["progress"].advance(bar["task"], n)

    if status is not None:
        status.start()
    try:
        yield say, tuning_started, trials_done
    finally:
        if bar["progress"] is not None:
            bar["progress"].stop()
        if status is not None:
            status.stop()


def _quiet_tvm_logs() -> None:
    """MetaSchedule logs every task table at INFO; sculpt shows a progress bar instead."""
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule", "tvm"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------ targets
def cmd_targets(args) -> int:
    if args.json:
        print(json.dumps({name: t.as_dict() for name, t in TARGETS.items()}))
        return 0
    table = Table(title="sculpt targets (TVM)")
    for col in ("target", "runs on", "description", "TVM target JSON"):
        table.add_column(col)
    for name, t in TARGETS.items():
        where = ("OpenCL GPU, " if t.is_opencl else "CPU, ") + t.arch
        table.add_row(name, where, t.description, json.dumps(t.spec))
    make_console().print(table)
    return 0


# ------------------------------------------------------------------ compile
def cmd_compile(args) -> int:
    target = get_target(args.target)
    if args.gpu_memory != "buffer":
        texture_target(target, args.gpu_memory)  # a target that is not Adreno: refused before anything runs
    if args.tune < 0:
        raise OptionError(f"--tune takes a number of trials >= 0, got {args.tune}")
    if args.search_tiles and (args.tune or args.tuning_db):
        raise OptionError("--search-tiles times sculpt's kernels, --tune schedules TVM's own: give one of them")
    device = _device(args)
    library = check_artifact_path(args.output, args.model)
    tuning_db = None
    if args.tuning_db:
        tuning_db = Path(args.tuning_db)
        if tuning_db.exists() and not tuning_db.is_dir():
            raise OptionError(f"--tuning-db {tuning_db}: exists and is not a folder")
        if not tuning_db.exists() and not args.tune:
            raise OptionError(f"--tuning-db {tuning_db}: no such folder (give --tune TRIALS to create it)")
        if not tuning_db.resolve().parent.is_dir():
            raise OptionError(f"--tuning-db {tuning_db}: the folder {tuning_db.resolve().parent} does not exist")
    elif args.tune:
        tuning_db = database_dir_for(library)
    model = load_model(args.model)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
    build_options = {"kernels": args.kernels} if getattr(args, "kernels", None) else {}
    console = make_console(stderr=True)
    _quiet_tvm_logs()
    with _status(console, enabled=not args.json) as (say, tuning_started, trials_done):
        compiled = compile_model(model, target, input_shapes=shapes, canonicalize=not args.no_canonicalize,
                                 tune_trials=args.tune, tuning_database=tuning_db, device=device,
                                 tune_strategy=args.tune_strategy, build_options=build_options, sparse=args.sparse,
                                 search_tiles=args.search_tiles, progress=say,
                                 on_tuning_start=tuning_started, on_trials=trials_done, int8=args.int8,
                                 gpu_memory=args.gpu_memory)
        say(f"exporting {library}")
        artifact = export_artifact(compiled, library, source_model=args.model, thread_policy=args.thread_policy)
    if args.json:
        print(json.dumps(artifact.manifest))
        return 0
    out = make_console()
    m = artifact.manifest
    out.print(f"wrote {artifact.library} ({artifact.library.stat().st_size / 2**20:.2f} MB, {m['target']['name']}: "
              f"{m['target']['arch']}{', OpenCL' if m['target']['opencl'] else ''}) and {artifact.manifest_path.name}"
              + (f" and {m['opencl_source']}" if m.get("opencl_source") else ""))
    out.print("inputs: " + ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in m["inputs"]))
    out.print("outputs: " + ", ".join(f"{t['name']} {t['shape']} {t['dtype']}" for t in m["outputs"]))
    if m.get("tuning"):
        tr = m["tuning"]
        out.print(f"tuning: {tr['tasks']} tasks, {tr['tasks_tuned']} tuned now with {tr['trials']} trials, "
                  f"{tr['tasks_reused']} taken from the database {tr['database']}")
    searched = (m.get("options") or {}).get("tile_search")
    if searched:
        out.print(f"tile search: {searched['kernels']} kernels, {searched['candidates']} candidates each, "
                  f"{searched['faster_than_heuristic']} faster than the heuristic's tile ({searched['seconds']} s)")
    sparse = (m.get("options") or {}).get("sparse")
    if sparse:
        out.print(f"sparse kernels ({sparse['mode']}): {sparse['layers_sparse']} of {len(sparse['decisions'])} layers")
    out.print(f"compiled in {m['compile_seconds']:.1f} s")
    return 0


# ------------------------------------------------------------------ verify
def parse_input_files(items) -> dict[str, "object"]:
    """``NAME=FILE.npy`` (or ``FILE.npy`` alone, keyed by '') -> loaded arrays."""
    feeds = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        if not path:
            raise OptionError(f"--input '{item}': give NAME=FILE.npy")
        p = Path(path)
        if not p.is_file():
            raise OptionError(f"--input {item}: {p} does not exist")
        try:
            value = np.load(p, allow_pickle=False)
        except Exception as e:
            raise OptionError(f"--input {item}: {p} is not a readable .npy file ({one_line(e, limit=200)})") \
                from None
        if not isinstance(value, np.ndarray):
            raise OptionError(f"--input {item}: {p} holds several arrays (.npz); give one .npy per input")
        if name in feeds:
            raise OptionError(f"--input given twice for '{name or 'the input'}'")
        feeds[name] = value
    return feeds


def cmd_verify(args) -> int:
    check_number_flag("--rtol", args.rtol)
    check_number_flag("--atol", args.atol)
    check_number_flag("--timeout", args.timeout, positive=True)
    artifact = load_artifact(args.artifact)
    load_model(args.model)  # a clear error for a missing or broken model before anything runs
    feeds = parse_input_files(args.input)
    if "" in feeds:
        names = [s.name for s in artifact.inputs]
        if len(names) != 1:
            raise OptionError(f"--input without a name is only for single-input artifacts; this one has "
                              f"{', '.join(names)}")
        feeds = {names[0]: feeds.pop("")}
    console = make_console(stderr=True)
    with _status(console, enabled=not args.json) as (say, _, _unused):
        result = verify_artifact(artifact, args.model, feeds, rtol=args.rtol, atol=args.atol, seed=args.seed,
                                 timeout=args.timeout, compile_only=args.compile_only, qdq_units=args.qdq_units,
                                 progress=say)
    if args.json:
        data = {"artifact": str(artifact.library), "target": artifact.manifest["target"]["name"], "ok": result.ok,
                "kind": result.kind, "emulated": result.emulated, "notes": result.notes,
                "rtol": args.rtol, "atol": args.atol}
        if result.comparison is not None:
            data.update(result.comparison.as_dict())
        if result.kernel_check is not None:
            data["opencl"] = result.kernel_check.as_dict()
        if result.unit_check is not None:
            data["end_to_end_ok"] = result.end_to_end_ok
            data["qdq_units"] = result.unit_check.as_dict()
        print(json.dumps(to_plain_json(data), allow_nan=False))
    else:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        if result.comparison is not None:
            where = " (under qemu)" if result.emulated else " (kernels on PoCL)" if result.kind == "opencl-run" else ""
            for o in result.comparison.outputs:
                print(f"{o.name}: max abs {o.max_abs:.3g}, relative {o.max_rel:.3g}"
                      + ("" if o.shape_match else " (shape mismatch)"))
            if result.unit_check is not None:
                print(f"{artifact.library.name}{where}: " + ("matches onnxruntime unit by unit" if result.ok
                                                              else "DIFFERS from onnxruntime unit by unit")
                      + f" ({result.unit_check.bound()}; float tails within rtol={args.rtol:g}, "
                        f"atol={args.atol:g})")
            else:
                print(f"{artifact.library.name}{where}: " + ("matches onnxruntime" if result.ok
                                                              else "DIFFERS from onnxruntime")
                      + f" (rtol={args.rtol:g}, atol={args.atol:g})")
        else:
            print(f"{artifact.library.name}: {len(result.kernel_check.kernels)} OpenCL kernels compiled "
                  f"({result.kernel_check.platform})")
    if not result.ok and result.unit_check is not None:
        print(f"sculpt: {result.unit_check.summary()}", file=sys.stderr)
    elif not result.ok:
        print(f"sculpt: outputs differ beyond rtol={args.rtol:g} / atol={args.atol:g}", file=sys.stderr)
    return 0 if result.ok else 1


# ------------------------------------------------------------------ bench
def cmd_bench(args) -> int:
    target = get_target(args.target)
    device = _device(args)
    model = load_model(args.model)
    shapes = resolve_input_shapes(model, parse_input_shapes(args.input_shape))
    if args.tune < 0:
        raise OptionError(f"--tune takes a number of trials >= 0, got {args.tune}")
    tmp_db = None
    tuning_db = Path(args.tuning_db) if args.tuning_db else None
    if args.tune and tuning_db is None:
        tmp_db = tempfile.TemporaryDirectory(prefix="sculpt-bench-tuning-")
        tuning_db = Path(tmp_db.name) / "db"
    console = make_console(stderr=True)
    _quiet_tvm_logs()
    try:
        with _status(console, enabled=not args.json) as (say, tuning_started, trials_done):
            result = benchmark(args.model, target, input_shapes=shapes, runs=args.runs, warmup=args.warmup,
                               rounds=args.rounds, threads=args.threads, kernels=getattr(args, "kernels", None),
                               tune_trials=args.tune, tuning_database=tuning_db, device=device, sparse=args.sparse,
                               tune_strategy=args.tune_strategy, thread_policy=args.thread_policy,
                               layers=args.layers,
                               progress=say, on_tuning_start=tuning_started, on_trials=trials_done)
    finally:
        if tmp_db is not None:
            tmp_db.cleanup()
    if args.json:
        print(json.dumps(to_plain_json(result), allow_nan=False))
        return 0
    table = Table(title=f"{args.model} on {result['target']} ({result['measured_on']}), {result['threads']} threads "
                        f"({result['thread_policy']} pool), "
                        f"median of {result['rounds']}x{result['runs']} runs")
    for col in ("runtime", "median ms", "ort / this", "max rel. error vs ort"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    table.add_row("onnxruntime", f"{result['ort_ms']:.3f}", "1.00", "-")
    for key, value in result.items():
        if key.startswith("tvm") and key.endswith("_ms"):
            label = key.removesuffix("_ms").replace("_", " ")
            table.add_row(label, f"{value:.3f}", f"{result['ort_ms'] / value:.2f}",
                          f"{result[key.replace('_ms', '_max_rel_error')]:.2g}")
    make_console().print(table)
    for label, reason in result.get("tvm_skipped", {}).items():
        print(f"sculpt: warning: {label.removesuffix('_ms').replace('_', ' ')} skipped: {reason}", file=sys.stderr)
    for label, rows in result.get("layers", {}).items():
        _print_layers(label, rows)
    if result.get("tuning"):
        tr = result["tuning"]
        make_console().print(f"tuning: {tr['tasks']} tasks, {tr['trials']} trials now, {tr['tasks_reused']} from the "
                         "database")
    return 0


def _print_layers(label: str, rows: list[dict], top: int = 30) -> None:
    """The per-kernel table of ``sculpt bench --layers``: slowest first, the rest summed in one row."""
    table = Table(title=f"{label.removesuffix('_ms').replace('_', ' ')}: time per kernel (one run)")
    for col in ("function", "kernel", "calls", "ms", "share"):
        table.add_column(col, justify="left" if col in ("function", "kernel") else "right")
    for r in rows[:top]:
        table.add_row(r["func"], r["kernel"], str(r["calls"]), f"{r['ms']:.3f}", f"{100 * r['share']:.1f}%")
    rest = rows[top:]
    if rest:
        table.add_row(f"({len(rest)} more)", "", str(sum(r["calls"] for r in rest)),
                      f"{sum(r['ms'] for r in rest):.3f}", f"{100 * sum(r['share'] for r in rest):.1f}%")
    make_console().print(table)
