"""4-bit weights in sculpt's TVM CPU build (kernels/int4_matmul): a matmul on a weight-quant'd
int4 weight (folded to float32 by canonicalize) keeps it packed at 4 bits in the module and unpacks
it in its kernel. Numerics against onnxruntime, the packed constants in the module, and the rewrite
left out where it does not apply."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.tvm.kernels import host_target
from sculpt.backends.tvm.kernels.int4_matmul import (
    MIN_ELEMENTS, Int4Weight, int4_codes, pack_int4_panels, pack_panels, pad_scales, rewrite_int4_matmuls, row_tile)
from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels, legalized_and_fused
from sculpt.backends.tvm.kernels.relax_rewrite import constant_value
from sculpt.backends.tvm.kernels.target_traits import traits_of
from sculpt.backends.tvm.relax_import import import_to_relax, run_relax
from sculpt.ir.model import Model
from sculpt.passes import create_pass
from sculpt.runtime import make_session

from markers import needs_ppocr

HOST = host_target("llvm")


def _matmul_model(x_shape, k: int, n: int, *, gemm: bool = False, seed: int = 0) -> Model:
    """x @ W + b as MatMul + Add, or (``gemm``) as Gemm with transB=1 and its bias."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    out_shape = [*x_shape[:-1], n]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"), numpy_helper.from_array(b, "b")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
                 helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto)


def _quantized(model: Model, **options) -> Model:
    return create_pass("weight-quant", {"min_elements": 16, **options})(model.clone()).model


def _folded(model: Model) -> Model:
    """What 'sculpt compile' imports: the model canonicalized (the DequantizeLinear folded)."""
    return create_pass("canonicalize")(model.clone()).model


def _rewritten(model: Model):
    stats: dict = {}
    mod = rewrite_int4_matmuls(import_to_relax(_folded(model)), traits_of(HOST), stats)
    return mod, stats


def _constants(mod) -> list:
    """(shape, dtype) of every constant of ``main``."""
    from tvm import relax

    found = []

    def visit(expr):
        value = constant_value(expr)
        if value is not None:
            found.append((tuple(int(d) for d in value.shape), str(value.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _max_rel_error(model: Model, quantized: Model, x: np.ndarray) -> float:
    exe = compile_with_kernels(import_to_relax(_folded(quantized)), tvm.target.Target(HOST))
    got = run_relax(exe, {"x": x}, ["x"])[0]
    ref = make_session(quantized, optimize=False).run(None, {"x": x})[0]  # the graph as written
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------ codes and packing
@pytest.mark.parametrize("group", [0, 16, 32])
def test_codes_reproduce_weight_quants_weights_bit_for_bit(group):
    model = _quantized(_matmul_model((1, 4, 45), 45, 37), group_size=group)
    w = numpy_helper.to_array(next(t for t in _folded(model).graph.initializer if t.name.startswith("w")))
    found = int4_codes(w)
    assert found is not None
    assert found.group == (45 if group == 0 else group)
    assert found.codes.dtype == np.int8 and found.codes.min() >= -8 and found.codes.max() <= 7
    assert np.array_equal(found.dequantized(), w)


def test_float_and_8_bit_weights_have_no_int4_codes_and_8_bit_ones_have_int8_codes():
    rng = np.random.default_rng(3)
    assert int4_codes(rng.standard_normal((64, 40)).astype(np.float32)) is None
    model = _quantized(_matmul_model((1, 4, 64), 64, 40), bits=8)
    w = numpy_helper.to_array(next(t for t in _folded(model).graph.initializer if t.name.startswith("w")))
    assert int4_codes(w) is None
    found = int4_codes(w, bits=8)
    assert found is not None and found.bits == 8 and np.array_equal(found.dequantized(), w)
    assert int4_codes(rng.standard_normal((64, 40)).astype(np.float32), bits=8) is None
    # zero columns take any scale; the codes stay zero
    z = np.zeros((16, 3), np.float32)
    z[:, 1] = np.arange(-8, 8, dtype=np.float32) * np.float32(0.1)
    found = int4_codes(z)
    assert found is not None and np.array_equal(found.dequantized(), z)
    # a fill (the onnx wheel's light models: one value per weight tensor) is no quantized weight
    fill = np.full((64, 40), np.float32(0.0123))
    assert int4_codes(fill) is None and int4_codes(fill, bits=8) is None


def test_panels_hold_two_vectors_of_columns_as_nibbles():
    codes = (np.arange(3 * 10) % 16 - 8).reshape(3, 10).astype(np.int8)
    packed = pack_int4_panels(codes, 4)  # 8 columns a panel: 2 panels, the last with 2 columns
    assert packed.shape == (2, 3, 4) and packed.dtype == np.int8
    b = packed.view(np.uint8).astype(np.int16)
    low = np.where(b & 0xF >= 8, (b & 0xF) - 16, b & 0xF)
    high = np.where(b >> 4 >= 8, (b >> 4) - 16, b >> 4)
    assert np.array_equal(low[0], codes[:, 0:4]) and np.array_equal(high[0], codes[:, 4:8])
    assert np.array_equal(low[1, :, :2], codes[:, 8:10]) and not low[1, :, 2:].any() and not high[1].any()
    assert pad_scales(np.ones((2, 10), np.float32), 4).shape == (2, 16)


def test_row_tiles_fit_the_accumulators_and_divide_the_rows():
    traits = traits_of(HOST)
    assert row_tile(40, traits) * 2 <= traits.accumulator_registers
    assert 40 % row_tile(40, traits) == 0
    assert row_tile(1, traits) == 1


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("direct,group_sums", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("group", [0, 16])
def test_every_kernel_variant_computes_the_dequantized_product(direct, group_sums, group, bits):
    """The kernel alone against numpy: 9 rows in tiles of 4 (a partial last tile), K = 37 (groups of
    16: a short last one), 21 columns (a partial panel)."""
    from sculpt.backends.tvm.kernels.int4_matmul import int4_matmul_kernel

    m, k, n, lanes = 9, 37, 21, traits_of(HOST).vector_lanes
    rng = np.random.default_rng(6)
    codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (k, n)).astype(np.int8)
    group = group or k
    scales = rng.random((-(-k // group), n)).astype(np.float32) + 0.5
    packed = pack_panels(Int4Weight(codes, scales, group, bits), lanes)
    padded = pad_scales(scales, lanes)
    func = int4_matmul_kernel(m, k, packed.shape[0], lanes, padded.shape[0], group, 4, True, direct, group_sums, bits)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(HOST))
    x = rng.standard_normal((m, k)).astype(np.float32)
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((m, padded.shape[1]), np.float32), dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, packed, padded)), y)
    w = codes.astype(np.float32) * np.repeat(scales, group, axis=0)[:k]
    ref = x.astype(np.float64) @ w
    assert np.abs(y.numpy()[:, :n] - ref).max() <= 1e-5 * np.abs(ref).max()
    assert not y.numpy()[:, n:].any()  # zero codes past the last column


# ------------------------------------------------------------------ numerics against onnxruntime
@pytest.mark.parametrize("group", [0, 16])
@pytest.mark.parametrize("gemm", [False, True])
def test_int4_matmul_and_gemm_match_onnxruntime(group, gemm):
    """Odd K (45), N (37) not a multiple of the 2-vector panel, M (7) not a multiple of the row tile."""
    x_shape = (7, 45) if gemm else (1, 7, 45)
    model = _quantized(_matmul_model(x_shape, 45, 37, gemm=gemm), group_size=group)
    mod, stats = _rewritten(model)
    assert stats["int4_matmuls"] == 1
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    assert _max_rel_error(model, model, x) <= 1e-5


@pytest.mark.parametrize("group", [0, 32])
def test_a_wide_int4_classifier_matches_onnxruntime_on_several_threads_worth_of_work(group):
    """rec's head shape, smaller: 40 x 120 by 120 x 1000 (parallel over panels; several row tiles:
    the codes unpacked once into a panel buffer)."""
    model = _quantized(_matmul_model((1, 40, 120), 120, 1000), group_size=group)
    x = np.random.default_rng(2).standard_normal((1, 40, 120)).astype(np.float32)
    assert _max_rel_error(model, model, x) <= 1e-5


@pytest.mark.parametrize("group", [0, 16])
def test_a_matrix_vector_product_on_int4_weights_matches_onnxruntime(group):
    """One row: the codes unpacked in registers, groups of 16 summed apart (K = 75: a short last group)."""
    model = _quantized(_matmul_model((1, 75), 75, 50, gemm=True), group_size=group)
    assert _rewritten(model)[1]["int4_matmuls"] == 1
    x = np.random.default_rng(3).standard_normal((1, 75)).astype(np.float32)
    assert _max_rel_error(model, model, x) <= 1e-5


@pytest.mark.parametrize("group", [0, 32])
def test_8_bit_weights_are_kept_a_byte_a_code_and_match_onnxruntime(group):
    model = _quantized(_matmul_model((1, 7, 75), 75, 37), bits=8, group_size=group)
    mod, stats = _rewritten(model)
    assert stats["int8_matmuls"] == 1 and stats["int4_matmuls"] == 0
    lanes = traits_of(HOST).vector_lanes
    assert ((-(-37 // (2 * lanes)), 75, 2 * lanes), "int8") in _constants(mod)
    x = np.random.default_rng(8).standard_normal((1, 7, 75)).astype(np.float32)
    assert _max_rel_error(model, model, x) <= 1e-5


# ------------------------------------------------------------------ what the module holds
@pytest.mark.parametrize("gemm", [False, True])
def test_the_built_module_holds_packed_nibbles_not_the_float_weight(gemm):
    k, n = 64, 200
    model = _quantized(_matmul_model((8, k) if gemm else (1, 8, k), k, n, gemm=gemm), group_size=32)
    mod, _ = _rewritten(model)
    target = tvm.target.Target(HOST)
    consts = _constants(legalized_and_fused(mod, target))
    lanes = traits_of(HOST).vector_lanes
    panels = -(-n // (2 * lanes))
    assert ((panels, k, lanes), "int8") in consts
    assert ((2, panels * 2 * lanes), "float32") in consts
    assert not any(dtype == "float32" and len(shape) == 2 and shape[0] * shape[1] >= k * n // 2
                   for shape, dtype in consts), consts


def test_the_exported_library_is_smaller_than_the_float_build(tmp_path):
    k, n = 256, 512  # 512 KB of float32 weights, 64 KB packed
    fp32 = _matmul_model((1, 4, k), k, n)
    target = tvm.target.Target(HOST)
    sizes = {}
    for name, model in (("fp32", fp32), ("int4", _quantized(fp32))):
        exe = compile_with_kernels(import_to_relax(_folded(model)), target)
        exe.export_library(str(tmp_path / f"{name}.so"))
        sizes[name] = (tmp_path / f"{name}.so").stat().st_size
    assert sizes["fp32"] - sizes["int4"] >= 0.8 * (k * n * 4 - k * n // 2), sizes


# ------------------------------------------------------------------ where it does not apply
def test_float_and_small_weights_are_left_to_the_float_kernels():
    stats = _rewritten(_matmul_model((1, 4, 64), 64, 40))[1]
    assert stats["int4_matmuls"] == stats["int8_matmuls"] == 0
    small = _matmul_model((1, 4, 8), 8, 8)  # 64 weights < MIN_ELEMENTS
    assert 8 * 8 < MIN_ELEMENTS
    assert _rewritten(_quantized(small))[1]["int4_matmuls"] == 0


def test_a_matmul_of_two_activations_and_int4_convs_are_not_rewritten():
    x_shape = [1, 8, 6, 6]
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["c", "s"], ["r"], name="reshape"),
         helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["r", "t"], ["y"], name="attention")], "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 16, 36], np.int64), "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = _quantized(Model.wrap(proto))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)  # the conv weight is int4
    assert _rewritten(model)[1]["int4_matmuls"] == 0


# ------------------------------------------------------------------ PP-OCRv4 rec, 4-bit MatMuls
def _rec_w4(tmp_path):
    from sculpt.models import PPOCR_SHAPES, ppocr_model_path

    model = Model.load(ppocr_model_path("rec"))
    model.fix_input_shapes({"x": PPOCR_SHAPES["rec"]})
    path = tmp_path / "rec_w4g32.onnx"
    create_pass("weight-quant", {"conv_bits": 8, "group_size": 32})(_folded(model)).model.save(path)
    return path


@pytest.mark.slow
@needs_ppocr
def test_rec_with_4_bit_matmuls_builds_packed_smaller_and_matches_onnxruntime(tmp_path):
    from sculpt.backends.tvm.artifact import compile_artifact, load_artifact
    from sculpt.backends.tvm.deploy import verify_artifact
    from sculpt.models import PPOCR_SHAPES, ppocr_model_path

    path = _rec_w4(tmp_path)
    int4 = compile_artifact(path, "host", tmp_path / "rec_w4.so")
    fp32 = compile_artifact(ppocr_model_path("rec"), "host", tmp_path / "rec.so",
                            input_shapes={"x": PPOCR_SHAPES["rec"]})
    # rec's 9 weight MatMuls hold 1.03M weights: 4.1 MB as float32, 0.6 MB packed with their scales
    assert fp32.library.stat().st_size - int4.library.stat().st_size > 3_000_000
    result = verify_artifact(load_artifact(int4.library), path, None, rtol=1e-4)
    assert result.ok, result.comparison.outputs


@pytest.mark.slow
@needs_ppocr
@pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs qemu-user-static and g++-aarch64-linux-gnu")
def test_int4_matmuls_run_on_arm64_under_qemu(tmp_path):
    """The NEON build (4 lanes: panels of 8 columns) of a 4-bit MatMul and Gemm, under qemu."""
    import onnx

    from sculpt.backends.tvm.artifact import compile_model, export_artifact, load_artifact
    from sculpt.backends.tvm.deploy import verify_artifact

    for name, x_shape, gemm, group in (("matmul", (1, 7, 45), False, 16), ("gemm", (5, 120), True, 0)):
        model = _quantized(_matmul_model(x_shape, x_shape[-1], 37, gemm=gemm), group_size=group)
        path = tmp_path / f"{name}.onnx"
        onnx.save(model.proto, path)
        library = tmp_path / f"{name}.so"
        compiled = compile_model(model, "arm64", build_options={"kernels": "sculpt"})
        assert "int4_matmul_0" in compiled.executable.as_text()  # the VM calls the int4 kernel
        export_artifact(compiled, library, source_model=path)
        x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
        result = verify_artifact(load_artifact(library), path, {"x": x}, rtol=1e-4, timeout=900)
        assert result.emulated and result.ok, result.comparison.outputs
