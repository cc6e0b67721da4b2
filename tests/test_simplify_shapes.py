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


def test_dynamic_batch_gets_a_constant_target_that_copies_it():
    m = tiny_convnet()  # batch dimension 'N' is dynamic; Reshape(x, Concat(Shape(x)[0:1], [-1]))
    res = create_pass("simplify-shapes")(m)
    assert not SHAPE_OPS & set(op_counts(res.model))
    reshape = next(n for n in res.model.graph.node if n.op_type == "Reshape")
    assert list(res.model.get_constant(reshape.input[1])) == [0, -1]  # 0: the batch copied
    assert res.model.input_shapes()["input"][0] == "N"
    for batch in (1, 3):
        assert_exact(m, res.model, shapes={"input": [batch, 3, 32, 32]})


def _computed_target_model(target_nodes, allowzero=None):
    """x [N, 4, 2, W] -> Reshape(x, target) -> y, the target built by ``target_nodes`` into 't'."""
    extra = {} if allowzero is None else {"allowzero": allowzero}
    nodes = target_nodes + [helper.make_node("Reshape", ["x", "t"], ["y"], name="reshape", **extra)]
    return make_model(nodes, [("x", ["N", 4, 2, "W"])], [("y", None)], opset=14)


def _ints(name, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, 7, [len(values)], values))


def test_computed_target_with_dims_in_place_and_one_unknown():
    # [N, 4*2, W] from Shape(x)[0], 8, Shape(x)[3]: N copied (0), W the one unknown left (-1)
    m = _computed_target_model([
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        _ints("i0", [0]), _ints("i3", [3]), _ints("c8", [8]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="g0"),
        helper.make_node("Gather", ["s", "i3"], ["w"], axis=0, name="g3"),
        helper.make_node("Cast", ["w"], ["w32"], to=6, name="to32"),
        helper.make_node("Cast", ["w32"], ["w64"], to=7, name="to64"),
        helper.make_node("Concat", ["n", "c8", "w64"], ["t"], axis=0, name="concat")])
    res = create_pass("simplify-shapes")(m)
    reshape = next(n for n in res.model.graph.node if n.op_type == "Reshape")
    assert list(res.model.get_constant(reshape.input[1])) == [0, 8, -1]
    assert op_counts(res.model) == {"Reshape": 1}
    for shape in ([1, 4, 2, 5], [3, 4, 2, 7]):
        assert_exact(m, res.model, shapes={"x": shape})


def test_computed_target_left_alone_when_it_cannot_be_constant():
    # two unknown elements (W read at another position, and an unknown computed value): kept as it is
    shape_nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"), _ints("i3", [3]), _ints("i0", [0]),
                   helper.make_node("Gather", ["s", "i3"], ["w"], axis=0, name="g3"),
                   helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="g0"),
                   helper.make_node("Concat", ["w", "n", "c"], ["t"], axis=0, name="concat")]
    m = _computed_target_model(shape_nodes[:5] + [
        helper.make_node("Mul", ["n", "n"], ["c"], name="square")] + shape_nodes[5:])
    res = create_pass("simplify-shapes")(m)
    assert "Shape" in op_counts(res.model)
    # allowzero=1: a 0 would be literal, so a dimension read in place cannot become a copy
    m = _computed_target_model([helper.make_node("Shape", ["x"], ["t"], name="shape")], allowzero=1)
    assert "Shape" in op_counts(create_pass("simplify-shapes")(m).model)


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
