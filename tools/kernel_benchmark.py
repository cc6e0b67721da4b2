"""Benchmark sculpt's TVM CPU kernels against TVM's default legalization and onnxruntime.

The zoo: PP-OCR det/rec/cls (rapidocr-onnxruntime), the onnx wheel's light models (resnet50,
densenet121, inception_v1/v2, shufflenet, squeezenet, vgg19, zfnet512, bvlc_alexnet) and the models
found inside other PyPI wheels (tools/zoo.py: a PP-LCNet orientation classifier, a PicoDet layout
detector at 800x608, PP-OCRv6 small det/rec), ``--models zoo`` for all of them.

Per kernel (default): every distinct Conv / MatMul / pooling layer shape of the canonicalized models
becomes a one-node ONNX model, run in onnxruntime, built by TVM with its default pipeline and
with sculpt's kernels; GFLOP/s (2 x MACs / time) and ratios, medians of repeated runs, all measured in
the same run.

End to end (--end-to-end): the canonicalized models themselves: onnxruntime vs TVM default vs TVM
with sculpt's kernels, compile times and the largest output error against onnxruntime.

    python tools/kernel_benchmark.py --models det,rec,cls --top 12        # per kernel, 12 heaviest per model
    python tools/kernel_benchmark.py --models det,rec,cls --end-to-end    # whole models
    python tools/kernel_benchmark.py --models zoo --end-to-end --skip-default --threads 1
    python tools/kernel_benchmark.py --models rec --end-to-end --skip-default --threads 2 --load 2  # busy cores
    python tools/kernel_benchmark.py --models zoo --end-to-end --threads 2 --compare-load 2  # idle vs busy
    python tools/kernel_benchmark.py --models rec --end-to-end --threads 2 --compare-load 2 --compare-pools
    python tools/kernel_benchmark.py --models zoo --end-to-end --skip-default --threads 2 --pause-ms 33  # per frame

TVM's default build is the bare ``llvm`` target (what ``build(..., kernels="default")`` does); sculpt's
build is the same target completed with the host CPU. Both TVM and onnxruntime use all cores
(TVM_NUM_THREADS / intra-op threads unset) unless --threads is given; TVM's pool runs under the
thread policy given (default stealing: sculpt's pool, the build loaded through a file; shared: TVM's,
not pinned, not spinning)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class LayerShape:
    """One distinct layer of a model, enough to rebuild it as a one-node ONNX model."""

    op: str
    input_shape: tuple
    weight_shape: tuple = ()
    attrs: tuple = ()          # sorted (name, value) pairs
    has_bias: bool = False
    macs: int = 0

    def describe(self) -> str:
        a = dict(self.attrs)
        if self.op == "Conv":
            k = "x".join(map(str, self.weight_shape[2:]))
            extra = [f"s{a['strides'][0]}{a['strides'][1]}" if a.get("strides", (1, 1)) != (1, 1) else "",
                     f"g{a['group']}" if a.get("group", 1) > 1 else ""]
            return f"conv {self.input_shape[1]}->{self.weight_shape[0]} k{k} {' '.join(e for e in extra if e)} " \
                   f"@{self.input_shape[2]}x{self.input_shape[3]}".replace("  ", " ")
        if self.op == "MatMul":
            return f"matmul {'x'.join(map(str, self.input_shape))} @ {'x'.join(map(str, self.weight_shape))}"
        return f"{self.op.lower()} {a.get('kernel_shape', '')} @{'x'.join(map(str, self.input_shape))}"


def _attr_value(attr):
    v = helper.get_attribute_value(attr)
    return tuple(v) if isinstance(v, (list, tuple)) else v


def layer_shapes(model_path) -> list[LayerShape]:
    """Distinct Conv/MatMul/pool layers of a (static-shape) model, heaviest first."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = {}
    for vi in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = tuple(dims)
    consts = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        x = shapes.get(node.input[0]) if node.input else None
        if x is None:
            continue
        attrs = tuple(sorted((a.name, _attr_value(a)) for a in node.attribute if a.name != "auto_pad"))
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and node.input[1] in consts and out:
            w = consts[node.input[1]]
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
            layer = LayerShape("Conv", x, w, attrs, len(node.input) > 2, macs)
        elif node.op_type == "MatMul" and out and (node.input[1] in consts or node.input[1] in shapes):
            w = consts.get(node.input[1]) or shapes[node.input[1]]
            layer = LayerShape("MatMul", x, w, (("weight", node.input[1] in consts),), False,
                               int(np.prod(out)) * int(w[-2]))
        elif node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool") and out:
            k = dict(attrs).get("kernel_shape", list(x[2:]))
            layer = LayerShape(node.op_type, x, (), attrs, False, int(np.prod(out)) * int(np.prod(k)))
        else:
            continue
        key = (layer.op, layer.input_shape, layer.weight_shape, layer.attrs)
        found.setdefault(key, layer)
    return sorted(found.values(), key=lambda s: -s.macs)


def one_node_model(layer: LayerShape, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(layer.input_shape))]
    inits = []
    attrs = dict(layer.attrs)
    if layer.op == "Conv":
        inits.append(numpy_helper.from_array(rng.standard_normal(layer.weight_shape).astype(np.float32), "w"))
        names = ["x", "w"]
        if layer.has_bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(layer.weight_shape[0]).astype(np.float32), "b"))
            names.append("b")
        node = helper.make_node("Conv", names, ["y"], **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in attrs.items()})
    elif layer.op == "MatMul":
        if attrs.get("weight", True):
            inits.append(numpy_helper.from_array(rng.standard_normal(layer.weight_shape).astype(np.float32), "w"))
        else:
            inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(layer.weight_shape)))
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        node = helper.make_node(layer.op, ["x"], ["y"], **{k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in attrs.items()})
    graph = helper.make_graph([node], "one_node", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


# what a run's time is read from: wall clock, or (``--clock cpu``, one thread) the CPU time of the
# calling thread, where both runtimes run their single-threaded work: on a machine other jobs load,
# the time the scheduler gives them is not counted (their effect on the caches still is)
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCK["wall"]
_pause_s = 0.0  # --pause-ms: idle time before each timed run (a camera's frame interval), set by main


def _median_ms(fn, runs: int, warmup: int = 2, budget_s: float = 20.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(runs):
        if _pause_s:
            time.sleep(_pause_s)
        t = _clock()
        fn()
        times.append((_clock() - t) * 1e3)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


_policy = "stealing"  # the TVM thread policy (--thread-policy), set by main


def _tvm_runner(executable, feeds: dict, order: list[str], policy: str | None = None):
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.work_pool import vm_module

    vm = relax.VirtualMachine(vm_module(executable, policy or _policy), tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), tvm.cpu()) for n in order]

    def run():
        return vm["main"](*args)

    return run


def _outputs(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [o for v in value for o in _outputs(v)]


def _feeds(model) -> dict:
    """Image-like inputs in [0, 1) (the PP-OCR models' outputs are near zero on N(0, 1) noise)."""
    rng = np.random.default_rng(0)
    return {name: rng.random([int(d) for d in shape]).astype(np.float32)
            for name, shape in model.input_shapes().items()}


def bench_layers(args) -> int:
    from sculpt.backends.tvm import build, import_to_relax
    from sculpt.ir.model import Model
    from sculpt.runtime import make_session

    print(f"{'model':12} {'layer':42} {'MMAC':>8} {'ort ms':>8} {'def ms':>9} {'sculpt ms':>9} "
          f"{'ort GF/s':>8} {'scl GF/s':>8} {'scl/ort':>7} {'def/scl':>8} {'max rel err':>11}")
    ratios = []
    for kind in args.models:
        layers = layer_shapes(_canonical_model_path(kind, args))
        if args.top:
            layers = layers[:args.top]
        for layer in layers:
            model = Model.wrap(one_node_model(layer))
            feeds = _feeds(model)
            sess = make_session(model, threads=args.threads)
            ref = [np.array(o, copy=True) for o in sess.run(None, feeds)]
            ort_ms = _median_ms(lambda: sess.run(None, feeds), args.runs)
            mod = import_to_relax(model)
            sculpt_run = _tvm_runner(build(mod, "llvm", kernels="sculpt"), feeds, model.input_names)
            sculpt_ms = _median_ms(sculpt_run, args.runs)
            got = _outputs(sculpt_run())
            err = max(float(np.abs(g - r).max()) / (float(np.abs(r).max()) or 1.0) for g, r in zip(got, ref))
            default_ms = float("nan")
            if not args.skip_default:
                default_run = _tvm_runner(build(mod, "llvm", kernels="default"), feeds, model.input_names)
                default_ms = _median_ms(default_run, max(3, args.runs // 4), warmup=1, budget_s=5.0)
            gflops = lambda ms: 2 * layer.macs / (ms * 1e6)  # noqa: E731
            ratios.append(sculpt_ms / ort_ms)
            print(f"{kind:12} {layer.describe()[:42]:42} {layer.macs / 1e6:8.2f} {ort_ms:8.3f} {default_ms:9.3f} "
                  f"{sculpt_ms:9.3f} {gflops(ort_ms):8.1f} {gflops(sculpt_ms):8.1f} {sculpt_ms / ort_ms:7.2f} "
                  f"{default_ms / sculpt_ms:8.1f} {err:11.2e}", flush=True)
    if ratios:
        geo = float(np.exp(np.mean(np.log(ratios))))
        print(f"\n{len(ratios)} layers: sculpt / onnxruntime latency, geometric mean {geo:.2f} "
              f"(median {statistics.median(ratios):.2f})")
    return 0


def _text_feeds(kind: str) -> dict:
    """Real inputs: rendered text lines (sculpt.textdata), preprocessed as PP-OCR does; det sees a
    page of four lines (its outputs on noise are ~1e-5, where relative errors mean nothing)."""
    from sculpt import ocr_task
    from sculpt.models import PPOCR_SHAPES
    from sculpt.textdata import text_lines

    lines = [img for img, _ in text_lines(4, seed=11)]
    if kind == "rec":
        return {"x": ocr_task.rec_preprocess(lines[0])}
    if kind == "cls":
        return {"x": ocr_task.cls_preprocess(lines[0])}
    width = max(img.shape[1] for img in lines)
    page = np.concatenate([np.pad(img, ((4, 4), (0, width - img.shape[1]), (0, 0)), constant_values=255)
                           for img in lines])
    h, w = PPOCR_SHAPES["det"][2:]
    return {"x": ocr_task.resize_norm(np.ascontiguousarray(page), h, w)}


def _reference(kind: str, args):
    """(canonical model, its inputs, an onnxruntime session, onnxruntime's outputs) of one zoo model."""
    from sculpt.ir.model import Model
    from sculpt.runtime import make_session

    model = Model.load(_canonical_model_path(kind, args))
    feeds = _text_feeds(kind) if kind in PPOCR else _feeds(model)
    sess = make_session(model, threads=args.threads)
    return model, feeds, sess, [np.array(o, copy=True) for o in sess.run(None, feeds)]


def _max_rel_error(got, ref) -> float:
    return max(float(np.abs(g - r).max()) / (float(np.abs(r).max()) or 1.0) for g, r in zip(got, ref))


def _idle_and_busy_rounds(runners: dict, rounds: int, load: int, runs: int) -> dict[str, list[float]]:
    """Median ms of each runner per round, idle and with ``load`` spinning processes: ``{"<name> idle":
    [...], "<name> busy": [...]}``. The runners take turns going first (reversed every other round): the
    kernel's placement of the busy processes changes within a round, and each runner meets it early and
    late alike."""
    from sculpt.backends.tvm.bench import RUNTIME_SETTLE_S

    times = {f"{who} {state}": [] for who in runners for state in ("idle", "busy")}
    for round_ in range(rounds):
        order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
        for state in ("idle", "busy"):
            with busy_processes(load if state == "busy" else 0):
                time.sleep(LOAD_RAMP_S if state == "busy" else RUNTIME_SETTLE_S)
                for i, who in enumerate(order):
                    if i:
                        time.sleep(RUNTIME_SETTLE_S)  # the last runtime's threads may still spin
                    times[f"{who} {state}"].append(_median_ms(runners[who], runs, budget_s=10))
    return times


def _paired_slowdown_ratio(times: dict[str, list[float]], who: str, level: float = 0.9,
                           draws: int = 2000) -> tuple[float, float, float]:
    """Per round, ``who``'s slowdown (busy / idle) over onnxruntime's in the same round: the median over the
    rounds and a ``level`` bootstrap interval of that median (rounds resampled with replacement, fixed
    seed). A model's busy times can fall in two groups by where the kernel puts the busy processes; the
    interval says whether a difference in the medians stands out of the rounds' spread."""
    q = (np.asarray(times[f"{who} busy"]) / np.asarray(times[f"{who} idle"])
         / (np.asarray(times["ort busy"]) / np.asarray(times["ort idle"])))
    medians = np.median(np.random.default_rng(0).choice(q, size=(draws, q.size), replace=True), axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(np.median(q)), float(low), float(high)


def bench_under_load(args) -> int:
    """Each model idle and with ``args.compare_load`` spinning processes, in alternating rounds of one
    process: onnxruntime's and sculpt's slowdowns under the same load, from the same builds. With
    ``--compare-pools`` each build runs on TVM's pool and on sculpt's (policy stealing) in the same rounds."""
    from sculpt.backends.tvm import build, import_to_relax

    policies = [args.thread_policy]
    if args.compare_pools:
        policies = ["shared" if args.thread_policy == "stealing" else args.thread_policy, "stealing"]
    head = f"{'model':18} {'ort idle':>9} {'ort busy':>9} {'ort x':>6}"
    for policy in policies:
        head += (f" | {policy + ' idle':>14} {'busy':>8} {'x':>5} {'/ort idle':>9} {'/ort busy':>9} "
                 f"{'x/ort x per round [90%]':>23}")
    print(f"{head} {'max rel err':>11}   ({args.threads or 'all'} thread(s), {args.compare_load} busy processes "
          "when busy; TVM builds with sculpt's kernels on each thread policy)")
    slowdowns = {policy: [] for policy in policies}
    for kind in args.models:
        model, feeds, sess, ref = _reference(kind, args)
        executable = build(import_to_relax(model), "llvm", kernels="sculpt")
        runs = {policy: _tvm_runner(executable, feeds, model.input_names, policy) for policy in policies}
        err = max(_max_rel_error(_outputs(run()), ref) for run in runs.values())
        times = _idle_and_busy_rounds({"ort": lambda: sess.run(None, feeds), **runs}, args.rounds,
                                      args.compare_load, args.runs)
        err = max([err] + [_max_rel_error(_outputs(run()), ref) for run in runs.values()])
        m = {key: statistics.median(v) for key, v in times.items()}
        ort_x = m["ort busy"] / m["ort idle"]
        line = f"{kind:18} {m['ort idle']:9.2f} {m['ort busy']:9.2f} {ort_x:6.2f}"
        for policy in policies:
            idle, busy = m[f"{policy} idle"], m[f"{policy} busy"]
            paired, low, high = _paired_slowdown_ratio(times, policy)
            slowdowns[policy].append((kind, ort_x, busy / idle, low))
            line += (f" | {idle:14.2f} {busy:8.2f} {busy / idle:5.2f} {idle / m['ort idle']:9.2f} "
                     f"{busy / m['ort busy']:9.2f} {paired:9.2f} [{low:4.2f},{high:4.2f}]")
        print(f"{line} {err:11.2e}", flush=True)
    for policy, rows in slowdowns.items():
        if rows:
            worse = [k for k, o, t, _ in rows if t > o]
            beyond = [k for k, _, _, low in rows if low > 1.0]
            geo = float(np.exp(np.mean([np.log(t / o) for _, o, t, _ in rows])))
            print(f"\n{len(rows)} models, {policy} pool: sculpt's slowdown / onnxruntime's, geometric mean {geo:.2f}; "
                  f"sculpt degraded more than onnxruntime on {len(worse)}" + (f" ({', '.join(worse)})" if worse else "")
                  + f"; beyond the rounds' spread (the per-round ratio's 90% interval above 1) on {len(beyond)}"
                  + (f" ({', '.join(beyond)})" if beyond else ""))
    return 0


def bench_end_to_end(args) -> int:
    from sculpt.backends.tvm import build, import_to_relax
    from sculpt.backends.tvm.bench import RUNTIME_SETTLE_S

    ratios = []
    print(f"{'model':12} {'ort ms':>8} {'tvm default ms':>14} {'tvm sculpt ms':>13} {'sculpt/ort':>10} "
          f"{'default/ort':>11} {'compile s (def/scl)':>19} {'max abs err':>11} {'max rel err':>11}"
          + (f" {'search s':>8}" if args.search else ""))
    for kind in args.models:
        model, feeds, sess, ref = _reference(kind, args)
        mod = import_to_relax(model)
        search_s = 0.0
        if args.search:
            import tvm

            from sculpt.backends.tvm.kernels import host_target
            from sculpt.backends.tvm.kernels.tile_search import timed_search

            _, search_s = timed_search(mod, tvm.target.Target(host_target("llvm")), candidates=args.search)
        t = time.perf_counter()
        sculpt_exe = build(mod, "llvm", kernels="sculpt")
        sculpt_compile = time.perf_counter() - t
        sculpt_run = _tvm_runner(sculpt_exe, feeds, model.input_names)
        got = _outputs(sculpt_run())
        err = _max_rel_error(got, ref)
        abs_err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        default_ms, default_compile = float("nan"), float("nan")
        if not args.skip_default:
            t = time.perf_counter()
            default_run = _tvm_runner(build(mod, "llvm", kernels="default"), feeds, model.input_names)
            default_compile = time.perf_counter() - t
        # interleave the measurements so that load changes on a shared machine hit all three alike
        ort_t, sculpt_t, default_t = [], [], []
        for _ in range(args.rounds):
            time.sleep(RUNTIME_SETTLE_S)
            ort_t.append(_median_ms(lambda: sess.run(None, feeds), args.runs, budget_s=10))
            time.sleep(RUNTIME_SETTLE_S)  # onnxruntime's threads still spin after its runs
            sculpt_t.append(_median_ms(sculpt_run, args.runs, budget_s=10))
            if not args.skip_default:
                default_t.append(_median_ms(default_run, 3, warmup=1, budget_s=5))
        ort_ms, sculpt_ms = statistics.median(ort_t), statistics.median(sculpt_t)
        # again after the timed runs: a kernel that leaves part of its output to whatever memory held
        # is right on the first run only
        later = _outputs(sculpt_run())
        err = max(err, _max_rel_error(later, ref))
        abs_err = max([abs_err] + [float(np.abs(g - r).max()) for g, r in zip(later, ref)])
        if default_t:
            default_ms = statistics.median(default_t)
        ratios.append(sculpt_ms / ort_ms)
        print(f"{kind:12} {ort_ms:8.2f} {default_ms:14.2f} {sculpt_ms:13.2f} {sculpt_ms / ort_ms:10.2f} "
              f"{default_ms / ort_ms:11.2f} {default_compile:9.1f}/{sculpt_compile:<9.1f} {abs_err:11.2e} {err:11.2e}"
              + (f" {search_s:8.1f}" if args.search else ""), flush=True)
    if ratios:
        geo = float(np.exp(np.mean(np.log(ratios))))
        print(f"\n{len(ratios)} models, {args.threads or 'all'} thread(s), {args.load} busy process(es): "
              f"sculpt / onnxruntime latency, geometric mean {geo:.2f}, worst {max(ratios):.2f}")
    return 0


PPOCR = ("det", "rec", "cls")
LIGHT = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet", "vgg19",
         "zfnet512", "bvlc_alexnet")


def zoo_names() -> list[str]:
    """Every model the benchmark knows: PP-OCR, the onnx wheel's light models, the wheel zoo (tools/zoo.py)."""
    return list(PPOCR) + list(LIGHT) + _wheel_zoo_names()


def _wheel_zoo():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sculpt_tools_zoo", Path(__file__).with_name("zoo.py"))
    if spec is None or not Path(spec.origin).is_file():
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel_zoo_names() -> list[str]:
    zoo = _wheel_zoo()
    return list(zoo.zoo_names()) if zoo else []


def _source_model(kind: str):
    """(sculpt Model, static input shapes) of a zoo model."""
    from sculpt.ir.model import Model
    from sculpt.models import PPOCR_SHAPES, light_model, ppocr_model

    if kind in PPOCR:
        return ppocr_model(kind), {"x": PPOCR_SHAPES[kind]}
    if kind in LIGHT:  # seeded weights: as shipped every weight is 0.02 and the errors measured nothing
        return light_model(kind), None
    zoo = _wheel_zoo()
    entry = zoo.ZOO[kind]
    return Model.load(zoo.fetch(kind)), {entry.input_name: list(entry.input_shape)}


def _canonical_model_path(kind: str, args) -> str:
    """The canonicalized zoo model at its static shape (made once per run, in a temp folder)."""
    import tempfile
    from pathlib import Path

    from sculpt.passes import Pipeline

    if not hasattr(args, "_tmp"):
        args._tmp = Path(tempfile.mkdtemp(prefix="sculpt-kernel-bench-"))
    path = args._tmp / f"{kind}.onnx"
    if not path.exists():
        model, shapes = _source_model(kind)
        res = Pipeline.from_specs(["canonicalize"], input_shapes=shapes).run(model)
        res.model.save(path)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="det,rec,cls",
                   help="comma-separated zoo models (PP-OCR det, rec, cls; the onnx wheel's light models: "
                        f"{', '.join(LIGHT)}; the wheel zoo of tools/zoo.py), or 'zoo' for all")
    p.add_argument("--end-to-end", action="store_true", help="whole models instead of layers")
    p.add_argument("--top", type=int, default=0, help="only the N heaviest distinct layers per model")
    p.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="end to end: interleaved rounds (median of medians)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--search", type=int, default=0, metavar="N",
                   help="end to end: first time the N best tiles of every kernel and cache the fastest "
                        "(~/.cache/sculpt/kernel_tiles.json; later builds use it)")
    p.add_argument("--skip-default", action="store_true", help="skip TVM's default build (slow: naive loops)")
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                   help="wall: elapsed time (default); cpu: the calling thread's CPU time, with --threads 1 "
                        "only (both runtimes run one thread's work in the caller: time other jobs take is not counted)")
    p.add_argument("--pause-ms", type=float, default=0.0,
                   help="end to end: sleep this long before each timed run, not counted (one inference per "
                        "camera frame: 33); both runtimes alike")
    p.add_argument("--conv-lanes", choices=["auto", "default", "wide"], default="auto",
                   help="channel blocks of the convs: auto (lane_policy decides per model), default (the target's "
                        "default vectors), wide (its widest: AVX-512's 16 lanes) for every model")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="keep N other processes busy (spinning) while measuring: a device whose cores other apps use")
    p.add_argument("--compare-load", type=int, default=0, metavar="N",
                   help="end to end: measure every model idle and with N spinning processes, in alternating "
                        "rounds of this one process, and print both runtimes' slowdowns")
    p.add_argument("--thread-policy", choices=["stealing", "shared", "dedicated"], default="stealing",
                   help="the TVM build's thread pool (sculpt.backends.tvm.thread_policy; default stealing)")
    p.add_argument("--compare-pools", action="store_true",
                   help="with --compare-load: each build on TVM's pool (shared, or dedicated if given) and on "
                        "sculpt's (stealing), in the same rounds")
    args = p.parse_args(argv)
    known = zoo_names()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.models == ["zoo"]:
        args.models = known
    bad = [m for m in args.models if m not in known]
    if bad:
        print(f"kernel_benchmark: error: unknown model(s) {', '.join(bad)} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.threads != 1:
        print("kernel_benchmark: error: --clock cpu needs --threads 1 (other threads' CPU time is not the "
              "caller's)", file=sys.stderr)
        return 2
    global _clock, _policy, _pause_s
    _clock, _policy, _pause_s = CLOCK[args.clock], args.thread_policy, max(0.0, args.pause_ms) / 1e3
    from sculpt.backends.tvm import thread_policy
    from sculpt.backends.tvm.kernels import lane_policy

    # the policy's threshold moved to always (0) or never (above 1) widen
    lane_policy.WIDE_SHARE = {"auto": lane_policy.WIDE_SHARE, "default": 2.0, "wide": 0.0}[args.conv_lanes]
    thread_policy.apply(args.thread_policy, args.threads)  # before TVM's pool starts
    if args.compare_pools and not args.compare_load:
        print("kernel_benchmark: error: --compare-pools needs --compare-load", file=sys.stderr)
        return 2
    if args.compare_load:
        if args.load or not args.end_to_end:
            print("kernel_benchmark: error: --compare-load needs --end-to-end and no --load", file=sys.stderr)
            return 2
        return bench_under_load(args)
    with busy_processes(args.load):
        return bench_end_to_end(args) if args.end_to_end else bench_layers(args)


LOAD_RAMP_S = 0.5  # after starting the spinning processes, before measuring


# spins until its parent is gone: a benchmark killed by a signal (timeout's SIGTERM skips the `with`
# block's exit) leaves no spinner behind to load the machine for what runs next
_SPINNER = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(200000):
        pass
"""


class busy_processes:
    """``n`` processes spinning on the CPU for the duration of a ``with`` block (killed at its end)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess

        import os

        self.procs = [subprocess.Popen([sys.executable, "-c", _SPINNER, str(os.getpid())]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()
        return False


if __name__ == "__main__":
    sys.exit(main())
