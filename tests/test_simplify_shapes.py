from onnx import helper

from graphs import assert_exact, make_model, op_counts
from sculpt.examples import tiny_convnet
from sculpt.passes import create_pass

SHAPE_OPS = {"Shape", "Slice", "Concat", "Gather", "Unsqueeze", "Size"}


def test_computed_reshape_becomes_constant_once_the_input_is_static(tmp_path):
    m = tiny_convnet()
    assert "Shape" in op_counts(m)
    m.fix_input_shapes({"input": [2, 3, 32, 32]})
    res = create_pass("simplify-shapes")(m)
    assert res.modified
    assert not SHAPE_OPS & set(op_counts(res.model))
    reshape = next(n for n in res.model.graph.node if n.op_type == "Reshape")
    assert list(res.model.get_constant(reshape.input[1])) == [2, -1]
    assert_exact(m, res.model, tmp_path=tmp_path)


def test_dynamic_batch_keeps_the_shape_computation():
    m = tiny_convnet()  # batch dimension 'N' is dynamic
    res = create_pass("simplify-shapes")(m)
    assert "Shape" in op_counts(res.model)
    assert_exact(m, res.model, shapes={"input": [3, 3, 32, 32]})


def test_size_and_shape_slices():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1),
             helper.make_node("Size", ["x"], ["n"], name="size"),
             helper.make_node("Cast", ["s"], ["sf"], name="cast", to=1),
             helper.make_node("Cast", ["n"], ["nf"], name="cast2", to=1),
             helper.make_node("Mul", ["sf", "nf"], ["k"], name="mul"),
             helper.make_node("ReduceSum", ["x"], ["r"], name="rsum", keepdims=0),
             helper.make_node("Add", ["r", "k"], ["y"], name="add")]
    m = make_model(nodes, [("x", [2, 3, 4])], [("y", None)], opset=18)
    res = create_pass("simplify-shapes")(m)
    assert op_counts(res.model) == {"ReduceSum": 1, "Add": 1}
    assert_exact(m, res.model)
