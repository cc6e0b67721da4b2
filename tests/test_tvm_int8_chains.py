"""Elementwise chains between int8 units (dequantize -> HardSwish / ReLU6 / ReLU / affine -> quantize)
computed in the int8 kernels' epilogue (sculpt.backends.tvm.int8_chains, kernels/quantized_chain.py):
which chains fold, that the folded build equals the integer Relax lowering bit for bit in both kernel
layouts, and that both stay within a rounding of onnxruntime's run of the QDQ graph."""

import dataclasses

import numpy as np
import pytest
from onnx import helper

from sculpt.backends.tvm.int8 import Int8KernelPolicy, _calls, int8_kernel_policy, lower_qdq_to_int8
from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.int8_conv import AVX2_PMADDWD, int8_conv_func, int8_conv_tile
from sculpt.backends.tvm.kernels.quantized_chain import ChainStep, QuantizedChain
from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax
from sculpt.ir.calibration import CalibrationSet
from sculpt.passes import PassContext, create_pass
from sculpt.runtime import make_session

from graphs import make_model
from test_tvm_int8 import rand

X_SHAPE = [1, 8, 20, 20]


def chain_net(residual: bool = False):
    """conv -> HardSwish -> 1x1 conv -> Clip(0, 6) -> 1x1 conv -> Relu -> x 0.5 + 0.25 -> conv; with
    ``residual``, the first conv's output is also added to the second's (so its chain cannot fold)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish"),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu"),
        helper.make_node("Mul", ["r3", "gain"], ["g3"], name="affine_scale"),
        helper.make_node("Add", ["g3", "shift"], ["a3"], name="affine_shift"),
        helper.make_node("Conv", ["a3", "w4", "b4"], ["c4"], name="conv4"),
        helper.make_node("Flatten", ["c4"], ["y"], name="flatten"),  # conv4's output quantized too
    ]
    if residual:
        nodes[4:5] = [helper.make_node("Add", ["r2", "c1"], ["s2"], name="residual"),
                      helper.make_node("Conv", ["s2", "w3", "b3"], ["c3"], name="conv3")]
    inits = {"w1": rand(rng, 16, 8, 3, 3, scale=0.3), "b1": rand(rng, 16, scale=0.1),
             "w2": rand(rng, 16, 16, 1, 1, scale=0.3), "b2": rand(rng, 16, scale=0.1),
             "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
             "w3": rand(rng, 16, 16, 1, 1, scale=0.3), "b3": rand(rng, 16, scale=0.1),
             "gain": np.array([0.5], np.float32), "shift": np.array([0.25], np.float32),
             "w4": rand(rng, 8, 16, 3, 3, scale=0.2), "b4": rand(rng, 8, scale=0.1)}
    model = make_model(nodes, [("x", X_SHAPE)], [("y", [1, 8 * 18 * 18])], inits, opset=14)
    q = create_pass("qdq", {"ops": ["Conv"]})(model, PassContext(calibration=CalibrationSet.random(model, 4, seed=1)))
    return q.model


def _policy(layout: str) -> Int8KernelPolicy:
    policy = int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD)
    return dataclasses.replace(policy, min_macs=0, layout=layout)


def _feeds(k: int) -> dict:
    return {"x": (np.random.default_rng(k).standard_normal(X_SHAPE) * (1 + k)).astype(np.float32)}


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_chains_fold_into_the_kernels_and_equal_the_integer_lowering(layout):
    """HardSwish and the affine after ReLU each become the epilogue of the conv before them (the qdq
    pass folds ReLU6 and ReLU into their quantizer's range): the build holds no dequantize but the
    output's and no float op of a chain, and its outputs equal the integer Relax lowering's (whose chains are Relax ops) bit
    for bit, and onnxruntime's QDQ graph within one output step."""
    q = chain_net()
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), _policy(layout))
    assert (stats.int8_kernel, stats.folded_chains, stats.layout) == (4, 2, layout)
    names = [getattr(call.op, "name", "") for call in _calls(lowered)]
    assert names.count("relax.dequantize") == 1  # the output's
    assert not {"relax.add", "relax.multiply", "relax.maximum", "relax.minimum", "relax.clip"} & set(names)
    assert sum("_chain" in gvar.name_hint for gvar in lowered.functions.keys()) == 2
    integer_ops, relax_stats = lower_qdq_to_int8(import_to_relax(q))
    assert relax_stats.folded_chains == 0
    kernel_build, relax_build = build(lowered), build(integer_ops)
    out_scale = float(q.get_constant(q.producers()[q.node_by_name("flatten").input[0]].input[1]))
    sess = make_session(q, optimize=False)
    for k in range(3):
        got, want = run_relax(kernel_build, _feeds(k), ["x"])[0], run_relax(relax_build, _feeds(k), ["x"])[0]
        np.testing.assert_array_equal(got, want)
        ref = sess.run(None, _feeds(k))[0]
        assert np.abs(got - ref).max() <= 1.01 * out_scale


def test_a_kernel_output_read_twice_keeps_its_chain_as_relax_ops():
    """conv1's output feeds HardSwish and a residual sum: its chain stays Relax ops (folding it would
    compute the kernel twice); the affine chain still folds."""
    q = chain_net(residual=True)
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), _policy("NHWC"))
    assert stats.folded_chains == 1
    integer_ops, _ = lower_qdq_to_int8(import_to_relax(q))
    for k in range(2):
        np.testing.assert_array_equal(run_relax(build(lowered), _feeds(k), ["x"])[0],
                                      run_relax(build(integer_ops), _feeds(k), ["x"])[0])


def test_chain_divisions_become_products_on_and_off_the_kernels():
    """HardSwish's / 6 and each chain's quantize divide no more (a float32 division costs several
    products): the integer lowering without kernels multiplies by the reciprocals too, and each chain's
    quantize has scale 1."""
    integer_ops, _ = lower_qdq_to_int8(import_to_relax(chain_net(residual=True)))
    calls = _calls(integer_ops)
    assert not [c for c in calls if getattr(c.op, "name", "") == "relax.divide"]
    unit_scales = [c for c in calls if getattr(c.op, "name", "") == "relax.quantize"
                   and float(c.args[1].value.numpy()) == 1.0]
    assert len(unit_scales) == 4 + 2  # each conv unit's requantization, and the two chains (one read twice)


def test_a_chain_in_the_epilogue_matches_its_float32_formula():
    """One conv kernel with a HardSwish chain against numpy: the requantized output q, then
    quantize(hswish(dequantize(q))) in float32 with the same operation order (products fused into
    the following sums only where numpy cannot tell: the values here are exact in float32)."""
    import tvm

    from sculpt.backends.tvm.kernels.int8_conv import folded_bias, pack_int8_weight, padded_multiplier
    from sculpt.backends.tvm.kernels.target_traits import host_target

    policy = _policy("NHWC")
    instr = policy.instruction
    shape = ConvShape(1, 8, 6, 7, 16, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (1, 8, 6, 7)).astype(np.uint8)
    w = rng.integers(-128, 128, (16, 8, 1, 1)).astype(np.int8)
    mult = np.full(16, 2.0 ** -9, np.float32)
    zy = 100
    # dequantize scale 2^-3 and a power-of-two reciprocal: every float step is exact
    chain = QuantizedChain(0.125, zy, (ChainStep("add", 0, 3.0), ChainStep("maximum", 1, 0.0),
                                       ChainStep("minimum", 2, 6.0), ChainStep("multiply", 0, 3),
                                       ChainStep("multiply", 4, 0.25)), 1.0, 5, "int8")
    tile = int8_conv_tile(shape, instr)
    channels = tile.padded_channels(16)
    w2, b2 = folded_bias(w, None, 0, instr.offset("uint8", 0), channels, mult, zy, "uint8")
    func = int8_conv_func(shape, tile, instr, "uint8", "uint8", 0, zy, layout="NHWC", parallel=False, chain=chain)
    lib = tvm.compile(tvm.IRModule({"conv": func.with_attr("global_symbol", "conv")}),
                      target=tvm.target.Target(host_target({"kind": "llvm"})))
    y = tvm.runtime.tensor(np.zeros((1, 6, 7, 16), np.int8))
    lib.mod["conv"](*[tvm.runtime.tensor(a) for a in (
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)), pack_int8_weight(w2, tile, instr), b2,
        padded_multiplier(mult, 16, channels))], y)
    acc = np.einsum("nchw,oc->nhwo", x.astype(np.int64), w[:, :, 0, 0].astype(np.int64))
    q = np.clip(np.rint(acc.astype(np.float32) * mult[0]) + zy, 0, 255)
    v = ((q - zy) * 0.125).astype(np.float32)
    h = (v * np.clip(v + 3, 0, 6) * np.float32(0.25)).astype(np.float32)
    want = np.clip(np.rint(h / 1.0) + 5, -128, 127).astype(np.int8)
    assert len(np.unique(want)) > 20  # the chain is not saturated
    np.testing.assert_array_equal(y.numpy(), want)


def test_gemm_units_with_transposed_weights_and_bias_take_the_int8_path():
    """A classifier head as ONNX writes it — Gemm with transB and a bias (VGG-19's fc7 and fc8): the
    unit matmul(dequantize(x), permute_dims(dequantize(W))) + dequantize(bias) is an int8 unit (the
    weight transposed at compile time, the bias added to the int32 sums), on the kernel and off it,
    bit-equal between the two and within one output step of onnxruntime's QDQ graph."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="fc1", transB=1),
             helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], name="fc2", transB=1),
             helper.make_node("Flatten", ["g2"], ["y"], name="flatten")]
    inits = {"w1": rand(rng, 48, 64, scale=0.2), "b1": rand(rng, 48, scale=0.1),
             "w2": rand(rng, 10, 48, scale=0.2), "b2": rand(rng, 10, scale=0.1)}
    model = make_model(nodes, [("x", [3, 64])], [("y", [3, 10])], inits)
    q = create_pass("qdq", {"ops": ["Gemm"]})(model, PassContext(calibration=CalibrationSet.random(model, 4, seed=2)))
    q = q.model
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), _policy("NHWC"))
    assert (stats.matmul, stats.int8_kernel, stats.left_float) == (2, 2, {})
    integer_ops, relax_stats = lower_qdq_to_int8(import_to_relax(q))
    assert (relax_stats.matmul, relax_stats.left_float) == (2, {})
    out_scale = float(q.get_constant(q.producers()[q.node_by_name("flatten").input[0]].input[1]))
    sess = make_session(q, optimize=False)
    for k in range(3):
        x = {"x": (np.random.default_rng(k).standard_normal((3, 64)) * (1 + k)).astype(np.float32)}
        got, want = run_relax(build(lowered), x, ["x"])[0], run_relax(build(integer_ops), x, ["x"])[0]
        np.testing.assert_array_equal(got, want)
        assert np.abs(got - sess.run(None, x)[0]).max() <= 1.01 * out_scale
