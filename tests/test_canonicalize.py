import numpy as np
import onnx
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.examples import tiny_convnet
from sculpt.passes import create_pass


def test_tiny_convnet_is_fully_canonical(tmp_path):
    m = tiny_convnet()
    m.fix_input_shapes({"input": [1, 3, 32, 32]})
    res = create_pass("canonicalize")(m)
    ops = op_counts(res.model)
    assert set(ops) == {"Conv", "Relu", "Add", "GlobalAveragePool", "Reshape", "Gemm", "Softmax"}, ops
    assert ops["Conv"] == 4
    assert res.stats["fold-batchnorm"]["folded"] == 3
    assert res.stats["fold-conv-affine"]["folded"] == 2
    assert res.stats["remove-identity"]["removed_nodes"] == 2
    assert_exact(m, res.model, tmp_path=tmp_path)
    # value_info is fresh: every intermediate tensor has a static shape
    for node in res.model.graph.node:
        for o in node.output:
            assert res.model.static_shape(o) is not None, o


def test_canonicalize_is_idempotent():
    m = tiny_convnet().fix_input_shapes({"input": [1, 3, 32, 32]})
    once = create_pass("canonicalize")(m).model
    twice = create_pass("canonicalize")(once)
    assert not twice.modified
    assert op_counts(once) == op_counts(twice.model)


def test_initializers_listed_as_inputs_are_frozen_and_folded(tmp_path):
    # IR 3 style: every weight is also a graph input
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    bn = helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")
    inits = {"w": f32(4, 3, 1, 1), "g": f32(4, low=0.5, high=1.5), "b": f32(4), "m": f32(4),
             "v": f32(4, low=0.5, high=1.5)}
    inputs = [("x", [1, 3, 4, 4])] + [(k, list(v.shape)) for k, v in inits.items()]
    m = make_model([conv, bn], inputs, [("y", [1, 4, 4, 4])], inits, opset=7, ir_version=3)
    assert m.input_names == ["x"]
    res = create_pass("canonicalize")(m)
    assert op_counts(res.model) == {"Conv": 1}
    assert [i.name for i in res.model.graph.input] == ["x"]
    assert res.model.proto.ir_version >= 4
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_options_switch_steps_off():
    m = tiny_convnet().fix_input_shapes({"input": [1, 3, 32, 32]})
    res = create_pass("canonicalize", {"fold_batchnorm": "false", "fold_affine": False})(m)
    ops = op_counts(res.model)
    assert ops["BatchNormalization"] == 3 and ops["Mul"] == 1
    assert "Identity" not in ops
