"""The channel-blocked conv kernel (sculpt.backends.tvm.kernels.blocked_conv): numerics against
onnxruntime over strides, padding, dilation, widths the column tile does not divide and fused
epilogues; the tile policy; the weight packing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sculpt.runtime import make_session  # noqa: E402
from sculpt.backends.tvm import import_to_relax, run_relax  # noqa: E402
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target, traits_of  # noqa: E402
from sculpt.backends.tvm.kernels import onnx_cases as cases  # noqa: E402
from sculpt.backends.tvm.kernels import tiling  # noqa: E402
from sculpt.backends.tvm.kernels.blocked_conv import (ConvShape, ConvTile, pack_weight,  # noqa: E402
                                                      tile_from_block_name)
from sculpt.backends.tvm.kernels.target_traits import TargetTraits  # noqa: E402
from sculpt.backends.tvm.kernels.tiling import conv_tile  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402

AVX2 = TargetTraits("avx2", 8, 16, 32 * 1024, 512 * 1024)
NEON = TargetTraits("neon", 4, 32, 32 * 1024, 256 * 1024)
AVX512 = TargetTraits("avx512", 16, 32, 48 * 1024, 1024 * 1024)


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


def _conv_model(cin, cout, hw, k, stride, pads, dilation, epilogue, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    inits, ins = [numpy_helper.from_array(w, "w")], ["x", "w"]
    if epilogue != "none":
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        ins.append("b")
    nodes = [helper.make_node("Conv", ins, ["c"], kernel_shape=[k, k], strides=[stride, stride], pads=pads,
                              dilations=[dilation, dilation])]
    oh = (hw[0] + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    ow = (hw[1] + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    last = "c"
    if epilogue in ("relu", "residual"):
        nodes.append(helper.make_node("Relu", [last], ["r"]))
        last = "r"
    if epilogue == "hardswish":
        nodes.append(helper.make_node("HardSwish", [last], ["h"]))
        last = "h"
    if epilogue == "residual":
        inits.append(numpy_helper.from_array(rng.standard_normal((1, cout, oh, ow)).astype(np.float32), "z"))
        nodes.append(helper.make_node("Add", [last, "z"], ["a"]))
        last = "a"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, oh, ow])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


CASES = [  # cin, cout, (h, w), k, stride, pads (t, l, b, r), dilation, epilogue
    (40, 32, (10, 12), 3, 1, [1, 1, 1, 1], 1, "relu"),          # width divides the column tile
    (40, 32, (13, 13), 3, 1, [1, 1, 1, 1], 1, "none"),          # 13 wide: padded width, sliced; no epilogue
    (3, 16, (17, 23), 7, 2, [3, 3, 3, 3], 1, "relu"),           # stem: 7x7 stride 2
    (64, 48, (9, 11), 1, 1, [0, 0, 0, 0], 1, "residual"),       # 1x1 with a residual add
    (48, 16, (12, 12), 3, 2, [0, 1, 1, 0], 1, "hardswish"),     # asymmetric padding, stride 2, HardSwish
    (24, 24, (15, 15), 3, 1, [2, 2, 2, 2], 2, "relu"),          # dilation 2
    (50, 8, (1, 1), 1, 1, [0, 0, 0, 0], 1, "none"),             # 1x1 map (squeeze-and-excitation)
    (20, 34, (14, 14), 1, 1, [0, 0, 0, 0], 1, "relu"),          # 34 channels: 40 computed, 6 sliced off
    (16, 68, (13, 13), 3, 2, [1, 1, 1, 1], 1, "residual"),      # 68 channels and a padded width, residual
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2][0]}x{c[2][1]}-k{c[3]}s{c[4]}-{c[7]}" for c in CASES])
def test_blocked_conv_matches_onnxruntime(case):
    _compile_and_compare(case)


def _compile_and_compare(case):
    """The one conv2d_blocked decision of a case's build, whose output matched onnxruntime."""
    cin, cout, hw, k, stride, pads, dilation, epilogue = case
    proto = _conv_model(cin, cout, hw, k, stride, pads, dilation, epilogue, seed=cin + k)
    model = Model.wrap(proto)
    x = np.random.default_rng(1).standard_normal((1, cin, *hw)).astype(np.float32)
    decisions = []
    import tvm

    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    got = run_relax(executable, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    blocked = [d for d in decisions if d.kind == "conv2d_blocked"]
    assert len(blocked) == 1, [(d.func, d.kind) for d in decisions]  # the unfused copy is gone
    ob, th, tw = blocked[0].tile[:3]
    assert ob % traits_of(host_target("llvm")).vector_lanes == 0
    return blocked[0]


ROWS_OUTER_CASES = [CASES[1], CASES[3], CASES[4], CASES[-1]]  # padded width, 1x1 residual, stride 2, 68 channels


@pytest.mark.parametrize("case", ROWS_OUTER_CASES, ids=[f"{c[0]}-{c[1]}-k{c[3]}s{c[4]}" for c in ROWS_OUTER_CASES])
def test_rows_outer_order_pads_one_band_at_a_time_and_matches(case, monkeypatch):
    """Bands of rows outermost (the policy's choice for large maps): the padding stage is computed per
    band inside the parallel loop; the result is the same."""
    from sculpt.backends.tvm.kernels import tiling

    monkeypatch.setattr(tiling, "_rows_outer", lambda *a: True)
    decision = _compile_and_compare(case)
    assert decision.tile[4] == 1


def test_policy_tiles_within_the_register_budget_and_keeps_the_width_kernel_where_it_wins():
    shape = ConvShape(1, 64, 56, 56, 192, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    tile = conv_tile(shape, AVX2)
    assert tile == ConvTile(24, 1, 3, rows_outer=1)  # 3 vectors of channels x 3 pixels: the best on AVX2
    assert conv_tile(ConvShape(1, 64, 56, 56, 64, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2) == ConvTile(16, 1, 4, rows_outer=1)
    for traits in (AVX2, NEON):
        for cout, hw in ((192, 56), (64, 7), (1000, 13), (40, 112)):
            t = conv_tile(ConvShape(1, 64, hw, hw, cout, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), traits)
            vregs = t.ob // traits.vector_lanes
            acc = t.th * t.tw * vregs
            assert t.ob % traits.vector_lanes == 0 and t.padded_channels(cout) <= cout * 17 / 16
            assert acc <= traits.vector_registers // 2 + 1 and acc + vregs + 1 <= traits.vector_registers - 3
    # 64 channels x 56x56 (800 KB) leave L2 between channel blocks: rows outermost (the weights, 147 or
    # 442 KB, are re-read per band instead); a 14x14 map stays in cache; 9.4 MB of weights against
    # 1.6 MB of input keep the channel blocks outermost
    assert conv_tile(ConvShape(1, 256, 14, 14, 256, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)), AVX2).rows_outer == 0
    assert conv_tile(ConvShape(1, 512, 28, 28, 512, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2).rows_outer == 0
    # PP-OCRv6 rec's 384->192 1x1 at 6x80 (737 KB of input, 1 MB of L2 in the traits): rows outer on
    # AVX-512 at half rate (Zen 4), channel blocks outer on a core with two 512-bit units
    rec = ConvShape(1, 384, 6, 80, 192, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
    assert tiling._rows_outer(rec, 192, AVX512)
    assert not tiling._rows_outer(rec, 192, replace(AVX512, wide_at_full_rate=True))
    # 13 wide: the least padding of the width wins
    narrow = conv_tile(ConvShape(1, 256, 13, 13, 256, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2)
    assert narrow.padded_width(13) - 13 <= 3
    # channels whole vectors would pad by more than a quarter on rows of whole vectors, or a short
    # reduction over whole vectors of width, keep the width kernel; 68 channels compute 72
    assert conv_tile(ConvShape(1, 64, 32, 32, 12, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2) is None
    # on rows of no whole vectors (28) the width kernel wastes as much: up to twice the channels
    assert conv_tile(ConvShape(1, 64, 28, 28, 12, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2).padded_channels(12) == 16
    assert conv_tile(ConvShape(1, 64, 28, 28, 3, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2) is None
    padded = conv_tile(ConvShape(1, 64, 28, 28, 68, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), AVX2)
    assert padded is not None and padded.padded_channels(68) == 72
    # 1000 classes (SqueezeNet's last conv): 1008 in blocks of 3 vectors rather than blocks of 1
    wide = conv_tile(ConvShape(1, 512, 13, 13, 1000, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)), AVX2)
    assert wide.ob == 24 and wide.padded_channels(1000) == 1008
    assert conv_tile(ConvShape(1, 16, 3, 96, 104, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)), AVX2) is None
    assert conv_tile(ConvShape(1, 16, 3, 95, 104, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)), AVX2) is not None


def test_policy_with_blocked_input_measured_rules():
    """NCHW8c in and out on AVX2: 12 accumulators (3 vectors x 4 pixels, or 2 x 6 for a 3x3 conv),
    but 8 for a 1x1 conv of 2 vectors of channels; on a score tie the rows a partial band leaves
    unused beat padded columns (7x7: 4 rows x 1 column, no padded width)."""
    def tile(cin, cout, hw, k):
        return conv_tile(ConvShape(1, cin, hw, hw, cout, (k, k), (1, 1), (1, 1), (k // 2,) * 4), AVX2, 8, 8)

    def accumulators(t):
        return t.th * t.tw * t.ob // AVX2.vector_lanes

    assert accumulators(tile(64, 256, 56, 1)) == 12 and tile(64, 256, 56, 1).ob == 24
    assert accumulators(tile(128, 128, 28, 3)) == 12 and tile(128, 128, 28, 3).ob == 16
    assert accumulators(tile(512, 128, 28, 1)) == 8 and accumulators(tile(256, 128, 14, 1)) == 8
    for cin, cout, k in ((512, 512, 3), (512, 2048, 1)):
        t = tile(cin, cout, 7, k)
        assert (t.th, t.tw) == (4, 1) and t.padded_width(7) == 7
    # with a blocked input the NEON tiles follow the same rules at 4 lanes and 32 registers
    t = conv_tile(ConvShape(1, 64, 28, 28, 64, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)), NEON, 4, 4)
    assert t.th * t.tw * t.ob // NEON.vector_lanes <= NEON.vector_registers * 3 // 4


def test_avx512_blocked_input_prefers_unpadded_tiles_once_the_fmas_are_fed():
    """AVX-512 with a blocked input: intensity beyond one FMA per load buys nothing, so a tile with
    no padded column and at least 8 accumulators wins over a denser padded one (SqueezeNet's
    512->1000 1x1 at 13x13: 16 channels x 13 columns, not 48 x 7 over 14 columns). NCHW input and
    AVX2 keep the intensity-first ranking; a 1x1 map still gets a blocked tile."""
    from sculpt.backends.tvm.kernels.tiling import MIN_ACCUMULATORS

    classifier = ConvShape(1, 512, 13, 13, 1000, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
    t = conv_tile(classifier, AVX512, 16, 0)
    assert t.padded_width(13) == 13 and t.th * t.tw * t.ob // 16 >= MIN_ACCUMULATORS
    assert (t.ob, t.th, t.tw) == (16, 1, 13)
    nchw = conv_tile(classifier, AVX512, 0, 0)
    assert nchw.ob == 48 and nchw.padded_width(13) > 13  # read from NCHW: the densest tile, padded, as before
    assert conv_tile(classifier, AVX2, 8, 0).ob == 24  # AVX2: unchanged (3 vectors of channels)
    squeezed = ConvShape(1, 96, 1, 1, 24, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))  # a squeeze-excitation conv
    assert conv_tile(squeezed, AVX512, 16, 16) is not None


def test_tile_travels_in_the_block_name_and_weights_pack_channel_blocks_innermost():
    tile = ConvTile(16, 2, 3, 64)
    assert tile_from_block_name(f"fused_{tile.name}_1") == tile
    assert tile_from_block_name("conv2d_nchw") is None
    w = np.arange(32 * 3 * 2 * 2, dtype=np.float32).reshape(32, 3, 2, 2)
    packed = pack_weight(w, 16)
    assert packed.shape == (2, 3, 2, 2, 16)
    for o, i, kh, kw in [(0, 0, 0, 0), (17, 2, 1, 0), (31, 1, 1, 1)]:
        assert packed[o // 16, i, kh, kw, o % 16] == w[o, i, kh, kw]
    partial = pack_weight(w[:20], 16)  # a last partial block: zero weights for channels 20..31
    assert partial.shape == (2, 3, 2, 2, 16)
    assert np.array_equal(partial[0], packed[0]) and np.array_equal(partial[1, ..., :4], packed[1, ..., :4])
    assert not partial[1, ..., 4:].any()


def _pad_after_conv_model(cout: int):
    """conv 3x3 + bias + Relu, then a Pad of the bottom/right border: TVM fuses the Pad into the conv's
    function, whose output is then larger than the conv's."""
    rng = np.random.default_rng(cout)
    w = (rng.standard_normal((cout, 8, 3, 3)) / 8).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Pad", ["r", "pads"], ["y"])]
    graph = helper.make_graph(nodes, "conv_pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 13, 13])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("cout, kind", [(16, "conv2d_blocked"), (3, "conv2d")])
def test_an_epilogue_that_pads_writes_its_border_every_run(cout, kind):
    """The border of a padding fused after a conv is written by the kernel, not left to memory that
    happens to be zero: the scheduled function, called on an output full of NaN, equals the unscheduled
    one (before the fix the border was written only by the first run of a model, from fresh memory)."""
    import tvm

    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.rules import schedule_func

    target = tvm.target.Target(host_target("llvm"))
    mod = legalized_and_fused(import_to_relax(Model.wrap(_pad_after_conv_model(cout))), target)
    funcs = [(gv.name_hint, f) for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "pad" in gv.name_hint and "conv" in gv.name_hint]
    assert len(funcs) == 1, [gv.name_hint for gv, _ in mod.functions_items()]
    name, func = funcs[0]
    scheduled, decision = schedule_func(func, traits_of(target), name=name)
    assert decision.kind == kind
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in p.shape] for p in func.params]
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes[:-1]]
    results = []
    for f in (func.with_attr("global_symbol", "main"), scheduled.with_attr("global_symbol", "main")):
        lib = tvm.tirx.build(f, target=target)
        out = tvm.runtime.tensor(np.full(shapes[-1], np.nan, np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in inputs], out)
        results.append(out.numpy())
    assert np.isfinite(results[1]).all()
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_gelu_erf_is_a_vector_approximation_within_float_precision():
    """erf (GELU after a conv, as in PP-OCRv6) becomes topi.fast_erf: no relax.erf left, outputs equal
    onnxruntime's to float precision over the whole range (tails included)."""
    import tvm

    from sculpt.backends.tvm.kernels.fast_math import rewrite_fast_math

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8, 3, 3)) / 3).astype(np.float32)
    sqrt2 = numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "sqrt2")
    one, half = (numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((1.0, "one"), (0.5, "half")))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Div", ["c", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["c", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 10, 10])],
                              [numpy_helper.from_array(w, "w"), sqrt2, one, half])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    model = Model.wrap(proto)
    mod = import_to_relax(model)
    assert "R.erf" in mod.script() and "R.erf" not in rewrite_fast_math(mod).script()
    executable = compile_with_kernels(mod, tvm.target.Target(host_target("llvm")))
    x = (rng.standard_normal((1, 8, 10, 10)) * 4).astype(np.float32)  # erf's tails too
    got = run_relax(executable, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())


def test_a_shufflenet_unit_matches_onnxruntime_with_one_kernel_per_grouped_conv():
    """Grouped 1x1 convs of 34 channels a group around a channel shuffle and a depthwise conv, with a
    residual add: one blocked kernel per grouped conv, the whole unit as onnxruntime computes it."""
    import tvm

    model = Model.wrap(cases.shuffle_unit_model())
    decisions = []
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    x = np.random.default_rng(3).standard_normal((1, 136, 14, 15)).astype(np.float32)
    got = run_relax(executable, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    kinds = [d.kind for d in decisions]  # one per kernel function: both grouped convs (one shape) call one
    assert kinds.count("conv2d_blocked") == 1 and "conv2d" not in kinds, kinds


@pytest.mark.parametrize("groups, cin, cout", [(2, 32, 64), (3, 48, 48), (4, 136, 136)])
def test_a_grouped_conv_runs_as_one_blocked_kernel(groups, cin, cout):
    """AlexNet's 2 groups, ShuffleNet's 3 and 4 (34 channels a group: padded to 40): one call of the
    channel-blocked kernel computes every group (a channel block reads its group's inputs only), the
    groups' padding channels are dropped after it; the bias and activation still apply."""
    import tvm

    rng = np.random.default_rng(groups)
    w = (rng.standard_normal((cout, cin // groups, 3, 3)) / 6).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 9, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 9, 13])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    model = Model.wrap(proto)
    decisions = []
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    x = rng.standard_normal((1, cin, 9, 13)).astype(np.float32)
    got = run_relax(executable, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    kinds = [d.kind for d in decisions]
    assert kinds.count("conv2d_blocked") == 1 and not set(kinds) & {"conv2d", "depthwise"}, kinds
