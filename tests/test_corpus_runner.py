"""tools/corpus_runner.py on a handful of small models: outcomes make sense, the JSON has one entry
per (model, pass), and a hanging or crashing pass cannot stop the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.host_cpu import fused_int8_saturates

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tools" / "corpus_runner.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("corpus_runner", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["corpus_runner"] = mod
    spec.loader.exec_module(mod)
    return mod


cr = _load_runner()


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _save(proto, path: Path) -> str:
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())
    return str(path)


def conv_bn_identity_model(path: Path) -> str:
    """Conv → BatchNormalization → Identity → Relu: fold-batchnorm and remove-identity both apply."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Identity", ["n"], ["i"], name="id"),
             helper.make_node("Relu", ["i"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "cbi", [_f32("x", [1, 3, 8, 8])], [_f32("y", [1, 4, 8, 8])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def identity_chain_model(path: Path) -> str:
    """Identity → Relu → Identity: removing the Identities changes nothing, bit for bit."""
    nodes = [helper.make_node("Identity", ["x"], ["a"], name="id1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["b"], ["y"], name="id2")]
    graph = helper.make_graph(nodes, "ids", [_f32("x", [2, 5])], [_f32("y", [2, 5])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def unknown_op_model(path: Path) -> str:
    """A custom-domain op no runtime here knows, between two Relus."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("Frobnicate", ["a"], ["b"], name="custom", domain="com.example"),
             helper.make_node("Relu", ["b"], ["y"], name="r2")]
    graph = helper.make_graph(nodes, "unknown", [_f32("x", [1, 4])], [_f32("y", [1, 4])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                         helper.make_opsetid("com.example", 1)]), path)


MODELS = ["simple/test_single_relu_model", "pytorch-converted/test_Conv2d", "pytorch-operator/test_operator_concat2"]
PASSES = ["canonicalize", "remove-identity", "fold-batchnorm", "constant-folding", "channel-pruning"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    extra = [conv_bn_identity_model(tmp / "conv_bn_identity.onnx"), identity_chain_model(tmp / "identity_chain.onnx"),
             unknown_op_model(tmp / "unknown_op.onnx")]
    out = tmp / "results.json"
    args = [sys.executable, str(RUNNER), "--passes", ",".join(PASSES), "--timeout-per-case", "120", "--jobs", "2",
            "--json", str(out)]
    for m in MODELS:
        args += ["--models", m]
    for e in extra:
        args += ["--extra", e, "--models", f"file/{Path(e).stem}"]
    start = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp)
    seconds = time.perf_counter() - start
    return p, json.loads(out.read_text()), seconds


def _result(doc, model, pass_name):
    [r] = [r for r in doc["results"] if r["model"] == model and r["pass"] == pass_name]
    return r


def test_one_entry_per_model_and_pass(corpus):
    p, doc, _ = corpus
    models = MODELS + ["file/conv_bn_identity", "file/identity_chain", "file/unknown_op"]
    assert sorted(doc["models"]) == sorted(models)
    keys = [(r["model"], r["pass"]) for r in doc["results"]]
    assert len(keys) == len(set(keys)) == len(models) * len(PASSES)
    assert set(keys) == {(m, q) for m in models for q in PASSES}
    for r in doc["results"]:
        assert r["outcome"] in ("applied", "skipped", "failed")
        assert r["outcome"] == "applied" or r.get("reason"), r
    counts = {q: sum(doc["summary"][q][k] for k in ("applied", "skipped", "failed")) for q in PASSES}
    assert counts == {q: len(models) for q in PASSES}


def test_the_run_is_green_and_prints_the_table(corpus):
    p, doc, _ = corpus
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| pass (6 models) | applied |" in p.stdout
    for q in PASSES:
        assert f"| `{q}` |" in p.stdout
    assert not [r for r in doc["results"] if r["outcome"] == "failed"]


def test_exact_passes_on_a_simple_model_are_exact(corpus):
    _, doc, _ = corpus
    r = _result(doc, "file/identity_chain", "canonicalize")
    assert r["outcome"] == "applied" and r["changed"] and r["modified"] and r["input"] == "raw"
    assert r["max_abs"] == 0.0 and r["max_rel"] == 0.0 and r["runtime"] == "onnxruntime"
    r = _result(doc, "file/conv_bn_identity", "canonicalize")
    assert r["outcome"] == "applied" and r["changed"] and r["input"] == "raw"
    assert r["max_rel"] <= 1e-5 and r["samples"] == cr.RANDOM_SAMPLES
    # the other passes ran on the canonical form, where the BatchNorm is already folded
    r = _result(doc, "file/conv_bn_identity", "fold-batchnorm")
    assert r["input"] == "canonicalized" and r["outcome"] == "applied" and not r["changed"]
    r = _result(doc, "simple/test_single_relu_model", "constant-folding")
    assert r["outcome"] == "applied" and r["max_abs"] == 0.0


def test_unknown_op_is_skipped_or_left_unchanged(corpus):
    _, doc, _ = corpus
    for q in PASSES:
        r = _result(doc, "file/unknown_op", q)
        assert r["outcome"] == "skipped" or (r["outcome"] == "applied" and not r["changed"]), r


def test_lossy_pass_gets_calibration_and_its_error_is_measured(corpus):
    _, doc, _ = corpus
    r = _result(doc, "pytorch-converted/test_Conv2d", "channel-pruning")
    assert r["exact"] is False and r["outcome"] in ("applied", "skipped")
    assert r["options"] == cr.RUNNER_OPTIONS["channel-pruning"]
    if r["outcome"] == "applied":
        assert r["calibration"] == f"random:{cr.CALIBRATION_SAMPLES}"
        assert isinstance(r["max_rel"], float)


def test_fast(corpus):
    # about 15 s on an idle 2-core machine; the bound leaves room for a loaded CI machine
    assert corpus[2] < 120, f"the small corpus took {corpus[2]:.0f} s"


# ------------------------------------------------------------------ a hang or a crash is one failed case
def _bad_pass(kind: str):
    from sculpt.passes.base import Pass, PassResult

    @dataclass
    class Bad(Pass):
        """Test pass that misbehaves."""

        name = f"test-{kind}"
        exact = True

        def run(self, model, ctx):
            if kind == "hang":
                time.sleep(3600)
            if kind == "crash":
                os.abort()
            if kind == "bug":
                raise KeyError("an internal bug")
            if kind == "inexact":
                w = model.graph.initializer[0]
                a = numpy_helper.to_array(w) * 2
                w.CopyFrom(numpy_helper.from_array(a, w.name))
                return PassResult(model, True, {})
            if kind == "silent":  # lossy, claims it changed nothing, but did
                w = model.graph.initializer[0]
                w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1, w.name))
                return PassResult(model, False, {})
            if kind == "invalid":
                model.graph.node[0].input[0] = "nowhere"
                return PassResult(model, True, {})
            return PassResult(model, False, {})

    if kind == "silent":
        Bad.exact = False
    return Bad


def test_hangs_crashes_and_broken_passes_are_failed_cases(register_pass, tmp_path):
    kinds = ["hang", "crash", "bug", "inexact", "silent", "invalid"]
    for k in kinds:
        register_pass(_bad_pass(k))
    model = cr.CorpusModel("file/cbi", conv_bn_identity_model(tmp_path / "cbi.onnx"))
    start = time.perf_counter()
    results = cr.run_corpus([model], ["canonicalize"] + [f"test-{k}" for k in kinds], timeout=8, jobs=2)
    assert time.perf_counter() - start < 40
    by = {r["pass"]: r for r in results}
    assert by["canonicalize"]["outcome"] == "applied"
    assert {k: by[f"test-{k}"]["outcome"] for k in kinds} == {k: "failed" for k in kinds}, by
    assert "timeout" in by["test-hang"]["reason"]
    assert "crashed" in by["test-crash"]["reason"]
    assert "KeyError" in by["test-bug"]["reason"]
    assert by["test-inexact"]["reason"].startswith("MISMATCH")
    assert "no change" in by["test-silent"]["reason"]
    assert "invalid output model" in by["test-invalid"]["reason"]
    summary = cr.summarize(results, list(by))
    assert summary["test-inexact"]["mismatch"] == 1 and summary["canonicalize"]["applied"] == 1
    assert "| `test-hang` | 0 | 0 | 0 | 1 | 0 |" in cr.markdown_table(summary, 1)


def test_an_output_raised_to_an_opset_onnxruntime_runs_is_checked_across_runtimes(tmp_path):
    """pytorch-converted/test_Linear is opset 6: onnxruntime cannot run it, onnx's reference evaluator
    can. qdq raises it to opset 13, which the reference evaluator cannot run (DequantizeLinear-13) but
    onnxruntime can: the output is then measured in onnxruntime against the reference's outputs of
    the input, not reported as a failure of the pass."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(RUNNER), "--passes", "qdq", "--models", "pytorch-converted/test_Linear",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    r = _result(json.loads(out.read_text()), "pytorch-converted/test_Linear", "qdq")
    assert r["outcome"] == "applied" and r["modified"], r
    assert r["runtime"] == "onnx-reference → onnxruntime"
    # int8: a small, measured error (in onnxruntime: on x86 without VNNI its fused kernels saturate the
    # pair sums of 8-bit weights, test_qdq.test_seven_bit_weights_keep_onnxruntimes_avx2_int8_kernels_exact)
    assert 0 < r["max_rel"] < (0.5 if fused_int8_saturates() else 0.1)
