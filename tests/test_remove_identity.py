import numpy as np
from onnx import helper, numpy_helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.passes import create_pass


def test_identity_and_dropout_in_the_middle(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="id"),
             helper.make_node("Dropout", ["b"], ["c"], name="drop"),
             helper.make_node("Sigmoid", ["c"], ["y"], name="sig")]
    m = make_model(nodes, [("x", [2, 5])], [("y", [2, 5])])
    res = create_pass("remove-identity")(m)
    assert op_counts(res.model) == {"Relu": 1, "Sigmoid": 1}
    assert res.stats["removed_nodes"] == 2
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_identity_producing_a_graph_output_keeps_the_output_name(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["y"], name="id"),
             helper.make_node("Neg", ["a"], ["z"], name="neg")]
    m = make_model(nodes, [("x", [4])], [("y", [4]), ("z", [4])])
    res = create_pass("remove-identity")(m)
    assert op_counts(res.model) == {"Relu": 1, "Neg": 1}
    assert res.model.output_names == ["y", "z"]
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_kept_where_removal_would_change_the_interface():
    # input → Identity → output: the graph needs the node to have distinct names
    m = make_model([helper.make_node("Identity", ["x"], ["y"], name="id")], [("x", [3])], [("y", [3])])
    assert not create_pass("remove-identity")(m).modified


def test_dropout_in_training_mode_or_with_used_mask_is_kept():
    train = helper.make_node("Dropout", ["x", "ratio", "mode"], ["y"], name="drop")
    m = make_model([train], [("x", [3])], [("y", [3])], {"ratio": np.array(0.5, np.float32),
                                                          "mode": np.array(True)})
    assert not create_pass("remove-identity")(m).modified
    mask = helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop")
    relu = helper.make_node("Relu", ["d"], ["y"], name="relu")
    from onnx import TensorProto

    m2 = make_model([mask, relu], [("x", [3])],
                    [("y", [3]), helper.make_tensor_value_info("mask", TensorProto.BOOL, [3])])
    assert not create_pass("remove-identity")(m2).modified
