"""The sparsify pass: R×1 block pruning along output channels, targets, saliency, layer choice, report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import make_model
from sculpt.runtime import compare_models, random_inputs
from sculpt.errors import OptionError, PassError
from sculpt.ir.calibration import CalibrationSet
from sculpt.passes import PassContext, create_pass

RNG = np.random.default_rng(7)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def small_net(batch=2):
    """Conv 3×3 (32←8) → Relu → Conv 1×1 (20←32, 20 not a multiple of 8) → Flatten → Gemm(transB) →
    MatMul; a grouped Conv on a side branch (left alone)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv1x1"),
        helper.make_node("Conv", ["r1", "wd"], ["dw"], name="depthwise", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["dw"], ["dwm"], name="dw_mean", keepdims=0),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    inits = {"w1": _w(32, 8, 3, 3), "b1": _w(32), "w2": _w(20, 32, 1, 1), "wd": _w(32, 1, 3, 3),
             "wg": _w(24, 20 * 6 * 6), "bg": _w(24), "wm": _w(24, 16)}
    return make_model(nodes, [("x", [batch, 8, 6, 6])], [("y", [batch, 16]), ("dwm", None)], inits)


def _matrices(model):
    """Weights of the sparsifiable layers as [outputs, inputs] matrices."""
    g = model.get_constant
    return {"conv3x3": g("w1").reshape(32, -1), "conv1x1": g("w2").reshape(20, -1), "gemm": g("wg"),
            "matmul": g("wm").T}


def _assert_blocked(matrix, r):
    rows = -(-matrix.shape[0] // r) * r
    padded = np.zeros((rows, matrix.shape[1]), matrix.dtype)
    padded[:matrix.shape[0]] = matrix
    blocks = padded.reshape(-1, r, matrix.shape[1])
    zero_any = (blocks == 0).any(axis=1)
    zero_all = (blocks == 0).all(axis=1)
    # padding rows are zero, so a partly filled last block counts as zero where its real rows are
    real = matrix.reshape(-1) if r == 1 else None
    if real is None:
        full_blocks = matrix.shape[0] // r
        assert np.array_equal(zero_any[:full_blocks], zero_all[:full_blocks]), "a block is only partly zero"


@pytest.mark.parametrize("block,r", [("1x1", 1), ("4x1", 4), ("8x1", 8), ("16x1", 16)])
def test_layer_sparsity_in_blocks(block, r, tmp_path):
    model = small_net()
    res = create_pass("sparsify", {"sparsity": 0.75, "block": block})(model)
    assert res.modified
    out = res.model
    for name, m in _matrices(out).items():
        _assert_blocked(m, r)
        zeros = float(np.mean(m == 0))
        assert 0.70 <= zeros <= 0.80, (name, zeros)
    # untouched: the grouped conv, biases; the original model
    np.testing.assert_array_equal(out.get_constant("wd"), model.get_constant("wd"))
    np.testing.assert_array_equal(out.get_constant("b1"), model.get_constant("b1"))
    assert float(np.mean(model.get_constant("w1") == 0)) == 0
    skipped = {s["layer"]: s["reason"] for s in res.stats["skipped"]}
    assert skipped["depthwise"] == "grouped Conv"
    layers = {l["layer"]: l for l in res.stats["layers"]}
    assert set(layers) == {"conv3x3", "conv1x1", "gemm", "matmul"}
    assert all(l["block"] == block and "weight_rel" in l["error"] and 0 < l["error"]["weight_rel"] < 1
               for l in layers.values())
    # the kept weights are the original ones (pruning, not refitting)
    kept = out.get_constant("w1") != 0
    np.testing.assert_array_equal(out.get_constant("w1")[kept], model.get_constant("w1")[kept])
    # runs in onnxruntime, valid ONNX
    path = tmp_path / "sparse.onnx"
    out.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    cmp = compare_models(model, out, count=1)
    assert 0 < cmp.max_rel < 10


def test_magnitude_keeps_the_largest_blocks():
    w = np.zeros((8, 4, 1, 1), np.float32)
    w[:, 0] = 5.0
    w[:, 1] = 0.1
    w[:4, 2] = 3.0  # half a block: score between the others
    w[:, 3] = 1.0
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [("x", [1, 4, 2, 2])],
                       [("y", [1, 8, 2, 2])], {"w": w})
    out = create_pass("sparsify", {"sparsity": 0.5, "block": "8x1"})(model).model.get_constant("w")
    kept = sorted(np.flatnonzero(np.abs(out[:, :, 0, 0]).sum(0)))
    assert kept == [0, 2]


def test_global_scope_reaches_the_total_and_differs_per_layer():
    model = small_net()
    res = create_pass("sparsify", {"sparsity": 0.6, "block": "4x1", "scope": "global"})(model)
    mats = _matrices(res.model)
    total = sum(m.size for m in mats.values())
    zeros = sum(int((m == 0).sum()) for m in mats.values())
    assert abs(zeros / total - 0.6) < 0.02
    per_layer = [float(np.mean(m == 0)) for m in mats.values()]
    assert max(per_layer) - min(per_layer) > 0.01
    assert max(per_layer) <= 0.98 + 1e-9
    assert abs(res.stats["sparsity"] - zeros / total) < 1e-3


def test_layer_choice_patterns_and_overrides():
    model = small_net()
    res = create_pass("sparsify", {"sparsity": 0.5, "layers": ["conv*"], "ignore": ["conv1x1"],
                                   "layer_sparsity": {"conv3x3": 0.25}})(model)
    mats = _matrices(res.model)
    assert abs(float(np.mean(mats["conv3x3"] == 0)) - 0.25) < 0.03
    for name in ("conv1x1", "gemm", "matmul"):
        assert float(np.mean(mats[name] == 0)) == 0
    assert [l["layer"] for l in res.stats["layers"]] == ["conv3x3"]
    res = create_pass("sparsify", {"sparsity": 0.5, "min_macs": 10**9})(model)
    assert not res.modified and all("min_macs" in s["reason"] for s in res.stats["skipped"]
                                    if s["layer"] != "depthwise")


def test_activation_saliency_needs_and_uses_calibration():
    model = small_net(batch=1)
    with pytest.raises(PassError, match="calibration"):
        create_pass("sparsify", {"saliency": "activation"})(model)
    # input channel 0 carries 100× larger activations: weight × activation keeps its columns
    x = RNG.standard_normal((4, 8, 6, 6)).astype(np.float32)
    x[:, 0] *= 100
    cal = CalibrationSet.from_arrays({"x": x})
    ctx = PassContext(calibration=cal)
    opts = {"sparsity": 0.8, "block": "8x1", "layers": ["conv3x3"]}
    by_act = create_pass("sparsify", {**opts, "saliency": "activation"})(model, ctx)
    by_mag = create_pass("sparsify", {**opts, "saliency": "magnitude"})(model, ctx)
    by_default = create_pass("sparsify", opts)(model, ctx)  # auto: activation, as there is calibration data
    assert by_default.stats["saliency"] == "activation"
    np.testing.assert_array_equal(by_default.model.get_constant("w1") == 0, by_act.model.get_constant("w1") == 0)
    assert create_pass("sparsify", opts)(model).stats["saliency"] == "magnitude"
    col = lambda m: m.get_constant("w1")[:, 0]  # noqa: E731
    assert np.count_nonzero(col(by_act.model)) > np.count_nonzero(col(by_mag.model))
    err_act = by_act.stats["layers"][0]["error"]["output_rel"]
    err_mag = by_mag.stats["layers"][0]["error"]["output_rel"]
    assert err_act < err_mag


def test_zero_sparsity_changes_nothing():
    model = small_net()
    res = create_pass("sparsify", {"sparsity": 0.0})(model)
    assert not res.modified
    cmp = compare_models(model, res.model, [random_inputs(model, seed=0)])
    assert cmp.max_abs == 0


@pytest.mark.parametrize("options,match", [
    ({"sparsity": 1.0}, "sparsity"), ({"block": "2x1"}, "block"), ({"scope": "net"}, "scope"),
    ({"layer_sparsity": {"a": 1.5}}, "layer_sparsity"), ({"sparsity": "lots"}, "sparsity"),
])
def test_bad_options(options, match):
    with pytest.raises(OptionError, match=match):
        create_pass("sparsify", options)


def test_ppocr_cls_sparsified_runs_in_onnxruntime():
    """Real model: PP-OCR cls canonicalized and sparsified at 50% in 8×1 blocks."""
    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import Pipeline

    res = Pipeline.from_specs(["canonicalize", "sparsify:sparsity=0.5,block=8x1"],
                              input_shapes={"x": PPOCR_SHAPES["cls"]}, verify_each=True).run(ppocr_model("cls"))
    stats = res.records[-1].stats
    assert stats["sparsified"] >= 10 and abs(stats["sparsity"] - 0.5) < 0.05
    onnx.checker.check_model(res.model.proto, full_check=True)
    err = res.records[-1].error
    assert err is not None and 0 < err["max_rel"] < 1
