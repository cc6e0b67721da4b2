"""The weight-quant pass (weight-only int4/int8): the layout it writes (int4/int8 initializers behind
DequantizeLinear, per channel or blocked, opset 21 for 4 bits), the scales' rounding against numpy,
exactness of the model against the float model with the same rounded weights, depthwise and conv
weights at their own bits, the file size on PP-OCR rec, and bad options."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphs import conv_matmul_net, make_model, op_counts, with_weights
from markers import needs_ppocr
from sculpt.cli.main import main
from sculpt.ir.model import Model
from sculpt.passes import create_pass
from sculpt.passes.weight_quantization import dequantized, quantize_symmetric
from sculpt.runtime import make_session, reference_session



@pytest.mark.parametrize("group", [0, 16])
def test_quantized_values_and_scales_match_numpy_and_clip_search_lowers_the_error(group):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 48)).astype(np.float32)
    w[3] = 0.0  # a row of zeros: scale 1, values 0
    q, s = quantize_symmetric(w, 0, 7, group, 1)
    assert q.min() >= -7 and q.max() <= 7 and np.all(q == np.round(q))
    assert s.shape == ((24, 3) if group else (24,))
    back = dequantized(q, s, 1 if group else 0, group)
    # every element is its group's scale times an integer, within half a step of w unless clipped
    step = np.broadcast_to(np.repeat(s, group, axis=1) if group else s[:, None], w.shape)
    clipped = np.abs(w) > 7 * step
    assert np.all(np.abs(back - w)[~clipped] <= step[~clipped] / 2 + 1e-6)
    assert np.all(back[3] == 0)
    q_max, s_max = quantize_symmetric(w, 0, 7, group, 1, search=False)
    err = ((back - w) ** 2).sum()
    assert err <= ((dequantized(q_max, s_max, 1 if group else 0, group) - w) ** 2).sum()


@pytest.mark.parametrize("options, conv_type, dw_type, opset", [
    ({}, onnx.TensorProto.INT4, onnx.TensorProto.INT8, 21),
    ({"bits": 8}, onnx.TensorProto.INT8, onnx.TensorProto.INT8, 13),
    ({"bits": 4, "conv_bits": 8, "group_size": 16}, onnx.TensorProto.INT8, onnx.TensorProto.INT8, 21),
    ({"depthwise_bits": 4}, onnx.TensorProto.INT4, onnx.TensorProto.INT4, 21),
])
def test_the_model_computes_the_float_model_with_the_rounded_weights(tmp_path, options, conv_type, dw_type, opset):
    model = conv_matmul_net()
    res = create_pass("weight-quant", {**options, "min_elements": 1})(model.clone())
    out = res.model
    assert res.modified and res.stats["quantized"] == 5 and out.opset == opset
    out.save(tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert op_counts(out)["DequantizeLinear"] == 5
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    inits = out.initializer_map()
    by_node = {n.name: dq[n.input[1]] for n in out.graph.node if n.input[1:2] and n.input[1] in dq}
    assert inits[by_node["conv1"].input[0]].data_type == conv_type
    assert inits[by_node["dw"].input[0]].data_type == dw_type
    assert inits[by_node["linear"].input[0]].data_type == (onnx.TensorProto.INT8 if options.get("bits") == 8
                                                            else onnx.TensorProto.INT4)
    # the graph as written (onnxruntime unoptimized: optimized, it may compute an int8 weight's MatMul
    # with activations quantized at run time) equals the float graph with the weights rounded in numpy
    rounded = {}
    for name, node in (("w1", "conv1"), ("wd", "dw"), ("w2", "pw"), ("wm", "linear"), ("wg", "head")):
        d = by_node[node]
        q = numpy_helper.to_array(inits[d.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[d.input[1]])
        axis = next(a.i for a in d.attribute if a.name == "axis")
        block = next((a.i for a in d.attribute if a.name == "block_size"), 0)
        rounded[name] = dequantized(q, s, axis, block)
        w = model.get_constant(name)
        assert np.abs(rounded[name] - w).max() <= 0.2 * np.abs(w).max()
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)
    got = reference_session(out).run(None, {"x": x})[0]
    want = make_session(with_weights(model, rounded)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_small_skipped_and_shared_weights():
    model = conv_matmul_net()
    res = create_pass("weight-quant", {"skip": ["head"], "min_elements": 500})(model.clone())
    # wd (288 weights) is under min_elements, the Gemm is skipped: conv1 (2304), pw (512), linear (1024)
    assert res.stats["quantized"] == 3 and res.stats["quantized_by_op"] == {"Conv": 2, "MatMul": 1}
    nothing = create_pass("weight-quant", {"ops": ["Gemm"], "min_elements": 10**6})(model.clone())
    assert not nothing.modified and nothing.model.opset == model.opset


@needs_ppocr
def test_ppocr_rec_4_bit_weights_cut_the_file_below_a_third(tmp_path):
    from sculpt.models import ppocr_model_path

    rec = Model.load(ppocr_model_path("rec"))
    size = (tmp_path / "a").write_bytes(rec.serialize())
    rec = create_pass("canonicalize")(rec).model  # weights as initializers
    out = create_pass("weight-quant", {"conv_bits": 8, "group_size": 32})(rec).model
    out.save(tmp_path / "rec_w4.onnx")
    assert (tmp_path / "rec_w4.onnx").stat().st_size <= 0.35 * size
    onnx.checker.check_model(str(tmp_path / "rec_w4.onnx"), full_check=True)
    x = np.random.default_rng(2).random((1, 3, 48, 320)).astype(np.float32)
    assert np.isfinite(make_session(out).run(None, {"x": x})[0]).all()


@pytest.mark.parametrize("spec, words", [
    ("weight-quant:bits=3", ["bits"]),
    ("weight-quant:conv_bits=3", ["conv_bits"]),
    ("weight-quant:group_size=24", ["group_size"]),
    ("weight-quant:ops=[Relu]", ["Relu"]),
    ("weight-quant:bits=3", ["bits", "1, 2, 4 or 8"]),
    ("weight-quant:depthwise_bits=0", ["depthwise_bits"]),
    ("weight-quant:low_bit_type=int3", ["low_bit_type", "int3"]),
    ("weight-quant:layout=packed", ["layout", "packed"]),
    ("weight-quant:layout=matmulnbits,group_size=256", ["matmulnbits", "256"]),
    ("weight-quant:layout=matmulnbits,accuracy_level=5", ["accuracy_level", "5"]),
    ("qdq:weight_bits=2", ["weight_bits", "4, 7 or 8"]),
    ("qdq:conv_weight_bits=6", ["conv_weight_bits", "6"]),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, spec, words):
    path = tmp_path / "m.onnx"
    conv_matmul_net().save(path)
    assert main(["run", str(path), "--pass", spec, "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sculpt: error:") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out.onnx").exists()


def test_the_cost_model_counts_int4_weights_at_half_a_byte():
    from sculpt.ir.cost import cost_of

    out = create_pass("weight-quant", {"min_elements": 1, "depthwise_bits": 8})(conv_matmul_net()).model
    dq_inputs = [n.input[0] for n in out.graph.node if n.op_type == "DequantizeLinear"]
    inits = out.initializer_map()
    expected = sum((int(np.prod(inits[i].dims)) * (4 if inits[i].data_type == onnx.TensorProto.INT4 else 8) + 7) // 8
                   for i in dq_inputs)
    report = cost_of(out)
    assert report.quantized_weight_bytes == expected
    assert report.quantized_params == sum(int(np.prod(inits[i].dims)) for i in dq_inputs)
