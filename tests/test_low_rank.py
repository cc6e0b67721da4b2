"""low-rank: structure, exactness at full rank, rank criteria, data-aware weighting, real models."""

from __future__ import annotations


import numpy as np
import pytest
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts
from sculpt.runtime import compare_models, make_session, random_inputs
from sculpt.errors import PassError
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.cost import cost_of
from sculpt.passes import PassContext, create_pass

EXACT = dict(energy=1.0, force=True, round_to=1)


def cnn(stride=1, pads=(1, 1, 1, 1), dilation=1, k=(3, 3), cin=8, cout=16, seed=0):
    """Conv k×k (+bias) → Relu → 1×1 Conv (no bias) → Flatten → Gemm (transB, bias).

    Weights come from a generator seeded here, so they do not depend on which tests ran before
    (pytest-xdist distributes tests in varying orders)."""
    import graphs

    graphs.RNG = np.random.default_rng(4321 + seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], name="c1", pads=list(pads), strides=[stride, stride],
                         dilations=[dilation, dilation]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="c2"),
        helper.make_node("Flatten", ["c2"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "g", "gb"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0),
    ]
    probe = make_model(nodes[:1], [("x", [1, cin, 12, 12])], [("c1", None)], {"w": f32(cout, cin, *k), "b": f32(cout)})
    h = make_session(probe).run(None, random_inputs(probe))[0].shape
    feat = 12 * h[2] * h[3]
    return make_model(nodes, [("x", [1, cin, 12, 12])], [("y", [1, 10])],
                      {"w": f32(cout, cin, *k), "b": f32(cout), "w2": f32(12, cout, 1, 1), "g": f32(10, feat),
                       "gb": f32(10)})


def matmul_model(k=64, n=48, rows=5):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [("x", [2, rows, k])], [("y", [2, rows, n])], {"w": f32(k, n)})


def correlated_calibration(model, count=8, seed=0):
    """Inputs with a strongly non-white channel covariance (a fixed random mixing of few sources;
    ``seed`` draws other samples from the same distribution)."""
    name = model.input_names[0]
    shape = model.input_shapes()[name]
    c = shape[1] if len(shape) == 4 else shape[-1]
    mix = np.random.default_rng(99).standard_normal((c, 3)) @ np.diag([3.0, 1.0, 0.3])
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(count):
        if len(shape) == 4:
            src = rng.standard_normal((3, shape[2] * shape[3]))
            x = (mix @ src).reshape(1, c, shape[2], shape[3]) + 0.05 * rng.standard_normal((1, c, shape[2], shape[3]))
        else:
            src = rng.standard_normal((int(np.prod(shape[:-1])), 3))
            x = (src @ mix.T).reshape(shape) + 0.05 * rng.standard_normal(shape)
        xs.append(x.astype(np.float32))
    if shape[0] != 1:
        return CalibrationSet(count, lambda k: {name: xs[k]}, "correlated", [name])
    return CalibrationSet.from_arrays({name: np.concatenate(xs)}, "correlated")


# ---------------------------------------------------------------------------- structure
@pytest.mark.parametrize("method,convs", [("spatial", 4), ("tucker", 5)])
def test_structure_forced_full_rank(method, convs, tmp_path):
    m = cnn()
    r = create_pass("low-rank", dict(EXACT, method=method))(m)
    assert r.modified and r.stats["factored"] == 3
    counts = op_counts(r.model)
    assert counts["Conv"] == convs and counts["MatMul"] == 1 and counts["Gemm"] == 1
    assert r.model.output_names == ["y"]
    names = [n.name for n in r.model.graph.node]
    assert len(names) == len(set(names))
    by = {layer["layer"]: layer for layer in r.stats["layers"]}
    assert by["c1"]["method"] == method and by["c2"]["method"] == by["fc"]["method"] == "svd"
    convs_ = [n for n in r.model.graph.node if n.op_type == "Conv"]
    kernels = [list(r.model.get_constant(n.input[1]).shape[2:]) for n in convs_]
    if method == "spatial":
        assert kernels[:2] == [[3, 1], [1, 3]]
        assert by["c1"]["rank"] == 8 * 3  # full rank of the (C·kh) × (O·kw) matrix
    else:
        assert kernels[:3] == [[1, 1], [3, 3], [1, 1]]
        assert by["c1"]["rank"] == [8, 16]
    # the factored k×k conv keeps its output tensor's name (c1 → Relu)
    assert any(n.output[0] == "c1" for n in convs_)
    # numerical and checker: exact at full rank (1e-5 relative)
    assert_exact(m, r.model, rtol=1e-5, atol=1e-5, tmp_path=tmp_path)


@pytest.mark.parametrize("stride,pads,dilation,k", [
    (2, (1, 1, 1, 1), 1, (3, 3)), (1, (2, 0, 1, 2), 1, (5, 3)), (1, (2, 2, 2, 2), 2, (3, 3)), (2, (0, 0, 0, 0), 1, (3, 3)),
    (1, (1, 0, 1, 0), 1, (3, 1)),
])
def test_exact_geometry(stride, pads, dilation, k, tmp_path):
    """Strides, asymmetric pads, dilations and non-square kernels survive the factorization exactly."""
    m = cnn(stride=stride, pads=pads, dilation=dilation, k=k)
    for method in ("spatial", "tucker"):
        r = create_pass("low-rank", dict(EXACT, method=method, layers=["c1"]))(m)
        if method == "spatial" and 1 in k:
            assert not r.modified and "does not apply" in r.stats["skipped"][0]["reason"]
            continue
        assert r.stats["factored"] == 1
        assert_exact(m, r.model, rtol=1e-5, atol=1e-5, tmp_path=tmp_path)


def test_exact_data_aware_and_matmul(tmp_path):
    m = matmul_model()
    cal = correlated_calibration(m)
    r = create_pass("low-rank", dict(EXACT, data_aware=True))(m, PassContext(calibration=cal))
    assert op_counts(r.model) == {"MatMul": 2} and r.stats["layers"][0]["data_aware"]
    assert_exact(m, r.model, rtol=1e-5, atol=1e-5, tmp_path=tmp_path)
    c = cnn()
    cal = correlated_calibration(c)
    for method in ("spatial", "tucker"):
        r = create_pass("low-rank", dict(EXACT, data_aware=True, method=method))(c, PassContext(calibration=cal))
        assert all(layer["data_aware"] for layer in r.stats["layers"] if layer["layer"] != "fc")
        assert_exact(c, r.model, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- policy
def test_energy_rank_and_skip_when_no_saving():
    m = matmul_model(k=64, n=48)
    # a rank-4 weight: energy 0.999 needs rank 4, rounded up to 8
    w = (f32(64, 4) @ f32(4, 48)).astype(np.float32)
    m.set_initializer("w", w)
    r = create_pass("low-rank", {"energy": 0.999})(m)
    layer = r.stats["layers"][0]
    assert layer["rank"] == 8 and layer["macs_after"] == 2 * 5 * 8 * (64 + 48) and layer["macs_before"] == 2 * 5 * 64 * 48
    assert layer["energy_kept"] > 0.999
    cmp = compare_models(m, r.model, [random_inputs(m, seed=s) for s in range(2)])
    assert cmp.within(1e-4, 1e-4)  # rank 4 ≤ 8: exact up to float error
    # full rank of a 64×48 weight costs more than the layer: left alone (reason given)
    r = create_pass("low-rank", {"energy": 1.0})(matmul_model())
    assert not r.modified and "would not cut MACs" in r.stats["skipped"][0]["reason"]


def test_compression_criterion_meets_target():
    m = cnn(cin=32, cout=64)
    r = create_pass("low-rank", {"criterion": "compression", "compression": 3.0, "round_to": 1})(m)
    assert r.stats["layers"]
    for layer in r.stats["layers"]:
        assert layer["macs_after"] <= layer["macs_before"] / 3.0
    assert r.stats["macs_after"] < r.stats["macs_before"]


def test_error_criterion_and_data_aware_beats_plain():
    m = cnn(cin=32, cout=64)
    cal = correlated_calibration(m)
    ctx = PassContext(calibration=cal)
    r = create_pass("low-rank", {"criterion": "error", "max_error": 0.05, "round_to": 1, "data_aware": True,
                                 "min_saving": 0.0})(m, ctx)
    assert r.stats["layers"]
    for layer in r.stats["layers"]:
        assert layer["error"] is not None and layer["error"] <= 0.05
    # at the same MAC budget, weighting by the input covariance gives a smaller output error
    plain = create_pass("low-rank", {"criterion": "compression", "compression": 3.0, "round_to": 1})(m, ctx)
    aware = create_pass("low-rank", {"criterion": "compression", "compression": 3.0, "round_to": 1,
                                     "data_aware": True})(m, ctx)
    ep = {layer["layer"]: layer["error"] for layer in plain.stats["layers"]}
    ea = {layer["layer"]: layer["error"] for layer in aware.stats["layers"]}
    assert set(ep) == set(ea) and ep
    for name in ep:
        assert ea[name] < ep[name], (name, ea[name], ep[name])
    # the model's output error follows when one layer is factored (explicit bound: under half the plain one)
    feeds = [cal[k] for k in range(4)]
    opts = {"criterion": "compression", "compression": 3.0, "round_to": 1, "layers": ["c1"], "refit": False}
    plain = create_pass("low-rank", opts)(m, ctx)
    aware = create_pass("low-rank", dict(opts, data_aware=True))(m, ctx)
    err_p = compare_models(m, plain.model, feeds).max_rel
    err_a = compare_models(m, aware.model, feeds).max_rel
    assert err_a < 0.5 * err_p, (err_a, err_p)


def test_auto_picks_fewer_macs():
    m = cnn(cin=32, cout=64)
    auto = create_pass("low-rank", {"energy": 0.8, "layers": ["c1"], "force": True})(m)
    each = {meth: create_pass("low-rank", {"energy": 0.8, "layers": ["c1"], "method": meth, "force": True})(m)
            for meth in ("spatial", "tucker")}
    macs = {meth: r.stats["layers"][0]["macs_after"] for meth, r in each.items()}
    assert auto.stats["layers"][0]["macs_after"] == min(macs.values())
    assert auto.stats["layers"][0]["method"] == min(macs, key=macs.get)


def test_layer_selection_and_report_matches_cost():
    m = cnn(cin=32, cout=64)
    r = create_pass("low-rank", {"energy": 0.8, "layers": ["c*"], "ignore": ["c2"]})(m)
    assert [layer["layer"] for layer in r.stats["layers"]] == ["c1"]
    big = cost_of(m).layers
    c1_macs = next(layer.macs for layer in big if layer.name == "c1")
    r = create_pass("low-rank", {"energy": 0.8, "min_macs": c1_macs})(m)
    assert [layer["layer"] for layer in r.stats["layers"]] == ["c1"]
    # the per-layer MACs the pass reports add up to what cost_of counts
    saved = sum(layer["macs_before"] - layer["macs_after"] for layer in r.stats["layers"])
    assert cost_of(m).macs - cost_of(r.model).macs == saved
    assert r.stats["macs_before"] - r.stats["macs_after"] == saved


def test_needs_calibration_and_bad_options():
    with pytest.raises(PassError, match="calibration"):
        create_pass("low-rank", {"data_aware": True})(cnn())
    with pytest.raises(PassError, match="calibration"):
        create_pass("low-rank", {"criterion": "error"})(cnn())
    from sculpt.errors import OptionError

    with pytest.raises(OptionError):
        create_pass("low-rank", {"energy": 1.5})
    with pytest.raises(OptionError):
        create_pass("low-rank", {"method": "cpd"})


def test_skips_grouped_and_nonconstant():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="dw", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["c", "c"], ["y"], name="act_mm")]
    m = make_model(nodes, [("x", [1, 8, 6, 6])], [("y", [1, 8, 6, 6])], {"w": f32(8, 1, 3, 3)})
    r = create_pass("low-rank", {"force": True})(m)
    assert not r.modified
    reasons = {s["layer"]: s["reason"] for s in r.stats["skipped"]}
    assert reasons == {"dw": "grouped Conv", "act_mm": "weight is not a constant"}
