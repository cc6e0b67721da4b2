"""The qdq pass: the QDQ layout around each op kind, onnxruntime's int8 fusions, skipped layers,
sensitivity, bias correction, cross-layer equalization, bad input."""

import fnmatch

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphs import make_model
from sculpt.backends.host_cpu import fused_int8_saturates
from sculpt.runtime import compare_models, make_session
from sculpt.errors import CalibrationError, OptionError, PassError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.passes import PassContext, create_pass
from sculpt.passes.cross_layer_equalization import find_pairs


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv_net(opset=13, rng=None):
    """x → Conv(3→8, 3x3, bias) → Relu → Conv(8→8, 1x1) → Add(skip) → GlobalAveragePool → Flatten → Gemm → y"""
    rng = rng or np.random.default_rng(10)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = {"w1": rand(rng, 8, 3, 3, 3, scale=0.3), "b1": rand(rng, 8, scale=0.1),
             "w2": rand(rng, 8, 8, 1, 1, scale=0.3), "b2": rand(rng, 8, scale=0.1),
             "wg": rand(rng, 5, 8, scale=0.3), "bg": rand(rng, 5, scale=0.1)}
    return make_model(nodes, [("x", [1, 3, 12, 12])], [("y", [1, 5])], inits, opset=opset)


# the weights onnxruntime's fused int8 kernels compute exactly on this CPU (x86 without VNNI: 7 bits)
THIS_CPU = {"weight_bits": 7} if fused_int8_saturates() else {}


def calib(model, count=8, seed=0):
    return PassContext(calibration=CalibrationSet.random(model, count, seed=seed))


def producer_op(model, tensor):
    p = model.producers().get(tensor)
    return p.op_type if p is not None else None


def ort_optimized_ops(model: Model, tmp_path) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    counts = {}
    for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ------------------------------------------------------------------------------------ layout
def test_conv_layout_weights_bias_and_folded_relu(tmp_path):
    model = conv_net()
    res = create_pass("qdq", THIS_CPU)(model, calib(model))
    q = res.model
    assert res.modified and res.stats["quantized_by_op"] == {"Conv": 2, "Gemm": 1}
    assert res.stats["folded_activations"] == 1
    assert "Relu" not in {n.op_type for n in q.graph.node}  # folded into conv1's output quantization
    conv1 = q.node_by_name("conv1")
    assert producer_op(q, conv1.input[0]) == "DequantizeLinear"
    w_dq = q.producers()[conv1.input[1]]
    assert q.get_constant(w_dq.input[0]).dtype == np.int8
    assert helper.get_attribute_value(w_dq.attribute[0]) == 0  # axis 0: per output channel
    assert q.get_constant(w_dq.input[1]).shape == (8,)
    b_dq = q.producers()[conv1.input[2]]
    assert q.get_constant(b_dq.input[0]).dtype == np.int32
    # the bias scale is input scale x weight scale
    x_dq = q.producers()[conv1.input[0]]
    np.testing.assert_allclose(q.get_constant(b_dq.input[1]),
                               q.get_constant(x_dq.input[1]) * q.get_constant(w_dq.input[1]), rtol=1e-7)
    # conv1's output goes only to its QuantizeLinear (zero point 0: the folded Relu)
    readers = q.consumers()[conv1.output[0]]
    assert [r.op_type for r in readers] == ["QuantizeLinear"]
    assert int(q.get_constant(readers[0].input[2])) == 0
    # Gemm per channel along B's output axis (transB=1 → axis 0)
    fc = q.node_by_name("fc")
    assert helper.get_attribute_value(q.producers()[fc.input[1]].attribute[0]) == 0
    path = tmp_path / "q.onnx"
    q.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    cmp = compare_models(model, q, [CalibrationSet.random(model, 1, seed=99)[0]])
    assert cmp.max_rel < 0.05, cmp.as_dict()


def test_onnxruntime_runs_int8_kernels(tmp_path):
    model = conv_net()
    q = create_pass("qdq")(model, calib(model)).model
    ops = ort_optimized_ops(q, tmp_path)
    assert ops.get("QLinearConv") == 2, ops
    assert ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) >= 1, ops


def test_opset_is_raised_for_per_channel_weights():
    model = conv_net(opset=12)
    res = create_pass("qdq")(model, calib(model))
    assert res.model.opset == 13 and res.stats["opset"] == "12 -> 13"
    res.model.verify()
    per_tensor = create_pass("qdq", {"per_channel": False})(model, calib(model))
    assert per_tensor.model.opset == 12
    assert all(not n.attribute for n in per_tensor.model.graph.node if n.op_type == "DequantizeLinear")


def test_nothing_to_quantize_returns_the_model_as_it_came():
    """No quantizable layer: no opset upgrade, no equalization — the same bytes, reported unmodified
    (an old-opset BatchNormalization model upgraded for nothing was the corpus runner's catch)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Sigmoid", ["r"], ["y"], name="sig")]
    model = make_model(nodes, [("x", [1, 4, 8, 8])], [("y", [1, 4, 8, 8])], opset=9)
    before = model.sha256()
    for options in ({}, {"equalize": True}):
        res = create_pass("qdq", options)(model, calib(model))
        assert not res.modified and res.stats["quantized"] == 0 and "opset" not in res.stats
        assert res.model.opset == 9 and res.model.sha256() == before


def _single_op_model(op, rng):
    """A graph around one op kind, float inputs from Convs' Relus so that they are activations."""
    x = ("x", [1, 4, 8, 8])
    pre = [helper.make_node("Relu", ["x"], ["a"], name="pre_a"), helper.make_node("Sigmoid", ["x"], ["b"], name="pre_b")]
    inits = {}
    if op == "MatMul-weights":
        node = helper.make_node("MatMul", ["a", "w"], ["y0"], name="target")
        inits["w"] = rand(rng, 8, 6)
        out = [1, 4, 8, 6]
    elif op == "MatMul-activations":
        node = helper.make_node("MatMul", ["a", "b"], ["y0"], name="target")
        out = [1, 4, 8, 8]
    elif op == "ConvTranspose":
        node = helper.make_node("ConvTranspose", ["a", "w", "bias"], ["y0"], name="target", strides=[2, 2])
        inits.update(w=rand(rng, 4, 5, 2, 2), bias=rand(rng, 5))
        out = [1, 5, 16, 16]
    elif op in ("Add", "Mul"):
        node = helper.make_node(op, ["a", "b"], ["y0"], name="target")
        out = [1, 4, 8, 8]
    elif op == "Add-constant":
        node = helper.make_node("Add", ["a", "k"], ["y0"], name="target")
        inits["k"] = rand(rng, 1, 4, 1, 1)
        out = [1, 4, 8, 8]
    elif op == "Concat":
        node = helper.make_node("Concat", ["a", "b"], ["y0"], name="target", axis=1)
        out = [1, 8, 8, 8]
    elif op in ("AveragePool", "MaxPool"):
        node = helper.make_node(op, ["a"], ["y0"], name="target", kernel_shape=[2, 2], strides=[2, 2])
        out = [1, 4, 4, 4]
    elif op == "GlobalAveragePool":
        node = helper.make_node(op, ["a"], ["y0"], name="target")
        out = [1, 4, 1, 1]
    elif op == "Resize":
        node = helper.make_node("Resize", ["a", "", "scales"], ["y0"], name="target", mode="nearest")
        inits["scales"] = np.array([1, 1, 2, 2], np.float32)
        out = [1, 4, 16, 16]
    else:
        raise ValueError(op)
    post = helper.make_node("Tanh", ["y0"], ["y"], name="post")  # the target's output is not a graph output
    return make_model(pre + [node, post], [x], [("y", out)], inits)


OP_CASES = ["MatMul-weights", "MatMul-activations", "ConvTranspose", "Add", "Mul", "Add-constant", "Concat",
            "AveragePool", "MaxPool", "GlobalAveragePool", "Resize"]


@pytest.mark.parametrize("case", OP_CASES)
def test_layout_around_each_op_kind(case, tmp_path):
    rng = np.random.default_rng(OP_CASES.index(case))
    model = _single_op_model(case, rng)
    op = case.split("-")[0]
    res = create_pass("qdq", {"ops": [op]})(model, calib(model))
    q = res.model
    assert res.stats["quantized"] == 1, res.stats
    target = q.node_by_name("target")
    data_inputs = [t for t in target.input if t and not (q.get_constant(t) is not None and op == "Resize")]
    for t in data_inputs:
        assert producer_op(q, t) == "DequantizeLinear", (case, t)
    quant = q.consumers()[target.output[0]]
    assert [r.op_type for r in quant] == ["QuantizeLinear"]
    if op in ("MaxPool", "Resize"):  # same scale and zero point as the input: runtimes drop the pair
        in_dq = q.producers()[target.input[0]]
        assert quant[0].input[1:] == in_dq.input[1:]
    if case == "ConvTranspose":  # per channel along the output-channel axis 1, int32 bias
        w_dq = q.producers()[target.input[1]]
        assert helper.get_attribute_value(w_dq.attribute[0]) == 1
        assert q.get_constant(q.producers()[target.input[2]].input[0]).dtype == np.int32
    if case == "MatMul-weights":
        w_dq = q.producers()[target.input[1]]
        assert helper.get_attribute_value(w_dq.attribute[0]) == 1
    path = tmp_path / "q.onnx"
    q.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    cmp = compare_models(model, q, [CalibrationSet.random(model, 1, seed=123)[0]])
    assert cmp.max_rel < 0.05, (case, cmp.as_dict())


def test_a_tensor_read_by_several_layers_gets_one_pair():
    model = _single_op_model("Concat", np.random.default_rng(0))
    # both 'a' and 'b' feed Concat; 'a' also feeds pre_b? no: add a second reader of 'a'
    model.graph.node.insert(2, helper.make_node("Mul", ["a", "a"], ["m"], name="square"))
    model.graph.output.append(helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [1, 4, 8, 8]))
    q = create_pass("qdq", {"ops": ["Concat", "Mul"]})(model, calib(model)).model
    quantizers = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "a"]
    assert len(quantizers) == 1
    assert q.node_by_name("square").input[0] == q.node_by_name("target").input[0]


def test_graph_outputs_stay_float():
    model = conv_net()
    q = create_pass("qdq")(model, calib(model)).model
    assert q.output_names == ["y"]
    assert producer_op(q, "y") == "Gemm"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "y" for n in q.graph.node)


# ------------------------------------------------------------------------------------ skipping
def test_layers_skipped_by_name_stay_float():
    model = conv_net()
    res = create_pass("qdq", {"skip": ["conv2", "f*"]})(model, calib(model))
    q = res.model
    skipped = {s["layer"] for s in res.stats["skipped"]}
    assert skipped == {"conv2", "fc"}
    for name in ("conv2", "fc"):
        node = q.node_by_name(name)
        assert q.get_constant(node.input[1]).dtype == np.float32  # float weights, no DequantizeLinear
    assert producer_op(q, q.node_by_name("conv1").input[1]) == "DequantizeLinear"


def test_sensitivity_keeps_the_worst_layer_float():
    rng = np.random.default_rng(3)
    model = conv_net(rng=rng)
    w2 = model.get_constant("w2").copy()
    w2[0, 0] = 200.0  # one huge weight: per-tensor quantization crushes the rest of conv2
    model.set_initializer("w2", w2)
    opts = {"per_channel": False, "keep_float": 1}
    res = create_pass("qdq", opts)(model, calib(model))
    errors = res.stats["layer_errors"]
    assert set(errors) == {"conv1", "conv2", "fc"}
    worst = max(errors, key=errors.get)
    assert errors[worst] > 10 * min(errors.values())  # the outlier weight dominates (conv2, or fc behind it)
    assert res.stats["kept_float_by_sensitivity"] == [worst]
    assert res.model.get_constant(res.model.node_by_name(worst).input[1]).dtype == np.float32



@pytest.mark.parametrize("budget", [0.2, 0.02, 1e-9])
def test_the_error_budget_bounds_the_models_error_with_the_fewest_float_layers(budget):
    """error_budget holds for the quantized model's output error on the calibration samples (measured
    here independently), with the fewest most sensitive layers kept float: one fewer breaks it."""
    from sculpt.runtime import compare_models

    rng = np.random.default_rng(3)
    model = conv_net(rng=rng)
    w2 = model.get_constant("w2").copy()
    w2[0, 0] = 200.0
    model.set_initializer("w2", w2)
    ctx = calib(model)
    feeds = list(ctx.calibration)
    res = create_pass("qdq", {"per_channel": False, "error_budget": budget})(model.clone(), ctx)
    kept = res.stats["kept_float_by_sensitivity"]
    order = sorted(res.stats["layer_errors"], key=res.stats["layer_errors"].get, reverse=True)
    assert kept == order[:len(kept)]
    assert compare_models(model, res.model, feeds).max_rel <= budget
    assert res.stats.get("model_error_on_calibration", 0.0) <= budget
    if kept:  # minimal: quantizing the last layer kept float as well breaks the budget
        fewer = create_pass("qdq", {"per_channel": False, "keep_float": len(kept) - 1})(model.clone(), ctx)
        assert fewer.stats["kept_float_by_sensitivity"] == kept[:-1]
        assert compare_models(model, fewer.model, feeds).max_rel > budget


def test_min_macs_keeps_small_layers_float():
    model = conv_net()
    res = create_pass("qdq", {"min_macs": 1000})(model, calib(model))
    assert {s["layer"] for s in res.stats["skipped"]} == {"fc"}  # 40 MACs


# ------------------------------------------------------------------------------------ accuracy aids
def _mean_channel_shift(reference, candidate, feeds, tensor):
    a = make_session(reference, extra_outputs=[tensor])
    b = make_session(candidate, extra_outputs=[tensor])
    diffs = [b.run([tensor], f)[0] - a.run([tensor], f)[0] for f in feeds]
    return np.abs(np.mean(np.concatenate(diffs), axis=(0, 2, 3)))


def test_bias_correction_removes_the_mean_output_shift():
    rng = np.random.default_rng(4)
    model = conv_net(rng=rng)
    w1 = model.get_constant("w1").copy()
    w1[:, :, 0, 0] += 3.0  # a large weight per channel: the others round to few levels (per tensor)
    model.set_initializer("w1", w1)
    feeds = list(CalibrationSet.random(model, 16, seed=0))
    ctx = PassContext(calibration=CalibrationSet.from_arrays({"x": np.concatenate([f["x"] for f in feeds])}))
    opts = {"per_channel": False, "activations": "int8", "fold_activations": False}
    plain = create_pass("qdq", opts)(model, ctx).model
    corrected_res = create_pass("qdq", {**opts, "bias_correction": True})(model, ctx)
    assert corrected_res.stats["bias_corrected"] == 3
    shift_plain = _mean_channel_shift(model, plain, feeds, "c1")
    shift_corrected = _mean_channel_shift(model, corrected_res.model, feeds, "c1")
    assert shift_corrected.mean() < shift_plain.mean() / 2, (shift_plain, shift_corrected)


def _imbalanced_pair():
    rng = np.random.default_rng(5)
    w1 = rand(rng, 8, 3, 3, 3)
    w1 *= np.array([100, 0.01, 1, 30, 0.1, 1, 5, 0.5], np.float32).reshape(-1, 1, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [("x", [1, 3, 10, 10])], [("y", [1, 4, 10, 10])],
                      {"w1": w1, "b1": rand(rng, 8), "w2": rand(rng, 4, 8, 1, 1)})


def test_cross_layer_equalization_is_exact_and_balances_ranges(tmp_path):
    from graphs import assert_exact

    model = _imbalanced_pair()
    res = create_pass("cross-layer-equalization")(model)
    assert res.modified and res.stats["pairs"] == 1
    assert_exact(model, res.model, rtol=1e-5, atol=1e-5, tmp_path=tmp_path)
    w1 = res.model.get_constant(res.model.node_by_name("conv1").input[1])
    w2 = res.model.get_constant(res.model.node_by_name("conv2").input[1])
    r1 = np.abs(w1).reshape(8, -1).max(1)
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(8, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert find_pairs(res.model)  # still a pair; a second run changes nothing
    assert not create_pass("cross-layer-equalization")(res.model).modified


def test_equalize_option_lowers_per_tensor_quantization_error():
    model = _imbalanced_pair()
    ctx = calib(model, 8)
    feeds = [CalibrationSet.random(model, 1, seed=50)[0]]
    plain = create_pass("qdq", {"per_channel": False, "calibration": "minmax", **THIS_CPU})(model, ctx)
    equalized = create_pass("qdq", {"per_channel": False, "calibration": "minmax", "equalize": True,
                                    **THIS_CPU})(model, ctx)
    assert equalized.stats["equalized_pairs"] == 1
    e_plain = compare_models(model, plain.model, feeds).max_rel
    e_eq = compare_models(model, equalized.model, feeds).max_rel
    assert e_eq < e_plain / 2, (e_plain, e_eq)


def test_cle_leaves_non_homogeneous_activations_alone():
    model = _imbalanced_pair()
    model.node_by_name("relu1").op_type = "Sigmoid"
    assert find_pairs(model) == []
    assert not create_pass("cross-layer-equalization")(model).modified


# ------------------------------------------------------------------------------------ bad input
def test_needs_calibration():
    with pytest.raises(PassError, match="qdq.*calibration"):
        create_pass("qdq")(conv_net())


@pytest.mark.parametrize("opts, word", [({"calibration": "magic"}, "calibration"), ({"activations": "int4"}, "activations"),
                                        ({"ops": ["Softmax"]}, "Softmax"), ({"percentile": 20}, "percentile"),
                                        ({"samples": 0}, "samples"), ({"nonsense": 1}, "nonsense")])
def test_bad_options_are_named(opts, word):
    with pytest.raises(OptionError, match=word):
        create_pass("qdq", opts)


def test_calibration_for_another_model_is_refused():
    model = conv_net()
    wrong = CalibrationSet.from_arrays({"image": np.zeros((2, 1, 3, 12, 12), np.float32)})
    with pytest.raises(CalibrationError, match="image"):
        create_pass("qdq")(model, PassContext(calibration=wrong))


def test_an_already_quantized_model_is_refused():
    model = conv_net()
    q = create_pass("qdq")(model, calib(model)).model
    with pytest.raises(PassError, match="already quantized"):
        create_pass("qdq")(q, calib(model))


def test_input_model_is_untouched():
    model = conv_net()
    before = model.sha256()
    create_pass("qdq", {"equalize": True, "bias_correction": True})(model, calib(model))
    assert model.sha256() == before


def test_listed_in_the_registry_with_options():
    from sculpt.passes import registered_passes

    cls = registered_passes()["qdq"]
    names = {o.name for o in cls.options()}
    assert {"calibration", "activations", "per_channel", "ops", "skip", "keep_float", "error_budget", "equalize",
            "bias_correction"} <= names
    assert fnmatch.fnmatch(cls.__doc__, "*QuantizeLinear*")


@pytest.mark.skipif(not fused_int8_saturates(), reason="this CPU has VNNI: onnxruntime's fused int8 kernels are exact")
def test_seven_bit_weights_keep_onnxruntimes_avx2_int8_kernels_exact():
    """On x86 without VNNI onnxruntime's QLinearConv sums uint8 x int8 pairs in int16 (vpmaddubsw), which
    saturates with 8-bit weights: the fused model then differs from the QDQ graph as written. 7-bit
    weights keep every pair sum in range."""
    model = conv_net()
    feeds = CalibrationSet.random(model, 1, seed=7)[0]

    def fused_vs_written(bits):
        q = create_pass("qdq", {"weight_bits": bits})(model, calib(model)).model
        fused = make_session(q).run(None, feeds)[0]
        written = make_session(q, optimize=False).run(None, feeds)[0]
        return float(np.abs(fused - written).max()) / float(np.abs(written).max())

    assert fused_vs_written(8) > 1e-2
    assert fused_vs_written(7) < 1e-3


def test_weight_bits_option():
    model = conv_net()
    q = create_pass("qdq", {"weight_bits": 7})(model, calib(model)).model
    w_dq = q.producers()[q.node_by_name("conv1").input[1]]
    values = q.get_constant(w_dq.input[0])
    assert values.dtype == np.int8 and int(np.abs(values).max()) == 63
    with pytest.raises((OptionError, ValueError), match="weight_bits must be 4, 7 or 8"):
        create_pass("qdq", {"weight_bits": 5})
