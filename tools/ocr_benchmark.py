"""What compression costs on a real task: OCR recognition (PP-OCRv4 rec) and text orientation (PP-OCR
mobile v2.0 cls) on rendered text lines, for the original model and for pipelines of sculpt passes.

    python tools/ocr_benchmark.py [--count 300] [--config NAME=SPEC;SPEC ...]... [--models rec,cls] [--json]

A config is a name and pass specs separated by ';', e.g. ``--config 'prune30=canonicalize;channel-pruning:ratio=0.3'``
(``--config plain=`` runs no pass). ``original`` (no pass) is always measured, as the baseline;
without ``--config`` the candidates are ``canonicalize``. Each pipeline runs with the input shape
fixed (rec 1×3×48×320, cls 1×3×48×192) and a calibration set of rendered lines from a seed other
than the evaluation set's (written as .npz, key ``x``). A config whose pass is unknown or fails is
reported in one line and the others go on.

Reported per model and config: exact match and character accuracy (rec) or orientation accuracy
(cls), agreement with the original's predictions, MACs and params (sculpt.ir.cost), onnxruntime
latency at batch 1 (median over rounds of the median of ``--runs`` runs; all configs measured in turn
in each round, in one process) and its ratio to the original's, and the pipeline's run time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sculpt import ocr_task
from sculpt.errors import SculptError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.models import ppocr_model
from sculpt.passes import Pipeline, create_pass, parse_pass_spec

DEFAULT_CONFIGS = ["canonicalize=canonicalize"]


@dataclass
class Config:
    name: str
    specs: list[str]
    error: str | None = None


@dataclass
class Row:
    model: str
    config: str
    specs: list[str]
    metrics: dict = field(default_factory=dict)
    agreement: float | None = None
    macs: int = 0
    params: int = 0
    latency_ms: dict = field(default_factory=dict)  # threads -> ms
    latency_ratio: dict = field(default_factory=dict)
    pipeline_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_config(text: str) -> Config:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SystemExit(f"ocr_benchmark: error: --config must be NAME=SPEC;SPEC..., got '{text}'")
    specs = [s.strip() for s in rest.split(";") if s.strip()]
    return Config(name, specs)


def check_config(cfg: Config) -> None:
    """Build the passes once, so that an unknown pass or option is reported before any work."""
    try:
        for spec in cfg.specs:
            create_pass(*parse_pass_spec(spec))
    except SculptError as e:
        cfg.error = str(e)
    except Exception as e:  # a pass under development may raise anything: report it, go on
        cfg.error = f"{type(e).__name__}: {e}"


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def agreement(metrics, reference) -> float:
    """Fraction of lines on which two models predict the same thing (decoded text, whitespace
    normalized as the accuracy metrics do, or orientation)."""
    def norm(p):
        return ocr_task.normalize_text(p) if isinstance(p, str) else p

    same = [norm(a) == norm(b) for a, b in zip(metrics.predictions, reference.predictions)]
    return sum(same) / len(same) if same else 0.0


def bench_model(kind: str, configs: list[Config], args, workdir: Path) -> list[Row]:
    shape = ocr_task.input_shape(kind)
    shapes = {"x": shape}
    original = ppocr_model(kind)
    fixed = original.clone().fix_input_shapes(shapes)
    fixed.infer_shapes()
    characters = ocr_task.character_list(original) if kind == "rec" else None

    t = time.perf_counter()
    cal_path = ocr_task.write_calibration(workdir / f"{kind}_calibration.npz", kind, args.calibration_count)
    calibration = CalibrationSet.from_npz(cal_path)
    calibration.check(fixed)
    data = ocr_task.task_set(kind, args.count, ocr_task.EVAL_SEED)
    log(f"{kind}: {len(data)} evaluation lines, {len(calibration)} calibration lines ({cal_path}) "
        f"in {time.perf_counter() - t:.1f}s")

    models = {}
    results = {}
    rows: list[Row] = []
    for cfg in [Config("original", [])] + configs:
        row = Row(kind, cfg.name, cfg.specs)
        rows.append(row)
        if cfg.error:
            row.error = cfg.error
            continue
        model = fixed
        if cfg.specs:
            t = time.perf_counter()
            try:
                pipe = Pipeline.from_specs(cfg.specs, input_shapes=shapes, calibration=calibration,
                                           statistics=False)
                model = pipe.run(original).model
            except SculptError as e:
                row.error = one_line(e)
            except Exception as e:  # a pass under development may raise anything: report it, go on
                row.error = one_line(f"{type(e).__name__}: {e}")
            row.pipeline_seconds = time.perf_counter() - t
            if row.error:
                log(f"{kind} / {cfg.name}: FAILED: {row.error}")
                continue
            if args.save_dir:
                out = Path(args.save_dir) / f"{kind}_{cfg.name}.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                model.save(out)
        try:
            cost = cost_of(model, shapes)
            row.macs, row.params = cost.macs, cost.params
            t = time.perf_counter()
            sess = ocr_task.session_for(model, threads=args.eval_threads, shape=shape)
            if kind == "rec":
                metrics = ocr_task.evaluate_rec(model, data, characters=characters, session=sess)
            else:
                metrics = ocr_task.evaluate_cls(model, data, session=sess)
            row.eval_seconds = time.perf_counter() - t
        except Exception as e:
            row.error = one_line(f"evaluation failed: {type(e).__name__}: {e}")
            log(f"{kind} / {cfg.name}: FAILED: {row.error}")
            continue
        row.metrics = metrics.as_dict()
        results[cfg.name] = metrics
        models[cfg.name] = model
        log(f"{kind} / {cfg.name}: {row.metrics} ({row.pipeline_seconds:.1f}s passes, "
            f"{row.eval_seconds:.1f}s evaluation)")

    if "original" in results:
        for row in rows:
            if row.config in results:
                row.agreement = agreement(results[row.config], results["original"])

    # latency: every model in turn in each round, so that drift in machine load hits all alike
    feed = data.inputs[:1]
    live = [r for r in rows if r.config in models]
    for threads in args.threads:
        sessions = {r.config: ocr_task.session_for(models[r.config], threads=threads, shape=shape) for r in live}
        times: dict[str, list[float]] = {r.config: [] for r in live}
        # enough runs that one measurement of the fastest model lasts >= --min-ms (cls takes ~1 ms a run)
        fastest = min(ocr_task.median_latency_ms(s, feed, 5) for s in sessions.values())
        runs = max(args.runs, int(args.min_ms / max(fastest, 1e-3)) + 1)
        for _ in range(args.rounds):
            for r in live:
                times[r.config].append(ocr_task.median_latency_ms(sessions[r.config], feed, runs))
        base = statistics.median(times["original"]) if "original" in times else None
        for r in live:
            ms = statistics.median(times[r.config])
            r.latency_ms[threads] = ms
            r.latency_ratio[threads] = ms / base if base else None
        log(f"{kind}: latency at {threads} thread(s): {args.rounds} rounds x {runs} runs")
    return rows


def fmt_pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def table(rows: list[Row], threads: list[int]) -> str:
    head = ["model", "config", "exact match", "char acc", "orient acc", "agree w/ orig", "MACs", "params"]
    for t in threads:
        head += [f"ms ({t} thr)", f"× orig ({t} thr)"]
    head += ["passes s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            continue
        m = r.metrics
        cells = [r.model, r.config, fmt_pct(m.get("exact_match")), fmt_pct(m.get("char_accuracy")),
                 fmt_pct(m.get("accuracy")), fmt_pct(r.agreement), f"{r.macs / 1e6:.1f}M",
                 f"{r.params / 1e6:.3f}M"]
        for t in threads:
            ms, ratio = r.latency_ms.get(t), r.latency_ratio.get(t)
            cells += ["—" if ms is None else f"{ms:.2f}", "—" if ratio is None else f"{ratio:.2f}"]
        cells.append(f"{r.pipeline_seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_latency_options(ap: argparse.ArgumentParser, *, threads: str) -> None:
    """The onnxruntime latency options every OCR benchmark takes."""
    ap.add_argument("--threads", default=threads, help="onnxruntime intra-op threads for latency, e.g. 1,2")
    ap.add_argument("--runs", type=int, default=20, help="runs per latency measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating latency rounds")
    ap.add_argument("--min-ms", type=float, default=300.0,
                    help="more runs per measurement for fast models, so that one lasts at least this long")


def parse_threads_and_models(ap: argparse.ArgumentParser, args) -> list[str]:
    """args.threads → list of ints; the --models list checked (rec, cls) and returned."""
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads takes integers separated by commas, got '{args.threads}'")
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    for k in kinds:
        if k not in ("rec", "cls"):
            ap.error(f"unknown model '{k}' (rec, cls)")
    return kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--count", type=int, default=ocr_task.DEFAULT_COUNT, help="evaluation lines per model")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=SPEC;SPEC",
                    help="a candidate pipeline (repeatable); default: canonicalize")
    ap.add_argument("--models", default="rec,cls", help="rec, cls or rec,cls")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    ap.add_argument("--calibration-count", type=int, default=64, help="calibration lines per model")
    ap.add_argument("--eval-threads", type=int, default=2, help="onnxruntime threads for the accuracy runs")
    add_latency_options(ap, threads="2")
    ap.add_argument("--work-dir", help="where the calibration .npz files go (default: a temporary folder)")
    ap.add_argument("--save-dir", help="save each config's output model here as <model>_<config>.onnx")
    args = ap.parse_args(argv)
    if args.count <= 0 or args.calibration_count <= 0 or args.runs <= 0 or args.rounds <= 0:
        ap.error("--count, --calibration-count, --runs and --rounds must be positive")
    kinds = parse_threads_and_models(ap, args)

    configs = [parse_config(c) for c in (args.config or DEFAULT_CONFIGS)]
    names = [c.name for c in configs]
    if "original" in names or len(set(names)) != len(names):
        ap.error("config names must be unique and not 'original' (always measured)")
    notes = []
    for cfg in configs:
        check_config(cfg)
        if cfg.error:
            note = f"config '{cfg.name}' ({'; '.join(cfg.specs)}): skipped: {one_line(cfg.error)}"
            notes.append(note)
            print(note, flush=True)

    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ocr_benchmark_") as tmp:
        workdir = Path(args.work_dir or tmp)
        for kind in kinds:
            rows += bench_model(kind, configs, args, workdir)
    seconds = time.perf_counter() - start
    for r in rows:
        if r.error and not any(c.name == r.config and c.error for c in configs):
            note = f"config '{r.config}' on {r.model} ({'; '.join(r.specs)}): failed: {r.error}"
            notes.append(note)
            print(note, flush=True)

    if args.json:
        print(json.dumps({"count": args.count, "seconds": seconds, "threads": args.threads, "notes": notes,
                          "rows": [r.as_dict() for r in rows]}, indent=2))
        return 0
    print(table(rows, args.threads))
    print(f"\n{args.count} lines per model, evaluation seed {ocr_task.EVAL_SEED}, calibration "
          f"{args.calibration_count} lines of seed {ocr_task.CALIBRATION_SEED}; latency: onnxruntime batch 1, "
          f"median over {args.rounds} rounds of the median of ≥ {args.runs} runs; total {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
