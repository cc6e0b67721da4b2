"""sculpt's TVM CPU kernels: every kernel kind against onnxruntime over a grid of shapes (odd sizes,
strides, padding, dilation, groups, depthwise, epilogues), the tiling heuristic, target traits, the
build() switch, and aarch64 code generation (NEON). Running on arm64 under qemu is in
test_tvm_kernels_arm64.py (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from sculpt.runtime import make_session  # noqa: E402
from sculpt.backends.tvm import build, import_to_relax, run_relax  # noqa: E402
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target, traits_of  # noqa: E402
from sculpt.backends.tvm.kernels import onnx_cases as cases  # noqa: E402
from sculpt.backends.tvm.kernels.tiling import (  # noqa: E402
    candidate_tiles, is_streaming, ranked_tiles, vector_registers, vector_width)
from sculpt.errors import SculptError  # noqa: E402
from sculpt.ir.model import Model  # noqa: E402

RTOL = 1e-4  # of each output's largest magnitude


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    """Builds read the tile-search cache: keep the user's out of these tests."""
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


def _host():
    import tvm

    return tvm.target.Target(host_target("llvm"))


def _compile_and_compare(proto, feeds, *, expect_kinds: dict[str, int] | None = None):
    """Build with the sculpt kernels, run, compare every output with onnxruntime; return decisions."""
    model = Model.wrap(proto)
    decisions: list = []
    executable = compile_with_kernels(import_to_relax(model), _host(), decisions=decisions)
    got = run_relax(executable, feeds, model.input_names)
    ref = make_session(model).run(None, dict(feeds))
    assert len(got) == len(ref)
    for name, g, r in zip(model.output_names, got, ref):
        assert g.shape == r.shape, name
        scale = float(np.abs(r).max()) or 1.0
        err = float(np.abs(g - r).max())
        assert err <= RTOL * scale, f"{name}: max error {err:.3g} > {RTOL} x {scale:.3g}"
    unscheduled = [d.func for d in decisions if d.kind == "unscheduled"]
    assert not unscheduled, f"left unscheduled: {unscheduled}"
    if expect_kinds:
        made = {}
        for d in decisions:
            made[d.kind] = made.get(d.kind, 0) + 1
        for kind, count in expect_kinds.items():
            assert made.get(kind, 0) >= count, f"expected >= {count} '{kind}' kernels, got {made}"
    return decisions


def test_conv_grid_matches_onnxruntime():
    proto = cases.conv_model(cases.CONV_GRID, cases.CONV_GRID_INPUT)
    x = np.random.default_rng(1).standard_normal(cases.CONV_GRID_INPUT).astype(np.float32)
    # 19 columns (no whole vectors): every conv of 6 or more output channels takes the channel-blocked
    # kernel (11 cases: 1x1 and k x k, strides, dilation, asymmetric padding, 12, 10 and 6 channels
    # computed as 16, 16 and 8); 3 channels and groups of 4 input channels keep the width-vectorized one
    decisions = _compile_and_compare(proto, {"x": x},
                                     expect_kinds={"conv2d_blocked": 11, "conv2d": 1, "depthwise": 6})
    lanes = traits_of(_host()).vector_lanes
    registers = traits_of(_host()).vector_registers
    for d in (d for d in decisions if d.tile):
        if d.kind == "conv2d_blocked":  # whole vectors of channels, accumulators within half the registers
            ob, th, tw = d.tile[:3]
            assert ob % lanes == 0 and d.shape[1] % ob == 0, d
            acc = th * tw * (ob // lanes)  # + the weight vectors and the broadcast: 3 registers to spare
            assert acc <= registers // 2 + 1 and acc + ob // lanes + 1 <= registers - 3, d
            continue
        # a tile covers whole output rows or divides one (1x1 convs tile oh*ow as one axis)
        vector, broadcast, rows = d.tile
        width = d.shape[-1]
        assert width % vector == 0 or vector % width == 0, d
        assert is_streaming(vector, 16) or vector_registers(vector, 16) * broadcast * rows <= 24, d


def test_pool_grid_matches_onnxruntime():
    proto = cases.pool_model(cases.POOL_GRID, cases.POOL_GRID_INPUT)
    x = np.random.default_rng(2).standard_normal(cases.POOL_GRID_INPUT).astype(np.float32)
    _compile_and_compare(proto, {"x": x}, expect_kinds={"pool": 3})


def _parallel_extents(script: str) -> list[int]:
    import re

    return [int(e) for e in re.findall(r"T\.parallel\(T\.int64\((\d+)\)\)", script)]


def _scheduled(proto):
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused
    from sculpt.backends.tvm.kernels.rules import schedule_module

    target = _host()
    with target:
        fused = legalized_and_fused(import_to_relax(Model.wrap(proto)), target)
        return schedule_module(fused, target)


def test_a_pool_is_parallel_from_less_work_than_a_conv():
    """AlexNet's 3x3 stride-2 max pool over 96 x 54 x 54: 584k window elements, under the 2^20
    multiply-adds from which a conv runs in parallel, yet 0.56 ms in one thread (a window element costs
    ~16 multiply-adds, WORK_COST): it runs in parallel, and matches onnxruntime."""
    from sculpt.backends.tvm.kernels.tiling import WORK_COST, worth_parallel

    work = 96 * 26 * 26 * 9
    assert not worth_parallel(work) and worth_parallel(work, "pool") and WORK_COST["pool"] > 1
    proto = cases.pool_model([cases.PoolCase("max3_s2", "MaxPool", (3, 3), (2, 2))], (1, 96, 54, 54))
    x = np.random.default_rng(16).standard_normal((1, 96, 54, 54)).astype(np.float32)
    _compile_and_compare(proto, {"x": x}, expect_kinds={"pool": 1})
    scheduled, decisions = _scheduled(proto)
    [pool] = [d for d in decisions if d.kind == "pool"]
    assert pool.shape == (1, 96, 26, 26) and "T.parallel(" in scheduled[pool.func].script()


@pytest.mark.parametrize("m,k,n,batch", [(40, 120, 360, (1,)), (7, 33, 50, (2,)), (1, 200, 2, ()),
                                         (5, 24, 661, (1,))])
def test_matmul_with_weight_and_bias(m, k, n, batch):
    """661 columns (prime, like rec's 6625 = 5^3 x 53): the weight is padded to whole vectors."""
    from sculpt.backends.tvm.kernels.pad_matmul_columns import pad_matmul_columns

    proto = cases.matmul_model(m, k, n, batch)
    padded = pad_matmul_columns(import_to_relax(Model.wrap(proto))).script()
    assert ("strided_slice" in padded) == (n == 661)
    a = np.random.default_rng(3).standard_normal((*batch, m, k)).astype(np.float32)
    _compile_and_compare(proto, {"a": a}, expect_kinds={"matmul": 1} if m > 1 else None)


def test_batched_matmul_of_two_activations():
    proto = cases.matmul_model(40, 15, 40, (1, 8), weight=False)
    rng = np.random.default_rng(4)
    feeds = {"a": rng.standard_normal((1, 8, 40, 15)).astype(np.float32),
             "b": rng.standard_normal((1, 8, 15, 40)).astype(np.float32)}
    _compile_and_compare(proto, feeds, expect_kinds={"matmul": 1})


def test_build_switch_default_and_sculpt_agree_and_bad_value_is_rejected():
    proto = cases.conv_model(cases.CONV_GRID[:2], cases.CONV_GRID_INPUT)
    model = Model.wrap(proto)
    mod = import_to_relax(model)
    x = np.random.default_rng(5).standard_normal(cases.CONV_GRID_INPUT).astype(np.float32)
    sculpt_out = run_relax(build(mod, "llvm"), {"x": x}, ["x"])
    default_out = run_relax(build(mod, "llvm", kernels="default"), {"x": x}, ["x"])
    for s, d in zip(sculpt_out, default_out):
        np.testing.assert_allclose(s, d, rtol=1e-4, atol=1e-5)
    with pytest.raises(SculptError, match="unknown kernels 'fast'"):
        build(mod, "llvm", kernels="fast")


def test_target_traits():
    znver4 = traits_of({"kind": "llvm", "mcpu": "znver4"})  # AVX-512: 8 lanes (measured), 32 registers
    assert (znver4.isa, znver4.vector_lanes, znver4.vector_registers) == ("avx512", 8, 32)
    assert traits_of({"kind": "llvm", "mattr": ["+avx2", "+fma"]}).vector_lanes == 8
    assert traits_of({"kind": "llvm", "mcpu": "x86-64"}).isa == "sse"
    arm = traits_of({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert (arm.isa, arm.vector_lanes, arm.vector_registers, arm.dotprod) == ("neon", 4, 32, False)
    assert traits_of({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}).dotprod
    assert traits_of({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}).dotprod
    # a bare host target gets the host CPU; a cross target is left alone
    assert "mcpu" in host_target("llvm")
    cross = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert host_target(cross) == cross


def test_tiling_heuristic_respects_registers_and_divisors():
    for isa_target in ({"kind": "llvm", "mcpu": "znver4"}, {"kind": "llvm", "mattr": ["+avx2"]},
                       {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}):
        traits = traits_of(isa_target)
        for vec, bcast, rows in [(80, 96, 80), (10, 384, 10), (96, 8, 12), (13, 7, 19), (6625, 40, 1)]:
            tile = ranked_tiles(vec, bcast, rows, traits, count=1)[0]
            assert vec % tile.vector == 0 and bcast % tile.broadcast == 0 and rows % tile.rows == 0
            if is_streaming(tile.vector, traits.vector_lanes):  # 6625: no vector tile divides it
                assert tile.vector == vec and not any(
                    d & (d - 1) == 0 and d >= 4 for d in range(4, 4 * traits.vector_lanes + 1) if vec % d == 0)
                continue
            used = vector_registers(tile.vector, traits.vector_lanes) * tile.broadcast * tile.rows
            assert used <= traits.accumulator_registers, (traits, tile)
            assert tile in candidate_tiles(vec, bcast, rows, traits)
    # AVX-512 prefers full 16-lane vectors and uses most of its accumulators on a big 1x1 conv
    big = ranked_tiles(80, 96, 80, traits_of({"kind": "llvm", "mcpu": "znver4"}), count=1)[0]
    assert big.vector % 16 == 0 and vector_registers(big.vector, 16) * big.broadcast * big.rows >= 12
    assert vector_width(40, 16) == 8 and vector_width(10, 16) == 10 and vector_width(48, 16) == 16


def test_arm64_codegen_uses_neon_vector_fma():
    """The same kernels compile for aarch64 (cross-compiled); the conv inner loop is NEON fmla."""
    import tvm

    # (a prime width such as 19 is vectorized whole, which LLVM scalarizes on aarch64: see README)
    proto = cases.conv_model([cases.CONV_GRID[0], cases.CONV_GRID[12]], (1, 8, 12, 16))
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    decisions: list = []
    executable = compile_with_kernels(import_to_relax(Model.wrap(proto)), target, decisions=decisions)
    assert {"conv2d_1x1", "depthwise"} <= {d.kind for d in decisions}
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else \
        executable.mod.inspect_source("asm")
    assert asm.count("fmla\tv") >= 50 and ".4s" in asm


@pytest.mark.parametrize("kernel,stride,pads,rewritten", [(2, 2, 0, True), (3, 2, 1, False)])
def test_transposed_conv(kernel, stride, pads, rewritten):
    """stride == kernel: rewritten to a 1x1 conv (GEMM kernel) + pixel shuffle; else TVM's lowering."""
    from sculpt.backends.tvm.kernels.transposed_conv import rewrite_transposed_convs

    shape = (1, 12, 9, 14)
    proto = cases.conv_transpose_model(12, 6, kernel, stride, pads, shape)
    mod = import_to_relax(Model.wrap(proto))
    assert ("conv2d_transpose" not in rewrite_transposed_convs(mod).script()) == rewritten
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    decisions = _compile_and_compare(proto, {"x": x})
    assert any(d.kind in ("conv2d_1x1", "conv2d_blocked") for d in decisions) == rewritten


def test_tile_search_caches_the_fastest_tile_and_builds_use_it(tmp_path):
    import json

    from sculpt.backends.tvm.kernels.tile_search import TileCache, cache_path, search_tiles

    proto = cases.conv_model([cases.ConvCase("pw", 8, 32, (1, 1), epilogue="relu")], (1, 8, 16, 32))
    mod = import_to_relax(Model.wrap(proto))
    results = search_tiles(mod, _host(), candidates=3, number=2, repeat=2)
    assert len(results) == 1 and results[0].kind == "conv2d_1x1"
    r = results[0]
    # the heuristic's tile first, then the ranking; a tile replaces it only when clearly faster
    assert 3 <= len(r.tried) <= 4 and r.heuristic_ms == r.tried[0][1]
    fastest_tile, fastest = min(r.tried, key=lambda t: t[1])
    from sculpt.backends.tvm.kernels.tile_search import MIN_GAIN
    if fastest < r.heuristic_ms * (1 - MIN_GAIN):
        assert (r.best, r.best_ms) == (fastest_tile, fastest)
    else:
        assert (r.best, r.best_ms) == tuple(r.tried[0])
    stored = json.loads(cache_path().read_text())["tiles"]
    assert list(stored) == [results[0].key] and stored[results[0].key]["tile"] == results[0].best
    # a later build takes the tile from the cache: plant one the heuristic would not pick
    cache = TileCache()
    planted = [8, 2, 2]
    assert planted not in [t for t, _ in results[0].tried[:1]]
    cache.put(results[0].key, type(cache.get(results[0].key))(*planted), 1.0)
    cache.save()
    decisions: list = []
    executable = compile_with_kernels(mod, _host(), decisions=decisions)
    assert [d.tile for d in decisions if d.kind == "conv2d_1x1"] == [planted]
    x = np.random.default_rng(8).standard_normal((1, 8, 16, 32)).astype(np.float32)
    ref = make_session(Model.wrap(proto)).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_relax(executable, {"x": x}, ["x"])[0], ref, rtol=1e-4, atol=1e-4)


def test_small_constant_folding_is_numpy_exact():
    """Constant bias reshapes are evaluated in numpy before TVM's (compile-per-call) FoldConstant."""
    from sculpt.backends.tvm.kernels.fold_small_constants import fold_small_constants

    proto = cases.conv_model(cases.CONV_GRID[:3], cases.CONV_GRID_INPUT)
    mod = import_to_relax(Model.wrap(proto))
    assert mod.script().count("R.reshape") >= 3
    folded = fold_small_constants(mod)
    assert folded.script().count("R.reshape") == 0 and folded.script().count("R.nn.conv2d") == 3
    x = np.random.default_rng(9).standard_normal(cases.CONV_GRID_INPUT).astype(np.float32)
    a = run_relax(build(mod, "llvm", kernels="default"), {"x": x}, ["x"])
    b = run_relax(build(folded, "llvm", kernels="default"), {"x": x}, ["x"])
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_small_spatial_1x1_conv_is_a_gemm_over_oh_ow():
    """A 1x1 conv on 10x10 tiles oh*ow as one contiguous axis: its vector tile spans whole rows (the
    width-vectorized kernel: 3 output channels, too few for whole vectors of channels)."""
    proto = cases.conv_model([cases.ConvCase("pw10", 3, 3, (1, 1), epilogue="hardswish"),
                              cases.ConvCase("pw10_res", 3, 3, (1, 1), epilogue="residual")], (1, 3, 10, 10))
    x = np.random.default_rng(10).standard_normal((1, 3, 10, 10)).astype(np.float32)
    decisions = _compile_and_compare(proto, {"x": x}, expect_kinds={"conv2d_1x1": 2})
    for d in decisions:
        if d.kind == "conv2d_1x1":
            assert d.tile[0] % 10 == 0 and d.tile[0] > 10, d


@pytest.mark.parametrize("operands", [[(1, 8, 6, 6), (1, 8, 6, 6)], [(1, 8, 6, 6), (1, 8, 1, 1), (1, 1, 6, 6)],
                                      [(1, 8, 1, 6), (1, 1, 6, 1)]])
def test_onnx_sum_becomes_adds_and_stays_bit_exact(operands):
    """ONNX Sum (ResNet's and ShuffleNet's residual joins): TVM's importer stacks the operands into a
    5-D tensor and reduces it; sculpt rewrites that to adds (no stack left) with the same result to the
    bit, broadcasting included."""
    from onnx import TensorProto, helper

    from sculpt.backends.tvm.kernels.sum_as_adds import rewrite_sum_of_stack

    names = [f"x{i}" for i in range(len(operands))]
    out_shape = list(np.broadcast_shapes(*operands))
    graph = helper.make_graph([helper.make_node("Sum", names, ["y"])], "sum",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in zip(names, operands)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    mod = import_to_relax(Model.wrap(proto))
    assert "R.stack" in mod.script() and "R.stack" not in rewrite_sum_of_stack(mod).script()
    rng = np.random.default_rng(len(operands))
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, operands)}
    got = run_relax(compile_with_kernels(mod, _host()), feeds, names)[0]
    expect = feeds[names[0]]
    for n in names[1:]:
        expect = expect + feeds[n]
    assert got.shape == tuple(out_shape) and np.array_equal(got, expect)


def test_depthwise_on_large_planes_pads_one_plane_at_a_time():
    """Depthwise convs and pools whose padded channel plane is large (here 62x62 and 66x66) pad inside the
    parallel loop over channels, one plane at a time, stride 2 (de-interleaved columns) included; the
    results match onnxruntime."""
    from sculpt.backends.tvm.kernels.register_tile import PER_PLANE_MIN_ELEMENTS

    grid = [cases.ConvCase("dw3_big", 8, 8, (3, 3), pads=(1, 1, 1, 1), group=8, epilogue="relu"),
            cases.ConvCase("dw3_s2_big", 8, 8, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1), group=8),
            cases.ConvCase("dw7_big", 8, 8, (7, 7), pads=(3, 3, 3, 3), group=8, epilogue="hardswish")]
    assert 62 * 62 >= PER_PLANE_MIN_ELEMENTS
    x = np.random.default_rng(7).standard_normal((1, 8, 60, 60)).astype(np.float32)
    decisions = _compile_and_compare(cases.conv_model(grid, (1, 8, 60, 60)), {"x": x}, expect_kinds={"depthwise": 3})
    pools = [cases.PoolCase("max3_s2_big", "MaxPool", (3, 3), (2, 2), (1, 1, 1, 1)),
             cases.PoolCase("avg3_s1_big", "AveragePool", (3, 3), (1, 1), (1, 1, 1, 1))]
    decisions += _compile_and_compare(cases.pool_model(pools, (1, 8, 60, 60)), {"x": x}, expect_kinds={"pool": 2})
    assert not [d for d in decisions if d.note], [(d.func, d.note) for d in decisions if d.note]


def test_a_blocked_max_pool_on_a_large_plane_pads_one_plane_at_a_time():
    """ResNet-50's 3x3 stride-2 max pool over 64 x 112x112, in NCHW16c (after the blocked stem): its
    plane is 112 x 112 x 16, so it is padded inside the parallel loop over channel blocks, not in
    two passes over the whole input before it (0.95 -> 0.43 ms on an Intel Xeon, 1 thread); the
    result equals numpy's max over the windows."""
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.kernels.rules import schedule_module

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 112, 112, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NCHW16c"))
        bb.emit_func_output(y)
    target = _host()
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps()])(bb.get())
        scheduled, decisions = schedule_module(mod, target)
    assert [d.kind for d in decisions] == ["pool"]
    pool = next(f for gv, f in scheduled.functions_items() if gv.name_hint.startswith("max_pool2d"))
    assert pool.script().count("T.parallel(") == 1, pool.script()  # pad and pool in one loop over planes
    data = np.random.default_rng(3).standard_normal((1, 4, 112, 112, 16)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    padded = np.pad(data, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    windows = [padded[:, :, i:i + 111:2, j:j + 111:2] for i in range(3) for j in range(3)]
    assert np.array_equal(got, np.max(windows, axis=0))


def test_unused_right_columns_never_change_the_output_width():
    from sculpt.backends.tvm.kernels.even_strided_width import unused_right_columns

    assert unused_right_columns(111, 0, 0, 3, 2) == 1       # SqueezeNet's max pools: 111 -> 112
    assert unused_right_columns(112, 1, 1, 3, 2) == 0       # already even
    assert unused_right_columns(10, 0, 0, 2, 2) == 0        # stride divides the width
    assert unused_right_columns(12, 0, 0, 3, 2) == 0        # (12 - 3) % 2 == 1: a 13th column would add an output
    assert unused_right_columns(11, 0, 0, 3, 1) == 0        # stride 1
    for width in range(5, 40):
        for k, s, d in ((3, 2, 1), (3, 3, 1), (5, 2, 1), (3, 2, 2), (2, 2, 1)):
            span = d * (k - 1) + 1
            extra = unused_right_columns(width, 0, 0, k, s, d)
            assert (width + extra - span) // s == (width - span) // s
            assert extra == 0 or (width + extra) % s == 0


def test_strided_windows_over_odd_widths_match_onnxruntime():
    """Pools and a depthwise conv of stride 2 over 111 (and 27) columns get an unused column of
    right padding (so their padding stage de-interleaves the columns); outputs equal onnxruntime's."""
    from sculpt.backends.tvm.kernels.even_strided_width import rewrite_even_strided_widths

    pools = [cases.PoolCase("max3_s2", "MaxPool", (3, 3), (2, 2)),
             cases.PoolCase("avg3_s2", "AveragePool", (3, 3), (2, 2))]
    x = np.random.default_rng(5).standard_normal((1, 4, 21, 111)).astype(np.float32)
    proto = cases.pool_model(pools, (1, 4, 21, 111))
    assert "padding=[0, 0, 0, 1]" in rewrite_even_strided_widths(import_to_relax(Model.wrap(proto))).script() \
        .replace("(", "[").replace(")", "]")
    _compile_and_compare(proto, {"x": x}, expect_kinds={"pool": 2})
    dw = [cases.ConvCase("dw3_s2_odd", 8, 8, (3, 3), stride=(2, 2), group=8, epilogue="relu")]
    x = np.random.default_rng(6).standard_normal((1, 8, 27, 27)).astype(np.float32)
    _compile_and_compare(cases.conv_model(dw, (1, 8, 27, 27)), {"x": x}, expect_kinds={"depthwise": 1})


def test_softmax_exp_tanh_sigmoid_are_vector_approximations_within_tolerance():
    """softmax (PP-OCRv6 rec's 6625 classes), exp, tanh and sigmoid (detection heads) become TVM's
    fast approximations: none of the scalar ops is left, and the outputs match onnxruntime within
    2e-6 of their scale, over inputs wide enough to reach the functions' tails."""
    from onnx import TensorProto, helper

    from sculpt.backends.tvm.kernels.fast_math import rewrite_fast_math

    shape = [1, 40, 6625]
    nodes = [helper.make_node("Softmax", ["x"], ["softmax"], axis=-1), helper.make_node("Exp", ["x"], ["exp"]),
             helper.make_node("Tanh", ["x"], ["tanh"]), helper.make_node("Sigmoid", ["x"], ["sigmoid"])]
    graph = helper.make_graph(nodes, "fast_math", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, shape) for n in nodes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    mod = import_to_relax(Model.wrap(proto))
    script = rewrite_fast_math(mod).script()
    for op in ("R.nn.softmax", "R.exp", "R.tanh", "R.sigmoid"):
        assert op in mod.script() and op not in script, op
    x = (np.random.default_rng(4).standard_normal(shape) * 12).astype(np.float32)  # [-60, 60]: the tails
    got = run_relax(compile_with_kernels(mod, _host()), {"x": x}, ["x"])
    ref = make_session(Model.wrap(proto)).run(None, {"x": x})
    for name, g, r in zip(["softmax", "exp", "tanh", "sigmoid"], got, ref):
        assert np.isfinite(g).all(), name
        if name == "exp":  # relative: exp spans 50 orders of magnitude
            tiny = r > 1e-30
            assert float(np.max(np.abs(g - r)[tiny] / r[tiny])) <= 5e-6, name
        else:
            assert float(np.abs(g - r).max()) <= 2e-6 * float(np.abs(r).max()), name


@pytest.mark.parametrize("length", [6625, 18710, 4096])
def test_row_softmax_vectorizes_rows_that_are_not_whole_vectors(length):
    """A row of 6625 or 18710 classes (PP-OCR rec's, PP-OCRv6 rec's CTC heads) is not a whole number
    of vectors: its whole vectors run vectorized with no bound check (a check on the lane index made
    TVM scalarize every stage: 40 x 18710 took 1.55 ms against onnxruntime's 0.33), the rest apart."""
    from tvm import s_tir

    from sculpt.backends.tvm.kernels.row_softmax import row_softmax_func, schedule_row_softmax

    lanes = 16
    sch = s_tir.Schedule(row_softmax_func(40, length, lanes))
    schedule_row_softmax(sch, lanes, True)
    script = sch.mod["main"].script()
    assert script.count("T.vectorized") == 6  # the partial max and sum (their init and update), exp, normalize
    assert "if_then_else" not in script and "T.where" not in script
    assert ("tail_max" in script) == bool(length % lanes)


def test_matrix_vector_product_streams_whole_weight_rows():
    """A fully connected layer at batch 1 whose weight fits in L2 (256 x 1000, 1000 KB; larger ones
    read column panels): one accumulator per column for the whole row of 1000 columns, the weight
    rows read in order; matches onnxruntime."""
    proto = cases.matmul_model(1, 256, 1000)
    a = np.random.default_rng(11).standard_normal((1, 1, 256)).astype(np.float32)
    decisions = _compile_and_compare(proto, {"a": a})
    assert [d.tile for d in decisions if d.tile] == [[1000, 1, 1]], decisions


@pytest.mark.parametrize("exponent", [0.25, 0.5, 0.75, 1.5, 2.0, 3.0, -0.5, -0.75, 2.2])
def test_power_by_quarters_is_roots_and_products_within_a_few_ulp(exponent):
    """x ** p for p in quarters (LRN's 0.75) becomes square roots and products: no R.power left, and
    the result within 4 ulp of the correctly rounded power; other exponents stay powf."""
    from onnx import TensorProto, helper, numpy_helper

    from sculpt.backends.tvm.kernels.fast_math import rewrite_fast_math

    shape = [2, 3, 50]
    p = numpy_helper.from_array(np.array(exponent, np.float32), "p")
    graph = helper.make_graph([helper.make_node("Pow", ["x", "p"], ["y"])], "pow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [p])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    mod = import_to_relax(Model.wrap(proto))
    assert ("R.power" in rewrite_fast_math(mod).script()) == (exponent == 2.2)
    x = np.random.default_rng(9).uniform(1e-3, 40, shape).astype(np.float32)
    got = run_relax(compile_with_kernels(mod, _host()), {"x": x}, ["x"])[0]
    exact = np.power(x.astype(np.float64), exponent)
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert float(np.max(np.abs(got - exact) / ulp)) <= 4


def test_lrn_matches_onnxruntime():
    """Local response normalization (AlexNet, GoogLeNet, ZFNet): its beta = 0.75 power as roots."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=1.0)], "lrn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 9, 11])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = (np.random.default_rng(12).standard_normal((1, 16, 9, 11)) * 30).astype(np.float32)
    _compile_and_compare(proto, {"x": x})


def test_a_pool_over_one_plane_runs_in_parallel_over_rows_and_matches_onnxruntime():
    """A pool over one (n, c) plane (a (1, 1, H, W) map; LRN's window sum was one before it got its
    own kernel) padded per plane would leave its parallel loop one iteration long: with fewer than
    PER_PLANE_MIN_PLANES planes every parallel loop of the pool runs over rows."""
    from onnx import TensorProto, helper

    from sculpt.backends.tvm.kernels.tiling import PER_PLANE_MIN_PLANES

    shape = [1, 1, 256, 256]  # 9 x 2^16 window elements: above the pool's parallel threshold
    graph = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                                count_include_pad=1)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = np.random.default_rng(15).standard_normal(shape).astype(np.float32)
    _compile_and_compare(proto, {"x": x}, expect_kinds={"pool": 1})
    scheduled, decisions = _scheduled(proto)
    pools = [d.func for d in decisions if d.kind == "pool"]
    assert pools and PER_PLANE_MIN_PLANES > 1
    for name in pools:
        extents = _parallel_extents(scheduled[name].script())
        assert extents and min(extents) >= 32, (name, extents)  # rows, not the one plane


@pytest.mark.parametrize("shape,size,alpha,beta,bias", [
    ((1, 96, 109, 109), 5, 1e-4, 0.75, 1.0),  # ZFNet's first LRN
    ((2, 7, 5, 33), 3, 0.5, 0.5, 2.0),  # a window over the edges of 7 channels, 33 columns: 2 vectors + 1
    ((1, 6, 9, 9), 1, 0.1, 1.0, 1.0),
])
def test_an_lrn_is_one_parallel_kernel_that_matches_onnxruntime(shape, size, alpha, beta, bias):
    """LRN (imported as a square, a 3-D average pool over the channels and a normalization) compiles
    to one kernel (local_response_norm) reading its input once: no pool, parallel over rows when
    large, within RTOL of onnxruntime for windows that cross the first and last channels."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)],
                              "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = (np.random.default_rng(16).standard_normal(shape) * 30).astype(np.float32)
    decisions = _compile_and_compare(proto, {"x": x}, expect_kinds={"local_response_norm": 1})
    assert [d.kind for d in decisions] == ["local_response_norm"], [d.kind for d in decisions]
    if np.prod(shape) >= 2**16:
        scheduled, decisions = _scheduled(proto)
        extents = _parallel_extents(scheduled[decisions[0].func].script())
        assert extents and min(extents) >= 32, extents  # (n, c, h) rows


_LRN_BETWEEN_GUARD_PAGES = """
import ctypes, mmap, sys
import numpy as np, tvm
from onnx import TensorProto, helper
from tvm import relax
from sculpt.backends.tvm import import_to_relax
from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels
from sculpt.backends.tvm.kernels.target_traits import host_target
from sculpt.ir.model import Model

shape = (1, 8, 16, 64)  # 4 KiB planes: the window reaches 2 planes past either end
graph = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=1.0)], "lrn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
proto.ir_version = 8
vm = relax.VirtualMachine(compile_with_kernels(import_to_relax(Model.wrap(proto)),
                                               tvm.target.Target(host_target("llvm"))), tvm.cpu())
page, nbytes = mmap.PAGESIZE, int(np.prod(shape)) * 4
guard = -(-3 * (nbytes // shape[1]) // page) * page
span = -(-nbytes // page) * page
region = mmap.mmap(-1, guard + span + guard)
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = ctypes.addressof(ctypes.c_char.from_buffer(region))
assert libc.mprotect(base, guard, 0) == 0 and libc.mprotect(base + guard + span, guard, 0) == 0
x = np.frombuffer(region, np.float32, int(np.prod(shape)), offset=guard + span - nbytes).reshape(shape)
x[...] = np.random.default_rng(0).standard_normal(shape)
y = vm["main"](tvm.runtime.from_dlpack(x)).numpy()  # the kernel reads the guarded buffer itself
sys.exit(0 if np.isfinite(y).all() else 3)
"""


def test_an_lrn_reads_nothing_outside_its_input():
    """The LRN kernel's window over the first and last channels reads no plane outside the tensor: its
    input between inaccessible pages (a read past either end is a segfault) in a subprocess. A Select
    around the load let the simplifier drop the index's clamp and the vector code read both sides:
    ZFNet's build crashed, while the results matched where the memory around happened to be mapped."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LRN_BETWEEN_GUARD_PAGES], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_depthwise_over_a_width_of_no_whole_vectors_computes_whole_vectors():
    """A 14-wide depthwise conv (PP-LCNet's 5x5) is computed 16 wide and sliced back: the vector
    tile is whole vectors, the epilogue writes only the real columns, results match onnxruntime."""
    from sculpt.backends.tvm.kernels.whole_vector_width import padded_output_width

    lanes = traits_of(_host()).vector_lanes
    assert padded_output_width(14, 8) == 16 and padded_output_width(10, 8) == 10 and padded_output_width(7, 8) == 7
    assert padded_output_width(16, 8) == 16 and padded_output_width(55, 8) == 56
    grid = [cases.ConvCase("dw5_14", 8, 8, (5, 5), pads=(2, 2, 2, 2), group=8, epilogue="hardswish"),
            cases.ConvCase("dw3_s2_14", 8, 8, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1), group=8, epilogue="relu")]
    x = np.random.default_rng(13).standard_normal((1, 8, 14, 14)).astype(np.float32)
    decisions = _compile_and_compare(cases.conv_model(grid[:1], (1, 8, 14, 14)), {"x": x}, expect_kinds={"depthwise": 1})
    x2 = np.random.default_rng(14).standard_normal((1, 8, 28, 28)).astype(np.float32)
    decisions += _compile_and_compare(cases.conv_model(grid[1:], (1, 8, 28, 28)), {"x": x2}, expect_kinds={"depthwise": 1})
    widths = {padded_output_width(14, lanes)}
    for d in decisions:
        if d.kind == "depthwise":
            assert d.shape[-1] in widths and d.tile[0] % min(lanes, 8) == 0, d


@pytest.mark.parametrize("shape", [[2, 3, 300], [5, 512], [1, 40, 6625], [4, 64]])
def test_softmax_over_long_rows_reduces_in_vectors_and_matches(shape):
    """Rows of >= 256 (300: a partial last vector, 512: whole vectors, 6625: the CTC recognizer's
    classes) take the vector-reduction softmax; short rows (attention's 64 keys) keep TVM's. Every
    row sums to 1 and matches onnxruntime within 2e-6 of its scale."""
    from onnx import TensorProto, helper

    from sculpt.backends.tvm.kernels.row_softmax import MIN_ROW

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    x = (np.random.default_rng(5).standard_normal(shape) * 8).astype(np.float32)
    decisions = _compile_and_compare(proto, {"x": x})
    rows = sum(1 for d in decisions if d.kind == "softmax_rows")
    assert rows == (1 if shape[-1] >= MIN_ROW else 0), [(d.func, d.kind) for d in decisions]
    got = run_relax(compile_with_kernels(import_to_relax(Model.wrap(proto)), _host()), {"x": x}, ["x"])[0]
    assert np.allclose(got.sum(axis=-1), 1.0, atol=1e-5)
    ref = make_session(Model.wrap(proto)).run(None, {"x": x})[0]
    assert float(np.abs(got - ref).max()) <= 2e-6 * float(np.abs(ref).max())
