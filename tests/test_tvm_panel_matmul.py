"""Matmuls with a constant weight larger than L2 read it in column panels (panel_matmul): same
results as onnxruntime, applied only where it pays."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.tvm.kernels import host_target
from sculpt.backends.tvm.kernels.panel_matmul import pack_panels, panel_count, panel_width
from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels
from sculpt.backends.tvm.kernels.target_traits import traits_of
from sculpt.backends.tvm.relax_import import import_to_relax, run_relax
from sculpt.ir.model import Model
from sculpt.runtime import make_session
from tvm_checks import host_build_and_reference


def _matmul_add_model(x_shape, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out_shape = [*x_shape[:-1], n]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto)


def _compile_and_compare(model, x_shape, kinds=("matmul",)):
    got, ref, decisions = host_build_and_reference(model, x_shape)
    assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())
    return [d for d in decisions if d.kind in kinds]


def test_panels_hold_the_columns_in_order_with_zeros_past_the_last():
    w = np.arange(3 * 10, dtype=np.float32).reshape(3, 10)
    p = pack_panels(w, 4)
    assert p.shape == (3, 3, 4)
    assert np.array_equal(p[1, 2], w[2, 4:8]) and np.array_equal(p[2, :, :2], w[:, 8:10])
    assert not p[2, :, 2:].any()


@pytest.mark.parametrize("x_shape", [(20, 1024), (1, 20, 1024)])
def test_a_classifier_with_a_weight_over_l2_reads_panels_and_matches_onnxruntime(x_shape):
    """ddddocr's classifier shape, narrower: 1024 x 2100 (8.6 MB) with 2100 columns, no whole panels."""
    traits = traits_of(host_target("llvm"))
    n = 2100
    assert 1024 * n * 4 >= traits.l2_bytes
    matmuls = _compile_and_compare(_matmul_add_model(x_shape, 1024, n), x_shape)
    nb = panel_width(traits.for_matmuls().vector_lanes)
    # one kernel over [rows, panels, panel columns]: its result is the [rows, columns] matrix as it is
    assert [tuple(d.shape) for d in matmuls] == [(20, -(-n // nb), nb)]


def test_a_short_reduction_reads_panels_too():
    """PP-OCR rec's classifier kind: 40 x 120 by 120 x 6625 (3.2 MB; 6625 = 5^3 x 53 columns)."""
    traits = traits_of(host_target("llvm"))
    nb = panel_width(traits.for_matmuls().vector_lanes)
    matmuls = _compile_and_compare(_matmul_add_model((1, 40, 120), 120, 6625), (1, 40, 120))
    assert [tuple(d.shape) for d in matmuls] == [(40, -(-6625 // nb), nb)]


def test_a_prime_panel_count_gets_one_zero_panel_more():
    assert [panel_count(n, 4) for n in (8, 12, 20, 36, 40, 44)] == [2, 3, 6, 9, 10, 12]
    p = pack_panels(np.ones((3, 20), np.float32), 4)
    assert p.shape == (6, 3, 4) and p[:5].all() and not p[5].any()


def test_a_prime_panel_count_is_tiled_two_or_more_panels_at_a_time():
    """ddddocr's classifier had 257 panels: tiles of one panel read one stream from memory at a time
    (5.4 ms against 3.7 with 258 panels in tiles of 3 on an Intel Xeon)."""
    traits = traits_of(host_target("llvm"))
    nb = panel_width(traits.for_matmuls().vector_lanes)
    panels = next(p for p in range(5, 400) if all(p % d for d in range(2, p)) and 1024 * (p * nb - 5) * 4 >= traits.l2_bytes)
    n = panels * nb - 5
    matmuls = _compile_and_compare(_matmul_add_model((20, 1024), 1024, n), (20, 1024))
    assert [tuple(d.shape) for d in matmuls] == [(20, panels + 1, nb)]
    assert matmuls[0].tile[2] >= 2, matmuls[0].tile


def test_a_small_weight_keeps_the_plain_matmul():
    """A 128 KB weight (in L2 already) keeps its plain kernel."""
    decisions = _compile_and_compare(_matmul_add_model((12, 512), 512, 64), (12, 512), kinds=("matmul", "reduce"))
    assert [tuple(d.shape) for d in decisions] == [(12, 64)], [(d.kind, d.shape) for d in decisions]


def test_a_matrix_vector_product_reads_panels_and_matches_onnxruntime():
    """One row (an FC layer at batch 1), 1024 x 2048 (8 MB): panels, accumulators in registers."""
    traits = traits_of(host_target("llvm"))
    nb = panel_width(traits.for_matmuls().vector_lanes)
    matmuls = _compile_and_compare(_matmul_add_model((1, 1024), 1024, 2048), (1, 1024), kinds=("matmul", "reduce"))
    assert [tuple(d.shape) for d in matmuls] == [(1, 2048 // nb, nb)], [(d.kind, d.shape) for d in matmuls]


def test_a_gemm_by_a_constant_of_shape_weight_is_a_sum():
    """VGG-19 (the onnx wheel's light model) stores fc6's weight as ConstantOfShape: every entry one
    value. The matmul becomes sum(x) x that value (uniform_weight_matmul), with onnxruntime's results
    to float32 rounding of the sum, and no matmul is left in the module."""
    from sculpt.backends.tvm.int8 import _calls
    from sculpt.backends.tvm.kernels.uniform_weight_matmul import rewrite_uniform_weight_matmuls

    k, n = 512, 96
    shape = numpy_helper.from_array(np.array([n, k], np.int64), "w_shape")
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                          value=numpy_helper.from_array(np.array([0.03125], np.float32))),
         helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [shape, numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = Model.wrap(proto)
    mod = import_to_relax(model)
    assert any(getattr(c.op, "name", "") == "relax.matmul" for c in _calls(mod))
    assert not any(getattr(c.op, "name", "") == "relax.matmul" for c in _calls(rewrite_uniform_weight_matmuls(mod)))
    x = np.random.default_rng(2).standard_normal((2, k)).astype(np.float32)
    exe = compile_with_kernels(mod, tvm.target.Target(host_target("llvm")))
    got = run_relax(exe, {"x": x}, ["x"])[0]
    want = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.ptp(got[0]) > 1.5  # the bias varies the columns; the sum is one value per row


def test_a_classifier_head_adds_its_bias_to_the_panels_and_its_softmax_reads_them_in_place():
    """PP-OCRv6 rec's head, narrower: MatMul 40 x 120 by 120 x 6625, Add, Softmax over the classes.
    The bias joins the panels' kernel (zero-padded like the weight) and the row softmax reads the
    padded rows and writes the output in its shape: no slice, reshape or add is left as a copy of
    its own (they took 0.6 ms of 18 in PP-OCRv6 rec)."""
    x_shape, k, n = (1, 40, 120), 120, 6625
    model = _matmul_add_model(x_shape, k, n)
    proto = model.proto
    proto.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], axis=-1))
    proto.graph.output[0].name = "p"
    decisions = _compile_and_compare(Model.wrap(proto), x_shape, kinds=("matmul", "softmax_rows", "injective"))
    kinds = [(d.func, d.kind) for d in decisions]
    assert sorted(k for _, k in kinds if k != "injective") == ["matmul", "softmax_rows"], kinds
    assert [f for f, k in kinds if k == "matmul"][0].startswith("fused_einsum_add"), kinds
    # the lone reshapes left (the input's rows, the panels' result as a matrix) are views at run time
    assert all(re.fullmatch(r"reshape\d*", f) for f, k in kinds if k == "injective"), kinds
