"""LayerInputStream: layer inputs reached in network order by running only the nodes between stops.

What each step returns must equal the tensor the whole model computes (onnxruntime, same samples),
also after the node just reached has been edited, and on graphs with subgraphs (run whole).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphs import f32, make_model
from sculpt.runtime import make_session
from sculpt.runtime.layer_inputs import LayerInputStream
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, ppocr_model
from sculpt.passes import Pipeline
from sculpt.textdata import text_input


def _whole(model: Model, samples, tensor):
    sess = make_session(model, extra_outputs=[tensor])
    return [sess.run([tensor], s)[0] for s in samples]


def _close(a, b, rel=1e-5):
    scale = max(float(np.abs(b).max()), 1e-6)
    return float(np.abs(a - b).max()) <= rel * scale


@pytest.fixture(scope="module")
def rec():
    shapes = {"x": PPOCR_SHAPES["rec"]}
    m = Pipeline.from_specs(["canonicalize"], input_shapes=shapes, statistics=False).run(ppocr_model("rec")).model
    return m, [{"x": text_input(shapes["x"], k)} for k in range(2)]


def test_every_conv_input_of_ppocr_rec_matches_the_whole_model(rec):
    model, samples = rec
    stream = LayerInputStream(model, samples)
    convs = [(k, n) for k, n in enumerate(model.graph.node) if n.op_type in ("Conv", "MatMul")]
    assert len(convs) > 30
    # every 5th layer: cuts land on residual branches, SE blocks, the neck's reshapes
    for k, node in convs[::5]:
        got = stream.inputs(k, node.input[0])
        want = _whole(model, samples, node.input[0])
        assert len(got) == len(samples)
        for g, w in zip(got, want):
            assert g.shape == w.shape and _close(g, w), node.name


def test_an_edit_at_the_current_node_is_seen_by_the_next_step(rec):
    model, samples = rec
    model = model.clone()
    stream = LayerInputStream(model, samples)
    convs = [(k, n) for k, n in enumerate(model.graph.node) if n.op_type == "Conv"]
    (k0, first), (k1, second) = convs[2], convs[3]
    before = stream.inputs(k0, first.input[0])
    w = model.get_constant(first.input[1])
    model.replace_constant_input(first, 1, (w * 0.5).astype(w.dtype), suffix="edited")
    got = stream.inputs(k1, second.input[0])
    want = _whole(model, samples, second.input[0])
    for g, w_ in zip(got, want):
        assert _close(g, w_)
    # the edit changed what the next layer sees (the check above is not vacuous)
    old = _whole(Model.wrap(rec[0].proto), samples, second.input[0])
    assert not _close(got[0], old[0])
    assert all(np.array_equal(a, b) for a, b in zip(before, _whole(model, samples, first.input[0])))


def test_going_back_or_changing_the_node_list_restarts():
    x = [("x", [1, 4, 6, 6])]
    inits = {"w0": f32(4, 4, 3, 3), "w1": f32(4, 4, 3, 3)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="r0"),
             helper.make_node("Conv", ["b", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    model = make_model(nodes, x, [("y", [1, 4, 6, 6])], inits)
    samples = [{"x": f32(1, 4, 6, 6)}]
    stream = LayerInputStream(model, samples)
    assert _close(stream.inputs(2, "b")[0], _whole(model, samples, "b")[0])
    assert _close(stream.inputs(1, "a")[0], _whole(model, samples, "a")[0])  # back: from the inputs
    model.graph.node.insert(1, helper.make_node("Neg", ["a"], ["a_neg"], name="extra"))
    assert _close(stream.inputs(3, "b")[0], _whole(model, samples, "b")[0])


def test_graphs_with_subgraphs_run_whole():
    then_graph = helper.make_graph([helper.make_node("Relu", ["a"], ["t"], name="then_relu")], "then", [],
                                   [helper.make_tensor_value_info("t", 1, [1, 4, 6, 6])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["a"], ["e"], name="else_neg")], "else", [],
                                   [helper.make_tensor_value_info("e", 1, [1, 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=then_graph, else_branch=else_graph),
             helper.make_node("Conv", ["b", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 4, 6, 6])],
                                  {"w0": f32(4, 4, 3, 3), "w1": f32(4, 4, 3, 3), "cond": np.array(True)})
    samples = [{"x": f32(1, 4, 6, 6)}]
    got = LayerInputStream(model, samples).inputs(2, "b")[0]
    assert (got >= 0).all() and _close(got, _whole(model, samples, "b")[0])
