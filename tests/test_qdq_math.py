"""Unit tests of the quantization mechanism (sculpt.ir.quantization): scale/zero-point math, rounding
against onnxruntime's QuantizeLinear, weight and bias quantization, calibration observers, sensitivity
selection."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.runtime import make_session
from sculpt.ir import quantization as qz


def _stats(values, bins=2048):
    s = qz.TensorStats(bins=bins)
    s.observe_extremes(values)
    s.observe_histogram(values)
    return s


def test_uint8_params_contain_zero_exactly():
    p = qz.activation_params(0.5, 3.0, "uint8")  # range widened to [0, 3]
    assert p.zero_point == 0 and p.dtype == "uint8"
    assert p.hi == pytest.approx(3.0, rel=1e-6)
    p = qz.activation_params(-1.0, 3.0, "uint8")
    assert 0 < p.zero_point < 255
    assert qz.fake_quantize(np.zeros(3, np.float32), p).tolist() == [0.0, 0.0, 0.0]
    assert p.lo == pytest.approx(-1.0, abs=p.scale) and p.hi == pytest.approx(3.0, abs=p.scale)


def test_int8_params_are_symmetric():
    p = qz.activation_params(-2.0, 5.0, "int8")
    assert p.zero_point == 0
    assert p.scale == pytest.approx(5.0 / 127, rel=1e-6)
    # QuantizeLinear saturates to the type's range, as onnxruntime does
    assert qz.quantize(np.array([-100.0, 100.0]), p.scale, 0, "int8").tolist() == [-128, 127]


def test_degenerate_range_gets_unit_scale():
    assert qz.activation_params(0.0, 0.0, "uint8").scale == 1.0
    assert qz.activation_params(0.0, 0.0, "int8").scale == 1.0
    with pytest.raises(ValueError):
        qz.activation_params(-np.inf, 1.0)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_quantize_matches_onnxruntime_including_ties(dtype):
    p = qz.activation_params(-3.0, 5.0, dtype)
    rng = np.random.default_rng(0)
    ties = (np.arange(-400, 400) + 0.5) * np.float32(p.scale)  # exact halves: round half to even
    x = np.concatenate([rng.uniform(-8, 8, 1000), ties]).astype(np.float32)
    elem = TensorProto.UINT8 if dtype == "uint8" else TensorProto.INT8
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", elem, [x.size])],
        [numpy_helper.from_array(p.scale_array(), "s"), numpy_helper.from_array(p.zero_point_array(), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    ref = make_session(model).run(None, {"x": x})[0]
    ours = qz.quantize(x, p.scale, p.zero_point, dtype)
    np.testing.assert_array_equal(ours, ref)


def test_weights_per_channel_are_symmetric_int8_and_dequantize_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.01, 1, 1, 1e-3],
                                                                         np.float32).reshape(-1, 1, 1, 1)
    w[4] = 0.0  # a dead channel
    q = qz.quantize_weight(w, axis=0)
    assert q.values.dtype == np.int8 and q.scale.shape == (6,)
    assert q.values.min() >= -127 and q.values.max() <= 127
    live = [0, 1, 2, 3, 5]
    assert all(np.abs(q.values[c]).max() == 127 for c in live)  # every live channel uses the full range
    assert q.scale[4] == 1.0 and not q.values[4].any()
    err = np.abs(q.dequantized() - w).reshape(6, -1).max(axis=1)
    assert np.all(err <= q.scale / 2 * (1 + 1e-5))
    per_tensor = qz.quantize_weight(w, axis=None)
    assert per_tensor.scale.shape == () and per_tensor.axis is None
    # per channel is never worse than per tensor, and much better on the small channels
    assert np.abs(q.dequantized()[2] - w[2]).max() < np.abs(per_tensor.dequantized()[2] - w[2]).max() / 100


def test_weights_on_another_axis():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    q = qz.quantize_weight(w, axis=1)
    assert q.scale.shape == (7,)
    np.testing.assert_allclose(q.scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)


def test_bias_is_int32_with_input_times_weight_scale():
    b = np.array([0.5, -1.25, 3.0, 0.0], np.float32)
    w_scale = np.array([0.01, 0.02, 0.03, 0.04], np.float32)
    q, scale = qz.quantize_bias(b, 0.05, w_scale)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(scale, np.float32(0.05) * w_scale)
    assert np.all(np.abs(q * scale.astype(np.float64) - b) <= scale / 2 + 1e-9)


def test_minmax_and_percentile_ranges():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 50.0]  # a few outliers
    s = _stats(x)
    assert qz.choose_range(s, "minmax") == (pytest.approx(-35.0), pytest.approx(50.0))
    lo, hi = qz.choose_range(s, "percentile", percentile=99.9)
    assert -4.0 < lo < -2.5 and 2.5 < hi < 4.0  # the 0.1% tails (about 3.1 sigma) are clipped
    with pytest.raises(ValueError):
        qz.choose_range(s, "percentile", percentile=10)


def test_entropy_threshold_keeps_the_bulk_and_clips_outliers():
    rng = np.random.default_rng(4)
    gauss = _stats(rng.standard_normal(500_000).astype(np.float32))
    lo, hi = qz.choose_range(gauss, "entropy", "int8")
    assert 2.5 < hi <= gauss.hi and gauss.lo <= lo < -2.5
    heavy = _stats(np.concatenate([rng.laplace(size=300_000), [80.0, -70.0]]).astype(np.float32))
    lo, hi = qz.choose_range(heavy, "entropy", "int8")
    assert 3.0 < hi < heavy.absmax / 4 and lo == -hi  # the two outliers are clipped away


def test_mse_range_has_the_least_squared_error_of_all_methods():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.laplace(size=300_000), [60.0, -45.0]]).astype(np.float32)
    s = _stats(x)
    errors = {}
    for method in qz.RANGE_METHODS:
        p = qz.activation_params(*qz.choose_range(s, method, "uint8"), "uint8")
        errors[method] = float(np.mean((qz.fake_quantize(x, p) - x) ** 2))
    assert errors["mse"] <= min(errors.values()) * 1.02, errors
    assert errors["mse"] < errors["minmax"] / 1.5, errors


def test_non_negative_tensors_keep_zero_at_the_bottom():
    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    s = _stats(x)
    for method in qz.RANGE_METHODS:
        lo, hi = qz.choose_range(s, method, "uint8")
        assert lo == 0.0 and hi > 0
        assert qz.activation_params(lo, hi, "uint8").zero_point == 0


def test_select_sensitive_by_count_and_budget():
    errors = {"a": 0.5, "b": 0.01, "c": 0.2, "d": 0.02}
    assert qz.select_sensitive(errors, count=2) == ["a", "c"]
    assert qz.select_sensitive(errors, budget=0.1) == ["a", "c"]  # remaining 0.03 <= 0.1
    assert qz.select_sensitive(errors, budget=0.025) == ["a", "c", "d"]
    assert qz.select_sensitive(errors, count=1, budget=1.0) == ["a"]
    assert qz.select_sensitive(errors) == []
