"""sparsify's training-free recovery (``reconstruct``): the kept weights of every sparsified layer are
refit by masked ridge least squares, in network order, on the inputs the sparsified model feeds it.

Checked numerically: the zero pattern is exactly the pattern-only one (the block-sparse kernels rely
on it); the model's error on held-out data is clearly lower than with the pattern alone; the masked
solve equals an independent per-output least-squares solve over the kept features; existing
refit callers (no mask) are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphs import make_model, rms_error
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.refit import RefitJob, ridge_refit
from sculpt.passes.refit import sequential_refit
from sculpt.passes import PassContext, create_pass

MIX = np.random.default_rng(11).standard_normal((8, 3))  # input channels mix 3 sources: correlated, as images are


def net():
    """Conv 3×3 (32←8) → Relu → Conv 1×1 (24←32) → Relu → as 36 rows of 24 → Gemm(transB, 16←24) →
    MatMul (12←16). Weights: a few directions plus noise (compressible, as trained layers are)."""
    rng = np.random.default_rng(3)

    def weight(rows, cols, rank):
        w = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) + 0.5 * rng.standard_normal((rows, cols))
        return (w / np.sqrt(cols)).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv1x1"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "rows"], ["r2d"], name="reshape"),
        helper.make_node("Transpose", ["r2d"], ["f"], name="positions_first", perm=[1, 0]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    inits = {"w1": weight(32, 72, 4).reshape(32, 8, 3, 3), "b1": np.full(32, 0.1, np.float32),
             "w2": weight(24, 32, 4).reshape(24, 32, 1, 1), "b2": np.full(24, 0.1, np.float32),
             "rows": np.array([24, 36], np.int64), "wg": weight(16, 24, 4), "bg": np.zeros(16, np.float32),
             "wm": weight(12, 16, 3).T.copy()}
    return make_model(nodes, [("x", [1, 8, 6, 6])], [("y", [36, 12])], inits)


def data(count: int, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((count, 3, 8, 8))
    src = (src[:, :, :-2, :-2] + src[:, :, 1:-1, 1:-1] + src[:, :, 2:, 2:]) / 3  # spatially smooth
    x = np.einsum("cs,nshw->nchw", MIX, src) + 0.1 * rng.standard_normal((count, 8, 6, 6))
    return CalibrationSet.from_arrays({"x": x.astype(np.float32)}, "smooth")


LAYERS = {"conv3x3": "w1", "conv1x1": "w2", "gemm": "wg", "matmul": "wm"}


def weight_of(model, layer):
    return model.get_constant(model.node_by_name(layer).input[1])


@pytest.mark.parametrize("block", ["1x1", "8x1"])
def test_reconstruct_keeps_the_pattern_and_lowers_the_held_out_error(block):
    model = net()
    ctx = PassContext(calibration=data(48, seed=1))
    held_out = list(data(8, seed=2))
    options = {"sparsity": 0.7, "block": block, "saliency": "magnitude"}
    pruned = create_pass("sparsify", {**options, "reconstruct": False})(model, ctx)
    refit = create_pass("sparsify", {**options, "reconstruct": True})(model, ctx)
    assert "refit" not in pruned.stats
    assert refit.stats["refit"] == {"layers": 4, "skipped": [], "overfit": []}
    for layer in LAYERS:
        before, after = weight_of(pruned.model, layer), weight_of(refit.model, layer)
        # exactly the same zeros (the refit neither fills a zeroed weight nor zeroes a kept one) ...
        np.testing.assert_array_equal(after == 0, before == 0, err_msg=layer)
        assert 0.65 <= float(np.mean(after == 0)) <= 0.75, layer
        # ... but new kept values
        assert float(np.abs(after - before).max()) > 1e-3, layer
    entries = {e["layer"]: e for e in refit.stats["layers"]}
    for layer in LAYERS:
        assert entries[layer]["refit"]["after"] < entries[layer]["refit"]["before"], entries[layer]
    err_pruned, err_refit = rms_error(model, pruned.model, held_out), rms_error(model, refit.model, held_out)
    assert err_pruned > 0.1, err_pruned  # the pattern alone really hurts
    assert err_refit < 0.6 * err_pruned, (err_refit, err_pruned)
    refit.model.verify()


def test_reconstruct_needs_calibration_and_can_be_turned_off():
    model = net()
    no_data = create_pass("sparsify", {"sparsity": 0.5})(model)
    assert "refit" not in no_data.stats  # reconstruct is on by default but has nothing to fit on
    off = create_pass("sparsify", {"sparsity": 0.5, "reconstruct": False})(model, PassContext(calibration=data(8, 1)))
    assert "refit" not in off.stats
    for layer, name in LAYERS.items():
        w, orig = weight_of(off.model, layer), model.get_constant(name)
        np.testing.assert_array_equal(w[w != 0], orig[w != 0])  # pruning only: kept weights untouched


def test_masked_ridge_equals_per_output_least_squares_over_kept_features():
    rng = np.random.default_rng(5)
    p = rng.standard_normal((400, 10)) @ rng.standard_normal((10, 10))  # correlated features
    y = rng.standard_normal((400, 6))
    keep = rng.random((10, 6)) > 0.5
    keep[:, 1] = keep[:, 0]  # two outputs sharing a pattern (one solve)
    keep[:, 5] = False  # an output that keeps nothing: only its bias
    w0 = rng.standard_normal((10, 6)) * keep
    b0 = rng.standard_normal(6)
    w, b = ridge_refit(p, y, w0, b0, strength=1e-12, keep=keep)
    assert np.all(w[~keep] == 0)
    for o in range(6):
        cols = np.flatnonzero(keep[:, o])
        design = np.concatenate([p[:, cols], np.ones((400, 1))], axis=1)
        expected = np.linalg.lstsq(design, y[:, o], rcond=None)[0]
        np.testing.assert_allclose(w[cols, o], expected[:-1], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(b[o], expected[-1], rtol=1e-6, atol=1e-8)
    # without a mask: the plain ridge solve, every weight free
    full, _ = ridge_refit(p, y, w0, None, strength=1e-12)
    np.testing.assert_allclose(full, np.linalg.lstsq(p, y, rcond=None)[0], rtol=1e-6, atol=1e-8)


def test_a_mask_of_the_wrong_shape_is_skipped_not_applied():
    model = net()
    damaged = model.clone()
    damaged.set_initializer("w1", model.get_constant("w1") * 0.5)
    samples = list(data(4, seed=3))
    report = sequential_refit(model, damaged, [RefitJob("conv3x3", "c1", keep=np.ones((3, 3), bool))], samples)
    assert report == {"layers": 0, "skipped": ["conv3x3"]}
    np.testing.assert_array_equal(damaged.get_constant("w1"), model.get_constant("w1") * 0.5)


@pytest.mark.slow
def test_ppocr_cls_orientation_recovered_by_reconstruct():
    """Real model and task: PP-OCR cls at 50% in 8×1 blocks loses its orientation accuracy (chance,
    50%) with the pattern alone; the refit brings most of it back, with the pattern unchanged."""
    from sculpt import ocr_task
    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import Pipeline

    base = Pipeline.from_specs(["canonicalize"], input_shapes={"x": PPOCR_SHAPES["cls"]}).run(ppocr_model("cls")).model
    ctx = PassContext(calibration=CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs("cls", 32)}))
    data = ocr_task.cls_set(200)  # the evaluation seed: never the calibration lines
    options = {"block": "8x1", "sparsity": 0.5}
    pruned = create_pass("sparsify", {**options, "reconstruct": False})(base, ctx)
    refit = create_pass("sparsify", {**options, "reconstruct": True})(base, ctx)
    for entry in refit.stats["layers"]:
        name = entry["layer"]
        np.testing.assert_array_equal(weight_of(refit.model, name) == 0, weight_of(pruned.model, name) == 0)
    acc_pruned = ocr_task.evaluate_cls(pruned.model, data).accuracy
    acc_refit = ocr_task.evaluate_cls(refit.model, data).accuracy
    assert ocr_task.evaluate_cls(base, data).accuracy >= 0.95
    assert acc_pruned <= 0.6 and acc_refit >= 0.72, (acc_pruned, acc_refit)
    assert refit.stats["refit"]["layers"] >= 25, refit.stats["refit"]
