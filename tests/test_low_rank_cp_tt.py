"""low-rank method=cp (CP decomposition of a k×k Conv) and method=tt (tensor train of a Gemm/MatMul):
the chains they build, exactness at full rank, error falling with rank, the ALS on kernels of known
CP rank, the data-aware fit and refit, the MACs reported against the cost model, the options, and
PP-OCRv4 rec."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import assert_exact, f32, make_model, op_counts, rms_error
from markers import needs_ppocr
from sculpt.errors import OptionError
from sculpt.ir.cost import cost_of
from sculpt.ir.factorize import ConvCP, MatrixTT, cp_full_rank
from sculpt.passes import PassContext, create_pass
from sculpt.runtime import compare_models, make_session, random_inputs
from test_low_rank import EXACT, cnn, correlated_calibration, matmul_model


def chain_after(model, first_input: str) -> list[onnx.NodeProto]:
    """The nodes reached from ``first_input`` following single consumers, in order."""
    out, name = [], first_input
    while True:
        readers = [n for n in model.graph.node if name in n.input]
        if len(readers) != 1:
            return out
        out.append(readers[0])
        name = readers[0].output[0]


def assert_macs_match(before, result):
    saved = sum(layer["macs_before"] - layer["macs_after"] for layer in result.stats["layers"])
    assert cost_of(before).macs - cost_of(result.model).macs == saved
    assert result.stats["macs_before"] - result.stats["macs_after"] == saved


def cp_kernel(shape, rank, seed=0):
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((d, rank)) for d in shape]
    return np.einsum("ar,br,cr,dr->abcd", *factors).astype(np.float32)


# ---------------------------------------------------------------------------- CP
def test_cp_structure_full_rank(tmp_path):
    m = cnn()
    r = create_pass("low-rank", dict(EXACT, method="cp", layers=["c1"]))(m)
    assert r.modified and r.stats["factored"] == 1
    layer = r.stats["layers"][0]
    rank = cp_full_rank((16, 8, 3, 3))
    assert layer["method"] == "cp" and layer["rank"] == rank == 72
    chain = chain_after(r.model, "x")[:4]
    assert [n.op_type for n in chain] == ["Conv"] * 4
    weights = [r.model.get_constant(n.input[1]).shape for n in chain]
    assert weights == [(rank, 8, 1, 1), (rank, 1, 3, 1), (rank, 1, 1, 3), (16, rank, 1, 1)]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in chain]
    assert groups == [1, rank, rank, 1]
    assert chain[3].output[0] == "c1" and len(chain[3].input) == 3  # the bias on the last 1×1
    assert_exact(m, r.model, rtol=1e-4, atol=1e-4, tmp_path=tmp_path)  # full checker on the saved file
    assert_macs_match(m, r)


@pytest.mark.parametrize("stride,pads,dilation,k", [
    (2, (1, 1, 1, 1), 1, (3, 3)), (1, (2, 0, 1, 2), 1, (5, 3)), (1, (2, 2, 2, 2), 2, (3, 3)), (1, (1, 0, 1, 0), 1, (3, 1)),
    (2, (0, 1, 0, 1), 1, (1, 3)),
])
def test_cp_exact_geometry(stride, pads, dilation, k, tmp_path):
    """Strides, asymmetric pads, dilations and k×1 / 1×k kernels (one depthwise Conv) survive exactly."""
    m = cnn(stride=stride, pads=pads, dilation=dilation, k=k)
    r = create_pass("low-rank", dict(EXACT, method="cp", layers=["c1"]))(m)
    assert r.stats["factored"] == 1
    depthwise = [n for n in r.model.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert len(depthwise) == (1 if 1 in k else 2)
    assert_exact(m, r.model, rtol=1e-4, atol=1e-4, tmp_path=tmp_path)
    assert_macs_match(m, r)


def test_cp_als_recovers_a_kernel_of_known_rank():
    """A kernel that is exactly CP rank 4: the energy search stops at rank 4, where the ALS fit is
    exact to 1e-4 relative (onnxruntime), and ranks below it are not."""
    m = cnn(cin=16, cout=32)
    m.set_initializer("w", cp_kernel((32, 16, 3, 3), 4))
    r = create_pass("low-rank", {"method": "cp", "energy": 0.9999, "round_to": 1, "layers": ["c1"]})(m)
    layer = r.stats["layers"][0]
    assert layer["rank"] == 4 and layer["energy_kept"] > 0.9999
    feeds = [random_inputs(m, seed=s) for s in range(2)]
    assert compare_models(m, r.model, feeds).within(1e-4, 1e-4)
    cp = ConvCP(cp_kernel((32, 16, 3, 3), 4))
    assert cp.relative_error(4) < 1e-4 and cp.relative_error(3) > 1e-2


def test_cp_error_falls_with_rank():
    m = cnn(cin=16, cout=32)
    errors, ranks = [], []
    for compression in (8.0, 4.0, 2.0):
        r = create_pass("low-rank", {"method": "cp", "criterion": "compression", "compression": compression,
                                     "round_to": 1, "layers": ["c1"]})(m)
        layer = r.stats["layers"][0]
        assert layer["macs_after"] <= layer["macs_before"] / compression
        ranks.append(layer["rank"])
        errors.append(_layer_output_error(m, r.model))
    assert ranks[0] < ranks[1] < ranks[2]
    assert errors[0] > errors[1] > errors[2], errors


def _layer_output_error(before, after, tensor="c1"):
    """‖c1 − c1_ref‖ / ‖c1_ref‖ on random inputs (the factored layer's own output)."""
    feeds = [random_inputs(before, seed=s) for s in range(2)]
    ref_sess = make_session(before, extra_outputs=[tensor])
    new_sess = make_session(after, extra_outputs=[tensor])
    num = den = 0.0
    for f in feeds:
        ref = ref_sess.run([tensor], f)[0].astype(np.float64)
        got = new_sess.run([tensor], f)[0].astype(np.float64)
        num += float(((got - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return float(np.sqrt(num / den))


def test_cp_data_aware_exact_and_better():
    m = cnn(cin=16, cout=32)
    ctx = PassContext(calibration=correlated_calibration(m))
    r = create_pass("low-rank", dict(EXACT, method="cp", data_aware=True, layers=["c1"]))(m, ctx)
    assert r.stats["layers"][0]["data_aware"]
    assert_exact(m, r.model, rtol=1e-4, atol=1e-4)
    # at the same rank, fitting in the whitened coordinates gives a smaller output error on the data
    opts = {"method": "cp", "criterion": "compression", "compression": 4.0, "round_to": 1, "layers": ["c1"],
            "refit": False}
    plain = create_pass("low-rank", opts)(m, ctx)
    aware = create_pass("low-rank", dict(opts, data_aware=True))(m, ctx)
    assert plain.stats["layers"][0]["rank"] == aware.stats["layers"][0]["rank"]
    assert aware.stats["layers"][0]["error"] < 0.5 * plain.stats["layers"][0]["error"], (
        aware.stats["layers"][0]["error"], plain.stats["layers"][0]["error"])
    # the refit of the last 1×1 runs where the other methods' does (its report names the cp_out node)
    refit = create_pass("low-rank", dict(opts, data_aware=True, refit=True))(m, ctx)
    names = set(refit.stats["refit"].get("errors", {})) | set(refit.stats["refit"]["skipped"])
    assert any("cp_out" in n for n in names), refit.stats["refit"]


def test_cp_leaves_matrices_to_svd_and_auto_unchanged():
    m = cnn()
    r = create_pass("low-rank", {"method": "cp", "energy": 0.8, "min_saving": 0.0})(m)
    methods = {layer["layer"]: layer["method"] for layer in r.stats["layers"]}
    assert methods["c1"] == "cp" and set(methods) - {"c1"} and all(methods[k] == "svd" for k in methods if k != "c1")
    auto = create_pass("low-rank", {"energy": 0.8, "force": True})(m)
    assert {layer["method"] for layer in auto.stats["layers"]} <= {"svd", "spatial", "tucker"}


# ---------------------------------------------------------------------------- tensor train
@pytest.mark.parametrize("cores", [2, 3])
def test_tt_structure_full_rank(cores, tmp_path):
    m = matmul_model()  # x [2, 5, 64] @ w [64, 48]
    r = create_pass("low-rank", dict(EXACT, method="tt", tt_cores=cores))(m)
    layer = r.stats["layers"][0]
    modes_in, modes_out = layer["modes"]
    assert len(modes_in) == len(modes_out) == cores
    assert int(np.prod(modes_in)) == 64 and int(np.prod(modes_out)) == 48
    chain = chain_after(r.model, "x")
    assert [n.op_type for n in chain] == ["Reshape", "MatMul"] + ["Reshape", "MatMul"] * (cores - 1) + ["Reshape"]
    assert chain[-1].output[0] == "y" and op_counts(r.model) == {"Reshape": cores + 1, "MatMul": cores}
    # the first MatMul takes the last core on the right, the others take theirs on the left
    mats = [n for n in chain if n.op_type == "MatMul"]
    assert r.model.get_constant(mats[0].input[1]).shape[0] == modes_in[-1]
    assert all(r.model.get_constant(n.input[0]) is not None for n in mats[1:])
    assert r.model.get_constant(mats[-1].input[0]).shape[0] == modes_out[0]
    assert_exact(m, r.model, rtol=1e-4, atol=1e-4, tmp_path=tmp_path)
    assert_macs_match(m, r)


def test_tt_gemm_with_bias_alpha_beta(tmp_path):
    m = cnn()
    r = create_pass("low-rank", dict(EXACT, method="tt"))(m)
    assert [layer["layer"] for layer in r.stats["layers"]] == ["fc"]
    reasons = {s["layer"]: s["reason"] for s in r.stats["skipped"]}
    assert reasons == {"c1": "method=tt applies to Gemm/MatMul only", "c2": "method=tt applies to Gemm/MatMul only"}
    assert chain_after(r.model, "fl")[-1].op_type == "Add"  # the Gemm's bias (×beta) after the chain
    assert_exact(m, r.model, rtol=1e-4, atol=1e-4, tmp_path=tmp_path)
    assert_macs_match(m, r)


def test_tt_only_where_it_cuts_macs():
    # a Kronecker-product weight is a tensor train of rank 1: factored, MACs cut, exact
    m = matmul_model(k=64, n=48)
    rng = np.random.default_rng(3)
    m.set_initializer("w", np.kron(rng.standard_normal((8, 6)), rng.standard_normal((8, 8))).astype(np.float32))
    r = create_pass("low-rank", {"method": "tt", "energy": 0.999, "round_to": 1})(m)
    layer = r.stats["layers"][0]
    assert layer["rank"] == 1 and layer["modes"] == [[8, 8], [6, 8]]
    assert layer["macs_after"] == 10 * (8 * 8 * 1 * 8 + 8 * 1 * 6 * 8) < layer["macs_before"] / 3  # 10 rows
    assert compare_models(m, r.model, [random_inputs(m, seed=s) for s in range(2)]).within(1e-4, 1e-4)
    assert_macs_match(m, r)
    # a random weight keeps 90% of its energy only at ranks that cost more: left alone, reason given
    r = create_pass("low-rank", {"method": "tt"})(matmul_model())
    assert not r.modified and "would not cut MACs" in r.stats["skipped"][0]["reason"]


def test_tt_error_falls_with_rank():
    m = matmul_model(k=64, n=48)
    feeds = [random_inputs(m, seed=s) for s in range(2)]
    errors, kept = [], []
    for energy in (0.3, 0.6, 0.9):
        r = create_pass("low-rank", {"method": "tt", "energy": energy, "round_to": 1, "force": True})(m)
        kept.append(r.stats["layers"][0]["energy_kept"])
        errors.append(rms_error(m, r.model, feeds))
    assert energy <= kept[-1] and kept[0] < kept[1] < kept[2]
    assert errors[0] > errors[1] > errors[2], errors
    # and in the algebra: the TT-SVD of a random matrix, every rank from 1 to full
    w = np.random.default_rng(0).standard_normal((24, 30))
    tt = MatrixTT(w, (4, 6), (5, 6))
    errs = [np.linalg.norm(tt.approx((r,)) - w) / np.linalg.norm(w) for r in range(1, tt.full[0] + 1)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-12


def test_tt_refit_of_the_last_core():
    """With calibration data the last-applied core is refit on the compressed model's inputs: the
    output error on held-out samples falls below the unrefit one."""
    m = matmul_model(k=64, n=48)
    cal = correlated_calibration(m, count=16)
    held_out = correlated_calibration(m, count=4, seed=7)
    opts = {"method": "tt", "criterion": "compression", "compression": 1.5, "round_to": 1, "refit_samples": 16}
    plain = create_pass("low-rank", dict(opts, refit=False))(m, PassContext(calibration=cal))
    refit = create_pass("low-rank", opts)(m, PassContext(calibration=cal))
    report = refit.stats["refit"]
    assert report["layers"] == 1 and len(report["errors"]) == 1
    node, err = next(iter(report["errors"].items()))
    assert node.startswith("mm_tt_core1")  # the last-applied core, G_1
    assert err["after"] < 0.75 * err["before"]  # measured 0.48 vs 0.72
    feeds = [held_out[k] for k in range(4)]
    held = rms_error(m, refit.model, feeds), rms_error(m, plain.model, feeds)
    assert held[0] < 0.75 * held[1], held
    assert_macs_match(m, refit)


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,message", [
    ({"method": "cpd"}, "method"), ({"method": "tt", "tt_cores": 1}, r"tt_cores must be in \[2, 6\], got 1"),
    ({"method": "cp", "als_iterations": 0}, r"als_iterations must be in \[1, 100000\], got 0"),
])
def test_bad_options_one_line(options, message):
    with pytest.raises(OptionError, match=message) as e:
        create_pass("low-rank", options)
    assert "\n" not in str(e.value) and "low-rank" in str(e.value)


def test_tt_cannot_split_is_a_reason():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="prime")]
    m = make_model(nodes, [("x", [4, 13])], [("y", [4, 8])], {"w": f32(13, 8)})
    r = create_pass("low-rank", {"method": "tt", "force": True})(m)
    assert not r.modified
    assert r.stats["skipped"][0]["reason"].startswith("method=tt: a 13×8 weight cannot be split into tt_cores=2")


# ---------------------------------------------------------------------------- a real model
@needs_ppocr
@pytest.mark.slow
def test_cp_on_ppocr_rec(tmp_path):
    """cp on PP-OCRv4 rec's k×k Convs (the 3×3 stem and the two 1×3 neck Convs), data-aware on 4
    rendered lines: checker, finite outputs, MACs as the cost model counts, and the error on 8 other
    lines. Measured: ranks 8, 72, 72 (10.46M → 5.65M MACs in those Convs), relative RMS error of the
    softmax 0.22 and the same argmax at 94% of the time steps (energy=0.999: 0.14 and 97.5%, the stem
    left alone). About 90 s on a loaded 2-core machine."""
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.textdata import text_input
    from test_substitution_models import real_model

    m, cal = real_model("rec")
    convs = ["p2o.Conv.0", "p2o.Conv.33", "p2o.Conv.36"]
    r = create_pass("low-rank", {"method": "cp", "data_aware": True, "energy": 0.99, "samples": 2,
                                 "layers": convs})(m, PassContext(calibration=cal))
    assert sorted(layer["layer"] for layer in r.stats["layers"]) == sorted(convs), r.stats["skipped"]
    assert all(layer["method"] == "cp" for layer in r.stats["layers"])
    assert_macs_match(m, r)
    r.model.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    shape = (1, 3, 48, 320)
    held_out = CalibrationSet.from_arrays({"x": np.concatenate([text_input(shape, k) for k in range(100, 108)])})
    feeds = [held_out[k] for k in range(8)]
    before, after = make_session(m), make_session(r.model)
    outs = [(before.run(None, f)[0], after.run(None, f)[0]) for f in feeds]
    assert all(np.isfinite(o).all() for _, o in outs)
    assert rms_error(m, r.model, feeds, m.output_names[0]) < 0.35
    assert np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in outs]) > 0.9


@needs_ppocr
def test_cp_on_ppocr_cls(tmp_path):
    """The default suite's real model: PP-OCR cls's 3×3 stem (8×3×3×3) by cp at full rank is exact, and
    truncated (data-aware, rank 6: measured relative error of the layer 0.09) it runs with finite outputs;
    MACs as the cost model counts."""
    from sculpt.ir.calibration import CalibrationSet
    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import Pipeline
    from sculpt.textdata import text_input

    shape = PPOCR_SHAPES["cls"]
    m = Pipeline.from_specs(["canonicalize"], input_shapes={"x": shape}).run(ppocr_model("cls")).model
    cal = CalibrationSet.from_arrays({"x": np.concatenate([text_input(shape, k) for k in range(4)])})
    full = create_pass("low-rank", dict(EXACT, method="cp", layers=["Conv@0"]))(m)
    assert full.stats["layers"][0]["rank"] == cp_full_rank((8, 3, 3, 3)) == 27
    feeds = [cal[k] for k in range(2)]
    assert compare_models(m, full.model, feeds).within(1e-4, 1e-4)
    r = create_pass("low-rank", {"method": "cp", "data_aware": True, "criterion": "compression", "compression": 1.2,
                                 "round_to": 1, "layers": ["Conv@0"]})(m, PassContext(calibration=cal))
    layer = r.stats["layers"][0]
    assert layer["method"] == "cp" and layer["rank"] == 6 and layer["macs_after"] <= layer["macs_before"] / 1.2
    assert_macs_match(m, r)
    r.model.save(tmp_path / "out.onnx")
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    out = make_session(r.model).run(None, cal[0])
    assert all(np.isfinite(o).all() for o in out)
