"""Sequential refit (sculpt.passes.refit.sequential_refit) and its use by the substitution passes.

A chain of three 3×3 Convs: factoring each one alone leaves an error that the next factored layer
receives and passes on. Refitting each replacement's last layer, in order, on what the compressed
model really feeds it (the original model's output of that layer as the target) must lower the
model's output error on held-out data, for low-rank, depthwise-separable and fire-module; a layer
that already matches is left untouched, and a refit never makes the calibration error worse.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import graphs
from graphs import f32, make_model, rms_error
from sculpt.runtime import compare_models
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.refit import RefitJob
from sculpt.passes.refit import sequential_refit
from sculpt.passes import PassContext, create_pass


def chain(seed: int = 0, channels: int = 24):
    """x[1,16,14,14] → (Conv 3×3 + bias → Relu) × 3 → y."""
    graphs.RNG = np.random.default_rng(777 + seed)
    nodes, inits, prev, cin = [], {}, "x", 16
    for k in range(3):
        nodes += [helper.make_node("Conv", [prev, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}")]
        # compressible, as trained layers are: few input-channel directions, one spatial kernel per
        # input channel (so every substitution fits it well), plus noise that none of them captures
        mixing = f32(channels, 4) @ f32(4, cin)
        spatial = f32(cin, 3, 3)
        w = mixing[:, :, None, None] * spatial[None] + 0.3 * f32(channels, cin, 3, 3)
        inits[f"w{k}"] = (w / np.sqrt(cin * 9)).astype(np.float32)
        inits[f"b{k}"] = f32(channels) * np.float32(0.1)
        prev, cin = f"r{k}", channels
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    return make_model(nodes, [("x", [1, 16, 14, 14])], [("y", [1, channels, 14, 14])], inits)


def smooth_data(count: int, seed: int) -> CalibrationSet:
    """Spatially smooth, channel-correlated inputs (as images are), so that the fits are data-aware."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(5).standard_normal((16, 4))
    xs = []
    for _ in range(count):
        src = rng.standard_normal((4, 16, 16))
        src = (src[:, :-2, :-2] + src[:, 1:-1, 1:-1] + src[:, 2:, 2:]) / 3  # a little spatial blur
        x = np.einsum("cs,shw->chw", mix, src)[None] + 0.05 * rng.standard_normal((1, 16, 14, 14))
        xs.append(x.astype(np.float32))
    return CalibrationSet.from_arrays({"x": np.concatenate(xs)}, "smooth")


# (pass, options, how much lower the held-out error must be with the refit than without). The
# depthwise-separable fit is already least squares on the pointwise weights, so its refit can only
# absorb the drift of the inputs: it must not be worse; low-rank and fire-module gain clearly.
PASSES = [
    ("low-rank", {"criterion": "compression", "compression": 3.0, "round_to": 1, "data_aware": True}, 0.9),
    ("depthwise-separable", {"multiplier": 2}, 1.0),
    ("fire-module", {"squeeze_ratio": 0.25, "round_to": 1}, 0.9),
]


@pytest.mark.parametrize("name,options,factor", PASSES, ids=[p[0] for p in PASSES])
def test_refit_lowers_the_model_error_on_held_out_data(name, options, factor):
    model = chain()
    ctx = PassContext(calibration=smooth_data(16, seed=1))
    held_out = [smooth_data(4, seed=2)[k] for k in range(4)]
    with_refit = create_pass(name, dict(options, refit=True))(model, ctx)
    without = create_pass(name, dict(options, refit=False))(model, ctx)
    assert with_refit.modified and without.modified
    report = with_refit.stats["refit"]
    assert report["layers"] >= 3, report  # every replaced layer's last node(s) refit
    assert "refit" not in without.stats
    err_refit, err_plain = rms_error(model, with_refit.model, held_out), rms_error(model, without.model, held_out)
    assert err_refit < factor * err_plain, (err_refit, err_plain)
    with_refit.model.verify()


def test_refit_leaves_an_exact_layer_alone_and_never_makes_calibration_error_worse():
    model = chain()
    samples = [smooth_data(4, seed=3)[k] for k in range(4)]
    # the model against itself: every layer already reproduces its target
    same = model.clone()
    report = sequential_refit(model, same, [RefitJob(f"conv{k}", f"c{k}") for k in range(3)], samples)
    assert report["layers"] == 0 and report["already_exact"] == ["conv0", "conv1", "conv2"]
    assert all(np.array_equal(model.get_constant(f"w{k}"), same.get_constant(same.graph.node[2 * k].input[1]))
               for k in range(3))
    # a damaged first layer: the second refit compensates, on the samples it was fitted to
    damaged = model.clone()
    w0 = damaged.get_constant("w0").copy()
    w0[:, 8:] = 0  # half of the input channels lost
    damaged.set_initializer("w0", w0)
    before = compare_models(model, damaged, samples).max_rel
    report = sequential_refit(model, damaged, [RefitJob("conv1", "c1")], samples)
    assert report["layers"] == 1
    after = compare_models(model, damaged, samples).max_rel
    assert after < before, (after, before)


def test_refit_of_a_node_it_cannot_solve_is_reported_not_attempted():
    model = chain()
    samples = [smooth_data(2, seed=4)[k] for k in range(2)]
    report = sequential_refit(model, model.clone(), [RefitJob("relu0", "r0"), RefitJob("missing", "c0")], samples)
    assert report == {"layers": 0, "skipped": ["relu0", "missing"]}
