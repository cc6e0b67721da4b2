"""The int8 conv kernel (sculpt.backends.tvm.kernels.int8_conv) and its wiring into the int8 lowering
(int8.lower_qdq_to_int8 with an Int8KernelPolicy): integer-exact against the QDQ graph's own math
(onnxruntime with graph optimizations off), on x86 (vpmaddwd; vpdpbusd where the host has AVX-512 VNNI)
and on aarch64 (sdot, run under qemu).

The real-model check takes every quantized conv/matmul unit of a QDQ model (DequantizeLinear of the
input, weight and bias -> Conv/MatMul -> QuantizeLinear), puts the units side by side in one model whose
inputs are the units' quantized inputs, and feeds it the tensors onnxruntime computed for them on a
real text line: the kernel's outputs must equal onnxruntime's bit for bit (whole models are compared
by decoded text elsewhere: float ops between units, softmax and hardswish, round differently)."""

import numpy as np
import onnx
import pytest
from onnx import helper

from sculpt import ocr_task
from sculpt.backends.host_cpu import cpu_flags, is_x86
from sculpt.backends.tvm.int8 import (MIN_KERNEL_MACS, Int8KernelPolicy, compile_int8, int8_kernel_policy,
                                      lower_qdq_to_int8)
from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.int8_conv import (AVX2_PMADDWD, AVX512_VNNI_256, AVX512_VNNI_512, AVX_VNNI,
                                                    NEON_SDOT, folded_bias, instruction_for, int8_conv_tile,
                                                    pack_int8_weight, wide_instruction_for)
from sculpt.backends.tvm.kernels.target_traits import host_target, traits_of
from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax
from sculpt.ir.calibration import CalibrationSet
from sculpt.ir.model import Model
from sculpt.passes import PassContext, Pipeline, create_pass
from sculpt.runtime import make_session

from graphs import make_model
from test_tvm_int8 import assert_small_net_exact, qdq_proto, rand, small_net

ARM_DOTPROD = "cortex-a76"
HOST_AVX512_VNNI = is_x86() and {"avx512_vnni", "avx512vl"} <= (cpu_flags() or set())
needs_avx512_vnni = pytest.mark.skipif(not HOST_AVX512_VNNI, reason="this CPU has no AVX-512 VNNI (vpdpbusd)")
# the x86 instructions the kernel has, each runnable where this host has it
X86_INSTRUCTIONS = [AVX2_PMADDWD, pytest.param(AVX512_VNNI_256, marks=needs_avx512_vnni),
                    pytest.param(AVX512_VNNI_512, marks=needs_avx512_vnni)]


def test_the_host_policy_takes_vnni_where_the_cpu_has_it():
    """vpdpbusd where LLVM's CPU features (less what /proc/cpuinfo hides) have AVX-512 VNNI or AVX-VNNI,
    vpmaddwd on other AVX2 CPUs; named CPUs and ``mattr`` decide for cross targets."""
    policy = int8_kernel_policy("llvm")
    assert policy is not None
    assert policy.instruction is (AVX512_VNNI_256 if HOST_AVX512_VNNI else AVX2_PMADDWD) or not is_x86()
    for target, instruction in [({"kind": "llvm", "mcpu": "znver4"}, AVX512_VNNI_256),
                                ({"kind": "llvm", "mcpu": "icelake-server"}, AVX512_VNNI_256),
                                ({"kind": "llvm", "mcpu": "skylake-avx512"}, AVX2_PMADDWD),
                                ({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512vnni"]}, AVX2_PMADDWD),
                                ({"kind": "llvm", "mcpu": "alderlake"}, AVX_VNNI),
                                ({"kind": "llvm", "mcpu": "znver3"}, AVX2_PMADDWD)]:
        assert instruction_for(traits_of(target)) is instruction, target
    # the float kernels' numbers stay those of the ISA
    assert traits_of({"kind": "llvm", "mcpu": "znver4"}).vector_lanes == 8


@pytest.mark.parametrize("cpu, wide", [("znver4", None), ("znver5", AVX512_VNNI_512), ("icelake-server", AVX512_VNNI_512),
                                       ("sapphirerapids", AVX512_VNNI_512), ("alderlake", None), ("znver3", None)])
def test_zmm_vnni_is_taken_where_the_core_runs_it_at_full_rate(cpu, wide):
    """Zen 4 splits a 512-bit vpdpbusd in two halves (the ymm form keeps the kernel's padding small at
    the same rate); Intel's AVX-512 cores and Zen 5 retire twice the multiply-adds in zmm, which a unit
    takes unless it pads more than WIDE_MAX_PADDING (1.5) times the output channels of the ymm form."""
    policy = int8_kernel_policy({"kind": "llvm", "mcpu": cpu})
    assert policy is not None and policy.wide_instruction is wide
    if wide is None:
        assert {policy.instruction_for(c) for c in (24, 64, 256)} == {policy.instruction}
        assert {policy.depthwise_lanes(c) for c in (24, 64, 256)} == {policy.instruction.lanes}
        return
    # the depthwise kernel pads to whole vectors: 8 channels to 16 in zmm is too many, 24 to 32 is not
    assert {c: policy.depthwise_lanes(c) for c in (8, 24, 40, 96)} == {8: 8, 24: 16, 40: 16, 96: 16}
    chosen = {c: policy.instruction_for(c).name for c in (4, 8, 16, 24, 40, 72, 256)}
    # 8 channels: 16 in one zmm block against 8 in ymm; 24 and 72: 32 and 96 against 24 and 72 pay
    assert chosen == {4: AVX512_VNNI_256.name, 8: AVX512_VNNI_256.name, 16: wide.name, 24: wide.name,
                      40: wide.name, 72: wide.name, 256: wide.name}


def test_weights_are_packed_as_the_dot_instruction_reads_them():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (19, 5, 3, 3)).astype(np.int8)
    shape = ConvShape(1, 5, 8, 8, 19, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    for instr in (AVX2_PMADDWD, NEON_SDOT, AVX512_VNNI_256, AVX512_VNNI_512):
        tile = int8_conv_tile(shape, instr)
        packed = pack_int8_weight(w, tile, instr)
        g = instr.group
        assert packed.shape == (-(-19 // tile.ob), -(-5 // g), 3, 3, tile.ob * g)
        # output channel o, input channel i at [o // ob, i // g, kh, kw, (o % ob) * g + i % g]
        for o, i, kh, kw in [(0, 0, 0, 0), (18, 4, 2, 1), (17, 3, 1, 2)]:
            assert packed[o // tile.ob, i // g, kh, kw, (o % tile.ob) * g + i % g] == w[o, i, kh, kw]
        assert not packed[-1, :, :, :, (19 % tile.ob) * g:].any()  # padded output channels are zero
        assert packed.dtype == (np.int16 if instr is AVX2_PMADDWD else np.int8)


def test_avx_vnni_targets_get_the_vex_vpdpbusd_on_16_registers():
    """AVX-VNNI (Alder Lake, no AVX-512): the same intrinsic, which LLVM emits in its VEX form on ymm0-15.
    Compiled only: this host may not have AVX-VNNI."""
    import re

    import tvm

    from sculpt.backends.tvm.kernels.int8_conv import int8_conv_func

    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}
    assert instruction_for(traits_of(target)) is AVX_VNNI
    shape = ConvShape(1, 16, 8, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    func = int8_conv_func(shape, int8_conv_tile(shape, AVX_VNNI), AVX_VNNI, "uint8", "uint8", 3, 0)
    lib = tvm.compile(tvm.IRModule({"conv": func.with_attr("global_symbol", "conv")}), target=tvm.target.Target(target))
    dots = [line for line in lib.mod.inspect_source("asm").splitlines() if "vpdpbusd" in line]
    assert len(dots) >= 16 and all("{vex}" in line for line in dots)
    assert all(int(r) < 16 for line in dots for r in re.findall(r"%ymm(\d+)", line))


@pytest.mark.parametrize("x_dtype, zx", [("uint8", 0), ("uint8", 131), ("int8", -128), ("int8", 7)])
def test_vnni_operands_are_unsigned_inputs_and_the_bias_takes_the_offset(x_dtype, zx):
    """vpdpbusd multiplies unsigned bytes by signed ones: the input, moved by the offset, is a uint8
    (uint8 data as is, int8 data + 128), and the folded bias makes the sum equal sum((x - zx) * w)."""
    rng = np.random.default_rng(4)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (64, 12))
    w = rng.integers(-128, 128, (5, 12)).astype(np.int8)
    offset = AVX512_VNNI_256.offset(x_dtype, zx)
    operand = x - offset
    assert operand.min() >= 0 and operand.max() <= 255 and 0 <= zx - offset <= 255
    w2, bias = folded_bias(w.reshape(5, 12, 1, 1), None, zx, offset, 8, np.ones(5, np.float32), 0, "int8")
    np.testing.assert_array_equal(operand @ w2.reshape(5, 12).T.astype(np.int64) + bias[:5], (x - zx) @ w.T.astype(np.int64))


def test_a_bias_saturated_at_the_int32_limit_becomes_a_constant_channel():
    """A real model (PP-OCRv4 rec, qdq) has a bias quantized to -2^31 (a tiny weight scale): adding the
    zero-point correction would wrap; the channel's output is its saturated value whatever the input."""
    w = np.full((2, 4, 1, 1), 3, np.int8)
    bias = np.array([-2 ** 31, 5], np.int32)
    mult = np.array([1e-3, 1e-3], np.float32)
    w2, b2 = folded_bias(w, bias, 13, 128, 8, mult, 0, "uint8")
    assert not w2[0].any() and (w2[1] == 3).all()
    assert b2[0] == -2 ** 30 and b2[1] == 5 - (13 - 128) * 12 and b2.dtype == np.int32
    # 512 channels of 127: the sum can move the output across the uint8 range, so the channel is not
    # constant and cannot be represented
    wide = np.full((2, 512, 1, 1), 127, np.int8)
    with pytest.raises(OverflowError, match="channel 0"):
        folded_bias(wide, np.array([-2147482648, 5], np.int32), 13, 128, 8, np.full(2, 1e-7, np.float32), 220, "uint8")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_bias_beyond_the_int32_reach_takes_the_wide_epilogue(layout):
    """The channel ``folded_bias`` refuses (its output varies with the input) takes the kernel with
    ``wide_folded_bias``: an int32 bias within 64 of zero and a float32 rest added in float64, where the
    sum is exact; the outputs are the int64 sum's rounded once to float32, as the integer lowering's."""
    import tvm

    from sculpt.backends.tvm.kernels.int8_conv import int8_conv_func, padded_multiplier, wide_folded_bias

    instruction = AVX512_VNNI_256 if "avx512_vnni" in cpu_flags() else AVX2_PMADDWD
    s = ConvShape(1, 512, 3, 5, 16, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
    rng = np.random.default_rng(8)
    # each pixel one value on all channels: channel 0's sums span most of their reach
    x = np.broadcast_to(np.linspace(0, 255, 15).astype(np.uint8).reshape(1, 1, 3, 5), (1, 512, 3, 5)).copy()
    w = rng.integers(-128, 128, (16, 512, 1, 1)).astype(np.int8)
    w[0] = 127
    bias = rng.integers(-5000, 5000, 16).astype(np.int32)
    bias[0] = -2147482648
    mult = np.full(16, 2e-3, np.float32)
    mult[0] = 1e-7
    tile = int8_conv_tile(s, instruction)
    channels = tile.padded_channels(16)
    w2, b2, rest = wide_folded_bias(w, bias, 13, instruction.offset("uint8", 13), channels, mult, 220, "uint8")
    assert np.flatnonzero(rest).tolist() == [0] and abs(int(b2[0])) <= 64 and (w2[0] == 127).all()
    func = int8_conv_func(s, tile, instruction, "uint8", "uint8", 13, 220, layout=layout, wide=True)
    lib = tvm.compile(tvm.IRModule({"conv": func.with_attr("global_symbol", "conv")}),
                      target=tvm.target.Target(host_target({"kind": "llvm"})))
    to_layout = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if layout == "NHWC" else (lambda a: a)
    y = tvm.runtime.tensor(to_layout(np.zeros((1, 16, 3, 5), np.uint8)))
    lib.mod["conv"](*[tvm.runtime.tensor(a) for a in (
        to_layout(x), pack_int8_weight(w2, tile, instruction), b2,
        np.concatenate([padded_multiplier(mult, 16, channels), rest]))], y)
    want = _kernel_reference(x, w, bias, 13, mult, 220, "uint8", s)
    assert len(np.unique(want[:, 0])) == 3  # channel 0 is not constant
    np.testing.assert_array_equal(y.numpy(), to_layout(want))


def _kernel_reference(x, w, bias, zx, multiplier, zy, out_dtype, s: ConvShape) -> np.ndarray:
    """The QDQ conv unit in numpy: integer sum((x - zx) * w) + bias, then QuantizeLinear's float32 math."""
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = s.strides, s.dilation, s.padding
    xs = np.pad(x.astype(np.int64) - zx, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    acc = np.zeros((s.batch, s.out_channels, s.out_height, s.out_width), np.int64)
    for r in range(s.kernel[0]):
        for t in range(s.kernel[1]):
            patch = xs[:, :, r * dh:r * dh + sh * (s.out_height - 1) + 1:sh,
                       t * dw:t * dw + sw * (s.out_width - 1) + 1:sw]
            acc += np.einsum("nchw,oc->nohw", patch, w[:, :, r, t].astype(np.int64))
    acc += bias.reshape(1, -1, 1, 1)
    lo, hi = (0, 255) if out_dtype == "uint8" else (-128, 127)
    y = acc.astype(np.float32) * multiplier.reshape(1, -1, 1, 1)
    return (np.rint(np.clip(y, np.float32(lo - zy), np.float32(hi - zy))) + zy).astype(out_dtype)


@pytest.mark.parametrize("width, tile_width, widths", [
    (112, 12, [12, 12] + [11] * 8), (28, 10, [10, 9, 9]), (224, 12, [12] * 15 + [11] * 4), (24, 12, [12, 12]),
    (5, 12, [5]), (13, 7, [7, 6])])
def test_a_row_is_cut_into_tiles_one_column_apart_with_none_padded(width, tile_width, widths):
    """112 columns in tiles of at most 12: ten tiles, none wider than needed (ten of 12 would compute
    eight padded columns, 7% of VGG's 112-wide layers)."""
    from sculpt.backends.tvm.kernels.int8_conv import Int8ConvTile

    runs = Int8ConvTile(32, tile_width).column_tiles(width)
    assert [w for count, w in runs for _ in range(count)] == widths


@pytest.mark.parametrize("instruction", X86_INSTRUCTIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("shape", [
    ConvShape(2, 7, 13, 10, 9, (1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),    # 1x1, stride 2: a strided pack
    ConvShape(1, 8, 13, 13, 24, (1, 1), (2, 3), (1, 1), (1, 2, 0, 1)),   # 1x1, uneven strides and pads
    ConvShape(1, 5, 9, 11, 19, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),    # channels not a whole group
    ConvShape(1, 12, 15, 14, 16, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
    ConvShape(1, 6, 12, 12, 8, (3, 2), (1, 2), (2, 1), (2, 1, 1, 0)),    # dilated, asymmetric pads
    ConvShape(1, 16, 8, 8, 33, (1, 1), (1, 1), (1, 1), (1, 1, 1, 1)),    # a padded 1x1: border pixels only
    ConvShape(1, 8, 9, 13, 24, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),    # NHWC reads these two in place:
    ConvShape(2, 12, 11, 11, 16, (3, 3), (2, 2), (1, 1), (0, 0, 0, 0)),  # no padding, whole groups of 4
    ConvShape(1, 8, 4, 30, 40, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0)),    # 28 columns: tiles of 10, 9, 9
], ids=lambda s: f"{s.kernel[0]}x{s.kernel[1]}s{s.strides[0]}{s.strides[1]}c{s.in_channels}")
@pytest.mark.parametrize("x_dtype, zx, zy", [("uint8", 131, 3), ("int8", -7, -2)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_packed_input_is_exact_on_strides_pads_and_partial_groups(shape, instruction, x_dtype, zx, zy, layout):
    """The kernel's input pack (channel groups as int32 words; the padding rows and columns written
    apart; a 1x1 kernel's stride taken in the pack, so its conv reads every packed pixel) gives the
    integer QDQ conv's bits, and a strided 1x1 conv packs only the pixels it reads; in NHWC too (whole
    groups of byte operands copied as words, or without padding read in place, output channels stored a
    vector at a time or, past a whole vector, one by one)."""
    import tvm

    from sculpt.backends.tvm.kernels.int8_conv import int8_conv_func, padded_multiplier

    rng = np.random.default_rng(shape.in_channels)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (shape.batch, shape.in_channels, shape.height, shape.width)).astype(x_dtype)
    w = rng.integers(-128, 128, (shape.out_channels, shape.in_channels) + tuple(shape.kernel)).astype(np.int8)
    bias = rng.integers(-5000, 5000, shape.out_channels).astype(np.int32)
    mult = rng.uniform(1e-4, 3e-3, shape.out_channels).astype(np.float32)
    tile = int8_conv_tile(shape, instruction)
    channels = tile.padded_channels(shape.out_channels)
    w2, b2 = folded_bias(w, bias, zx, instruction.offset(x_dtype, zx), channels, mult, zy, x_dtype)
    func = int8_conv_func(shape, tile, instruction, x_dtype, x_dtype, zx, zy, layout=layout)
    in_place = layout == "NHWC" and instruction.group == 4 and shape.in_channels % 4 == 0 and not any(shape.padding)
    if in_place:  # read as words where they are: no packed copy
        assert "alloc_buffer" not in func.script()
    elif shape.kernel == (1, 1):
        groups = -(-shape.in_channels // instruction.group)
        packed = (shape.batch, shape.out_height, shape.out_width, groups)
        assert f"T.alloc_buffer({packed}" in func.script().replace(" ", "").replace(",", ", ")
    lib = tvm.compile(tvm.IRModule({"conv": func.with_attr("global_symbol", "conv")}),
                      target=tvm.target.Target(host_target({"kind": "llvm"})))
    dev = tvm.cpu()
    to_layout = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if layout == "NHWC" else (lambda a: a)
    y = tvm.runtime.tensor(to_layout(np.zeros((shape.batch, shape.out_channels, shape.out_height, shape.out_width),
                                              x_dtype)), dev)
    lib.mod["conv"](*[tvm.runtime.tensor(a, dev) for a in (
        to_layout(x), pack_int8_weight(w2, tile, instruction), b2,
        padded_multiplier(mult, shape.out_channels, channels))], y)
    np.testing.assert_array_equal(y.numpy(), to_layout(_kernel_reference(x, w, bias, zx, mult, zy, x_dtype, shape)))


@pytest.mark.parametrize("instruction", X86_INSTRUCTIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("activations", ["uint8", "int8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "auto"])
def test_small_net_on_the_kernel_is_exact_against_the_qdq_graph(activations, instruction, layout):
    _, q = small_net(activations)
    policy = Int8KernelPolicy(instruction, min_in_channels=1, layout=layout)  # the 3-channel first conv too
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), policy)
    # conv1, conv3 and the weight matmul on the kernel; the depthwise conv and the matmul of two
    # activations stay integer Relax ops
    assert (stats.conv2d, stats.matmul, stats.int8_kernel) == (3, 2, 3) and stats.left_float == {}
    assert stats.layout == layout if layout != "auto" else stats.layout in ("NCHW", "NHWC")
    assert lowered.script().count("sculpt_int8_conv") >= 3
    assert_small_net_exact(build(lowered), q, runs=3)


def quantized_units(q: Model, limit: int | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The conv units of ``q`` (DequantizeLinear of a quantized input and of constant weights -> Conv ->
    QuantizeLinear) side by side: (a model whose inputs are the units' quantized inputs and whose
    outputs are their quantized outputs, the input names)."""
    q = q.clone().infer_shapes()
    producers, consumers = q.producers(), q.consumers()
    nodes, inputs, outputs, inits, seen = [], [], [], {}, set()
    for node in q.graph.node:
        if node.op_type != "Conv" or len(consumers.get(node.output[0], [])) != 1:
            continue
        quant = consumers[node.output[0]][0]
        dqs = [producers.get(name) for name in node.input]
        if quant.op_type != "QuantizeLinear" or any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
            continue
        dq_x = dqs[0]
        if dq_x.input[0] in seen or q.get_constant(dq_x.input[0]) is not None:
            continue
        seen.add(dq_x.input[0])
        # the unit's output is another unit's input: its own copy gets a name of its own
        quant_copy = helper.make_node("QuantizeLinear", list(quant.input), [quant.output[0] + "_unit"],
                                      name=quant.name + "_unit")
        unit = dqs + [node, quant_copy]
        for n in unit:
            for name in n.input:
                value = q.get_constant(name)
                if value is not None:
                    inits[name] = value
        vi = q.value_infos()
        inputs.append(vi[dq_x.input[0]])
        outputs.append(helper.make_tensor_value_info(quant_copy.output[0], vi[quant.output[0]].type.tensor_type.elem_type,
                                                     q.tensor_shape(quant.output[0])))
        nodes.extend(unit)
        if limit and len(inputs) == limit:
            break
    graph = helper.make_graph(nodes, "units", inputs, outputs,
                              [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto, [i.name for i in inputs]


@pytest.fixture(scope="module")
def rec_units():
    """PP-OCRv4 rec quantized by ``qdq``, its conv units, and their real inputs on a rendered line."""
    from sculpt.models import ppocr_model

    shape = ocr_task.input_shape("rec")
    fp32 = Pipeline.from_specs(["canonicalize"], input_shapes={"x": shape}).run(ppocr_model("rec")).model
    cal = CalibrationSet.from_arrays({"x": ocr_task.calibration_inputs("rec", 8)})
    q = Pipeline.from_specs(["qdq:samples=8"], input_shapes={"x": shape}, calibration=cal).run(fp32).model
    units, names = quantized_units(q)
    line = ocr_task.rec_set(1, seed=5).inputs[:1]
    captured = make_session(q, optimize=False, extra_outputs=names).run(names, {"x": line})
    return units, dict(zip(names, captured))


def x86_object_code(executable, tmp_path) -> str:
    """objdump -d of the executable's exported library."""
    import subprocess

    library = tmp_path / "lib.so"
    executable.export_library(str(library))
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
@pytest.mark.parametrize("instruction", X86_INSTRUCTIONS, ids=lambda i: i.name)
def test_every_conv_unit_of_ppocr_rec_is_exact_on_the_kernel(rec_units, tmp_path, instruction):
    """Bit for bit the integer QDQ math (the Relax integer lowering: int32 sums, float32(acc) * M,
    round half to even); within one step of onnxruntime's float evaluation of the graph, which sums
    float products and divides by the output scale, so a value within float rounding of a .5 tie can
    round the other way (1 of 122,880 outputs of one unit here). The object code holds the instruction
    (vpdpbusd on ymm or zmm registers, never the saturating vpdpbusds)."""
    units, feeds = rec_units
    assert len(feeds) >= 25
    path = tmp_path / "units.onnx"
    onnx.save(units, path)
    model = Model.load(path)
    # every unit the kernel can take, small ones too (the host policy leaves those under MIN_KERNEL_MACS)
    lowered, stats = lower_qdq_to_int8(import_to_relax(model), Int8KernelPolicy(instruction))
    assert stats.int8_kernel >= 20 and stats.left_float == {}
    _, host_stats = lower_qdq_to_int8(import_to_relax(model), Int8KernelPolicy(instruction, min_macs=MIN_KERNEL_MACS))
    assert stats.int8_kernel > host_stats.int8_kernel > 10
    executable = build(lowered)
    asm = x86_object_code(executable, tmp_path)
    if instruction is AVX2_PMADDWD:  # LLVM fuses vpmaddwd + vpaddd into vpdpwssd where the target has VNNI
        assert asm.count("vpmaddwd") + asm.count("vpdpwssd") >= 20 and "vpdpbusd" not in asm
    else:
        register = "%zmm" if instruction is AVX512_VNNI_512 else "%ymm"
        dots = [line for line in asm.splitlines() if "vpdpbusd" in line]
        assert len(dots) >= 20 * 4 and all(register in line for line in dots)
        assert "vpdpbusds" not in asm
    integer_ops, relax_stats = compile_int8(model, int8_kernel=False)
    assert relax_stats.int8_kernel == 0
    got = run_relax(executable, feeds, list(feeds))
    want = run_relax(integer_ops, feeds, list(feeds))
    ref = make_session(units, optimize=False).run(None, feeds)
    assert len(got) == len(want) == len(ref) == len(units.graph.output)
    off = total = 0
    for g, w, r, out in zip(got, want, ref, units.graph.output):
        assert g.dtype == w.dtype == r.dtype
        np.testing.assert_array_equal(g, w, err_msg=out.name)
        diff = np.abs(g.astype(np.int32) - r.astype(np.int32))
        assert diff.max() <= 1, out.name
        off, total = off + int(np.count_nonzero(diff)), total + diff.size
    assert off <= total * 1e-4


@pytest.mark.slow
def test_ppocr_rec_units_on_sdot_are_exact_under_qemu(rec_units, tmp_path):
    """aarch64 with dotprod: the object holds sdot, and the units run under qemu equal the integer QDQ
    math (the host's Relax integer lowering) bit for bit."""
    import subprocess

    from sculpt.backends.tvm.artifact import compile_model, export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    units, feeds = rec_units
    path = tmp_path / "units.onnx"
    onnx.save(units, path)
    compiled = compile_model(Model.load(path), ARM_DOTPROD, int8="kernel")
    assert compiled.options["int8"]["instruction"] == NEON_SDOT.name
    assert compiled.options["int8"]["on_int8_kernel"] >= 15  # the units over MIN_KERNEL_MACS: 16 of rec's
    artifact = export_artifact(compiled, tmp_path / "units.so", source_model=path)
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(artifact.library)], capture_output=True,
                         text=True, check=True).stdout
    assert asm.count("sdot\t") >= 15
    run = run_artifact(artifact, feeds)
    assert run.emulated
    integer_ops, _ = compile_int8(Model.load(path), int8_kernel=False)
    want = run_relax(integer_ops, feeds, list(feeds))
    got = list(run.outputs.values())
    assert len(got) == len(want) == len(units.graph.output)
    for g, w, out in zip(got, want, units.graph.output):
        np.testing.assert_array_equal(g, w, err_msg=out.name)


def residual_chain() -> Model:
    """A QDQ ResNet-like block: two 3x3 convs beside a 3x3 shortcut conv, their sum, Relu, a max pool and
    one more conv, every conv over MIN_KERNEL_MACS: in NHWC only the input's and the output's transposes
    are left."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "ws", "bs"], ["cs"], name="shortcut", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "cs"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c3"], ["y"], name="flatten"),  # conv3's output quantized too
    ]
    inits = {"w1": rand(rng, 32, 16, 3, 3, scale=0.2), "b1": rand(rng, 32, scale=0.1),
             "w2": rand(rng, 32, 32, 3, 3, scale=0.1), "b2": rand(rng, 32, scale=0.1),
             "ws": rand(rng, 32, 16, 3, 3, scale=0.2), "bs": rand(rng, 32, scale=0.1),
             "w3": rand(rng, 64, 32, 3, 3, scale=0.1), "b3": rand(rng, 64, scale=0.1)}
    model = make_model(nodes, [("x", [1, 16, 32, 32])], [("y", [1, 64 * 16 * 16])], inits)
    return create_pass("qdq", {"ops": ["Conv"]})(model, PassContext(calibration=CalibrationSet.random(model, 4, seed=1))).model


def test_a_residual_chain_runs_in_nhwc_and_equals_the_integer_lowering():
    """The auto layout puts a chain of kernel units into NHWC (the transposes between them cancel across
    the residual sum, the Relu and the pool) and the build equals the integer Relax lowering bit for bit."""
    from tvm import relax

    q = residual_chain()
    policy = int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD, min_macs=MIN_KERNEL_MACS)
    lowered, stats = lower_qdq_to_int8(import_to_relax(q), policy)
    assert stats.int8_kernel == 4 and stats.layout == "NHWC"
    transposes = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: transposes.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.permute_dims" else None)
    assert len(transposes) == 2
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)}
    integer_ops, _ = lower_qdq_to_int8(import_to_relax(q))
    for got, want in zip(run_relax(build(lowered), feeds, ["x"]), run_relax(build(integer_ops), feeds, ["x"])):
        np.testing.assert_array_equal(got, want)


def test_a_residual_chain_in_nhwc_on_sdot_is_exact_under_qemu(tmp_path):
    """The same chain for aarch64 with dotprod, run under qemu: NHWC, sdot, the host's integer lowering's bits."""
    import subprocess

    from sculpt.backends.tvm.artifact import compile_model, export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    q = residual_chain()
    path = tmp_path / "chain.onnx"
    q.save(path)
    compiled = compile_model(Model.load(path), ARM_DOTPROD, int8="kernel")
    assert compiled.options["int8"]["instruction"] == NEON_SDOT.name
    assert (compiled.options["int8"]["on_int8_kernel"], compiled.options["int8"]["layout"]) == (4, "NHWC")
    artifact = export_artifact(compiled, tmp_path / "chain.so", source_model=path)
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(artifact.library)], capture_output=True,
                         text=True, check=True).stdout
    assert asm.count("sdot\t") >= 4
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)}
    run = run_artifact(artifact, feeds)
    assert run.emulated
    integer_ops, _ = compile_int8(Model.load(path), int8_kernel=False)
    for got, want in zip(run.outputs.values(), run_relax(integer_ops, feeds, ["x"])):
        np.testing.assert_array_equal(got, want)


def test_compile_option_lowers_a_qdq_model_onto_the_kernel(monkeypatch):
    """``sculpt compile --int8 kernel``: the manifest says what ran on the kernel; bad option values and
    non-CPU targets are one-line errors."""
    from sculpt.backends.tvm import int8
    from sculpt.backends.tvm.artifact import compile_model
    from sculpt.errors import OptionError

    _, q = small_net("uint8")
    assert compile_model(q, "host", int8="kernel").options["int8"]["on_int8_kernel"] == 0  # all below MIN_KERNEL_MACS
    monkeypatch.setattr(int8, "MIN_KERNEL_MACS", 0)
    compiled = compile_model(q, "host", int8="kernel")
    info = compiled.options["int8"]
    host_instruction = instruction_for(traits_of(host_target({"kind": "llvm"})))
    assert info["instruction"] == host_instruction.name and info["on_int8_kernel"] == 3 and info["conv2d"] == 3  # the 3-channel first conv too
    host_wide = wide_instruction_for(traits_of(host_target({"kind": "llvm"})))
    assert info["wide_instruction"] == (host_wide.name if host_wide else None)
    relax_only = compile_model(q, "host", int8="relax").options["int8"]
    assert relax_only["on_int8_kernel"] == 0 and relax_only["conv2d"] == 3
    with pytest.raises(OptionError, match="--int8"):
        compile_model(q, "host", int8="fast")
    with pytest.raises(OptionError, match="not a CPU"):
        compile_model(q, "mali", int8="kernel")
    assert_small_net_exact(compiled.executable, q, runs=2)


def wide_bias_unit(side: int = 4) -> onnx.ModelProto:
    """One conv unit (512 -> 2 channels, 1x1, on a ``side`` x ``side`` map) with a bias at -2^31 on a
    channel whose output still depends on its input."""
    from onnx import TensorProto

    xs, ws = np.float32(0.02), np.full(2, 1e-3, np.float32)
    consts = {"xs": np.array(xs), "xz": np.array(13, np.uint8), "wq": np.full((2, 512, 1, 1), 127, np.int8),
              "ws": ws, "wz": np.zeros(2, np.int8), "bq": np.array([-2147482648, 5], np.int32),
              "bs": (xs * ws).astype(np.float32), "bz": np.zeros(2, np.int32), "ys": np.array(xs * 1e-3 / 1e-7, np.float32),
              "yz": np.array(220, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["y"])]
    proto = qdq_proto(nodes, consts, [1, 512, side, side], ("y", TensorProto.UINT8, [1, 2, side, side]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_a_unit_whose_bias_cannot_be_folded_takes_the_wide_kernel():
    """PP-OCRv4 det (qdq) has such a unit: a bias at -2^31 on a channel whose output still depends on
    its input. The kernel takes it with its wide epilogue, and equals the integer Relax lowering."""
    proto = wide_bias_unit()
    policy = int8_kernel_policy("llvm")
    lowered, stats = lower_qdq_to_int8(import_to_relax(Model(proto)), Int8KernelPolicy(policy.instruction))
    assert (stats.conv2d, stats.int8_kernel) == (1, 1) and stats.left_float == {}
    integer_ops, _ = lower_qdq_to_int8(import_to_relax(Model(proto)))
    for got, want in zip(_unit_outputs(build(lowered), [1, 512, 4, 4]), _unit_outputs(build(integer_ops), [1, 512, 4, 4])):
        np.testing.assert_array_equal(got, want)


def test_the_wide_epilogue_on_aarch64_is_exact_under_qemu(tmp_path):
    """The same unit for aarch64 with dotprod (the float64 part of the epilogue on NEON), under qemu:
    the host's integer lowering's bits."""
    from sculpt.backends.tvm.artifact import compile_model, export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    path = tmp_path / "wide.onnx"
    onnx.save(wide_bias_unit(48), path)  # over the policy's min_macs
    compiled = compile_model(Model.load(path), ARM_DOTPROD, int8="kernel")
    assert compiled.options["int8"]["on_int8_kernel"] == 1
    feeds = {"x": (np.random.default_rng(3).standard_normal((1, 512, 48, 48)) * 4).astype(np.float32)}
    run = run_artifact(export_artifact(compiled, tmp_path / "wide.so", source_model=path), feeds)
    assert run.emulated
    integer_ops, _ = compile_int8(Model.load(path), int8_kernel=False)
    np.testing.assert_array_equal(list(run.outputs.values())[0], run_relax(integer_ops, feeds, ["x"])[0])


def _unit_outputs(executable, x_shape, runs: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [run_relax(executable, {"x": (rng.standard_normal(x_shape) * (1 + k)).astype(np.float32)}, ["x"])[0]
            for k in range(runs)]


@pytest.mark.parametrize("bias", ["small", "beyond_2^24", "int32_limit"])
def test_depthwise_units_on_a_kernel_policy_are_exact_float32_convs(bias):
    """Under an int8 kernel policy a depthwise unit (not the kernel's) runs as a float32 conv of the
    integers (sculpt's float depthwise kernels instead of an int16 conv): every partial sum is an integer
    below 2^24, so it equals the integer lowering bit for bit, with a bias added in float32 where exact
    and as integers (int64 at the int32 limit) where not."""
    from onnx import TensorProto

    rng = np.random.default_rng(8)
    c = 16
    xs, ws = np.float32(0.03), (rng.uniform(0.5, 2, c) * 1e-2).astype(np.float32)
    bq = rng.integers(-3000, 3000, c).astype(np.int32)
    if bias == "beyond_2^24":
        bq[::3] = np.int32(40_000_000)
    elif bias == "int32_limit":
        bq[1] = np.int32(-2 ** 31)
    consts = {"xs": np.array(xs), "xz": np.array(113, np.uint8),
              "wq": rng.integers(-127, 128, (c, 1, 5, 5)).astype(np.int8), "ws": ws, "wz": np.zeros(c, np.int8),
              "bq": bq, "bs": (xs * ws).astype(np.float32), "bz": np.zeros(c, np.int32),
              "ys": np.array(0.05, np.float32), "yz": np.array(120, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], group=c, pads=[2, 2, 2, 2], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["y"])]
    proto = qdq_proto(nodes, consts, [1, c, 19, 19], ("y", TensorProto.UINT8, [1, c, 10, 10]))
    policy = int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD)
    lowered, stats = lower_qdq_to_int8(import_to_relax(Model(proto)), policy)
    assert (stats.conv2d, stats.int8_kernel, stats.exact_float) == (1, 0, 1) and stats.left_float == {}
    assert "int16" not in lowered.script()
    integer, integer_stats = lower_qdq_to_int8(import_to_relax(Model(proto)))
    assert integer_stats.exact_float == 0
    for got, want in zip(_unit_outputs(build(lowered), [1, c, 19, 19]), _unit_outputs(build(integer), [1, c, 19, 19])):
        np.testing.assert_array_equal(got, want)


def test_a_unit_beyond_float32s_exact_integers_stays_an_integer_conv():
    """A float32 sum is exact only below 2^24: a 1x1 conv over 640 channels of weight 127 (reach
    640 x 127 x 256 > 2^24) keeps the int16 conv."""
    from onnx import TensorProto

    consts = {"xs": np.array(0.02, np.float32), "xz": np.array(13, np.uint8),
              "wq": np.full((2, 640, 1, 1), 127, np.int8), "ws": np.full(2, 1e-3, np.float32),
              "wz": np.zeros(2, np.int8), "ys": np.array(0.5, np.float32), "yz": np.array(10, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["y"])]
    proto = qdq_proto(nodes, consts, [1, 640, 1, 1], ("y", TensorProto.UINT8, [1, 2, 1, 1]))
    policy = Int8KernelPolicy((int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD)).instruction,
                              min_macs=10 ** 9)  # not on the kernel
    lowered, stats = lower_qdq_to_int8(import_to_relax(Model(proto)), policy)
    assert (stats.conv2d, stats.int8_kernel, stats.exact_float) == (1, 0, 0) and "int16" in lowered.script()


def test_a_quantized_transposed_conv_reads_a_constant_weight():
    """A QDQ ConvTranspose stays float, but its weight's DequantizeLinear is evaluated at lowering (as
    TVM's FoldConstant would later), so that sculpt's kernels rewrite the stride == kernel transposed conv
    into a 1x1 conv and a pixel shuffle (PP-OCRv4 det's head: 4.2 -> about 1 ms) instead of naive loops.
    The values are the same: the output equals the build that dequantizes in TVM."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("ConvTranspose", ["r1", "wt", "bt"], ["y"], name="up", strides=[2, 2],
                              kernel_shape=[2, 2])]
    inits = {"w1": rand(rng, 16, 8, 3, 3, scale=0.3), "b1": rand(rng, 16, scale=0.1),
             "wt": rand(rng, 16, 8, 2, 2, scale=0.3), "bt": rand(rng, 8, scale=0.1)}
    model = make_model(nodes, [("x", [1, 8, 10, 10])], [("y", [1, 8, 20, 20])], inits)
    q = create_pass("qdq", {"ops": ["Conv", "ConvTranspose"]})(
        model, PassContext(calibration=CalibrationSet.random(model, 4, seed=2))).model
    assert any(n.op_type == "ConvTranspose" for n in q.graph.node)
    policy = int8_kernel_policy("llvm") or Int8KernelPolicy(AVX2_PMADDWD)
    lowered, _ = lower_qdq_to_int8(import_to_relax(q), policy)
    text = lowered.script(show_meta=False)
    assert "conv2d_transpose" in text
    main = lowered["main"]
    import tvm
    from tvm import relax

    weights = []
    relax.analysis.post_order_visit(main, lambda e: weights.append(e.args[1]) if isinstance(e, relax.Call) and getattr(
        e.op, "name", "") == "relax.nn.conv2d_transpose" else None)
    assert weights and all(isinstance(w, tvm.ir.expr.Constant) for w in weights)
    before, _ = lower_qdq_to_int8(import_to_relax(q))  # the weight dequantized by TVM
    for got, want in zip(_unit_outputs(build(lowered), [1, 8, 10, 10]), _unit_outputs(build(before), [1, 8, 10, 10])):
        np.testing.assert_array_equal(got, want)
