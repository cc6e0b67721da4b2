"""The int8 depthwise kernel (sculpt.backends.tvm.kernels.int8_depthwise) and its place in the NHWC int8
lowering: integer-exact against a numpy reference of the QDQ unit's math, and, in a MobileNetV3-style
block (pointwise conv, HardSwish, depthwise, squeeze-and-excitation, pointwise, nearest upsampling), a
build whose only large transposes are the model's edges and whose outputs equal the integer Relax
lowering bit for bit, on the host and on aarch64 under qemu."""

from dataclasses import replace

import numpy as np
import pytest
from onnx import helper

from sculpt.backends.tvm.int8 import Int8KernelPolicy, compile_int8, int8_kernel_policy, lower_qdq_to_int8
from sculpt.backends.tvm.kernels import int8_depthwise
from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.int8_conv import AVX2_PMADDWD, NEON_SDOT
from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.passes import PassContext, create_pass

from graphs import make_model
from test_tvm_int8 import rand


def _reference(x, w, bias, zx, multiplier, zy, out_dtype, s: ConvShape) -> np.ndarray:
    """The QDQ depthwise unit in integers: x NHWC, w [C, 1, KH, KW]; QuantizeLinear's rounding."""
    n, h, wd, c = x.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = s.strides, s.dilation, s.padding
    xp = np.zeros((n, h + pt + pb, wd + pl + pr, c), np.int64)
    xp[:, pt:pt + h, pl:pl + wd] = x.astype(np.int64) - zx
    oh, ow = s.out_height, s.out_width
    acc = np.zeros((n, oh, ow, c), np.int64) + bias.astype(np.int64)
    for r in range(s.kernel[0]):
        for t in range(s.kernel[1]):
            acc += xp[:, r * dh: r * dh + (oh - 1) * sh + 1: sh, t * dw: t * dw + (ow - 1) * sw + 1: sw] \
                * w[:, 0, r, t].astype(np.int64)
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)
    return np.clip(np.rint(acc.astype(np.float32) * multiplier) + zy, lo, hi).astype(out_dtype)


@pytest.mark.parametrize("lanes", [8, 4])
@pytest.mark.parametrize("shape", [
    # channels, height, width, kernel, stride, dilation, pads (top, left, bottom, right)
    (16, 20, 20, 3, 1, 1, (1, 1, 1, 1)),
    (24, 13, 11, 3, 2, 1, (1, 1, 1, 1)),    # odd sizes at stride 2: partial column tiles
    (20, 9, 9, 5, 1, 1, (2, 2, 2, 2)),      # a channel tail (20 = 2 x 8 + 4), 5x5
    (5, 6, 7, 3, 1, 2, (2, 1, 0, 3)),       # fewer channels than a vector, dilation, uneven pads
    (8, 23, 30, 3, 2, 1, (0, 1, 1, 0)),
], ids=lambda s: "x".join(map(str, s[:3])) + f"_k{s[3]}s{s[4]}d{s[5]}")
@pytest.mark.parametrize("x_dtype, zx, out_dtype, zy", [("uint8", 131, "uint8", 3), ("int8", -7, "int8", -2),
                                                        ("uint8", 0, "int8", 5)])
def test_the_depthwise_kernel_is_exact(shape, lanes, x_dtype, zx, out_dtype, zy, monkeypatch):
    """Every output equals the unit's integer math: padding, strides, dilation, channel tails, column
    tails, and (with a small band) bands whose rows do not divide the output's."""
    import tvm

    for budget in ("BAND_BYTES", "STRIDE_ONE_BAND_BYTES"):  # several bands, the last one partial
        monkeypatch.setattr(int8_depthwise, budget, 2048)
    c, h, wd, k, stride, dil, pads = shape
    s = ConvShape(1, c, h, wd, c, (k, k), (stride, stride), (dil, dil), pads)
    tile = int8_depthwise.int8_depthwise_tile(s, lanes, 16)
    assert tile.th < s.out_height or s.out_height < 10  # several bands on every map of 10 rows or more
    rng = np.random.default_rng(c * h + lanes)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (1, h, wd, c)).astype(x_dtype)
    w = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    bias = rng.integers(-4_000_000, 4_000_000, c).astype(np.int32)  # beyond float32's exact integers
    multiplier = (rng.uniform(0.2, 2, c) * 1e-3).astype(np.float32)
    func = int8_depthwise.int8_depthwise_func(s, tile, x_dtype, out_dtype, zx, zy)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    y = tvm.runtime.tensor(np.zeros((1, s.out_height, s.out_width, c), out_dtype))
    consts = int8_depthwise.depthwise_constants(w, bias, multiplier, tile)
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, *consts)), y)
    np.testing.assert_array_equal(y.numpy(), _reference(x, w, bias, zx, multiplier, zy, out_dtype, s))


def test_stride_one_bands_are_tall_and_leave_work_for_every_thread():
    """At stride 1 a band holds as many rows as fit STRIDE_ONE_BAND_BYTES (PP-OCRv4 rec's 240-channel
    5x5 at 12x80: the whole height, each input row converted once), at stride 2 as fit BAND_BYTES; a
    unit of one channel block keeps MIN_TASKS bands."""
    def band_bytes(s, t):
        rows = (t.th - 1) * s.strides[0] + s.kernel[0]
        return rows * int8_depthwise._band_width(s, t.tw) * t.lanes * 4

    rec = ConvShape(1, 240, 12, 80, 240, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2))
    assert int8_depthwise.int8_depthwise_tile(rec, 16, 32).th == 12
    strided = ConvShape(1, 96, 200, 152, 96, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    tile = int8_depthwise.int8_depthwise_tile(strided, 16, 32)
    assert band_bytes(strided, tile) <= int8_depthwise.BAND_BYTES < band_bytes(strided, replace(tile, th=tile.th + 1))
    narrow = ConvShape(1, 16, 40, 40, 16, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    tile = int8_depthwise.int8_depthwise_tile(narrow, 16, 32)
    assert band_bytes(narrow, tile) <= int8_depthwise.STRIDE_ONE_BAND_BYTES
    assert -(-40 // tile.th) >= int8_depthwise.MIN_TASKS


def test_a_bias_at_the_int32_limit_takes_the_wide_epilogue():
    """PP-OCRv4 rec's 5x5 depthwise units have biases quantized to -2^31: bias + sum overflows int32. The
    kernel keeps a bias within 64 of zero in int32 and adds the rest in float64, where the sum is exact:
    the outputs are the int64 sum's, rounded once to float32, on channels near the limit and off it
    (a depthwise unit's sums are too small to move such a channel's output by more than a step)."""
    import tvm

    s = ConvShape(1, 16, 9, 10, 16, (5, 5), (1, 1), (1, 1), (2, 2, 2, 2))
    tile = int8_depthwise.int8_depthwise_tile(s, 8, 16)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (1, 9, 10, 16)).astype(np.uint8)
    w = rng.integers(-128, 128, (16, 1, 5, 5)).astype(np.int8)
    bias = rng.integers(-4_000_000, 4_000_000, 16).astype(np.int32)
    bias[[0, 3, 9]] = [-2 ** 31, 2 ** 31 - 1, -2 ** 31 + 1000]
    multiplier = np.full(16, 1e-3, np.float32)
    # the limit channels' outputs: about 1, 255 (int32 wrap-around would give 0) and 6
    multiplier[[0, 3, 9]] = [5.9e-8, 1.2e-7, 5.6e-8]
    weight, folded, mult = int8_depthwise.depthwise_constants(w, bias, multiplier, tile)
    assert mult.size == 2 * 16 and np.count_nonzero(mult[16:]) == 3 and np.abs(folded).max() < 4_000_000
    func = int8_depthwise.int8_depthwise_func(s, tile, "uint8", "uint8", 7, 128, wide=True)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    y = tvm.runtime.tensor(np.zeros((1, 9, 10, 16), np.uint8))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x, weight, folded, mult)), y)
    want = _reference(x, w, bias, 7, multiplier, 128, "uint8", s)
    assert want[..., 3].min() == 255 and 0 < want[..., 0].max() < 255 and 0 < want[..., 9].max() < 255
    np.testing.assert_array_equal(y.numpy(), want)


X_SHAPE = [1, 32, 48, 48]


def mobilenet_block() -> Model:
    """A MobileNetV3-style block as PP-OCR's detector has them: 1x1 conv, HardSwish, 3x3 depthwise at
    stride 2, squeeze-and-excitation (mean, 1x1 conv, Relu, 1x1 conv, HardSigmoid, scale), 1x1 conv, a
    nearest 2x upsampling added to the block's input path, a 3x3 conv."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish1"),
        helper.make_node("Conv", ["h1", "wd", "bd"], ["d"], name="depthwise", group=64, pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("HardSwish", ["d"], ["h2"], name="hswish2"),
        helper.make_node("GlobalAveragePool", ["h2"], ["m"], name="squeeze"),
        helper.make_node("Conv", ["m", "ws1", "bs1"], ["s1"], name="se_reduce"),
        helper.make_node("Relu", ["s1"], ["r1"], name="se_relu"),
        helper.make_node("Conv", ["r1", "ws2", "bs2"], ["s2"], name="se_expand"),
        helper.make_node("HardSigmoid", ["s2"], ["g"], name="se_gate", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["h2", "g"], ["e"], name="excite"),
        helper.make_node("Conv", ["e", "w2", "b2"], ["c2"], name="project"),
        helper.make_node("Resize", ["c2", "", "scales"], ["u"], name="upsample", mode="nearest"),
        helper.make_node("Conv", ["x", "wx", "bx"], ["cx"], name="lateral"),
        helper.make_node("Add", ["u", "cx"], ["a"], name="merge"),
        helper.make_node("Conv", ["a", "w3", "b3"], ["c3"], name="head", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c3"], ["y"], name="flatten"),  # the head's output quantized too
    ]
    inits = {"w1": rand(rng, 64, 32, 1, 1, scale=0.3), "b1": rand(rng, 64, scale=0.1),
             "wd": rand(rng, 64, 1, 3, 3, scale=0.3), "bd": rand(rng, 64, scale=0.1),
             "ws1": rand(rng, 16, 64, 1, 1, scale=0.2), "bs1": rand(rng, 16, scale=0.1),
             "ws2": rand(rng, 64, 16, 1, 1, scale=0.2), "bs2": rand(rng, 64, scale=0.1),
             "w2": rand(rng, 32, 64, 1, 1, scale=0.2), "b2": rand(rng, 32, scale=0.1),
             "scales": np.array([1, 1, 2, 2], np.float32),
             "wx": rand(rng, 32, 32, 1, 1, scale=0.3), "bx": rand(rng, 32, scale=0.1),
             "w3": rand(rng, 8, 32, 3, 3, scale=0.2), "b3": rand(rng, 8, scale=0.1)}
    model = make_model(nodes, [("x", X_SHAPE)], [("y", [1, 8 * 48 * 48])], inits, opset=14)
    return create_pass("qdq", {})(model, PassContext(calibration=CalibrationSet.random(model, 4, seed=2))).model


def _large_transposes(mod) -> list[tuple[int, ...]]:
    """The shapes of the transposes of more than SMALL_OPERAND elements (a transposed SE scale is a few
    hundred)."""
    from sculpt.backends.tvm.int8 import _calls
    from sculpt.backends.tvm.kernels.sink_permutes import SMALL_OPERAND

    shapes = [tuple(int(d) for d in call.ty.shape) for call in _calls(mod)
              if getattr(call.op, "name", "") == "relax.permute_dims"]
    return [s for s in shapes if int(np.prod(s)) > SMALL_OPERAND]


def test_a_mobilenet_block_runs_in_nhwc_and_equals_the_integer_lowering():
    """The auto layout takes the block into NHWC with the depthwise unit on its kernel: transposes cross
    HardSwish, the SE block's mean and scale, the upsampling and the sum, leaving only the input's and
    the output's; the build equals the integer Relax lowering bit for bit."""
    q = mobilenet_block()
    policy = int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD, min_macs=2_000_000)
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), policy)
    assert stats.layout == "NHWC" and stats.int8_depthwise == 1 and stats.left_float == {}
    assert stats.int8_kernel == 6  # every ungrouped conv, the SE block's too
    assert stats.folded_chains == 1  # the expansion's HardSwish (the depthwise's feeds the SE block's mean)
    assert sorted(_large_transposes(lowered)) == [(1, 8, 48, 48), (1, 48, 48, 32)]
    integer_ops, _ = lower_qdq_to_int8(import_to_relax(q))
    rng = np.random.default_rng(0)
    for k in range(3):
        feeds = {"x": (rng.standard_normal(X_SHAPE) * (1 + k)).astype(np.float32)}
        for got, want in zip(run_relax(build(lowered), feeds, ["x"]), run_relax(build(integer_ops), feeds, ["x"])):
            np.testing.assert_array_equal(got, want)


def test_the_mobilenet_block_on_aarch64_is_exact_under_qemu(tmp_path):
    """The same block for aarch64 with dotprod (4-lane vectors in the depthwise kernel), run under qemu:
    NHWC, and the host's integer lowering's bits."""
    from sculpt.backends.tvm.artifact import compile_model, export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    q = mobilenet_block()
    path = tmp_path / "block.onnx"
    q.save(path)
    compiled = compile_model(Model.load(path), "cortex-a76", int8="kernel")
    info = compiled.options["int8"]
    assert (info["instruction"], info["layout"], info["on_int8_depthwise"], info["folded_chains"]) == \
        (NEON_SDOT.name, "NHWC", 1, 1)
    artifact = export_artifact(compiled, tmp_path / "block.so", source_model=path)
    feeds = {"x": np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)}
    run = run_artifact(artifact, feeds)
    assert run.emulated
    integer_ops, _ = compile_int8(Model.load(path), int8_kernel=False)
    for got, want in zip(run.outputs.values(), run_relax(integer_ops, feeds, ["x"])):
        np.testing.assert_array_equal(got, want)
