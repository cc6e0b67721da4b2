"""LSTM, GRU and RNN in the TVM backend: unrolled over their static sequence length before TVM's
importer, or (LSTM and GRU, the default) as a TIR loop over time called from Relax
(sculpt.backends.tvm.recurrent_import, recurrent_loop), built for the host CPU with sculpt's kernels
(and for adreno, run on PoCL), and matched against onnxruntime; their MACs in the cost model; bench
without TVM.

The cases are the onnx wheel's backend node tests test_lstm_*, test_gru_*, test_simple_rnn_* and
test_rnn_* (models and expected outputs made by the onnx package's own case generators, with W, R, B
and P made initializers, as exported models have them), plus random configurations the node tests
do not cover (sequence_lens as a graph input, initial states with peepholes and clip, other
activations, GRU's linear_before_reset, an old opset). The real CNN+LSTM recognizer (ddddocr's
captcha CRNN from tools/zoo.py) is compiled for the host and for arm64 (run under qemu) in slow tests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.tvm import recurrent_import
from sculpt.backends.tvm.recurrent_import import RECURRENT_MODES, RecurrentImportError, lower_recurrent, unroll_recurrent
from sculpt.backends.tvm.recurrent_loop import CONFIG_ATTR, LOOP_OP
from sculpt.backends.tvm.relax_import import TVMImportError, build, import_to_relax, run_relax
from sculpt.cli import main
from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model

CONSTANT_INPUTS = {1, 2, 3, 7}  # W, R, B, P
RTOL = 1e-4  # of each output's largest magnitude (float rounding of the reordered sums)


def _node_test_cases() -> list[tuple[onnx.NodeProto, list[np.ndarray], list[np.ndarray], str]]:
    """(node, inputs, expected outputs, name) of the onnx wheel's LSTM, GRU and RNN node tests."""
    from sculpt.models import recurrent_node_cases

    return recurrent_node_cases()


NODE_CASES = _node_test_cases()


def _as_model(node: onnx.NodeProto, inputs: list[np.ndarray], opset: int = 14) -> tuple[onnx.ModelProto, dict]:
    """The node in a model: W, R, B, P as initializers, the other inputs as graph inputs (and feeds)."""
    graph_inputs, initializers, feeds = [], [], {}
    present = [name for name in node.input if name]
    for name, value in zip(present, inputs):
        if list(node.input).index(name) in CONSTANT_INPUTS:
            initializers.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                              value.shape))
            feeds[name] = value
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output if o]
    graph = helper.make_graph([node], node.op_type.lower(), graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _unrolled(proto: onnx.ModelProto) -> Model:
    model = Model.load(proto)
    model.infer_shapes()
    assert unroll_recurrent(model) == 1
    assert not any(n.op_type in ("LSTM", "GRU", "RNN") for n in model.graph.node)
    model.infer_shapes()
    model.verify()
    return model


def _assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol: float = RTOL) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = max(float(np.abs(w).max()), 1e-3)
        assert float(np.abs(g - w).max()) <= rtol * scale, (float(np.abs(g - w).max()), scale)


@pytest.mark.parametrize("case", NODE_CASES, ids=[c[3] for c in NODE_CASES])
def test_node_tests_unrolled_match_and_build_for_the_host(case):
    node, inputs, expected, name = case
    proto, feeds = _as_model(node, inputs)
    unrolled = _unrolled(proto)
    got_ort = _session(unrolled.proto).run(None, feeds)
    _assert_close(got_ort, expected)
    if node.attribute and any(a.name == "layout" and a.i == 1 for a in node.attribute):
        reference = expected  # onnxruntime's CPU kernels refuse layout=1 (batch first)
    else:
        reference = _session(proto).run(None, feeds)
        _assert_close(reference, expected)
    order = [i.name for i in proto.graph.input]
    executable = build(import_to_relax(Model.load(proto)), "llvm", kernels="sculpt")
    _assert_close(run_relax(executable, feeds, order), reference)


def _random_case(op: str, *, hidden=5, inputs_size=4, steps=6, batch=3, direction="forward", bias=True,
                 initial=False, peepholes=False, seq_lens=None, opset=14, seed=0, **attrs):
    """A model with one random ``op`` node; ``seq_lens``: 'input' (a graph input) or 'constant'."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    names = ["X", "W", "R", "B" if bias else "", "seq" if seq_lens else "", "h0" if initial else ""]
    values = [rng.standard_normal((steps, batch, inputs_size)).astype(np.float32),
              (rng.standard_normal((dirs, gates * hidden, inputs_size)) * 0.5).astype(np.float32),
              (rng.standard_normal((dirs, gates * hidden, hidden)) * 0.5).astype(np.float32)]
    if bias:
        values.append((rng.standard_normal((dirs, 2 * gates * hidden)) * 0.3).astype(np.float32))
    lengths = np.array([steps, 2, steps - 1][:batch], np.int32)
    if seq_lens:
        values.append(lengths)
    if initial:
        values.append(rng.standard_normal((dirs, batch, hidden)).astype(np.float32))
    if op == "LSTM":
        names.append("c0" if initial else "")
        if initial:
            values.append(rng.standard_normal((dirs, batch, hidden)).astype(np.float32))
        names.append("P" if peepholes else "")
        if peepholes:
            values.append((rng.standard_normal((dirs, 3 * hidden)) * 0.5).astype(np.float32))
    while names and not names[-1]:
        names.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outputs, name=f"{op.lower()}_0", hidden_size=hidden, direction=direction,
                            **attrs)
    proto, feeds = _as_model(node, values, opset)
    if seq_lens == "constant":  # the lengths become an initializer
        proto.graph.initializer.append(numpy_helper.from_array(feeds.pop("seq"), "seq"))
        del proto.graph.input[[i.name for i in proto.graph.input].index("seq")]
    return proto, feeds


RANDOM_CASES = {
    "lstm_bidirectional_seq_lens_input_states_peepholes_clip": dict(
        op="LSTM", direction="bidirectional", seq_lens="input", initial=True, peepholes=True, clip=1.5),
    "lstm_reverse_input_forget_constant_seq_lens": dict(
        op="LSTM", direction="reverse", input_forget=1, seq_lens="constant", initial=True),
    "lstm_activations_opset9": dict(
        op="LSTM", opset=9, clip=2.0, activations=["HardSigmoid", "LeakyRelu", "Softsign"],
        activation_alpha=[0.3, 0.05], activation_beta=[0.4]),
    "gru_linear_before_reset_bidirectional_seq_lens_input": dict(
        op="GRU", direction="bidirectional", linear_before_reset=1, seq_lens="input", initial=True),
    "gru_reverse_states_no_bias": dict(op="GRU", direction="reverse", bias=False, initial=True, steps=1),
    "rnn_relu_bidirectional_constant_seq_lens": dict(
        op="RNN", direction="bidirectional", activations=["Relu", "Tanh"], seq_lens="constant", initial=True),
}


@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_random_configurations_match_onnxruntime(name):
    spec = dict(RANDOM_CASES[name])
    proto, feeds = _random_case(spec.pop("op"), **spec)
    reference = _session(proto).run(None, feeds)
    unrolled = _unrolled(proto)
    _assert_close(_session(unrolled.proto).run(None, feeds), reference)
    if "seq" in feeds:  # past a sequence's end its outputs are zeros and its state stays
        y = reference[0]
        assert np.all(y[2:, :, 1] == 0) and np.any(y[:2, :, 1] != 0)
    order = [i.name for i in proto.graph.input]
    executable = build(import_to_relax(Model.load(proto)), "llvm", kernels="sculpt")
    _assert_close(run_relax(executable, feeds, order), reference)


# ------------------------------------------------------------------------- LSTM: unrolled or a loop over time
LOOP_RTOL = 1e-5
LSTM_NODE_CASES = [c for c in NODE_CASES if c[0].op_type in ("LSTM", "GRU")]  # the ops with a loop form
LSTM_RANDOM_CASES = [name for name, spec in RANDOM_CASES.items() if spec["op"] in ("LSTM", "GRU")]


def _lstm_case(case) -> tuple[onnx.ModelProto, dict, list[np.ndarray]]:
    """(model, feeds, reference) of a node test or random case name; the reference is onnxruntime's
    (the node test's own expected outputs where onnxruntime refuses layout=1)."""
    if isinstance(case, str):
        spec = dict(RANDOM_CASES[case])
        proto, feeds = _random_case(spec.pop("op"), **spec)
        return proto, feeds, _session(proto).run(None, feeds)
    node, inputs, expected, _ = case
    proto, feeds = _as_model(node, inputs)
    if any(a.name == "layout" and a.i == 1 for a in node.attribute):
        return proto, feeds, expected
    return proto, feeds, _session(proto).run(None, feeds)


@pytest.mark.parametrize("mode", RECURRENT_MODES)
@pytest.mark.parametrize("case", LSTM_NODE_CASES + LSTM_RANDOM_CASES,
                         ids=[c[3] for c in LSTM_NODE_CASES] + LSTM_RANDOM_CASES)
def test_lstm_and_gru_unrolled_and_as_a_loop_match_onnxruntime_at_1e5(case, mode):
    proto, feeds, reference = _lstm_case(case)
    order = [i.name for i in proto.graph.input]
    executable = build(import_to_relax(Model.load(proto), recurrent=mode), "llvm", kernels="sculpt")
    _assert_close(run_relax(executable, feeds, order), reference, LOOP_RTOL)


def test_loop_mode_is_one_projection_matmul_and_one_loop_function():
    proto, _ = _random_case("LSTM", direction="bidirectional", steps=30, seq_lens="input", initial=True,
                            peepholes=True)
    model = Model.load(proto)
    model.infer_shapes()
    assert lower_recurrent(model, "loop") == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(LOOP_OP) == 1 and ops.count("MatMul") == 1 and "LSTM" not in ops
    assert len(ops) < 10  # projection, mask, loop: nothing per step
    mod = import_to_relax(Model.load(proto), recurrent="loop")
    loops = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and CONFIG_ATTR in f.attrs]
    assert loops == ["sculpt_lstm_loop"]
    # a GRU too (both forms of its candidate); RNN is unrolled in loop mode
    for before_reset in (0, 1):
        gru, _ = _random_case("GRU", steps=4, direction="bidirectional", linear_before_reset=before_reset)
        mod = import_to_relax(Model.load(gru), recurrent="loop")
        assert [gv.name_hint for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and CONFIG_ATTR in f.attrs] == ["sculpt_gru_loop"]
    rnn, _ = _random_case("RNN", steps=4)
    unrolled = Model.load(rnn)
    unrolled.infer_shapes()
    assert lower_recurrent(unrolled, "loop") == 1
    assert [n.op_type for n in unrolled.graph.node].count("MatMul") >= 4


def test_loop_is_the_default_and_an_unknown_mode_is_a_one_line_error():
    assert recurrent_import.DEFAULT_RECURRENT_MODE == "loop"
    proto, _ = _random_case("LSTM")
    with pytest.raises(RecurrentImportError, match=r"unknown recurrent mode 'scan' \(choose from unroll, loop\)"):
        import_to_relax(Model.load(proto), recurrent="scan")


def test_gpu_form_of_a_loop_too_large_for_shared_memory_is_a_one_line_error():
    from sculpt.backends.tvm.recurrent_loop import gpu_shared_bytes, replace_loops_for_gpu

    proto, _ = _random_case("LSTM", hidden=64, batch=2, steps=3)
    mod = import_to_relax(Model.load(proto), recurrent="loop")
    cfg_bytes = 4 * 2 * 6 * 64  # batch x (4H gates + H state + H cell) floats
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and CONFIG_ATTR in f.attrs]
    from sculpt.backends.tvm.recurrent_loop import LoopConfig

    assert gpu_shared_bytes(LoopConfig.from_json(str(func.attrs[CONFIG_ATTR]))) == cfg_bytes
    swapped, names = replace_loops_for_gpu(mod, 256, cfg_bytes)
    assert names == ["sculpt_lstm_loop"] and "shared" in swapped["sculpt_lstm_loop"].script()
    assert "shared" not in mod["sculpt_lstm_loop"].script()  # the input module is left as it was
    with pytest.raises(ValueError, match=rf"sculpt_lstm_loop: .* {cfg_bytes} bytes .* over the target's {cfg_bytes - 1}"):
        replace_loops_for_gpu(mod, 256, cfg_bytes - 1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyopencl") is None, reason="needs pyopencl and PoCL")
@pytest.mark.parametrize("name", ["lstm_bidirectional_seq_lens_input_states_peepholes_clip",
                                  "gru_linear_before_reset_bidirectional_seq_lens_input", "gru_reverse_states_no_bias"])
def test_loop_builds_for_adreno_and_matches_onnxruntime_on_pocl(tmp_path, monkeypatch, name):
    """The loop's GPU form: one work-group, state and gates in shared memory, barriers between phases."""
    from sculpt.backends.tvm.artifact import compile_artifact, load_artifact
    from sculpt.backends.tvm.deploy import verify_artifact

    monkeypatch.setattr(recurrent_import, "DEFAULT_RECURRENT_MODE", "loop")
    proto, feeds, _ = _lstm_case(name)
    path = tmp_path / "lstm.onnx"
    onnx.save(proto, path)
    library = tmp_path / "lstm_adreno.so"
    compile_artifact(path, "adreno", library)
    result = verify_artifact(load_artifact(library), path, feeds, rtol=LOOP_RTOL, timeout=600)
    assert result.ok, result.comparison.outputs


def test_non_constant_weights_are_a_one_line_error():
    proto, feeds = _random_case("GRU")
    weight = proto.graph.initializer[1]
    assert weight.name == "R"
    proto.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(weight.dims)))
    del proto.graph.initializer[1]
    with pytest.raises(RecurrentImportError, match=r"GRU 'gru_0': R \('R'\) must be a constant") as err:
        import_to_relax(Model.load(proto))
    assert isinstance(err.value, TVMImportError) and "\n" not in str(err.value)


def test_cost_model_counts_recurrent_macs():
    """Per step, direction and sequence: gates x hidden x (input + hidden + 1)."""
    for op, gates in (("LSTM", 4), ("GRU", 3), ("RNN", 1)):
        proto, _ = _random_case(op, hidden=5, inputs_size=4, steps=6, batch=3, direction="bidirectional")
        report = cost_of(Model.load(proto))
        assert report.macs_by_op[op] == 6 * 3 * 2 * gates * 5 * (4 + 5 + 1)
        # the unrolled form does the same multiply-accumulates (less the first step's zero state)
        unrolled = cost_of(_unrolled(proto))
        recurrent_taps = 3 * 2 * gates * 5 * 5  # one step of h @ R^T, all directions
        assert unrolled.macs_by_op["MatMul"] == 6 * 3 * 2 * gates * 5 * (4 + 5) - recurrent_taps


def _unsupported_model(tmp_path) -> Path:
    """A conv followed by LpNormalization, an ONNX op TVM 0.27's importer has no converter for."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("LpNormalization", ["c"], ["y"], axis=1, p=2)]
    graph = helper.make_graph(nodes, "lpnorm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    path = tmp_path / "lpnorm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_compile_error_does_not_suggest_canonicalize_it_ran(tmp_path, capsys):
    out = tmp_path / "m.so"
    assert main(["compile", str(_unsupported_model(tmp_path)), "--target", "host", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LpNormalization" in err[0] and "canonicalize" not in err[0], err
    assert not out.exists()


def test_bench_measures_onnxruntime_when_tvm_cannot_import(tmp_path, capsys):
    path = _unsupported_model(tmp_path)
    assert main(["bench", str(path), "--runs", "2", "--warmup", "0", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ort_ms"] > 0
    assert not any(k.startswith("tvm") and k.endswith("_ms") for k in result)
    (reason,) = result["tvm_skipped"].values()
    assert "LpNormalization" in reason
    assert main(["bench", str(path), "--runs", "2", "--warmup", "0", "--rounds", "1"]) == 0
    captured = capsys.readouterr()
    assert "onnxruntime" in captured.out
    assert "skipped" in captured.err and "LpNormalization" in captured.err


# ------------------------------------------------------------------------- the real CNN+LSTM recognizer
CRNN_SHAPE = (1, 1, 64, 160)


def _zoo():
    path = Path(__file__).resolve().parents[1] / "tools" / "zoo.py"
    spec = importlib.util.spec_from_file_location("sculpt_tools_zoo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crnn_with_logits(tmp_path_factory) -> Path:
    """ddddocr's captcha CRNN with its logits (the ArgMax input) as a second output, so the comparison
    sees floats, not only the decoded classes."""
    zoo = _zoo()
    try:
        source = zoo.fetch("ddddocr-captcha")
    except Exception as e:  # no network, no wheel: the model cannot be had here
        pytest.skip(f"the ddddocr wheel cannot be fetched: {e}")
    proto = onnx.load(source)
    assert any(n.op_type == "LSTM" for n in proto.graph.node)
    argmax = next(n for n in proto.graph.node if n.op_type == "ArgMax")
    proto.graph.output.append(helper.make_tensor_value_info(argmax.input[0], TensorProto.FLOAT, None))
    path = tmp_path_factory.mktemp("crnn") / "ddddocr_logits.onnx"
    onnx.save(proto, path)
    return path


def _captcha_input(folder: Path) -> Path:
    """Rendered words in grey, normalised as ddddocr does ((x / 255 - 0.5) / 0.5)."""
    from sculpt.textdata import render_text_image

    image, _ = render_text_image(CRNN_SHAPE[2], CRNN_SHAPE[3], seed=3, words_per_line=1)
    grey = image.astype(np.float32).mean(axis=2)
    x = ((grey / 255.0 - 0.5) / 0.5).reshape(CRNN_SHAPE).astype(np.float32)
    path = folder / "input1.npy"
    np.save(path, x)
    return path


def _compile_and_verify_crnn(model: Path, target: str, folder: Path, capsys, rtol: float = RTOL) -> dict:
    library = folder / f"crnn_{target}.so"
    shape = "input1=" + ",".join(map(str, CRNN_SHAPE))
    assert main(["compile", str(model), "--target", target, "--input-shape", shape, "-o", str(library)]) == 0
    capsys.readouterr()
    assert main(["verify", str(library), "--model", str(model), "--input", f"input1={_captcha_input(folder)}",
                 "--rtol", str(rtol), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["max_rel"] <= rtol, data
    assert len(data["outputs"]) == 2 and all(o["shape_match"] for o in data["outputs"])
    return data


@pytest.mark.slow
@pytest.mark.parametrize("mode", RECURRENT_MODES)
def test_crnn_recognizer_compiles_for_the_host_and_matches_onnxruntime(crnn_with_logits, tmp_path, capsys, mode,
                                                                       monkeypatch):
    monkeypatch.setattr(recurrent_import, "DEFAULT_RECURRENT_MODE", mode)
    _compile_and_verify_crnn(crnn_with_logits, "host", tmp_path, capsys, LOOP_RTOL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs qemu-user-static and g++-aarch64-linux-gnu")
@pytest.mark.parametrize("mode", RECURRENT_MODES)
def test_crnn_recognizer_on_arm64_under_qemu_matches_onnxruntime(crnn_with_logits, tmp_path, capsys, mode,
                                                                  monkeypatch):
    monkeypatch.setattr(recurrent_import, "DEFAULT_RECURRENT_MODE", mode)
    data = _compile_and_verify_crnn(crnn_with_logits, "arm64", tmp_path, capsys, LOOP_RTOL)
    assert data["emulated"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs qemu-user-static and g++-aarch64-linux-gnu")
@pytest.mark.parametrize("name", ["gru_linear_before_reset_bidirectional_seq_lens_input",
                                  "rnn_relu_bidirectional_constant_seq_lens",
                                  "lstm_bidirectional_seq_lens_input_states_peepholes_clip"])
def test_random_configurations_on_arm64_under_qemu(name, tmp_path):
    from sculpt.backends.tvm.artifact import compile_artifact, load_artifact
    from sculpt.backends.tvm.deploy import verify_artifact

    spec = dict(RANDOM_CASES[name])
    proto, feeds = _random_case(spec.pop("op"), **spec)
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    library = tmp_path / f"{name}.so"
    compile_artifact(path, "arm64", library)
    result = verify_artifact(load_artifact(library), path, feeds, rtol=RTOL, timeout=600)
    assert result.emulated and result.ok, result.comparison.outputs
