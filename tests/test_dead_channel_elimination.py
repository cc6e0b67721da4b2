"""dead-channel-elimination: exact (1e-5) removal of channels zeroed on purpose — across residual Adds,
Concats, depthwise and grouped Convs, SE blocks, BatchNorm, Relu with a negative bias — the folding of
constant channels into a following Gemm / unpadded Conv (and not into a padded one), the lossy
data-driven mode, and the real PP-OCR models. Each test checks structure (what went, the new shapes),
numerics through onnxruntime and the full checker on the saved model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.runtime import compare_models
from sculpt.errors import OptionError, PassError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.channels import ChannelGraph, Dim
from sculpt.passes import Pipeline, create_pass
from sculpt.passes.base import PassContext
from test_channel_graph import conv, node, zero_units

DCE = "dead-channel-elimination"


def run_dce(m, tmp_path, *, expect_removed=None, **opts):
    res = create_pass(DCE, opts)(m)
    if expect_removed is not None:
        assert res.stats["removed_channels"] == expect_removed, res.stats
    assert_exact(m, res.model, rtol=1e-5, atol=1e-6, tmp_path=tmp_path)
    return res


def wshape(model, node_name, index=1):
    return tuple(model.get_constant(model.node_by_name(node_name).input[index]).shape)


def zero_filters(inits, name, channels, bias=None, value=0.0):
    """Zero output channels of a Conv weight ``name`` (and set their bias to ``value``)."""
    inits[name] = inits[name].copy()
    inits[name][channels] = 0
    if bias:
        inits[bias] = inits[bias].copy()
        inits[bias][channels] = value


# ---------------------------------------------------------------------------------------------- residual
def residual(zero1=(), zero2=(), bias2=0.0):
    inits = {"w1": f32(8, 4, 3, 3), "b1": f32(8), "w2": f32(8, 4, 1, 1), "b2": f32(8), "w3": f32(5, 8, 3, 3),
             "b3": f32(5)}
    zero_filters(inits, "w1", list(zero1), "b1")
    zero_filters(inits, "w2", list(zero2), "b2", bias2)
    nodes = [conv("conv1", "x", "c1", "w1", "b1", pads=[1] * 4), node("Relu", ["c1"], ["r1"], "relu1"),
             conv("conv2", "x", "c2", "w2", "b2"), node("Add", ["r1", "c2"], ["s"], "add"),
             node("Relu", ["s"], ["r"], "relu"), conv("conv3", "r", "y", "w3", "b3", pads=[1] * 4)]
    return make_model(nodes, [("x", [2, 4, 6, 6])], [("y", [2, 5, 6, 6])], inits)


def test_residual_add_channels_zero_in_both_branches_go(tmp_path):
    m = residual(zero1=[1, 5], zero2=[1, 5])
    res = run_dce(m, tmp_path, expect_removed=2)
    out = res.model
    assert out.static_shape("s") == (2, 6, 6, 6) and out.static_shape("c1") == (2, 6, 6, 6)
    assert wshape(out, "conv1") == (6, 4, 3, 3) and wshape(out, "conv2") == (6, 4, 1, 1)
    assert wshape(out, "conv3") == (5, 6, 3, 3)
    assert res.stats["folded_constants"] == 0


def test_residual_add_channel_live_in_one_branch_stays(tmp_path):
    m = residual(zero1=[1, 5], zero2=[5])
    res = run_dce(m, tmp_path, expect_removed=1)
    assert res.model.static_shape("s") == (2, 7, 6, 6)


def test_nothing_dead_nothing_changes(tmp_path):
    m = residual()
    res = run_dce(m, tmp_path, expect_removed=0)
    assert not res.modified
    assert res.model.static_shape("s") == (2, 8, 6, 6)


def test_constant_residual_channel_is_not_folded_into_padded_conv(tmp_path):
    # conv1's channel 3 is zero after its Relu, conv2's is the constant 0.4: 0.4 reaches conv3 (padded)
    m = residual(zero1=[3], zero2=[3], bias2=0.4)
    res = run_dce(m, tmp_path, expect_removed=0)
    assert res.model.static_shape("s") == (2, 8, 6, 6)


# ---------------------------------------------------------------------------------------------- concat
def test_concat_inputs_lose_their_zero_channels(tmp_path):
    inits = {"wa": f32(4, 3, 1, 1), "ba": f32(4), "wb": f32(6, 3, 3, 3), "bb": f32(6), "wc": f32(5, 10, 3, 3)}
    zero_filters(inits, "wa", [2], "ba")
    zero_filters(inits, "wb", [0, 4], "bb")
    nodes = [conv("ca", "x", "a", "wa", "ba"), conv("cb", "x", "b", "wb", "bb", pads=[1] * 4),
             node("Concat", ["a", "b"], ["c"], "cat", axis=1), node("Relu", ["c"], ["r"], "relu"),
             conv("cc", "r", "y", "wc", pads=[1] * 4)]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 5, 5, 5])], inits)
    res = run_dce(m, tmp_path, expect_removed=3)
    out = res.model
    assert out.static_shape("a") == (1, 3, 5, 5) and out.static_shape("b") == (1, 4, 5, 5)
    assert out.static_shape("c") == (1, 7, 5, 5) and wshape(out, "cc") == (5, 7, 3, 3)


def test_concat_input_all_dead_keeps_one_channel(tmp_path):
    inits = {"wa": f32(2, 3, 1, 1), "ba": f32(2), "wb": f32(3, 3, 1, 1), "bb": f32(3), "wc": f32(2, 5, 1, 1)}
    zero_filters(inits, "wa", [0, 1], "ba")
    nodes = [conv("ca", "x", "a", "wa", "ba"), conv("cb", "x", "b", "wb", "bb"),
             node("Concat", ["a", "b"], ["c"], "cat", axis=1), conv("cc", "c", "y", "wc")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], inits)
    res = run_dce(m, tmp_path, expect_removed=1)
    assert res.model.static_shape("a") == (1, 1, 4, 4)


# ---------------------------------------------------------------------------------------------- depthwise
def depthwise(reader_pads, dw_bias):
    inits = {"w0": f32(6, 3, 1, 1), "b0": f32(6), "wd": f32(6, 1, 3, 3), "bd": np.asarray(dw_bias, np.float32),
             "w1": f32(4, 6, 3, 3), "b1": f32(4)}
    zero_filters(inits, "w0", [1, 4], "b0")
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             conv("dw", "r", "d", "wd", "bd", group=6, pads=[1] * 4), node("Relu", ["d"], ["e"], "relu2"),
             conv("c1", "e", "y", "w1", "b1", pads=reader_pads)]
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6 if any(reader_pads) else 4, 6 if any(reader_pads) else 4])],
                      inits)


def test_depthwise_zero_in_zero_out(tmp_path):
    m = depthwise([1] * 4, [0.3, 0.0, -0.2, 0.1, 0.0, 0.5])
    res = run_dce(m, tmp_path, expect_removed=2)
    out = res.model
    dw = out.node_by_name("dw")
    assert wshape(out, "dw") == (4, 1, 3, 3) and [a.i for a in dw.attribute if a.name == "group"] == [4]
    assert out.static_shape("e") == (1, 4, 6, 6) and wshape(out, "c1") == (4, 4, 3, 3)


def test_depthwise_bias_constant_folded_into_unpadded_conv(tmp_path):
    # channel 1: zero in, depthwise bias 0.7 → the constant 0.7 after the Relu, folded into c1 (no padding);
    # channel 4: bias -0.2 → zero after the Relu
    m = depthwise([0] * 4, [0.3, 0.7, -0.2, 0.1, -0.2, 0.5])
    res = run_dce(m, tmp_path, expect_removed=2)
    assert res.stats["folded_constants"] == 1
    assert wshape(res.model, "c1") == (4, 4, 3, 3)


def test_depthwise_bias_constant_not_folded_into_padded_conv(tmp_path):
    m = depthwise([1] * 4, [0.3, 0.7, -0.2, 0.1, -0.2, 0.5])
    res = run_dce(m, tmp_path, expect_removed=1)  # only channel 4 (zero); channel 1 (0.7) must stay
    assert res.stats["folded_constants"] == 0
    assert wshape(res.model, "c1") == (4, 5, 3, 3)


# ---------------------------------------------------------------------------------------------- relu / bias
@pytest.mark.parametrize("bias,removed,folded", [(-0.5, 1, 0), (0.8, 1, 9)])
def test_relu_of_bias_dead_or_folded_into_gemm(bias, removed, folded, tmp_path):
    inits = {"w0": f32(4, 3, 3, 3), "b0": f32(4), "wg": f32(5, 36), "bg": f32(5)}
    zero_filters(inits, "w0", [2], "b0", bias)
    nodes = [conv("c0", "x", "t", "w0", "b0", pads=[1] * 4), node("Relu", ["t"], ["r"], "relu"),
             node("Flatten", ["r"], ["f"], "flat", axis=1), node("Gemm", ["f", "wg", "bg"], ["y"], "fc", transB=1,
                                                                 alpha=0.5, beta=2.0)]
    m = make_model(nodes, [("x", [1, 3, 3, 3])], [("y", [1, 5])], inits)
    res = run_dce(m, tmp_path, expect_removed=removed)
    assert res.stats["folded_constants"] == folded  # 0.8 reaches 9 flat inputs of the Gemm
    assert wshape(res.model, "fc") == (5, 27) and res.model.static_shape("f") == (1, 27)


def test_constant_channel_folded_into_gemm_without_bias(tmp_path):
    inits = {"w1": f32(6, 8), "b1": f32(8), "w2": f32(8, 3)}
    inits["w1"][:, 3] = 0
    inits["b1"][3] = 1.5
    nodes = [node("Gemm", ["x", "w1", "b1"], ["h"], "fc1"), node("Relu", ["h"], ["r"], "relu"),
             node("Gemm", ["r", "w2"], ["y"], "fc2")]
    m = make_model(nodes, [("x", [2, 6])], [("y", [2, 3])], inits)
    res = run_dce(m, tmp_path, expect_removed=1)
    fc2 = res.model.node_by_name("fc2")
    assert len(fc2.input) == 3 and res.model.get_constant(fc2.input[2]).shape == (3,)
    assert wshape(res.model, "fc2") == (7, 3)


def test_batchnorm_gamma_and_beta_zero(tmp_path):
    g = f32(6, low=0.5, high=1.5)
    beta = f32(6)
    g[[0, 3]] = 0
    beta[[0, 3]] = 0
    inits = {"w0": f32(6, 3, 3, 3), "b0": f32(6), "g": g, "beta": beta, "mean": f32(6), "var": f32(6, low=0.5, high=2),
             "w1": f32(2, 6, 3, 3)}
    nodes = [conv("c0", "x", "t", "w0", "b0", pads=[1] * 4),
             node("BatchNormalization", ["t", "g", "beta", "mean", "var"], ["bn"], "bn"),
             node("Relu", ["bn"], ["r"], "relu"), conv("c1", "r", "y", "w1", pads=[1] * 4)]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)
    res = run_dce(m, tmp_path, expect_removed=2)
    assert wshape(res.model, "c0") == (4, 3, 3, 3) and wshape(res.model, "bn") == (4,)


def test_squeeze_excitation_group(tmp_path):
    inits = {"w0": f32(8, 3, 3, 3), "b0": f32(8), "w1": f32(3, 8, 1, 1), "b1": f32(3), "w2": f32(8, 3, 1, 1),
             "b2": f32(8), "w3": f32(4, 8, 1, 1), "b3": f32(4)}
    zero_filters(inits, "w0", [2, 6], "b0")  # the SE scale of these channels stays live: 0 · s = 0
    nodes = [conv("conv0", "x", "a", "w0", "b0", pads=[1] * 4), node("Relu", ["a"], ["r"], "relu"),
             node("GlobalAveragePool", ["r"], ["p"], "gap"), conv("se1", "p", "q", "w1", "b1"),
             node("Relu", ["q"], ["qr"], "se_relu"), conv("se2", "qr", "s", "w2", "b2"),
             node("HardSigmoid", ["s"], ["h"], "hsig", alpha=0.2, beta=0.5), node("Mul", ["r", "h"], ["m"], "mul"),
             conv("conv3", "m", "y", "w3", "b3")]
    m = make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits)
    res = run_dce(m, tmp_path, expect_removed=2)
    out = res.model
    assert wshape(out, "conv0") == (6, 3, 3, 3) and wshape(out, "se1") == (3, 6, 1, 1)
    assert wshape(out, "se2") == (6, 3, 1, 1) and wshape(out, "conv3") == (4, 6, 1, 1)


def test_grouped_conv_reader_needs_the_whole_period(tmp_path):
    def model(zero):
        inits = {"w0": f32(8, 3, 1, 1), "b0": f32(8), "wg": f32(8, 4, 3, 3), "w1": f32(2, 8, 1, 1)}
        zero_filters(inits, "w0", zero, "b0")
        nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
                 conv("gc", "r", "g", "wg", group=2, pads=[1] * 4), node("Relu", ["g"], ["gr"], "relu2"),
                 conv("c1", "gr", "y", "w1")]
        return make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)

    # channels 1 and 5 are the same index in the two groups of gc: both dead → removable
    res = run_dce(model([1, 5]), tmp_path, expect_removed=1)
    assert wshape(res.model, "gc") == (8, 3, 3, 3) and res.model.static_shape("r") == (1, 6, 5, 5)
    # only channel 1 dead: removing it would unbalance the groups
    run_dce(model([1]), tmp_path, expect_removed=0)


def test_through_a_channel_shuffle(tmp_path):
    """ShuffleNet block: grouped 1×1, Reshape/Transpose/Reshape shuffle, depthwise, grouped 1×1. The
    values follow the shuffle's maps; a unit (channels 0, 2, 4, 6 of the first Conv, see
    test_channel_graph.test_channel_shuffle) zero at the source is zero at the second grouped Conv."""
    from test_channel_graph import shuffle_model

    m = shuffle_model(groups=2, per=4)
    w = m.get_constant("w1").copy()
    b = m.get_constant("b1").copy()
    w[[0, 2, 4, 6]] = 0
    b[[0, 2, 4, 6]] = 0
    m.set_initializer("w1", w)
    m.set_initializer("b1", b)
    res = run_dce(m, tmp_path, expect_removed=1)
    out = res.model
    assert out.static_shape("sh") == (1, 4, 5, 5) and wshape(out, "g2") == (4, 2, 1, 1)
    assert out.get_constant(out.node_by_name("split_groups").input[1]).tolist() == [1, 2, 2, 5, 5]
    # one channel of the unit live: nothing goes
    b[4] = 1.0
    m.set_initializer("b1", b)
    run_dce(m, tmp_path, expect_removed=0)


def test_split_and_slice_readers(tmp_path):
    inits = {"w0": f32(10, 3, 1, 1), "b0": f32(10), "w1": f32(2, 4, 3, 3), "w2": f32(3, 6, 1, 1),
             "sizes": np.array([4, 6], np.int64)}
    zero_filters(inits, "w0", [0, 7], "b0")
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             node("Split", ["r", "sizes"], ["s1", "s2"], "split", axis=1),
             conv("c1", "s1", "y1", "w1", pads=[1] * 4), conv("c2", "s2", "y2", "w2")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y1", [1, 2, 4, 4]), ("y2", [1, 3, 4, 4])], inits)
    res = run_dce(m, tmp_path, expect_removed=2)
    assert res.model.get_constant(res.model.node_by_name("split").input[1]).tolist() == [3, 5]


def test_graph_output_channels_are_never_removed(tmp_path):
    inits = {"w0": f32(6, 3, 1, 1), "b0": f32(6), "w1": f32(2, 6, 1, 1)}
    zero_filters(inits, "w0", [1], "b0")
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"), conv("c1", "r", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4]), ("r", [1, 6, 4, 4])], inits)
    run_dce(m, tmp_path, expect_removed=0)


def test_verify_each_in_a_pipeline(tmp_path):
    m = residual(zero1=[0, 2], zero2=[0, 2])
    res = Pipeline.from_specs([DCE], verify_each=True).run(m)
    assert res.records[0].stats["removed_channels"] == 2
    assert op_counts(res.model) == op_counts(m)


# ---------------------------------------------------------------------------------------------- data driven
def sleepy_model():
    """Channel 2 of c0 has a bias of -50: never active on normal inputs, but not provably zero."""
    inits = {"w0": f32(6, 3, 3, 3, scale=0.3), "b0": f32(6), "w1": f32(4, 6, 3, 3), "b1": f32(4)}
    inits["w0"][2] = 0.01  # |pre-activation| ≤ 0.27·max|x| − 50: never above zero for |x| < 185
    inits["b0"][2] = -50.0
    nodes = [conv("c0", "x", "t", "w0", "b0", pads=[1] * 4), node("Relu", ["t"], ["r"], "relu"),
             conv("c1", "r", "y", "w1", "b1", pads=[1] * 4)]
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits)


def test_data_driven_removes_never_active_channels(tmp_path):
    m = sleepy_model()
    exact = create_pass(DCE)(m)
    assert exact.stats["removed_channels"] == 0
    cal = CalibrationSet.random(m, count=8, seed=3)
    dd = create_pass(DCE, {"data_driven": True})
    assert not dd.exact  # lossy: the pipeline measures rather than checks it
    res = dd(m, PassContext(calibration=cal))
    assert res.stats["removed_channels"] == 1
    assert wshape(res.model, "c0") == (5, 3, 3, 3) and wshape(res.model, "c1") == (4, 5, 3, 3)
    # on data like the calibration set the result is the same model
    feeds = [dict(cal[k]) for k in range(3)] + [{"x": np.random.default_rng(9).standard_normal((1, 3, 6, 6)).astype(np.float32)}]
    cmp = compare_models(m, res.model, feeds)
    assert cmp.within(1e-5, 1e-6), cmp.as_dict()
    # … but not for every input: a large input wakes the channel up
    big = {"x": np.full((1, 3, 6, 6), 400.0, np.float32)}
    assert not compare_models(m, res.model, [big]).within(1e-3)
    path = tmp_path / "dd.onnx"
    res.model.save(path)
    onnx.checker.check_model(str(path), full_check=True)


def test_data_driven_threshold_and_needs_calibration():
    m = sleepy_model()
    with pytest.raises(PassError, match="calibration"):
        create_pass(DCE, {"data_driven": True})(m)
    with pytest.raises(OptionError, match="threshold"):
        create_pass(DCE, {"data_driven": True, "threshold": -1.0})
    cal = CalibrationSet.random(m, count=4)
    # a huge threshold calls every channel inactive, but every dimension keeps one channel
    res = create_pass(DCE, {"data_driven": True, "threshold": 1e9})(m, PassContext(calibration=cal))
    assert res.model.static_shape("t")[1] == 1


# ---------------------------------------------------------------------------------------------- real models
def _dead_by_measurement(model, cg, units, feeds):
    """The units whose channels are exactly zero, on ``feeds``, wherever they are read (the inputs of
    the Convs/Gemms that reduce over them): an oracle independent of the pass's own analysis."""
    from sculpt.runtime import make_session

    readers = cg.consumers + cg.partial_consumers
    tensors = sorted({c.dim.tensor for c in readers})
    sess = make_session(model, extra_outputs=tensors)
    peak = {}
    for f in feeds:
        for t, v in zip(tensors, sess.run(tensors, f)):
            a = np.abs(v).max(axis=tuple(i for i in range(v.ndim) if i != 1))
            peak[t] = np.maximum(peak.get(t, 0), a)
    dead = []
    for u in units:
        if all((peak[c.dim.tensor][cg.unit_labels(c.dim) == u] == 0).all() for c in readers):
            dead.append(u)
    return dead


def _residual_and_se_units(cg, per_group=3, groups=6):
    """Prunable units of groups with several sources (residual Adds, SE blocks)."""
    out = []
    for g in cg.prunable_groups():
        if len({s.node for s in g.sources}) >= 2 and len(g.prunable_units) >= 4:
            out += g.prunable_units[:per_group]
            groups -= 1
            if not groups:
                break
    return out


def _noise_floor(model, feeds):
    """onnxruntime's own float noise on this model: optimized against unoptimized graph."""
    from sculpt.runtime import make_session

    a, b = make_session(model), make_session(model, optimize=False)
    return max(float(np.abs(x - y).max()) for f in feeds for x, y in zip(a.run(None, f), b.run(None, f)))


def _canonical_ppocr(kind):
    from sculpt.models import PPOCR_SHAPES, ppocr_model

    canon = Pipeline.from_specs(["canonicalize"], input_shapes={"x": PPOCR_SHAPES[kind]}, statistics=False).run(
        ppocr_model(kind)).model
    return create_pass(DCE)(canon).model  # less the channels already dead in the trained model, if any


@pytest.mark.parametrize("kind", ["cls", "det"])
def test_real_ppocr_zeroed_filters_are_removed_exactly(kind, tmp_path):
    """Zero whole units of residual/SE groups of the real models; DCE removes at least the units an
    onnxruntime run shows to be zero at every reader, and the outputs stay the same (1e-5, or the
    runtime's own noise on det, whose optimized and unoptimized runs already differ by ~2e-5)."""
    from sculpt.ir.cost import cost_of
    from sculpt.models import PPOCR_SHAPES
    from sculpt.textdata import text_input

    shape = PPOCR_SHAPES[kind]
    base = _canonical_ppocr(kind)
    cg = ChannelGraph.build(base.clone())
    units = _residual_and_se_units(cg)
    zeroed = zero_units(base, cg, units)
    feeds = [{"x": text_input(shape, seed)} for seed in range(2)]
    dead = _dead_by_measurement(zeroed, cg, units, feeds)
    assert len(dead) >= 3, (len(units), len(dead))
    where = {u: next(d for d in cg.sizes if u in set(cg.unit_labels(d).tolist())) for u in dead}
    res = create_pass(DCE)(zeroed)
    assert res.stats["removed_channels"] >= len(dead), res.stats
    cmp = compare_models(zeroed, res.model, feeds)
    tol = max(1e-5, 2 * _noise_floor(zeroed, feeds))
    assert tol <= 1e-4 and cmp.max_abs <= tol, (cmp.as_dict(), tol)
    # the tensors holding the dead channels lost them, and the MACs went down
    for u, d in where.items():
        assert res.model.static_shape(d.tensor)[d.axis] < zeroed.static_shape(d.tensor)[d.axis], d
    assert cost_of(res.model).macs < cost_of(zeroed).macs
    path = tmp_path / f"{kind}.onnx"
    res.model.save(path)
    onnx.checker.check_model(str(path), full_check=True)


def test_real_cls_constant_channels_are_folded(tmp_path):
    """Only the source filters zeroed: the depthwise Conv after them turns the zero into its bias, a
    constant that runs through hardswish and the SE block into unpadded 1×1 Convs — folded there."""
    from sculpt.models import PPOCR_SHAPES
    from sculpt.textdata import text_input

    base = _canonical_ppocr("cls")
    cg = ChannelGraph.build(base.clone())
    units = _residual_and_se_units(cg)
    zeroed = zero_units(base, cg, units, channelwise=False)
    res = create_pass(DCE)(zeroed)
    assert res.stats["removed_channels"] >= 3 and res.stats["folded_constants"] >= 3, res.stats
    feeds = [{"x": text_input(PPOCR_SHAPES["cls"], seed)} for seed in range(2)]
    cmp = compare_models(zeroed, res.model, feeds)
    assert cmp.within(1e-5, 1e-6), cmp.as_dict()
    path = tmp_path / "cls.onnx"
    res.model.save(path)
    onnx.checker.check_model(str(path), full_check=True)
