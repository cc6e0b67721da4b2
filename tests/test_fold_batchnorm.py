import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.passes import create_pass


def _bn(name, x, y, c, **attrs):
    inits = {f"{name}.g": f32(c, low=0.5, high=1.5), f"{name}.b": f32(c), f"{name}.m": f32(c),
             f"{name}.v": f32(c, low=0.5, high=2.0)}
    node = helper.make_node("BatchNormalization", [x, *inits], [y], name=name, **attrs)
    return node, inits


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (8, False)])
def test_conv_bn_folds(groups, bias, tmp_path):
    w = {"w": f32(8, 8 // groups, 3, 3)}
    if bias:
        w["b"] = f32(8)
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], name="conv", pads=[1] * 4,
                            group=groups)
    bn, inits = _bn("bn", "c", "y", 8, epsilon=1e-3)
    m = make_model([conv, bn], [("x", [2, 8, 6, 6])], [("y", [2, 8, 6, 6])], {**w, **inits})
    res = create_pass("fold-batchnorm")(m)
    assert res.modified and res.stats["folded"] == 1
    assert op_counts(res.model) == {"Conv": 1}
    assert res.model.graph.node[0].output[0] == "y"  # graph output name kept
    assert_exact(m, res.model, tmp_path=tmp_path)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds(group, tmp_path):
    conv = helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", strides=[2, 2], group=group)
    bn, inits = _bn("bn", "c", "y", 6)
    # ConvTranspose weights are [Cin, Cout / group, kH, kW]
    m = make_model([conv, bn], [("x", [1, 4, 5, 5])], [("y", [1, 6, 11, 11])],
                   {"w": f32(4, 6 // group, 3, 3), "b": f32(6), **inits})
    res = create_pass("fold-batchnorm")(m)
    assert op_counts(res.model) == {"ConvTranspose": 1}
    assert_exact(m, res.model, tmp_path=tmp_path)


@pytest.mark.parametrize("trans_b,bias_shape", [(0, (5,)), (1, (5,)), (1, (1, 5)), (0, None)])
def test_gemm_bn_folds(trans_b, bias_shape, tmp_path):
    inputs = ["x", "w"] + (["c"] if bias_shape else [])
    gemm = helper.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, alpha=0.7, beta=1.3)
    bn, inits = _bn("bn", "g", "y", 5)
    init = {"w": f32(5, 7) if trans_b else f32(7, 5), **inits}
    if bias_shape:
        init["c"] = f32(*bias_shape)
    m = make_model([gemm, bn], [("x", [3, 7])], [("y", [3, 5])], init)
    res = create_pass("fold-batchnorm")(m)
    assert op_counts(res.model) == {"Gemm": 1}
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_not_folded_when_conv_output_has_other_readers():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    bn, inits = _bn("bn", "c", "y", 4)
    relu = helper.make_node("Relu", ["c"], ["z"], name="relu")
    m = make_model([conv, bn, relu], [("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4]), ("z", [1, 4, 4, 4])],
                   {"w": f32(4, 3, 1, 1), **inits})
    res = create_pass("fold-batchnorm")(m)
    assert not res.modified
    assert "other readers" in res.stats["skipped"][0]
    assert op_counts(res.model)["BatchNormalization"] == 1


def test_not_folded_after_non_linear_op():
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu")
    bn, inits = _bn("bn", "r", "y", 3)
    m = make_model([relu, bn], [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])], inits)
    res = create_pass("fold-batchnorm")(m)
    assert not res.modified and op_counts(res.model) == {"Relu": 1, "BatchNormalization": 1}


def test_not_folded_with_dynamic_statistics():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    bn = helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")
    m = make_model([conv, bn], [("x", [1, 3, 4, 4]), ("g", [4])], [("y", [1, 4, 4, 4])],
                   {"w": f32(4, 3, 1, 1), "b": f32(4), "m": f32(4), "v": f32(4, low=0.5, high=1)})
    res = create_pass("fold-batchnorm")(m)
    assert not res.modified and "not constant" in res.stats["skipped"][0]


def test_shared_weight_is_not_changed_for_its_other_reader(tmp_path):
    # two convs share one weight tensor; only one is followed by BN
    c1 = helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1")
    c2 = helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2")
    bn, inits = _bn("bn", "c1", "y1", 4)
    m = make_model([c1, c2, bn], [("x", [1, 3, 4, 4])], [("y1", [1, 4, 4, 4]), ("c2", [1, 4, 4, 4])],
                   {"w": f32(4, 3, 1, 1), **inits})
    res = create_pass("fold-batchnorm")(m)
    assert res.modified
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    assert_exact(m, res.model, tmp_path=tmp_path)
