"""explicit-pads and fold-pad: a Conv's auto_pad and a constant zero Pad before it become the Conv's own
pads (exact in onnxruntime, full checker), and what they must not touch stays."""

import numpy as np
import onnx
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.passes import create_pass
from sculpt.passes.explicit_pads import same_pads


def _attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_same_pads_put_the_odd_unit_where_the_mode_says():
    assert same_pads(368, 2, 1, 1, upper=True) == (0, 1)  # PP-HGNet's stem: 2x2 conv, SAME_UPPER
    assert same_pads(368, 2, 1, 1, upper=False) == (1, 0)
    assert same_pads(7, 3, 2, 1, upper=True) == (1, 1)    # out 4: (4 - 1) * 2 + 3 - 7 = 2
    assert same_pads(8, 3, 2, 1, upper=True) == (0, 1)    # out 4: 6 + 3 - 8 = 1
    assert same_pads(9, 3, 1, 2, upper=False) == (2, 2)   # dilated: 8 + 5 - 9 = 4... split 2, 2


def test_auto_pad_becomes_explicit_pads(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="upper", auto_pad="SAME_UPPER", kernel_shape=[2, 2]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="lower", auto_pad="SAME_LOWER", strides=[2, 2]),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="valid", auto_pad="VALID")]
    m = make_model(nodes, [("x", [1, 3, 11, 11])], [("y", [1, 5, 4, 4])],
                   {"w1": f32(4, 3, 2, 2), "w2": f32(6, 4, 3, 3), "w3": f32(5, 6, 3, 3)})
    m.infer_shapes()
    res = create_pass("explicit-pads")(m)
    assert res.stats["rewritten"] == 3
    convs = {n.name: n for n in res.model.graph.node}
    assert [_attr(convs[n], "auto_pad") for n in convs] == [None] * 3
    assert _attr(convs["upper"], "pads") == [0, 0, 1, 1]
    assert _attr(convs["lower"], "pads") == [1, 1, 1, 1]   # 11 -> 6 at stride 2: 5 * 2 + 3 - 11 = 2
    assert _attr(convs["valid"], "pads") == [0, 0, 0, 0]
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_a_zero_pad_folds_into_the_conv_that_reads_it(tmp_path):
    pads = np.array([0, 0, 0, 1, 0, 0, 2, 1], np.int64)  # top 0, left 1, bottom 2, right 1
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    m = make_model(nodes, [("x", [1, 3, 9, 9])], [("y", [1, 4, 11, 11])], {"pads": pads, "w": f32(4, 3, 3, 3)})
    res = create_pass("fold-pad")(m)
    assert res.stats["folded"] == 1 and op_counts(res.model) == {"Conv": 1}
    assert _attr(res.model.graph.node[0], "pads") == [1, 2, 3, 2]
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_pads_that_are_not_a_convs_zero_padding_stay():
    """A non-zero pad value, a padded channel axis, a reflect pad and a Pad also read by a Relu."""
    w = f32(4, 3, 3, 3)
    spatial = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    cases = [
        ([helper.make_node("Pad", ["x", "pads", "v"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"])],
         {"pads": spatial, "v": np.array(1.0, np.float32), "w": w}, [1, 4, 9, 9]),
        ([helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"])],
         {"pads": np.array([0, 1, 1, 1, 0, 0, 1, 1], np.int64), "w": f32(4, 4, 3, 3)}, [1, 4, 9, 9]),
        ([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"), helper.make_node("Conv", ["p", "w"], ["y"])],
         {"pads": spatial, "w": w}, [1, 4, 9, 9]),
    ]
    for nodes, inits, out in cases:
        m = make_model(nodes, [("x", [1, 3, 9, 9])], [("y", out)], inits)
        assert not create_pass("fold-pad")(m).modified
    shared = [helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Conv", ["p", "w"], ["y"]),
              helper.make_node("Relu", ["p"], ["z"])]
    m = make_model(shared, [("x", [1, 3, 9, 9])], [("y", [1, 4, 9, 9]), ("z", [1, 3, 11, 11])],
                   {"pads": spatial, "w": w})
    assert not create_pass("fold-pad")(m).modified


def test_canonicalize_runs_both():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], auto_pad="SAME_UPPER", kernel_shape=[2, 2])]
    m = make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 10, 10])],
                   {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": f32(4, 3, 2, 2)})
    res = create_pass("canonicalize")(m)
    assert op_counts(res.model) == {"Conv": 1}
    assert _attr(res.model.graph.node[0], "pads") == [1, 1, 2, 2]
    onnx.checker.check_model(res.model.proto, full_check=True)
