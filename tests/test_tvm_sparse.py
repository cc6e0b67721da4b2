"""BSR packing, the sparse/dense/im2col TIR kernels, and apply_sparse_kernels against onnxruntime."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import helper

from graphs import make_model
from sculpt.runtime import run as ort_run
from sculpt.backends.tvm import build, import_to_relax, run_relax
from sculpt.backends.tvm.sparse import apply_sparse_kernels, detect_block_rows, layer_names_from_onnx, pack_bsr
from sculpt.backends.tvm.sparse.kernels import (ConvGeometry, PanelShape, bsr_panel_kernel, dense_panel_kernel,
                                                im2col_kernel)
from sculpt.backends.tvm.kernels.target_traits import host_target as host_target_dict  # noqa: E402
from sculpt.backends.tvm.sparse.timing import host_target, run_function
from sculpt.errors import OptionError
from sculpt.passes import create_pass

RNG = np.random.default_rng(11)
TOL = 1e-4  # relative to the output's scale


def _rel(got, ref):
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _blocky(rows, cols, r, sparsity):
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    keep = RNG.random((-(-rows // r), cols)) >= sparsity
    return w * np.repeat(keep, r, axis=0)[:rows]


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("r", [1, 4, 8, 16])
def test_pack_roundtrip_and_block_detection(r):
    w = _blocky(37, 21, r, 0.7)
    m = pack_bsr(w, r)
    np.testing.assert_array_equal(m.to_dense(), w)
    assert m.indptr[-1] == m.nnz_blocks and m.data.shape == (m.nnz_blocks, r)
    assert detect_block_rows(w) >= r or np.mean(w == 0) < 0.3
    used = m.used_columns()
    sub = m.with_columns_renumbered(used)
    np.testing.assert_array_equal(sub.to_dense(), w[:, used])


def test_empty_matrix_packs_to_one_zero_block():
    m = pack_bsr(np.zeros((8, 5), np.float32), 8)
    data, indices, indptr = m.kernel_arrays()
    assert m.nnz_blocks == 0 and data.shape == (1, 8) and not data.any() and list(indptr) == [0, 0]


# ------------------------------------------------------------------ kernels, exact against numpy
@pytest.mark.parametrize("batch,rows,depth,cols,r,tile", [
    (1, 24, 37, 100, 8, 16),   # column tail
    (2, 30, 16, 7, 4, 64),     # rows not a multiple of R, tile wider than the panel
    (1, 20, 9, 33, 16, 16),
    (1, 16, 40, 40, 1, 64),
])
def test_bsr_and_dense_kernels_exact(batch, rows, depth, cols, r, tile):
    w = _blocky(rows, depth, r, 0.8)
    x = RNG.standard_normal((batch, depth, cols)).astype(np.float32)
    bias = RNG.standard_normal(rows).astype(np.float32)
    ref = np.einsum("ok,bkn->bon", w.astype(np.float64), x) + bias[:, None]
    panel = PanelShape(batch, rows, depth, cols)
    out = np.zeros((batch, rows, cols), np.float32)
    target = host_target()
    m = pack_bsr(w, r)
    assert _rel(run_function(bsr_panel_kernel(panel, m, tile), [x, *m.kernel_arrays(), bias, out], target), ref) < TOL
    assert _rel(run_function(dense_panel_kernel(panel, 8, 16), [x, w, bias, out], target), ref) < TOL


def test_im2col_kernel_matches_numpy_patches():
    geo = ConvGeometry(1, 3, 10, 11, (3, 3), (2, 1), (1, 2), (1, 2, 0, 1))
    x = RNG.standard_normal((1, 3, 10, 11)).astype(np.float32)
    rows = np.array([0, 5, 8, 13, 26], np.int32)
    got = run_function(im2col_kernel(geo, len(rows)), [x, rows, np.zeros((1, 5, 50), np.float32)], host_target())
    padded = np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1)))
    for u, k in enumerate(rows):
        c, ky, kx = k // 9, k // 3 % 3, k % 3
        for oh in range(geo.out_height):
            for ow in range(geo.out_width):
                assert got[0, u, oh * geo.out_width + ow] == padded[0, c, oh * 2 + ky, ow + kx * 2]


# ------------------------------------------------------------------ the Relax rewrite
def sparse_net():
    """1×1 conv, 3×3 conv (stride 2, padding), Gemm(transB) and MatMul — all sparsified in 8×1 blocks."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pw"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="k3", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="matmul"),
    ]
    inits = {"w1": RNG.standard_normal((40, 16, 1, 1)).astype(np.float32), "b1": RNG.standard_normal(40).astype(np.float32),
             "w2": RNG.standard_normal((24, 40, 3, 3)).astype(np.float32),
             "wg": RNG.standard_normal((32, 24 * 5 * 6)).astype(np.float32),
             "bg": RNG.standard_normal(32).astype(np.float32), "wm": RNG.standard_normal((32, 16)).astype(np.float32)}
    dense = make_model(nodes, [("x", [1, 16, 9, 11])], [("y", [1, 16])], inits)
    return create_pass("sparsify", {"sparsity": 0.8, "block": "8x1"})(dense).model


@pytest.fixture(scope="module")
def sparse_model():
    return sparse_net()


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_rewrite_matches_onnxruntime(sparse_model, mode):
    mod = import_to_relax(sparse_model)
    target = host_target()
    new, decisions = apply_sparse_kernels(mod, target, mode, layer_names=layer_names_from_onnx(sparse_model),
                                          number=2, repeat=2)
    by_name = {d.layer: d for d in decisions}
    assert set(by_name) == {"pw", "k3", "gemm", "matmul"}
    assert {d.kernel for d in decisions} == {"pointwise", "im2col", "matmul"}
    assert all(d.block == "8x1" and abs(d.sparsity - 0.8) < 0.05 for d in decisions)
    if mode == "on":
        assert all(d.sparse and d.decided_by == "mode=on" for d in decisions)
    else:
        assert all(d.decided_by == "measured" and d.dense_ms > 0 and d.sparse_ms > 0 for d in decisions)
        assert all(d.sparse == (d.sparse_ms < d.dense_ms * 0.95) for d in decisions)
    calls = new.script().count("R.call_tir(cls.sparse_")
    assert calls == sum(d.sparse for d in decisions) + sum(d.sparse and d.kernel == "im2col" for d in decisions)
    x = RNG.standard_normal((1, 16, 9, 11)).astype(np.float32)
    ref = ort_run(sparse_model, {"x": x})["y"]
    got = run_relax(build(new, host_target_dict("llvm")), {"x": x}, ["x"])[0]
    assert _rel(got, ref) < TOL


def test_off_and_dense_weights_stay_dense(sparse_model):
    mod = import_to_relax(sparse_model)
    same, decisions = apply_sparse_kernels(mod, "llvm", "off")
    assert same.script() == mod.script() and all(not d.sparse and d.decided_by == "mode=off" for d in decisions)
    _, decisions = apply_sparse_kernels(mod, "llvm", "on", min_sparsity=0.95)
    assert all(not d.sparse and d.decided_by == "below min_sparsity" for d in decisions)


def test_bad_mode_is_an_option_error(sparse_model):
    with pytest.raises(OptionError, match="sparse mode"):
        apply_sparse_kernels(import_to_relax(sparse_model), "llvm", "sometimes")


def test_aarch64_uses_the_cost_model_and_compiles(sparse_model, tmp_path):
    """The rewrite for an aarch64 (NEON) target: decided by the cost model (it cannot be measured
    here), compiled by LLVM for aarch64, and linked by the cross compiler when it is installed."""
    import tvm

    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    new, decisions = apply_sparse_kernels(import_to_relax(sparse_model), target, "auto")
    assert all(d.decided_by == "cost-model" and d.speedup > 0 for d in decisions)
    assert any(d.sparse for d in decisions)
    ex = tvm.compile(new, target=tvm.target.Target(target))
    if shutil.which("aarch64-linux-gnu-g++"):
        path = tmp_path / "sparse_arm64.so"
        ex.export_library(str(path), cc="aarch64-linux-gnu-g++")
        assert path.read_bytes()[:4] == b"\x7fELF" and path.read_bytes()[18] == 183  # EM_AARCH64


@pytest.mark.slow
def test_aarch64_under_qemu_matches_onnxruntime(sparse_model, tmp_path):
    """Exact on arm64: the rewritten module cross-compiled and run by the deploy runner under qemu."""
    import tvm

    from sculpt.backends.tvm.runner import run_runner

    if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64-static")):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user-static")
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    new, _ = apply_sparse_kernels(import_to_relax(sparse_model), target, "on")
    lib = tmp_path / "sparse_arm64.so"
    tvm.compile(new, target=tvm.target.Target(target)).export_library(str(lib), cc="aarch64-linux-gnu-g++")
    x = RNG.standard_normal((1, 16, 9, 11)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "out").mkdir()
    result = run_runner(lib, "aarch64", [tmp_path / "x.npy"], tmp_path / "out", timeout=600)
    got = np.load(result.output_files[0])
    ref = ort_run(sparse_model, {"x": x})["y"]
    assert _rel(got, ref) < TOL


@pytest.mark.slow
def test_sparsified_ppocr_rec_auto_matches_onnxruntime_and_beats_the_dense_build():
    """Done-criterion: PP-OCRv4 rec, canonicalized, 90% sparse in 8×1 blocks, built with mode='auto'
    matches onnxruntime on the sparsified ONNX and runs faster than its dense TVM build."""
    import time

    import tvm

    from sculpt.models import PPOCR_SHAPES, ppocr_model
    from sculpt.passes import Pipeline

    model = Pipeline.from_specs(["canonicalize", "sparsify:sparsity=0.9,block=8x1"],
                                input_shapes={"x": PPOCR_SHAPES["rec"]}).run(ppocr_model("rec")).model
    mod = import_to_relax(model)
    target = host_target()
    new, decisions = apply_sparse_kernels(mod, target, "auto", layer_names=layer_names_from_onnx(model),
                                          number=3, repeat=3)
    assert sum(d.sparse for d in decisions) >= len(decisions) // 2
    spec = host_target_dict("llvm")
    x = RNG.standard_normal(PPOCR_SHAPES["rec"]).astype(np.float32)
    ref = list(ort_run(model, {"x": x}).values())[0]

    def median_ms(module):
        vm = tvm.relax.VirtualMachine(build(module, spec), tvm.cpu())
        xt = tvm.runtime.tensor(x)
        out = vm["main"](xt).numpy()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            vm["main"](xt)
            times.append(time.perf_counter() - t)
        return sorted(times)[1], out

    sparse_ms, out = median_ms(new)
    assert _rel(out, ref) < TOL
    dense_ms, _ = median_ms(mod)
    assert sparse_ms < dense_ms
