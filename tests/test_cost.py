"""Tests of the cost model (sculpt.ir.cost): hand-built one-node models with known answers, and an
independent count of the real PP-OCR models from the shapes onnxruntime actually produces."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.ir.cost import cost_of
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, ppocr_model


def one_node(op, x_shape, weights=(), extra_inputs=(), opset=17, **attrs) -> Model:
    """A model with one node: input 'x' of ``x_shape``, then constant inputs ``weights`` (arrays)."""
    inits, names = [], ["x"]
    for k, w in enumerate(weights):
        if w is None:
            names.append("")
            continue
        name = f"w{k}"
        inits.append(numpy_helper.from_array(np.asarray(w), name))
        names.append(name)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    for name, shape in extra_inputs:
        names.append(name)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    node = helper.make_node(op, names, ["y"], name="the_node", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return Model(proto)


def zeros(*shape):
    return np.zeros(shape, np.float32)


def single(model: Model, input_shapes=None):
    rep = cost_of(model, input_shapes)
    assert len(rep.layers) == 1 and rep.layers[0].name == "the_node"
    return rep, rep.layers[0]


def ort_output_shape(model: Model, x_shape, extra=()):
    sess = ort.InferenceSession(model.serialize(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones(x_shape, np.float32)}
    for name, shape in extra:
        feeds[name] = np.ones(shape, np.float32)
    return sess.run(None, feeds)[0].shape


# (op, x shape, weights, attrs, output shape, MACs, params) -- MACs worked out by hand
CONV_CASES = {
    # 4 out channels x 8x8 outputs x (3 in channels x 3x3 taps)
    "conv": ("Conv", [1, 3, 8, 8], [zeros(4, 3, 3, 3)], dict(pads=[1, 1, 1, 1]), (1, 4, 8, 8),
             4 * 64 * 27, 108),
    "conv_bias": ("Conv", [1, 3, 8, 8], [zeros(4, 3, 3, 3), zeros(4)], dict(pads=[1, 1, 1, 1]), (1, 4, 8, 8),
                  4 * 64 * 27, 112),
    "batch2": ("Conv", [2, 3, 8, 8], [zeros(4, 3, 3, 3)], dict(pads=[1, 1, 1, 1]), (2, 4, 8, 8),
               2 * 4 * 64 * 27, 108),
    # 2 groups: each output channel sees 4/2 = 2 input channels
    "grouped": ("Conv", [1, 4, 8, 8], [zeros(6, 2, 3, 3)], dict(pads=[1, 1, 1, 1], group=2), (1, 6, 8, 8),
                6 * 64 * 2 * 9, 108),
    # depthwise: one input channel per output channel, no padding: 10-3+1 = 8
    "depthwise": ("Conv", [1, 8, 10, 10], [zeros(8, 1, 3, 3)], dict(group=8), (1, 8, 8, 8), 8 * 64 * 9, 72),
    # stride 2 on 9x9 with a 3x3 kernel: (9-3)/2+1 = 4
    "strided": ("Conv", [1, 3, 9, 9], [zeros(2, 3, 3, 3)], dict(strides=[2, 2]), (1, 2, 4, 4), 2 * 16 * 27, 54),
    # dilation 2: effective kernel 5, 10-5+1 = 6
    "dilated": ("Conv", [1, 1, 10, 10], [zeros(1, 1, 3, 3)], dict(dilations=[2, 2]), (1, 1, 6, 6), 36 * 9, 9),
    # 1x1 pointwise, non-square
    "pointwise": ("Conv", [1, 16, 5, 7], [zeros(32, 16, 1, 1)], {}, (1, 32, 5, 7), 32 * 35 * 16, 512),
    # 1-D conv
    "conv1d": ("Conv", [1, 2, 10], [zeros(3, 2, 4)], {}, (1, 3, 7), 3 * 7 * 8, 24),
    # transposed: every input element meets Cout/groups x kh x kw taps: 4*5*5 inputs x 2*3*3
    "convtranspose": ("ConvTranspose", [1, 4, 5, 5], [zeros(4, 2, 3, 3)], dict(strides=[2, 2]), (1, 2, 11, 11),
                      100 * 18, 72),
    "convtranspose_grouped": ("ConvTranspose", [1, 4, 5, 5], [zeros(4, 1, 3, 3)], dict(group=2), (1, 2, 7, 7),
                              100 * 9, 36),
    "convtranspose_k2s2": ("ConvTranspose", [2, 3, 4, 4], [zeros(3, 5, 2, 2), zeros(5)], dict(strides=[2, 2]),
                           (2, 5, 8, 8), 2 * 48 * 20, 65),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_costs(case):
    op, x_shape, weights, attrs, out_shape, macs, params = CONV_CASES[case]
    model = one_node(op, x_shape, weights, **attrs)
    assert ort_output_shape(model, x_shape) == out_shape  # the expected shape is real
    rep, layer = single(model)
    assert layer.op_type == op and tuple(layer.output_shape) == out_shape
    assert layer.macs == macs and rep.macs == macs and rep.macs_by_op == {op: macs}
    assert layer.params == params and rep.params == params
    assert rep.weight_bytes == layer.weight_bytes == 4 * params
    assert rep.unknown_macs == []


GEMM_CASES = {
    "plain": ([3, 5], [zeros(5, 4)], {}, (3, 4), 3 * 4 * 5, 20),
    "transA": ([5, 3], [zeros(5, 4)], dict(transA=1), (3, 4), 3 * 4 * 5, 20),
    "transB": ([3, 5], [zeros(4, 5)], dict(transB=1), (3, 4), 3 * 4 * 5, 20),
    "both_bias": ([7, 3], [zeros(6, 7), zeros(6)], dict(transA=1, transB=1), (3, 6), 3 * 6 * 7, 48),
}


@pytest.mark.parametrize("case", sorted(GEMM_CASES))
def test_gemm_costs(case):
    x_shape, weights, attrs, out_shape, macs, params = GEMM_CASES[case]
    model = one_node("Gemm", x_shape, weights, **attrs)
    assert ort_output_shape(model, x_shape) == out_shape
    rep, layer = single(model)
    assert layer.macs == macs and rep.macs_by_op == {"Gemm": macs}
    assert rep.params == params


MATMUL_CASES = {
    "2d": ([3, 5], [zeros(5, 4)], (), (3, 4), 3 * 4 * 5, 20),
    "batched_const": ([2, 3, 4, 5], [zeros(5, 6)], (), (2, 3, 4, 6), 2 * 3 * 4 * 6 * 5, 30),
    # both operands are activations: no parameters
    "batched_dynamic": ([2, 3, 4, 5], [], [("b", [2, 3, 5, 6])], (2, 3, 4, 6), 2 * 3 * 4 * 6 * 5, 0),
    "broadcast": ([3, 4, 5], [], [("b", [2, 1, 5, 6])], (2, 3, 4, 6), 2 * 3 * 4 * 6 * 5, 0),
    "vector_left": ([5], [zeros(5, 4)], (), (4,), 4 * 5, 20),
    "vector_right": ([3, 5], [zeros(5)], (), (3,), 3 * 5, 5),
}


@pytest.mark.parametrize("case", sorted(MATMUL_CASES))
def test_matmul_costs(case):
    x_shape, weights, extra, out_shape, macs, params = MATMUL_CASES[case]
    model = one_node("MatMul", x_shape, weights, extra_inputs=extra)
    assert ort_output_shape(model, x_shape, extra) == out_shape
    rep, layer = single(model)
    assert layer.macs == macs and rep.macs_by_op == {"MatMul": macs}
    assert rep.params == params


POOL_CASES = {
    # one op per window element per output
    "maxpool": ("MaxPool", [1, 2, 8, 8], dict(kernel_shape=[2, 2], strides=[2, 2]), (1, 2, 4, 4), 32 * 4),
    "avgpool_padded": ("AveragePool", [1, 2, 8, 8], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (1, 2, 8, 8),
                       128 * 9),
    "avgpool_rect": ("AveragePool", [2, 3, 6, 9], dict(kernel_shape=[2, 3], strides=[2, 3]), (2, 3, 3, 3),
                     54 * 6),
    # global pooling reads every input element once
    "gap": ("GlobalAveragePool", [2, 3, 4, 5], {}, (2, 3, 1, 1), 120),
    "gmp": ("GlobalMaxPool", [1, 3, 4, 5], {}, (1, 3, 1, 1), 60),
    "relu": ("Relu", [2, 3, 4], {}, (2, 3, 4), 24),
    "softmax": ("Softmax", [4, 10], dict(axis=1), (4, 10), 40),
    "transpose": ("Transpose", [2, 3, 4], dict(perm=[2, 0, 1]), (4, 2, 3), 0),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pooling_and_unary_costs(case):
    op, x_shape, attrs, out_shape, macs = POOL_CASES[case]
    model = one_node(op, x_shape, **attrs)
    assert ort_output_shape(model, x_shape) == out_shape
    rep, layer = single(model)
    assert layer.macs == macs and rep.macs == macs
    assert rep.macs_by_op == ({op: macs} if macs else {})
    assert rep.params == 0 and rep.unknown_macs == []


def test_elementwise_costs_count_output_elements():
    # broadcasting Add of a per-channel constant: one op per output element, the constant is 3 params
    rep, layer = single(one_node("Add", [2, 3, 4], [np.ones((3, 1), np.float32)]))
    assert layer.macs == 24 and layer.params == 3 and rep.weight_bytes == 12
    rep, layer = single(one_node("Mul", [5], extra_inputs=[("b", [4, 1])]))
    assert layer.macs == 20 and layer.params == 0
    # an integer shape tensor is not a parameter, and Reshape costs nothing
    rep, layer = single(one_node("Reshape", [2, 6], [np.array([3, 4], np.int64)]))
    assert layer.macs == 0 and rep.params == 0 and rep.weight_bytes == 0 and layer.output_shape == [3, 4]
    # float16 weights: 2 bytes each
    m = one_node("Add", [4], [np.ones(4, np.float16)])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    rep, layer = single(m)
    assert rep.params == 4 and rep.weight_bytes == 8


def test_shared_weights_are_counted_once():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    rep = cost_of(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert rep.params == 16 and rep.weight_bytes == 64
    assert [layer.params for layer in rep.layers] == [16, 16]
    assert rep.macs == 2 * (2 * 4 * 4)


def test_constant_node_weights_count_as_parameters():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32))
    nodes = [helper.make_node("Constant", [], ["w"], name="cw", value=w),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    rep = cost_of(Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert [layer.name for layer in rep.layers] == ["conv"]  # Constant nodes are not layers
    assert rep.params == 12 and rep.macs == 4 * 4 * 3


def test_dynamic_input_needs_input_shapes():
    model = one_node("Conv", ["N", 3, "H", "W"], [zeros(4, 3, 3, 3)])
    rep, layer = single(model)
    assert layer.macs is None and rep.unknown_macs == ["the_node"] and rep.macs == 0
    assert rep.params == 108  # parameters need no shapes
    rep, layer = single(model, {"x": [1, 3, 10, 10]})
    assert layer.macs == 4 * 64 * 27 and rep.unknown_macs == []
    # the caller's model is not modified
    assert model.input_shapes() == {"x": ["N", 3, "H", "W"]}


def test_as_dict_and_model_bytes():
    model = one_node("Conv", [1, 3, 8, 8], [zeros(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    rep = cost_of(model)
    assert rep.model_bytes == model.byte_size()
    assert cost_of(model, model_bytes=1234).model_bytes == 1234
    d = rep.as_dict()
    assert d["totals"] == {"params": 108, "macs": 6912, "weight_bytes": 432, "model_bytes": model.byte_size(),
                           "nodes": 1, "unknown_macs_layers": 0}
    assert d["macs_by_op"] == {"Conv": 6912}
    assert d["layers"][0]["output_shape"] == [1, 4, 8, 8]


# ------------------------------------------------------------------------------------------- real models
def _independent_macs(proto: onnx.ModelProto, x_shape) -> dict[str, int]:
    """Conv/ConvTranspose/Gemm/MatMul MACs from the shapes onnxruntime produces and the weights' own dims,
    without sculpt: every node output becomes a graph output, the model runs once."""
    weight_dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            weight_dims[node.output[0]] = tuple(node.attribute[0].t.dims)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    names = [o for n in proto.graph.node if n.op_type != "Constant" for o in n.output if o]
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    values = sess.run(names, {proto.graph.input[0].name: x})
    shape = dict(weight_dims)
    shape.update({n: v.shape for n, v in zip(names, values)})
    shape[proto.graph.input[0].name] = tuple(x_shape)

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    totals: dict[str, int] = {}
    for node in proto.graph.node:
        op = node.op_type
        if op == "Conv":  # every output element: Cin/groups x kernel taps
            out, w = shape[node.output[0]], shape[node.input[1]]
            x_in = shape[node.input[0]]
            assert w[1] * attr(node, "group", 1) == x_in[1]
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif op == "ConvTranspose":  # every input element: Cout/groups x kernel taps
            macs = int(np.prod(shape[node.input[0]])) * int(np.prod(shape[node.input[1]][1:]))
        elif op == "Gemm":
            a = shape[node.input[0]]
            macs = int(np.prod(shape[node.output[0]])) * (a[0] if attr(node, "transA", 0) else a[1])
        elif op == "MatMul":
            macs = int(np.prod(shape[node.output[0]])) * shape[node.input[0]][-1]
        else:
            continue
        totals[op] = totals.get(op, 0) + macs
    return totals


@pytest.mark.parametrize("kind", ["det", "rec", "cls"])
def test_real_model_macs_match_an_independent_count(kind):
    model = ppocr_model(kind)
    x_shape = PPOCR_SHAPES[kind]
    expected = _independent_macs(model.proto, x_shape)
    assert expected.get("Conv", 0) > 10**7
    report = cost_of(model, {"x": x_shape})
    got = {op: report.macs_by_op.get(op) for op in expected}
    assert got == expected
    assert report.unknown_macs == []
    # parameters: every float initializer/Constant that some node reads, counted once
    params = 0
    seen = set()
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    for node in model.graph.node:
        for i in node.input:
            t = consts.get(i)
            if t is not None and i not in seen and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                seen.add(i)
                params += int(np.prod(t.dims))
    assert report.params == params


def test_cost_of_does_not_modify_the_model():
    model = ppocr_model("cls")
    digest = model.sha256()
    cost_of(model, {"x": PPOCR_SHAPES["cls"]})
    assert model.sha256() == digest


def test_cost_ignores_stale_value_info_after_an_edit():
    # h = x @ w recorded as [2, 3]; the weight is then pruned to 2 columns, as a pruning pass would
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert cost_of(model).macs_by_op == {"MatMul": 2 * 3 * 4, "Relu": 6}
    model.set_initializer("w", np.ones((4, 2), np.float32))
    rep = cost_of(model)
    assert rep.macs_by_op == {"MatMul": 2 * 2 * 4, "Relu": 4}
    assert rep.params == 8 and [layer.output_shape for layer in rep.layers] == [[2, 2], [2, 2]]


def test_shapes_onnx_inference_cannot_reach_are_measured():
    # the classifier reshapes with a target computed at run time: ONNX inference loses the shapes after it
    model = ppocr_model("cls")
    static_only = cost_of(model, {"x": PPOCR_SHAPES["cls"]}, runtime_shapes=False)
    assert "MatMul" not in static_only.macs_by_op and static_only.unknown_macs
    measured = cost_of(model, {"x": PPOCR_SHAPES["cls"]})
    assert measured.unknown_macs == [] and measured.macs_by_op["MatMul"] == 1 * 2 * 200
    assert measured.macs_by_op["Conv"] == static_only.macs_by_op["Conv"]
    # without static input shapes nothing can run: shapes stay unknown, no error
    assert cost_of(model).unknown_macs


def test_quantized_weights_behind_dequantize_linear_count_as_parameters():
    """An int8 weight read by DequantizeLinear is a parameter (1 byte each); its float scales too."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.int8), "wq")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "ws")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, name="dq"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, scale])
    report = cost_of(Model.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])))
    assert report.params == 8 * 4 * 3 * 3 + 8
    assert report.weight_bytes == 8 * 4 * 3 * 3 * 1 + 8 * 4
