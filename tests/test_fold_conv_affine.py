import numpy as np
import pytest
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.passes import create_pass


@pytest.mark.parametrize("op,const_shape", [
    ("Mul", (1, 6, 1, 1)), ("Mul", (6, 1, 1)), ("Mul", ()), ("Mul", (1,)),
    ("Add", (1, 6, 1, 1)), ("Add", (6, 1, 1)), ("Add", ()),
    ("Div", (1, 6, 1, 1)), ("Sub", (6, 1, 1)),
])
def test_conv_then_constant_folds(op, const_shape, tmp_path):
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4)
    const = f32(*const_shape, low=0.5, high=2.0) if const_shape else np.array(1.7, np.float32)
    aff = helper.make_node(op, ["c", "k"], ["y"], name="affine")
    m = make_model([conv, aff], [("x", [1, 3, 5, 5])], [("y", [1, 6, 5, 5])],
                   {"w": f32(6, 3, 3, 3), "b": f32(6), "k": const})
    res = create_pass("fold-conv-affine")(m)
    assert res.modified and op_counts(res.model) == {"Conv": 1}
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_chain_of_mul_and_add_folds_completely(tmp_path):
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    mul = helper.make_node("Mul", ["s", "c"], ["m"], name="mul")  # constant on the left
    add = helper.make_node("Add", ["m", "t"], ["y"], name="add")
    m = make_model([conv, mul, add], [("x", [2, 4, 3, 3])], [("y", [2, 5, 3, 3])],
                   {"w": f32(5, 4, 1, 1), "s": f32(1, 5, 1, 1), "t": f32(5, 1, 1)})
    res = create_pass("fold-conv-affine")(m)
    assert res.stats["folded"] == 2 and op_counts(res.model) == {"Conv": 1}
    assert_exact(m, res.model, tmp_path=tmp_path)


@pytest.mark.parametrize("case", ["spatial", "const_minus_x", "const_div_x", "two_readers", "broadcast_grows"])
def test_not_folded(case):
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    inits = {"w": f32(4, 3, 1, 1)}
    nodes = [conv]
    outputs = [("y", None)]
    if case == "spatial":  # varies along width: not a per-channel map
        nodes.append(helper.make_node("Mul", ["c", "k"], ["y"], name="op"))
        inits["k"] = f32(1, 1, 1, 4)
    elif case == "const_minus_x":
        nodes.append(helper.make_node("Sub", ["k", "c"], ["y"], name="op"))
        inits["k"] = f32(1, 4, 1, 1)
    elif case == "const_div_x":
        nodes.append(helper.make_node("Div", ["k", "c"], ["y"], name="op"))
        inits["k"] = f32(1, 4, 1, 1)
    elif case == "two_readers":
        nodes.append(helper.make_node("Mul", ["c", "k"], ["y"], name="op"))
        nodes.append(helper.make_node("Relu", ["c"], ["z"], name="relu"))
        inits["k"] = f32(1, 4, 1, 1)
        outputs.append(("z", None))
    else:  # a rank-5 constant would broadcast the output to rank 5
        nodes.append(helper.make_node("Add", ["c", "k"], ["y"], name="op"))
        inits["k"] = f32(1, 1, 4, 1, 1)
    m = make_model(nodes, [("x", [1, 3, 4, 4])], outputs, inits)
    res = create_pass("fold-conv-affine")(m)
    assert not res.modified
    assert len(res.model.graph.node) == len(nodes)
