import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.passes import create_pass


def test_constant_chain_folds_to_one_initializer(tmp_path):
    nodes = [
        helper.make_node("Constant", [], ["a"], name="ca", value=numpy_helper.from_array(f32(4))),
        helper.make_node("Constant", [], ["b"], name="cb", value_float=2.0),
        helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
        helper.make_node("Exp", ["ab"], ["e"], name="exp"),
        helper.make_node("Add", ["x", "e"], ["y"], name="add"),
    ]
    m = make_model(nodes, [("x", [2, 4])], [("y", [2, 4])])
    res = create_pass("constant-folding")(m)
    assert op_counts(res.model) == {"Add": 1}
    assert res.stats["constants_to_initializers"] == 2 and res.stats["folded_nodes"] == 2
    const = res.model.get_constant(res.model.graph.node[0].input[1])
    a = numpy_helper.to_array(nodes[0].attribute[0].t)
    np.testing.assert_allclose(const, np.exp(a * np.float32(2.0)), rtol=1e-6)  # onnxruntime exp vs numpy exp: 1 ulp
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_random_ops_and_graph_outputs_are_not_folded():
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], name="rand", shape=[2, 3]),
        helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(f32(2, 3))),
        helper.make_node("Neg", ["c"], ["out_const"], name="neg"),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
    ]
    m = make_model(nodes, [("x", [2, 3])], [("y", [2, 3]), ("out_const", [2, 3])])
    res = create_pass("constant-folding")(m)
    ops = op_counts(res.model)
    assert ops.get("RandomNormal") == 1 and ops.get("Neg") == 1 and ops.get("Add") == 1
    res.model.verify()


def test_expanding_op_over_the_size_limit_stays_a_node(tmp_path):
    shape = numpy_helper.from_array(np.array([64, 1024, 16], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="cos",
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=[shape])
    from sculpt.ir.model import Model

    m = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    small = create_pass("constant-folding", {"max_tensor_mb": 1})(m)
    assert "ConstantOfShape" in op_counts(small.model)  # 4 MB result > 1 MB limit
    big = create_pass("constant-folding", {"max_tensor_mb": 8})(m)
    assert op_counts(big.model) == {"Add": 1}
    assert_exact(m, small.model)
    assert_exact(m, big.model, tmp_path=tmp_path)


def test_shape_ops_with_integer_results_fold():
    nodes = [helper.make_node("Constant", [], ["s"], name="s",
                              value=numpy_helper.from_array(np.array([2, 3], np.int64))),
             helper.make_node("Concat", ["s", "m1"], ["shape"], name="cat", axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    m = make_model(nodes, [("x", [6, 4])], [("y", [2, 3, 4])], {"m1": np.array([-1], np.int64)})
    res = create_pass("constant-folding")(m)
    assert op_counts(res.model) == {"Reshape": 1}
    np.testing.assert_array_equal(res.model.get_constant(res.model.graph.node[0].input[1]), [2, 3, -1])
    assert_exact(m, res.model)


def test_nothing_to_fold_reports_unmodified():
    m = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [3])], [("y", [3])])
    res = create_pass("constant-folding")(m)
    assert not res.modified
    assert [n.SerializeToString() for n in res.model.graph.node] == [n.SerializeToString() for n in m.graph.node]
