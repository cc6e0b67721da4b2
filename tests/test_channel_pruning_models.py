"""The done-criterion of channel pruning (issue 4) on real models:

    sculpt run MODEL --pass canonicalize --pass channel-pruning:ratio=0.3 --calibration ...

gives a valid model (full checker on the saved file) that onnxruntime runs, with MACs reduced by 30%
± 5 points, and no channel group left inconsistent: the channel graph rebuilt on the pruned model
has every index map between dimensions of matching sizes, and the shapes the model declares are the
shapes onnxruntime computes. PP-OCRv4 det/rec/cls are calibrated on rendered text, the onnx wheel's
light models on random inputs. The big ones are marked slow (`pytest -m slow`)."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import json
import time

import numpy as np
import onnx
import pytest

from sculpt.runtime import make_session
from sculpt.cli import main
from sculpt.ir.channels import ChannelGraph
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, backend_test_data_dir, ppocr_model_path
from sculpt.passes import Pipeline
from sculpt.textdata import text_input

RATIO = 0.3
TOLERANCE = 0.05
CALIBRATION = 8

# seconds each model took here (2 cores, other work running): over ~20 s is marked slow
CLI_SECONDS = {"cls": 9, "shufflenet": 8, "squeezenet": 27, "rec": 100, "det": 60, "inception_v1": 100,
               "resnet50": 490, "densenet121": 190}
MECHANISM_SECONDS = {"cls": 3, "shufflenet": 4, "squeezenet": 3, "inception_v1": 8, "det": 10, "rec": 21,
                     "resnet50": 35, "densenet121": 60}
MODELS = list(CLI_SECONDS)


def _params(seconds, limit=8):
    return [pytest.param(n, marks=() if seconds[n] <= limit else pytest.mark.slow, id=n) for n in MODELS]


def _source(name):
    if name in PPOCR_SHAPES:
        return ppocr_model_path(name), {"x": PPOCR_SHAPES[name]}
    return backend_test_data_dir() / "light" / f"light_{name}.onnx", None


def _samples(name, model: Model, count, seed=0):
    """Rendered text for the PP-OCR models, N(0, 1) noise for the others."""
    if name in PPOCR_SHAPES:
        return [{"x": text_input(PPOCR_SHAPES[name], seed + k)} for k in range(count)]
    from sculpt.runtime import random_inputs

    return [random_inputs(model, seed=seed + k) for k in range(count)]


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def assert_groups_consistent(model: Model):
    """Rebuild the channel graph on ``model``: every index map joins dimensions of fitting sizes
    (eq: equal; slice: the part inside the whole, and the parts of a Concat/Split tile it exactly;
    repeat/stride/period: whole multiples), and every shape the model declares is the one onnxruntime
    computes."""
    work = model.clone()
    cg = ChannelGraph.build(work)  # raises InvalidModelError on an eq or repeat between unequal sizes
    parts: dict = {}
    for a, b, kind, args, op in cg._edges:
        sa, sb = cg.sizes[a], cg.sizes[b]
        if kind == "eq":
            assert sa == sb, (op, str(a), sa, str(b), sb)
        elif kind == "slice":
            assert 0 <= args[0] and args[0] + sb <= sa, (op, str(a), sa, args, str(b), sb)
            parts.setdefault((op, a), []).append((args[0], sb))
        elif kind == "repeat":
            assert sa * args[0] == sb, (op, str(a), sa, args, str(b), sb)
        elif kind == "stride":
            assert sb % (sa * args[0]) == 0, (op, str(a), sa, args, str(b), sb)
        elif kind == "period":
            assert sa % args[0] == 0, (op, str(a), sa, args)
    nodes = {n.name: n for n in work.graph.node}
    for (op, whole), spans in parts.items():
        if nodes[op].op_type in ("Concat", "Split"):
            spans.sort()
            assert spans[0][0] == 0 and all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(spans, spans[1:])), (op, spans)
            assert spans[-1][0] + spans[-1][1] == cg.sizes[whole], (op, spans, cg.sizes[whole])
    # declared shapes against the shapes onnxruntime computes
    names = sorted(t for t in cg.shapes if t not in cg.constants and t not in work.input_names)
    sess = make_session(work, optimize=False, extra_outputs=names)
    from sculpt.runtime import random_inputs

    values = sess.run(names, random_inputs(work, seed=0))
    wrong = [(t, cg.shapes[t], v.shape) for t, v in zip(names, values) if tuple(v.shape) != tuple(cg.shapes[t])]
    assert not wrong, wrong[:5]
    return cg


@functools.lru_cache(maxsize=2)
def _canonical(name) -> Model:
    src, shapes = _source(name)
    return Pipeline.from_specs(["canonicalize"], input_shapes=shapes, statistics=False).run(Model.load(src)).model


@pytest.mark.parametrize("name", _params(CLI_SECONDS, limit=10))
def test_channel_pruning_ratio_03(name, tmp_path):
    start = time.perf_counter()
    src, shapes = _source(name)
    original = Model.load(src)
    if name in PPOCR_SHAPES:
        cal = tmp_path / "calibration.npz"
        np.savez(cal, x=np.concatenate([s["x"] for s in _samples(name, original, CALIBRATION)]))
        cal_arg = str(cal)
    else:
        cal_arg = f"random:{CALIBRATION}"
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    args = ["run", src, "--pass", "canonicalize", "--pass", f"channel-pruning:ratio={RATIO}",
            "--calibration", cal_arg, "-o", out, "--report", report]
    if shapes:
        args += ["--input-shape", "x=" + ",".join(map(str, shapes["x"]))]
    rc, stdout, stderr = _cli(*args)
    assert rc == 0, stdout + stderr
    seconds = time.perf_counter() - start

    # valid: the full checker on the saved file, and sculpt's own invariants
    onnx.checker.check_model(str(out), full_check=True)
    pruned = Model.load(out)
    pruned.verify()

    # MACs reduced by the requested fraction, against the canonical model (what the pass received)
    canonical = _canonical(name)
    before, after = cost_of(canonical).macs, cost_of(pruned).macs
    reduction = 1 - after / before
    stats = json.loads(report.read_text())
    print(f"\n{name}: MACs {before} → {after} ({reduction:.1%} fewer), {seconds:.1f} s")
    assert abs(reduction - RATIO) <= TOLERANCE, (reduction, stats)
    assert not cost_of(pruned).unknown_macs

    # no group left inconsistent
    cg = assert_groups_consistent(pruned)
    assert sum(g.size for g in cg.groups if g.sources) < sum(
        g.size for g in ChannelGraph.build(canonical.clone()).groups if g.sources)

    # onnxruntime runs it on real inputs: same output names and shapes, finite values
    feeds = _samples(name, pruned, 2, seed=100)
    ref_sess, sess = make_session(canonical), make_session(pruned)
    for f in feeds:
        ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, f)))
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f)))
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].shape == ref[k].shape and np.isfinite(got[k]).all(), k


def _l2_order(cg: ChannelGraph, g) -> list[int]:
    """The prunable units of a group, smallest L2 norm of their source filters first."""
    score = dict.fromkeys(g.prunable_units, 0.0)
    for s in g.sources:
        node = cg.model.node_by_name(s.node)
        w = cg.model.get_constant(node.input[1]).astype(np.float64)
        if node.op_type == "Conv":
            rows = w.reshape(w.shape[0], -1)
        elif node.op_type == "ConvTranspose":
            rows = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            rows = w
        else:
            rows = w.T
        norms = np.sqrt((rows ** 2).sum(1))
        for ch, u in enumerate(cg.unit_labels(s.dim).tolist()):
            if u in score:
                score[u] += norms[ch]
    return sorted(score, key=lambda u: (score[u], u))


@pytest.mark.parametrize("name", _params(MECHANISM_SECONDS, limit=8))
def test_mechanism_removes_30_percent_of_the_macs(name, tmp_path):
    """The mechanism alone, independent of the pass's policy: the same fraction of every prunable
    group (smallest L2 first, kept feasible with ChannelGraph.feasible), bisected to 30% fewer MACs,
    removed with ChannelGraph.remove_units. The result is valid, runs, and its groups are consistent;
    this also covers the Concat-heavy models (squeezenet, inception, densenet)."""
    canonical = _canonical(name)
    base = cost_of(canonical).macs
    cg = ChannelGraph.build(canonical.clone())
    order = {g.id: _l2_order(cg, g) for g in cg.prunable_groups()}

    def plan(f):
        units = []
        for g in cg.prunable_groups():
            n = min(int(math.floor(f * g.size)), len(order[g.id]), max(0, g.size - 4))
            units += order[g.id][:n]
        return cg.feasible(units, min_keep=4)

    def prune(units):
        trial = canonical.clone()
        ChannelGraph.build(trial).remove_units(units)
        return trial

    lo, hi, best = 0.0, 0.9, None
    for _ in range(10):
        mid = (lo + hi) / 2
        trial = prune(plan(mid))
        red = 1 - cost_of(trial).macs / base
        if best is None or abs(red - RATIO) < abs(best[0] - RATIO):
            best = (red, mid, trial)
        if abs(red - RATIO) < 0.01:
            break
        lo, hi = (mid, hi) if red < RATIO else (lo, mid)
    reduction, level, pruned = best
    print(f"\n{name}: mechanism at level {level:.3f}: {reduction:.1%} fewer MACs")
    assert abs(reduction - RATIO) <= TOLERANCE, reduction
    path = tmp_path / "pruned.onnx"
    pruned.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    pruned.verify()
    assert_groups_consistent(pruned)
    sess = make_session(pruned)
    for f in _samples(name, pruned, 1, seed=7):
        assert all(np.isfinite(v).all() for v in sess.run(None, f))
