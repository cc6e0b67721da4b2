"""Int8 lowering of QDQ models in TVM Relax.

A QDQ model (the ``qdq`` pass) imports into Relax as ``dequantize → conv2d/matmul (→ + bias) →
quantize`` in float32. :func:`lower_qdq_to_int8` rewrites each such unit, with ``relax.dpl`` patterns,
into integer compute as onnxruntime's QLinearConv/QLinearMatMul do it:

    acc = conv2d(x_q - zx, w_q, out_dtype=int32) (+ b_q)          # exact integer accumulation
    y_q = clamp(round_half_even(float32(acc) * M) + zy)           # M = float32(sx·sw) / sy, per channel

so the quantized outputs agree with onnxruntime's int8 kernels (up to float rounding of ``acc · M``
at exact ties), instead of computing in float32 on dequantized values. Inputs are widened to int16
before the multiply (``x_q - zx`` of a uint8 needs 9 bits), products accumulate in int32.

With an :class:`Int8KernelPolicy` (``compile_int8`` makes one for CPU targets with a dot-product
instruction: x86 VNNI's vpdpbusd, else AVX2's vpmaddwd; aarch64's sdot), the conv units the policy takes become one call to the
int8 conv kernel instead (kernels/int8_conv.py: int8/uint8 in, int32 accumulators, the requantization
in its epilogue, int8/uint8 out). In the NHWC layout depthwise units whose sums are exact in float32
become calls to the int8 depthwise kernel (kernels/int8_depthwise.py), so that a MobileNet-style
pointwise -> depthwise -> pointwise chain stays NHWC; grouped convs and the units the policy declines
stay the Relax ops above (exact float32 convs where possible), which sculpt's float kernels schedule.
A unit whose bias is so near int32's limit that bias + sum could overflow takes the kernels' wide
epilogue (the bias's rest added in float64, where the sum is exact). The elementwise chain after a
kernel call (dequantize -> HardSwish, ReLU6, affine... -> quantize; int8_chains.py) becomes that
kernel's epilogue. Every chain, on the kernels or not, multiplies by reciprocals where the graph divides
by a constant (int8_chains.divisions_as_products), so both builds compute the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from sculpt.backends.tvm.int8_chains import divisions_as_products, output_chains
from sculpt.backends.tvm.kernels.clip_as_ops import rewrite_clip_calls
from sculpt.backends.tvm.kernels.fold_small_constants import fold_small_constants
from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_calls
from sculpt.backends.tvm.kernels.sink_permutes import sink_permutes
from sculpt.backends.tvm.relax_import import TVMImportError, build, import_to_relax
from sculpt.common import one_line
from sculpt.ir.model import Model
from sculpt.ir.quantization import dequantize


@dataclass
class LoweringStats:
    conv2d: int = 0
    matmul: int = 0
    int8_kernel: int = 0  # of the conv2d and matmul units: those on the int8 conv kernel
    int8_depthwise: int = 0  # of the conv2d units: those on the int8 depthwise kernel (NHWC layout only)
    exact_float: int = 0  # of the conv2d units: integer math run exactly as a float32 conv (_float_exact_conv)
    folded_chains: int = 0  # elementwise chains (dequantize -> activation -> quantize) in a kernel's epilogue
    left_float: dict[str, int] = field(default_factory=dict)  # op → units the patterns did not match
    layout: str = ""  # the int8 kernel's activation layout (NHWC or NCHW), when a unit is on it

    @property
    def total(self) -> int:
        return self.conv2d + self.matmul


def _const_value(expr) -> np.ndarray:
    value = getattr(expr, "data", None) or expr.value  # TVM 0.27: relax constants carry ``value``
    return value.numpy()


def _type_of(expr):
    return getattr(expr, "struct_info", None) or expr.ty  # TVM 0.27 calls it ``ty``


def _ndim(expr) -> int:
    return int(_type_of(expr).ndim)


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.expr.Constant)


def _scalar(expr) -> float | int | None:
    value = _const_value(expr)
    if value.size != 1:
        return None
    return value.reshape(()).item()


def _patterns():
    from tvm.relax.dpl import is_const, is_op, wildcard

    def dq(data):
        return is_op("relax.dequantize")(data, is_const(), is_const())

    x_q = wildcard()
    dq_x = dq(x_q)
    dq_w = dq(is_const())
    conv = is_op("relax.nn.conv2d")(dq_x, dq_w)
    dq_b = dq(is_const())
    bias = is_op("relax.reshape")(dq_b, wildcard())
    conv_bias = is_op("relax.add")(conv, bias)
    q_conv = is_op("relax.quantize")(conv_bias | conv, is_const(), is_const())

    a_q, b_q = wildcard(), wildcard()
    dq_a, dq_b2 = dq(a_q), dq(b_q)
    mm = is_op("relax.matmul")(dq_a, dq_b2)
    # Gemm with transB: the [N, K] weight transposed; with a bias, Gemm's C (dequantized int32)
    perm_b = is_op("relax.permute_dims")(dq_b2)
    mm_t = is_op("relax.matmul")(dq_a, perm_b)
    dq_mb = dq(is_const())
    mm_bias = is_op("relax.add")(mm | mm_t, dq_mb)
    q_mm = is_op("relax.quantize")(mm_bias | mm | mm_t, is_const(), is_const())
    dq_tw = dq(is_const())
    deconv = is_op("relax.nn.conv2d_transpose")(wildcard(), dq_tw)
    return {"conv": (q_conv, conv, conv_bias, dq_x, dq_w, dq_b, x_q),
            "matmul": (q_mm, mm, dq_a, dq_b2, a_q, b_q, mm_t, perm_b, mm_bias, dq_mb),
            "conv_transpose": (deconv, dq_tw)}


def _dequantized_constant(call) -> np.ndarray | None:
    """relax.dequantize of a constant integer tensor to float32 (sculpt.ir.quantization.dequantize: the
    float32 formula TVM's legalization uses, per channel along ``axis``), or None for other forms."""
    if str(call.attrs.out_dtype) != "float32":
        return None
    q = _const_value(call.args[0])
    scale, zp, axis = _dq_params(call)
    if q.dtype.kind not in "iu" or scale.dtype != np.float32 or zp.dtype.kind not in "iu":
        return None
    if scale.size not in (1, q.shape[axis]) or zp.size not in (1, scale.size):
        return None
    flat = lambda v: v.reshape(-1) if v.size > 1 else v.reshape(())  # noqa: E731
    return dequantize(q, flat(scale), flat(zp), axis)


def _widen(bb_expr, zero_point: int):
    """int16(q) - zero_point as a Relax expression."""
    from tvm import relax

    wide = relax.op.astype(bb_expr, "int16")
    if zero_point:
        wide = relax.op.subtract(wide, relax.const(np.int16(zero_point), "int16"))
    return wide


def _dq_params(call) -> tuple[np.ndarray, np.ndarray, int]:
    """scale, zero point and axis of a matched dequantize call."""
    return _const_value(call.args[1]), _const_value(call.args[2]), int(call.attrs.axis)


def _requantize(acc, multiplier: np.ndarray, out_q_call, channel_axis: int, ndim: int, float_acc: bool = False):
    """float32(acc) * M (per channel along ``channel_axis``) rounded to the output type with its
    zero point — relax.quantize with scale 1 is round-half-even, add zp, saturate."""
    from tvm import relax

    mult = np.asarray(multiplier, np.float32)
    if mult.size > 1:
        shape = [1] * ndim
        shape[channel_axis] = mult.size
        mult = mult.reshape(shape)
    acc_f = acc if float_acc else relax.op.astype(acc, "float32")
    scaled = relax.op.multiply(acc_f, relax.const(mult.reshape(mult.shape), "float32"))
    zy = _const_value(out_q_call.args[2])
    return relax.op.quantize(scaled, relax.const(np.float32(1.0), "float32"),
                             relax.const(zy.reshape(()) if zy.size == 1 else zy, str(zy.dtype)),
                             axis=-1, out_dtype=out_q_call.attrs.out_dtype)


def _add_bias(acc, b_q: np.ndarray, w_q: np.ndarray, shape=(1, -1, 1, 1)):
    """acc + b_q per output channel (``w_q``'s first axis; the bias reshaped to ``shape`` to meet acc's
    channel axis); in int64 when the int32 sum could overflow: a bias quantized with a tiny weight scale
    saturates at -2^31 (PP-OCRv4 det's Conv.28 channel 33: 15 of its 100 outputs wrapped around, 8 steps
    off onnxruntime)."""
    from tvm import relax

    o = w_q.shape[0]
    reach = np.abs(w_q.reshape(o, -1).astype(np.int64)).sum(axis=1) * 256  # |sum((x - zx) * w)| < reach
    if np.all(np.abs(b_q.reshape(-1).astype(np.int64)) + reach < 2 ** 31):
        return relax.op.add(acc, relax.const(b_q.reshape(shape), "int32"))
    return relax.op.add(relax.op.astype(acc, "int64"), relax.const(b_q.reshape(shape).astype(np.int64), "int64"))


# a float32 holds every integer of magnitude up to 2^24 exactly
_FLOAT32_EXACT = 2 ** 24
# ungrouped units off the int8 kernel with fewer input channels stay int16 Relax convs
EXACT_FLOAT_MIN_IN_CHANNELS = 4


def _reach(w_q: np.ndarray) -> np.ndarray:
    """Per output channel, a bound on |sum((x - zx) * w)| (|x - zx| <= 255): also on every partial sum."""
    o = w_q.shape[0]
    return np.abs(w_q.reshape(o, -1).astype(np.int64)).sum(axis=1) * 256


def _exact_in_float32(w_q: np.ndarray, x_q) -> bool:
    """Whether the unit's integer accumulation can run in float32 exactly: every product and every
    partial sum (in any order, with or without FMA) is an integer below 2^24."""
    return w_q.dtype == np.int8 and str(_type_of(x_q).dtype) in ("uint8", "int8") \
        and bool(np.all(_reach(w_q) < _FLOAT32_EXACT))


def _float_exact_conv(x_q, zx: int, w_q: np.ndarray, b_q: np.ndarray | None, a, multiplier: np.ndarray, out_q_call):
    """The conv unit's integer math in float32, exact (``_exact_in_float32``): float32(x_q) - zx (exact)
    convolved with the integer weights as float32 sums integers below 2^24 without rounding, so the
    accumulator equals the int32 one; the float conv then runs on sculpt's float kernels (depthwise,
    blocked) instead of an unvectorized int16 conv. The bias is added in float32 where that is exact
    too, else as integers (``_add_bias``); the requantization is the same ``_requantize``."""
    from tvm import relax

    data = relax.op.astype(x_q, "float32")
    if zx:
        data = relax.op.subtract(data, relax.const(np.float32(zx), "float32"))
    acc = relax.op.nn.conv2d(data, relax.const(w_q.astype(np.float32), "float32"), strides=a.strides,
                             padding=a.padding, dilation=a.dilation, groups=a.groups, data_layout="NCHW",
                             kernel_layout="OIHW", out_dtype="float32")
    if b_q is not None:
        if np.all(np.abs(b_q.reshape(-1).astype(np.int64)) + _reach(w_q) < _FLOAT32_EXACT):
            acc = relax.op.add(acc, relax.const(b_q.reshape(1, -1, 1, 1).astype(np.float32), "float32"))
        else:
            return _requantize(_add_bias(relax.op.astype(acc, "int32"), b_q, w_q), multiplier, out_q_call, 1, 4)
    return _requantize(acc, multiplier, out_q_call, 1, 4, float_acc=True)


def _multiplier(sx, sw, sy) -> np.ndarray:
    """float32(sx·sw)/sy in float32, as onnxruntime computes the requantization scale."""
    return ((np.float32(sx) * np.asarray(sw, np.float32)).astype(np.float32) / np.float32(sy)).astype(np.float32)


# auto layout: NHWC when, after sinking, it adds at most this many transposes per int8 kernel call to the
# NCHW lowering's. Measured (1 thread, NHWC / NCHW time): resnet50 (2 added for 53 calls) 24.8 / 36.2 ms,
# vgg19 (2 for 16) 117 / 141; PP-OCRv4 det (6 added for 60 calls, with its depthwise units on the int8
# depthwise kernel; about 90 for 26 before) 9.4 / 12.5 and rec (11 for 44) 10.4 / 13.0
AUTO_NHWC_ADDED_TRANSPOSES = 0.5

# below this many multiply-adds a conv unit stays integer Relax ops, which TVM fuses with the float
# ops after it: PP-OCR cls (every conv unit under 1.3M MACs) measured 2.5 ms with its units on the
# kernel, 1.9 ms without (2 threads, host loaded)
MIN_KERNEL_MACS = 2_000_000


# below these many multiply-adds a kernel call runs on one thread: waking the pool's other workers costs
# more than the work (each parallel loop wakes them; with the shared thread policy they sleep between
# loops). PP-OCRv4 det in NHWC, 2 threads: its squeeze-and-excitation convs (1x1 maps, 2-40K MACs) took
# 30-40 us on 2 threads and 5 us on one; 192 -> 42 channels at 20x20 (3.2M) 73 us vs 38
MIN_PARALLEL_MACS = 4_000_000
MIN_PARALLEL_DEPTHWISE_MACS = 1_000_000
# the wide instruction's padded output channels over the narrow one's a unit may take it at: twice the
# multiply-adds per cycle pay for a third more channels (24 -> 32). On the Xeon of wide_instruction_for,
# 1 thread, every unit in zmm against zmm only where it padded no more than 1.25x (depthwise in ymm):
# PP-OCRv4 rec 6.54 vs 7.80 ms, det 6.85 vs 7.64, the 800x608 layout detector 37.2 vs 42.6
WIDE_MAX_PADDING = 1.5


def _macs(shape, depthwise: bool = False) -> int:
    per_output = shape.kernel[0] * shape.kernel[1] * (1 if depthwise else shape.in_channels)
    return shape.out_channels * shape.out_height * shape.out_width * per_output


@dataclass(frozen=True)
class Int8KernelPolicy:
    """Which QDQ conv units run on the int8 conv kernel (kernels/int8_conv.py) with ``instruction``:
    convs of one group with at least ``min_macs`` multiply-adds and ``min_in_channels`` input
    channels. The first conv of a network (3 image channels: one group of 4 with a zero channel)
    takes it too: bit-identical, and faster than the int16 Relax conv it was left to (1 thread:
    resnet50 38.4 -> 35.0 ms, PP-OCRv4 det 12.9 -> 12.4; resnet50's 7x7 stem alone 4.84 -> 1.01 ms,
    onnxruntime's 1.46)."""

    instruction: object  # int8_conv.DotInstruction
    min_macs: int = 0
    min_in_channels: int = 1
    float_grouped: bool = False  # depthwise/grouped units stay dequantize -> float conv -> quantize
    # the kernel's activation layout: NHWC (transposes around each call, cancelled between kernels by
    # kernels/sink_permutes), NCHW (the graph's own: no transpose, the kernel gathers its input's channels
    # and scatters its output's, a byte at a time), or auto: NHWC unless it adds more than
    # AUTO_NHWC_ADDED_TRANSPOSES transposes per kernel call (ops between the units that no transpose crosses)
    layout: str = "auto"
    # a wider form of ``instruction`` (AVX-512's zmm where the core runs it at full rate), taken by the
    # units it pads no more than WIDE_MAX_PADDING more output channels than ``instruction`` does
    wide_instruction: object = None

    def instruction_for(self, out_channels: int):
        """The conv kernel's instruction for a unit of ``out_channels``."""
        from sculpt.backends.tvm.kernels.int8_conv import padded_out_channels

        if self.wide_instruction is None:
            return self.instruction
        narrow = padded_out_channels(out_channels, self.instruction)
        wide = padded_out_channels(out_channels, self.wide_instruction)
        return self.wide_instruction if wide <= narrow * WIDE_MAX_PADDING else self.instruction

    def depthwise_lanes(self, channels: int) -> int:
        """Channels per vector of the depthwise kernel (float32 multiply-adds, no dot instruction): the
        wide instruction's where it has one and the padding stays within WIDE_MAX_PADDING. On the Xeon
        of instruction_for's figures, 16 lanes against 8 (one thread): 128 channels 3x3 stride 2 at
        160 x 160 1.78 -> 1.03 ms, 240 channels 5x5 at 28 x 28 0.156 -> 0.101."""
        if self.wide_instruction is None:
            return self.instruction.lanes
        narrow, wide = self.instruction.lanes, self.wide_instruction.lanes
        padded = lambda lanes: -(-channels // lanes) * lanes  # noqa: E731
        return wide if padded(wide) <= padded(narrow) * WIDE_MAX_PADDING else narrow

    def keeps_float(self, groups: int) -> bool:
        return self.float_grouped and groups > 1

    def takes(self, shape, groups: int) -> bool:
        macs = _macs(shape)
        # min_macs keeps small units off the kernel in NCHW only (fused with the float ops after them); in
        # NHWC a unit off the kernel would need a transpose on each side
        min_macs = self.min_macs if self.layout != "NHWC" else 0
        return groups == 1 and macs >= min_macs and shape.in_channels >= self.min_in_channels


def int8_kernel_policy(target) -> Int8KernelPolicy | None:
    """The policy for a TVM CPU target (dict or Target, host completed as the float kernels do), or None
    when the target has no widening dot-product instruction the kernel knows."""
    from sculpt.backends.tvm.kernels.int8_conv import instruction_for, wide_instruction_for
    from sculpt.backends.tvm.kernels.target_traits import host_target, traits_of

    target_dict = {"kind": target} if isinstance(target, str) else target
    if not isinstance(target_dict, dict) or target_dict.get("kind") != "llvm":
        return None
    traits = traits_of(host_target(target_dict))
    instruction = instruction_for(traits)
    if instruction is None:
        return None
    return Int8KernelPolicy(instruction, min_macs=MIN_KERNEL_MACS, wide_instruction=wide_instruction_for(traits))


class _KernelEmitter:
    """Emits calls to the int8 conv kernel: one PrimFunc per distinct (shape, types, zero points)."""

    def __init__(self, policy: Int8KernelPolicy, mod):
        from tvm import relax

        self.policy = policy
        self.builder = relax.BlockBuilder(mod)  # its add_func gives GlobalVars typed for call_tir
        self.funcs: dict[tuple, object] = {}  # key -> GlobalVar
        self.makers: dict[str, object] = {}  # kernel name -> makes its PrimFunc (with chain=, the chain's)

    def _add(self, key, make, prefix: str) -> None:
        gvar = self.builder.add_func(make(), f"{prefix}{len(self.funcs)}")
        self.funcs[key] = gvar
        self.makers[gvar.name_hint] = make

    def is_kernel(self, gvar) -> bool:
        return getattr(gvar, "name_hint", None) in self.makers

    def with_chain(self, kernel_call, chain, args, rewriter):
        """The call, on ``args``, of the kernel ``kernel_call`` calls (a call_tir of one of these
        kernels) with ``chain`` (kernels/quantized_chain.py) in its epilogue; one PrimFunc per (kernel,
        chain), added to the module by ``rewriter``."""
        from tvm import relax

        name = kernel_call.args[0].name_hint
        key = ("chain", name, chain)
        if key not in self.funcs:
            self.funcs[key] = rewriter.add_func(self.makers[name](chain=chain), f"{name}_chain")
        out = kernel_call.ty_args[0]
        return relax.call_tir(self.funcs[key], args, relax.TensorType([int(d) for d in out.shape], chain.out_dtype))

    def conv_shape(self, conv, x_q):
        from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
        from sculpt.backends.tvm.kernels.relax_rewrite import four_pads, static_shape

        a = conv.attrs
        x_shape, w_shape, pads = static_shape(x_q), static_shape(conv.args[1]), four_pads(a)
        if x_shape is None or w_shape is None or pads is None or len(x_shape) != 4:
            return None, 1
        return ConvShape(x_shape[0], w_shape[1], x_shape[2], x_shape[3], w_shape[0], (w_shape[2], w_shape[3]),
                         tuple(int(v) for v in a.strides), tuple(int(v) for v in a.dilation), tuple(pads)), int(a.groups)

    def call(self, shape, x_q, w_q: np.ndarray, b_q: np.ndarray | None, zx: int, multiplier: np.ndarray,
             out_q_call, x_dtype: str | None = None):
        """The call of the kernel for this unit on an NCHW ``x_q``, giving NCHW (transposed in and out
        when the policy's layout is NHWC), or None when its sums may overflow int32 (wide_folded_bias)."""
        from tvm import relax

        if self.policy.layout == "NCHW":
            return self.kernel_call(shape, x_q, w_q, b_q, zx, multiplier, out_q_call, x_dtype)
        y = self.kernel_call(shape, relax.op.permute_dims(x_q, [0, 2, 3, 1]), w_q, b_q, zx, multiplier, out_q_call,
                             x_dtype or str(_type_of(x_q).dtype))
        return None if y is None else relax.op.permute_dims(y, [0, 3, 1, 2])

    def kernel_call(self, shape, x_q, w_q: np.ndarray, b_q: np.ndarray | None, zx: int, multiplier: np.ndarray,
                    out_q_call, x_dtype: str | None = None):
        """The call of the kernel on ``x_q`` in the policy's layout, or None (``call``)."""
        from tvm import relax

        from sculpt.backends.tvm.kernels import int8_conv as k

        instr = self.policy.instruction_for(shape.out_channels)
        tile = k.int8_conv_tile(shape, instr)
        x_dtype, out_dtype = x_dtype or str(_type_of(x_q).dtype), str(out_q_call.attrs.out_dtype)
        zy = int(_const_value(out_q_call.args[2]).reshape(-1)[0])
        channels = tile.padded_channels(shape.out_channels)
        try:
            w_q, bias, rest = k.wide_folded_bias(w_q, b_q, zx, instr.offset(x_dtype, zx), channels, multiplier, zy,
                                                 out_dtype)
        except OverflowError:  # sums that may overflow int32 whatever the bias: not this kernel
            return None
        layout, wide = self.policy.layout, rest is not None
        key = (shape, tile, instr.name, x_dtype, out_dtype, zx, zy, layout, wide)
        if key not in self.funcs:
            make = functools.partial(k.int8_conv_func, shape, tile, instr, x_dtype, out_dtype, zx, zy, layout=layout,
                                     parallel=_macs(shape) >= MIN_PARALLEL_MACS, wide=wide)
            self._add(key, make, "sculpt_int8_conv")
        gvar = self.funcs[key]
        mult = k.padded_multiplier(multiplier, shape.out_channels, channels)
        args = [x_q, relax.const(k.pack_int8_weight(w_q, tile, instr)), relax.const(bias, "int32"),
                relax.const(np.concatenate([mult, rest]) if wide else mult, "float32")]
        out = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
        if layout == "NHWC":
            out = (out[0], out[2], out[3], out[1])
        return relax.call_tir(gvar, args, relax.TensorType(out, out_dtype))

    def depthwise_call(self, shape, x_q, w_q: np.ndarray, b_q: np.ndarray | None, zx: int, multiplier: np.ndarray,
                       out_q_call):
        """The call of the int8 depthwise kernel (kernels/int8_depthwise.py, NHWC) for a depthwise unit on
        an NCHW ``x_q`` (``shape``: its ConvShape over all C channels), transposed in and out, giving NCHW;
        the caller checked that its sums are exact in float32."""
        from tvm import relax

        from sculpt.backends.tvm.kernels import int8_depthwise as k

        instr = self.policy.instruction
        tile = k.int8_depthwise_tile(shape, self.policy.depthwise_lanes(shape.out_channels), instr.registers)
        x_dtype, out_dtype = str(_type_of(x_q).dtype), str(out_q_call.attrs.out_dtype)
        zy = int(_const_value(out_q_call.args[2]).reshape(-1)[0])
        weight, bias, mult = k.depthwise_constants(w_q, b_q, multiplier, tile)
        wide = mult.size > tile.padded_channels(shape.out_channels)  # with bias rests (a bias near int32's limit)
        key = ("depthwise", shape, tile, x_dtype, out_dtype, zx, zy, wide)
        if key not in self.funcs:
            make = functools.partial(k.int8_depthwise_func, shape, tile, x_dtype, out_dtype, zx, zy, wide=wide,
                                     parallel=_macs(shape, depthwise=True) >= MIN_PARALLEL_DEPTHWISE_MACS)
            self._add(key, make, "sculpt_int8_dw")
        args = [relax.op.permute_dims(x_q, [0, 2, 3, 1]), relax.const(weight), relax.const(bias), relax.const(mult)]
        y = relax.call_tir(self.funcs[key], args, relax.TensorType(
            (shape.batch, shape.out_height, shape.out_width, shape.out_channels), out_dtype))
        return relax.op.permute_dims(y, [0, 3, 1, 2])

    def matmul_call(self, a_q, b_q: np.ndarray, za: int, multiplier: np.ndarray, out_q_call,
                    bias: np.ndarray | None = None):
        """A matmul by a constant [K, N] int8 matrix (plus an int32 ``bias`` [N]) as a 1x1 conv of the
        kernel: the rows of ``a_q`` [..., M, K] are the pixels of a [1, K, 1, M] image (transposed in and
        out), or None when the policy does not take it."""
        from tvm import relax

        from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
        from sculpt.backends.tvm.kernels.relax_rewrite import static_shape

        a_shape = static_shape(a_q)
        if a_shape is None or len(a_shape) < 2:
            return None
        k, n = b_q.shape
        rows = int(np.prod(a_shape[:-1]))
        shape = ConvShape(1, k, 1, rows, n, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0))
        if not self.policy.takes(shape, 1):
            return None
        weight = np.ascontiguousarray(b_q.T).reshape(n, k, 1, 1)
        if self.policy.layout == "NHWC":  # the rows are the pixels of a [1, 1, M, K] NHWC image as they are
            y = self.kernel_call(shape, relax.op.reshape(a_q, (1, 1, rows, k)), weight, bias, za, multiplier,
                                 out_q_call, str(_type_of(a_q).dtype))
            return None if y is None else relax.op.reshape(y, tuple(a_shape[:-1]) + (n,))
        image = relax.op.reshape(relax.op.permute_dims(relax.op.reshape(a_q, (rows, k)), [1, 0]), (1, k, 1, rows))
        y = self.call(shape, image, weight, bias, za, multiplier, out_q_call, str(_type_of(a_q).dtype))
        if y is None:
            return None
        y = relax.op.permute_dims(relax.op.reshape(y, (n, rows)), [1, 0])
        return relax.op.reshape(y, tuple(a_shape[:-1]) + (n,))


def lower_qdq_to_int8(mod, kernel_policy: Int8KernelPolicy | None = None):
    """Rewrite the QDQ conv2d/matmul units of every Relax function of ``mod`` into int8 compute with
    int32 accumulation and requantization; with ``kernel_policy``, the conv units it takes into calls to
    the int8 conv kernel (in the policy's layout; ``auto`` decided by the transposes NHWC leaves).
    Returns (new module, LoweringStats)."""
    if kernel_policy is None or kernel_policy.layout != "auto":
        return _lower_qdq_to_int8(mod, kernel_policy)
    nchw = _lower_qdq_to_int8(mod, dataclasses.replace(kernel_policy, layout="NCHW"))
    if not nchw[1].int8_kernel:  # every unit below the policy's min_macs: a model of small convs stays off
        return nchw              # the kernels (NHWC would take them all, to avoid transposes)
    nhwc = _lower_qdq_to_int8(mod, dataclasses.replace(kernel_policy, layout="NHWC"))
    kernel_calls = nhwc[1].int8_kernel + nhwc[1].int8_depthwise
    added = _count_calls(nhwc[0], "relax.permute_dims") - _count_calls(nchw[0], "relax.permute_dims")
    return nhwc if added <= AUTO_NHWC_ADDED_TRANSPOSES * kernel_calls else nchw


def _calls(mod):
    """Every call in the Relax functions of ``mod``."""
    from tvm import relax

    found = []
    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def _count_calls(mod, op_name: str) -> int:
    return sum(1 for call in _calls(mod) if getattr(call.op, "name", "") == op_name)


def _lower_qdq_to_int8(mod, kernel_policy: Int8KernelPolicy | None):
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    pats = _patterns()
    stats = LoweringStats()
    emitter = _KernelEmitter(kernel_policy, mod) if kernel_policy is not None else None
    q_conv, conv_p, conv_bias_p, dq_x_p, dq_w_p, dq_b_p, x_q_p = pats["conv"]
    q_mm, mm_p, dq_a_p, dq_b_p2, a_q_p, b_q_p, mm_t_p, perm_b_p, mm_bias_p, dq_mb_p = pats["matmul"]

    def rewrite_conv(expr, m):
        conv = m[conv_p]
        dq_x, dq_w = m[dq_x_p], m[dq_w_p]
        sx, zx, _ = _dq_params(dq_x)
        sw, zw, w_axis = _dq_params(dq_w)
        sy = _const_value(expr.args[1])
        if sx.size != 1 or zx.size != 1 or sy.size != 1 or np.any(zw != 0) or \
                (sw.size > 1 and w_axis not in (0, -4)) or conv.attrs.data_layout != "NCHW" or \
                conv.attrs.kernel_layout != "OIHW":
            return expr
        w_int8 = _const_value(dq_w.args[0])
        b_q = None
        if conv_bias_p in m:
            dq_b = m[dq_b_p]
            b_q = _const_value(dq_b.args[0])
            if b_q.dtype != np.int32 or np.any(_const_value(dq_b.args[2]) != 0):
                return expr
            # the bias scale is sx·sw by construction; check it so that a foreign model is not misread
            if not np.allclose(_const_value(dq_b.args[1]), np.float32(sx.reshape(())) * sw.reshape(-1), rtol=1e-6):
                return expr
        multiplier = _multiplier(sx.reshape(()), sw.reshape(-1), sy.reshape(()))
        if emitter is not None and w_int8.dtype == np.int8:
            shape, groups = emitter.conv_shape(conv, m[x_q_p])
            if emitter.policy.keeps_float(groups):
                return expr
            call = emitter.call(shape, m[x_q_p], w_int8, b_q, int(zx.reshape(())), multiplier, expr) \
                if shape is not None and emitter.policy.takes(shape, groups) else None
            if call is not None:
                stats.conv2d += 1
                stats.int8_kernel += 1
                return call
        a = conv.attrs
        if emitter is not None and emitter.policy.layout == "NHWC" and w_int8.dtype == np.int8:
            call = _depthwise_unit(emitter, conv, m[x_q_p], w_int8, b_q, int(zx.reshape(())), multiplier, expr)
            if call is not None:
                stats.conv2d += 1
                stats.int8_depthwise += 1
                return call
        # a conv on 3 image channels off the kernel stays integer: measured slower on the float blocked
        # kernel (PP-OCRv4 det's first conv 0.70 -> 1.22 ms, 1 thread)
        if emitter is not None and (int(a.groups) > 1 or w_int8.shape[1] >= EXACT_FLOAT_MIN_IN_CHANNELS) \
                and _exact_in_float32(w_int8, m[x_q_p]):
            stats.exact_float += 1
            stats.conv2d += 1
            return _float_exact_conv(m[x_q_p], int(zx.reshape(())), w_int8, b_q, a, multiplier, expr)
        w_q = w_int8.astype(np.int16)
        data = _widen(m[x_q_p], int(zx.reshape(())))
        acc = relax.op.nn.conv2d(data, relax.const(w_q, "int16"), strides=a.strides, padding=a.padding,
                                 dilation=a.dilation, groups=a.groups, data_layout="NCHW", kernel_layout="OIHW",
                                 out_dtype="int32")
        if b_q is not None:
            acc = _add_bias(acc, b_q, w_q)
        stats.conv2d += 1
        return _requantize(acc, multiplier, expr, 1, 4)

    def rewrite_matmul(expr, m):
        dq_a, dq_b = m[dq_a_p], m[dq_b_p2]
        sa, za, _ = _dq_params(dq_a)
        sb, zb, b_axis = _dq_params(dq_b)
        sy = _const_value(expr.args[1])
        b_rank = _ndim(dq_b)
        b_expr = m[b_q_p]
        transposed = mm_t_p in m  # Gemm's transB: matmul(a, permute_dims(dequantize(w [N, K])))
        if transposed:
            permute = m[perm_b_p]
            if not _is_constant(b_expr) or b_rank != 2 or (permute.attrs.axes is not None and
                                                            [int(v) for v in permute.attrs.axes] != [1, 0]):
                return expr
            b_axis = {0: 1, -2: 1}.get(b_axis, -2)  # the channel axis of the transposed weight [K, N]
        if sa.size != 1 or za.size != 1 or sy.size != 1:
            return expr
        if sb.size > 1 and (b_rank != 2 or b_axis not in (1, -1) or np.any(zb != 0)):
            return expr
        b_const = _const_value(b_expr).T if transposed else (_const_value(b_expr) if _is_constant(b_expr) else None)
        bias = None
        if mm_bias_p in m:  # Gemm's C, quantized with scale sa·sb and zero point 0 (as the conv bias)
            dq_bias = m[dq_mb_p]
            bias = _const_value(dq_bias.args[0])
            if b_const is None or b_rank != 2 or bias.dtype != np.int32 or bias.size != b_const.shape[1] \
                    or np.any(_const_value(dq_bias.args[2]) != 0) or not np.allclose(
                        _const_value(dq_bias.args[1]), np.float32(sa.reshape(())) * sb.reshape(-1), rtol=1e-6):
                return expr
            bias = bias.reshape(-1)
        multiplier = _multiplier(sa.reshape(()), sb.reshape(-1), sy.reshape(()))
        if emitter is not None and b_const is not None and b_rank == 2 and np.all(zb == 0) \
                and b_const.dtype == np.int8:
            call = emitter.matmul_call(m[a_q_p], b_const, int(za.reshape(())), multiplier, expr, bias)
            if call is not None:
                stats.matmul += 1
                stats.int8_kernel += 1
                return call
        a = _widen(m[a_q_p], int(za.reshape(())))
        if b_const is not None and (sb.size > 1 or transposed):
            if zb.size > 1 and np.any(zb != 0):
                return expr
            b = relax.const((b_const.astype(np.int16) - np.int16(zb.reshape(-1)[0])).astype(np.int16), "int16")
        elif zb.size == 1:
            b = _widen(b_expr, int(zb.reshape(())))
        else:
            return expr
        acc = relax.op.matmul(a, b, out_dtype="int32")
        out_rank = _ndim(expr)
        if bias is not None:
            acc = _add_bias(acc, bias, np.ascontiguousarray(b_const.T), shape=(-1,))
        stats.matmul += 1
        return _requantize(acc, multiplier, expr, out_rank - 1, out_rank)

    deconv_p, deconv_w_p = pats["conv_transpose"]

    def constant_transposed_weight(expr, m):
        # dequantize(constant) evaluated here, as TVM's FoldConstant would, but early enough for the
        # transposed-conv rewrite of sculpt's kernels (kernels/transposed_conv.py: a 1x1 blocked conv and
        # a pixel shuffle) to see a constant weight instead of the naive conv2d_transpose loops
        weight = _dequantized_constant(m[deconv_w_p])
        if weight is None:
            return expr
        return relax.Call(expr.op, [expr.args[0], relax.const(weight, "float32")], expr.attrs)

    out = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            func = rewrite_call(q_conv, rewrite_conv, func)
            func = rewrite_call(q_mm, rewrite_matmul, func)
            if emitter is not None:
                func = rewrite_call(deconv_p, constant_transposed_weight, func)
        out[gvar] = func
    if emitter is not None:  # the kernels' PrimFuncs
        for gvar, func in emitter.builder.get().functions.items():
            out.setdefault(gvar, func)
    new_mod = type(mod)(out, attrs=mod.attrs) if mod.attrs is not None else type(mod)(out)
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    # Clip's bounds as constants and Clip as Relax ops (the float pipeline's first rewrites, earlier): the
    # importer's call_tir of maximum/minimum by a computed scalar stops every transpose and chain; then the
    # chains' divisions as products, with or without kernels
    new_mod = divisions_as_products(rewrite_clip_calls(fold_small_constants(new_mod)))
    if emitter is not None and emitter.funcs:
        stats.layout = kernel_policy.layout
        if kernel_policy.layout == "NHWC":
            new_mod = sink_permutes(new_mod)
        new_mod, stats.folded_chains = _fold_output_chains(new_mod, emitter)
    stats.left_float = _float_units(new_mod)
    if stats.exact_float:  # those float32 convs compute the integer units exactly: not left float
        left = stats.left_float.get("relax.nn.conv2d", 0) - stats.exact_float
        if left > 0:
            stats.left_float["relax.nn.conv2d"] = left
        else:
            stats.left_float.pop("relax.nn.conv2d", None)
    return new_mod, stats


def _fold_output_chains(mod, emitter: _KernelEmitter):
    """``mod`` with each elementwise chain after a kernel call (int8_chains.output_chains) computed in
    that kernel's epilogue; returns (module, chains folded)."""
    from tvm import relax

    planned = []
    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            planned += output_chains(func, emitter.is_kernel)
    if not planned:
        return mod, 0

    def before(call, rewriter, visit):
        for found in planned:
            if found.end.same_as(call):
                return emitter.with_chain(found.kernel_call, found.chain, visit(found.kernel_call.args[1]), rewriter)
        return None

    mod = rewrite_calls(mod, lambda call, rewriter: None, before=before)
    return relax.transform.DeadCodeElimination()(mod), len(planned)


def _depthwise_unit(emitter: _KernelEmitter, conv, x_q, w_q: np.ndarray, b_q: np.ndarray | None, zx: int,
                    multiplier: np.ndarray, out_q_call):
    """The int8 depthwise kernel's call for a depthwise unit (one input and one output channel per group)
    whose sums are exact in float32, or None."""
    shape, groups = emitter.conv_shape(conv, x_q)
    if shape is None or groups == 1 or shape.in_channels != 1 or shape.out_channels != groups:
        return None
    if not _exact_in_float32(w_q, x_q):
        return None
    all_channels = dataclasses.replace(shape, in_channels=groups, out_channels=groups)
    return emitter.depthwise_call(all_channels, x_q, w_q, b_q, zx, multiplier, out_q_call)


def _float_units(mod) -> dict[str, int]:
    """conv2d/matmul calls still computing in float32 (not rewritten)."""
    counts: dict[str, int] = {}
    for call in _calls(mod):
        name = getattr(call.op, "name", "")
        if name in ("relax.nn.conv2d", "relax.matmul") and _type_of(call).dtype == "float32":
            counts[name] = counts.get(name, 0) + 1
    return counts


def compile_int8(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None, target: str | dict = "llvm",
                 *, kernels: str = "sculpt", int8_kernel: bool = True):
    """Import a QDQ model, lower its quantized units to int8 compute, build (``kernels`` as in
    :func:`sculpt.backends.tvm.relax_import.build`; with sculpt's kernels and ``int8_kernel``, the conv
    units on the int8 conv kernel where the target has its instruction). Returns (executable,
    LoweringStats)."""
    mod = import_to_relax(model, input_shapes)
    policy = int8_kernel_policy(target) if kernels == "sculpt" and int8_kernel else None
    try:
        lowered, stats = lower_qdq_to_int8(mod, policy)
    except Exception as e:  # a TVM failure inside the rewrite: report in one line
        raise TVMImportError(f"int8 lowering failed: {one_line(e)}") from None
    return build(lowered, target, kernels=kernels), stats
