"""flush-subnormals: subnormal float constants become zero, outputs bit-equal in onnxruntime (full checker),
and what is not a constant subnormal stays; canonicalize runs it unless told not to."""

import numpy as np
from onnx import helper, numpy_helper

from graphs import assert_exact, f32, make_model
from sculpt.passes import Pipeline, create_pass
from sculpt.passes.flush_subnormals import subnormal_mask
from sculpt.runtime import make_session

TINY = np.finfo(np.float32).tiny  # the smallest normal float32, 1.18e-38


def _conv_with_subnormal_weights():
    w = f32(8, 4, 1, 1)
    w.reshape(-1)[::3] = TINY / np.float32(7)       # a third of the weights subnormal, like PP-OCRv6 det's conv
    w.reshape(-1)[1] = -TINY                          # the smallest normal: kept
    bias = np.array([TINY / 2, 0, 1, -TINY / 3, 0, 0, 2, 0], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    return make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 8, 5, 5])], {"w": w, "b": bias}), w, bias


def test_subnormal_weights_become_zero_and_the_outputs_stay_bit_equal(tmp_path):
    m, w, bias = _conv_with_subnormal_weights()
    expected = int(subnormal_mask(w).sum() + subnormal_mask(bias).sum())
    assert expected == len(range(0, w.size, 3)) + 2
    res = create_pass("flush-subnormals")(m)
    assert res.modified and res.stats == {"values": expected, "tensors": 2}
    w2, b2 = res.model.get_constant("w"), res.model.get_constant("b")
    assert not subnormal_mask(w2).any() and not subnormal_mask(b2).any()
    assert w2.reshape(-1)[1] == -TINY and np.array_equal(w2[~subnormal_mask(w)], w[~subnormal_mask(w)])
    assert_exact(m, res.model, tmp_path=tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    before, after = (make_session(model).run(None, {"x": x})[0] for model in (m, res.model))
    assert np.array_equal(before, after)
    assert not create_pass("flush-subnormals")(res.model).modified  # nothing left


def test_graph_inputs_integers_and_normal_constants_are_left_alone():
    m, _, _ = _conv_with_subnormal_weights()
    m.graph.input.append(helper.make_tensor_value_info("w", 1, [8, 4, 1, 1]))  # overridable: not a constant
    shape = np.array([1, 8, 25], np.int64)
    m.set_initializer("shape", shape)
    res = create_pass("flush-subnormals")(m)
    assert res.stats == {"values": 2, "tensors": 1}  # the bias only
    w_tensor = next(t for t in res.model.graph.initializer if t.name == "w")
    assert subnormal_mask(numpy_helper.to_array(w_tensor)).any()
    assert np.array_equal(res.model.get_constant("shape"), shape)


def test_canonicalize_flushes_unless_told_not_to():
    m, w, _ = _conv_with_subnormal_weights()
    flushed = Pipeline.from_specs(["canonicalize"]).run(m.clone()).model
    assert not subnormal_mask(flushed.get_constant("w")).any()
    kept = Pipeline.from_specs(["canonicalize:flush_subnormals=false"]).run(m.clone()).model
    assert subnormal_mask(kept.get_constant("w")).sum() == subnormal_mask(w).sum()
