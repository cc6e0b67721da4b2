"""An int8 convolution with int32 accumulators and the requantization in its epilogue: the QDQ conv unit
``quantize(conv(dequantize(x_q), dequantize(w_q)) + bias)`` in one hand-scheduled PrimFunc, int8/uint8
in, int8/uint8 out, no float tensor between int8 layers.

The register tile is the fp32 blocked conv's (blocked_conv: a block of output channels is the vector
axis, a row of ``tw`` output pixels shares each weight load), with the multiply-add replaced by a
widening dot product of ``group`` input channels per int32 lane, the instruction the target has:

    x86 AVX2    vpmaddwd  int16 x int16, pairs summed into int32 (8 lanes x 2 channels), then vpaddd.
                Exact: |(x - offset) * w| < 2^15 * 2^7, a pair's sum fits int32 (vpmaddubsw, the u8 x s8
                instruction onnxruntime uses without VNNI, saturates its int16 pair sums instead).
    aarch64     sdot      int8 x int8, 4 channels summed into each int32 lane, accumulating (4 x 4),
                with the ``dotprod`` feature (Armv8.2-A+).
    x86 VNNI    vpdpbusd  uint8 x int8, 4 channels summed into each int32 lane, accumulating (AVX-512 VNNI
                with VL: 8 lanes in ymm0-31, or 16 in zmm; AVX-VNNI: 8 lanes, ymm0-15). Its sums wrap
                like vpaddd — not the saturating vpdpbusds — and cannot overflow here: 4 x 255 x 128 per
                step, the whole sum bounded by folded_bias's check. The unsigned operand is the input:
                uint8 data as is, int8 data + 128.

    for each block of ob output channels x one row x a tile of tw (or tw - 1) output columns (parallel
    over rows and blocks; a row's tiles differ by one column at most, none padded):
        acc[tw][ob] = 0                                          # tw * ob / lanes vector registers
        for cg, kh, kw:                                          # cg: groups of ``group`` input channels
            w = packed[block, cg, kh, kw, 0:ob, 0:group]         # ob / lanes vector loads
            for each of the tw pixels:
                acc[pixel] += dot(broadcast(xp[cg, ih, iw, 0:group]), w)
        y[n, o, oh, ow] = saturate(nearbyint(min(max(float32(acc + bias') * M, lo), hi)) + zy)

In NHWC (``layout``; the lowering's policy chooses it where the transposes around the calls cancel
between kernels) the input is read a pixel's channels at a time and the output written a vector of
channels at a time; in NCHW the pack gathers each group of channels from ``group`` planes and the
epilogue scatters each vector's lanes to ``lanes`` planes, one byte each.

Without padding, in NHWC, with whole groups of byte operands, there is no ``xp``: the conv reads each
group's word where it is in the input and XORs the offset in a register.

``xp`` is the input with the zero point moved: ``x - offset`` in the instruction's operand type (offset
= zx for int16 operands; 128 for uint8 / 0 for int8 data with int8 operands; 0 for uint8 / -128 for int8
data with uint8 operands), its channels grouped
innermost (each group one int32 word, built in a register), padded with ``zx - offset`` (the value of a
padded zero in the quantized domain); a 1x1 kernel's pack keeps only the pixels its stride reads. Then
``sum((x - zx) * w) = sum(xp * w) - (zx - offset) * sum(w)``, so the correction is folded into the
int32 bias (``bias'``): the accumulation is exact integer arithmetic on every target. The epilogue is
QuantizeLinear's (round half to even — ``nearbyint`` in the default rounding mode — add the zero point,
saturate); clamping to ``[qmin - zy, qmax - zy]`` before rounding equals saturating after it, and it is
also the folded Relu/Clip of a ``qdq`` model (uint8 with zero point 0). ``M = float32(sx * sw) / sy``
per output channel, as the Relax lowering (int8.py) and onnxruntime compute it.

Mechanism only: the functions here build the PrimFunc and pack its constants; int8.py decides which
units take it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape


@dataclass(frozen=True)
class DotInstruction:
    """A widening dot-product instruction: ``lanes`` int32 accumulators per vector, each the sum of
    ``group`` products of ``operand`` values (the input's ``group`` values are broadcast to all lanes)."""

    name: str
    lanes: int
    group: int
    operand: str          # the input's operand type: "int16", "int8" or "uint8"
    intrinsic: str        # the LLVM intrinsic
    accumulates: bool     # the intrinsic adds into its first operand (sdot) or returns the sum (pmaddwd)
    registers: int        # vector registers of the target

    @property
    def weight_operand(self) -> str:
        """The weights' operand type: int16 beside int16 inputs, int8 otherwise."""
        return "int16" if self.operand == "int16" else "int8"

    def offset(self, x_dtype: str, zx: int) -> int:
        """What is subtracted from the quantized input to make an operand."""
        if self.operand == "int16":
            return zx
        if self.operand == "uint8":
            return 0 if x_dtype == "uint8" else -128
        return 128 if x_dtype == "uint8" else 0


AVX2_PMADDWD = DotInstruction("avx2-pmaddwd", 8, 2, "int16", "llvm.x86.avx2.pmadd.wd", False, 16)
NEON_SDOT = DotInstruction("neon-sdot", 4, 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", True, 32)
# LLVM 22 declares vpdpbusd on <N x i32> accumulators and <4N x i8> multiplicands; AVX-VNNI's VEX form is
# the same intrinsic (LLVM picks the encoding from the target's features)
AVX512_VNNI_256 = DotInstruction("avx512-vnni-256", 8, 4, "uint8", "llvm.x86.avx512.vpdpbusd.256", True, 32)
AVX512_VNNI_512 = DotInstruction("avx512-vnni-512", 16, 4, "uint8", "llvm.x86.avx512.vpdpbusd.512", True, 32)
AVX_VNNI = DotInstruction("avx-vnni", 8, 4, "uint8", "llvm.x86.avx512.vpdpbusd.256", True, 16)


def instruction_for(traits) -> DotInstruction | None:
    """The dot instruction a target (TargetTraits) has, or None (the int8 units stay Relax ops)."""
    if traits.isa == "avx512" and traits.vnni:
        return AVX512_VNNI_256
    if traits.isa in ("avx2", "avx512") and traits.vnni:
        return AVX_VNNI
    if traits.isa in ("avx2", "avx512"):
        return AVX2_PMADDWD
    if traits.isa == "neon" and traits.dotprod:
        return NEON_SDOT
    return None


def wide_instruction_for(traits) -> DotInstruction | None:
    """The 512-bit vpdpbusd where the target runs it at full rate (``wide_at_full_rate``: twice the
    multiply-adds of the 256-bit form per cycle), or None. One 256 x 256 x 3x3 conv at 56 x 56 on an
    Intel Xeon with AMX (one thread): 8.84 ms in ymm, 6.15 in zmm; 512 x 512 at 14 x 14 2.14 vs 1.26."""
    if traits.isa == "avx512" and traits.vnni and traits.wide_at_full_rate:
        return AVX512_VNNI_512
    return None


@dataclass(frozen=True)
class Int8ConvTile:
    """Output channels per block (a multiple of the instruction's lanes) and output columns per tile."""

    ob: int
    tw: int

    def padded_channels(self, out_channels: int) -> int:
        return -(-out_channels // self.ob) * self.ob

    def column_tiles(self, out_width: int) -> tuple[tuple[int, int], ...]:
        """(count, width) of the row's column tiles, at most ``tw`` wide, in order: as many tiles as
        ``tw`` needs, their widths differing by one column at most (112 as 2 x 12 + 8 x 11, where
        ten tiles of 12 would compute 8 padded columns, 7% of the work)."""
        tiles = -(-out_width // self.tw)
        base, wider = divmod(out_width, tiles)
        return tuple((count, width) for count, width in ((wider, base + 1), (tiles - wider, base)) if count)


def _channel_vectors(out_channels: int, instr: DotInstruction) -> int:
    vectors = 2 if out_channels > instr.lanes else 1
    padded = lambda v: -(-out_channels // (v * instr.lanes)) * v * instr.lanes  # noqa: E731
    if vectors == 2 and instr.registers >= 32 and padded(3) < padded(2):
        vectors = 3
    return vectors


def padded_out_channels(out_channels: int, instr: DotInstruction) -> int:
    """The output channels the conv kernel computes for ``out_channels`` (whole blocks of its tile)."""
    block = _channel_vectors(out_channels, instr) * instr.lanes
    return -(-out_channels // block) * block


def int8_conv_tile(shape: ConvShape, instr: DotInstruction) -> Int8ConvTile:
    """Two vectors of output channels (one for narrow layers; three on 32 registers where that pads
    fewer channels: 24 outputs in 8-lane vectors, PP-OCR det's head and neck) and as many columns as the
    remaining accumulator registers hold (one register for the broadcast input, one per weight vector,
    one for the product of an instruction that does not accumulate, one spare)."""
    vectors = _channel_vectors(shape.out_channels, instr)
    free = instr.registers - 2 - vectors - (0 if instr.accumulates else 1)
    tw = max(1, min(free // vectors, shape.out_width, 12))
    # an even split of the row: 40 columns as 5 x 8 rather than 4 x 10 with a padded tail
    tiles = -(-shape.out_width // tw)
    tw = -(-shape.out_width // tiles)
    return Int8ConvTile(vectors * instr.lanes, tw)


def pack_int8_weight(w_q: np.ndarray, tile: Int8ConvTile, instr: DotInstruction) -> np.ndarray:
    """OIHW int8 -> [O/ob, ceil(I/group), KH, KW, ob * group] in the instruction's operand type: for
    each (channel group, tap), ob output channels x ``group`` input channels contiguous (one vector per
    ``lanes`` outputs); the extra output and input channels are zero weights."""
    o, i, kh, kw = w_q.shape
    g = instr.group
    ocp, icp = tile.padded_channels(o), -(-i // g) * g
    full = np.zeros((ocp, icp, kh, kw), np.int64)
    full[:o, :i] = w_q
    packed = full.reshape(ocp // tile.ob, tile.ob, icp // g, g, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(packed.reshape(ocp // tile.ob, icp // g, kh, kw, tile.ob * g)).astype(instr.weight_operand)


# a bias part that is a multiple of this is exact in float32 up to 2^31 (24 significant bits)
_FLOAT32_EXACT_STEP = 2 ** 7


def folded_bias(w_q: np.ndarray, bias_q: np.ndarray | None, zx: int, offset: int, channels: int,
                multiplier: np.ndarray, zy: int, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(weights, int32 bias zero-padded to ``channels``): bias - (zx - offset) * sum(w) per output
    channel. A channel whose int32 bias is so large that its sum could overflow int32 (a bias
    quantized with a tiny weight scale saturates at -2^31 in real models) has the same output for
    every input; it gets zero weights and a bias of the same output instead. OverflowError when such a
    channel's output is not constant (``wide_folded_bias`` takes those)."""
    w, b, rest = wide_folded_bias(w_q, bias_q, zx, offset, channels, multiplier, zy, out_dtype)
    if rest is not None:
        c = int(np.flatnonzero(rest)[0])
        raise OverflowError(f"output channel {c}: its int32 bias {int(b[c]) + int(rest[c])} may overflow "
                            "the accumulator")
    return w, b


def wide_folded_bias(w_q: np.ndarray, bias_q: np.ndarray | None, zx: int, offset: int, channels: int,
                     multiplier: np.ndarray, zy: int, out_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``folded_bias`` that also takes the channels whose output is not constant: (weights, int32
    bias, float32 rest or None). Such a channel's bias is split into an int32 part within 64 of zero,
    added to the accumulator, and a rest, a multiple of 2^7 (exact in float32), that the kernel's
    ``wide`` epilogue adds in float64 — where the sum is exact, so its float32 is the int64 sum's."""
    o = w_q.shape[0]
    w = np.array(w_q)
    b = np.zeros(channels, np.int64)
    if bias_q is not None:
        b[:o] = bias_q.reshape(-1)
    b[:o] -= (zx - offset) * w.reshape(o, -1).astype(np.int64).sum(axis=1)
    reach = np.abs(w.reshape(o, -1).astype(np.int64)).sum(axis=1) * 256  # |sum(x' * w)| < reach
    risky = np.flatnonzero(np.abs(b[:o]) + reach >= 2 ** 31)
    rest = None
    if risky.size:
        qmin, qmax = quantized_range(out_dtype)
        m = np.broadcast_to(np.asarray(multiplier, np.float32).reshape(-1), (o,))

        def out(acc, c):
            return np.clip(np.rint(np.float32(acc) * m[c]) + zy, qmin, qmax)

        for c in risky:
            small = int(np.clip(b[c], -2 ** 30, 2 ** 30))
            if out(b[c] - reach[c], c) == out(b[c] + reach[c], c) == out(small, c):
                w[c] = 0
                b[c] = small
                continue
            if reach[c] + _FLOAT32_EXACT_STEP >= 2 ** 31:
                raise OverflowError(f"output channel {c}: its sums may overflow int32 without the bias")
            rest = split_bias(b, c, rest)
    return w, b.astype(np.int32), rest


def split_bias(b: np.ndarray, c: int, rest: np.ndarray | None) -> np.ndarray:
    """Move channel ``c``'s int64 bias ``b[c]`` but a part within 64 of zero to the float32 ``rest``
    (made as zeros of b's size when None), as a multiple of 2^7, exact in float32; returns ``rest``."""
    rest = np.zeros(b.size, np.float32) if rest is None else rest
    part = int(np.rint(b[c] / _FLOAT32_EXACT_STEP)) * _FLOAT32_EXACT_STEP
    rest[c] = np.float32(part)
    b[c] -= part
    return rest


def padded_multiplier(multiplier: np.ndarray, out_channels: int, channels: int) -> np.ndarray:
    m = np.zeros(channels, np.float32)
    m[:out_channels] = np.broadcast_to(np.asarray(multiplier, np.float32).reshape(-1), (out_channels,))
    return m


def quantized_range(dtype: str) -> tuple[int, int]:
    """The saturation bounds of QuantizeLinear's output type."""
    return (0, 255) if dtype == "uint8" else (-128, 127)


def requantized(total, mult, lanes: int, out_dtype: str, zy: int, chain=None, rest=None):
    """The kernels' epilogue on ``lanes`` int32 sums ``total`` (accumulator + bias) with their float32
    multipliers ``mult``: the quantized output clamp(round_half_even(float32(total) * mult) + zy) to
    ``out_dtype``'s range as int32 lanes; with ``chain`` (a quantized_chain.QuantizedChain), the chain's
    output for it instead. ``rest`` (float32 lanes, wide_folded_bias): a bias part added in float64."""
    from tvm import tirx

    qmin, qmax = quantized_range(out_dtype)
    vec_f32, vec_i32, vec_f64 = f"float32x{lanes}", f"int32x{lanes}", f"float64x{lanes}"
    if rest is not None:  # exact in float64; float32 of it rounds once, as float32 of the int64 sum
        total = tirx.Cast(vec_f64, total) + tirx.Cast(vec_f64, rest)
    scaled = tirx.Cast(vec_f32, total) * mult
    clamped = tirx.Min(tirx.Max(scaled, tirx.Broadcast(tirx.FloatImm("float32", qmin - zy), lanes)),
                       tirx.Broadcast(tirx.FloatImm("float32", qmax - zy), lanes))
    rounded = tirx.nearbyint(clamped)
    if chain is not None:  # the chain dequantizes float32(q - in_zero): the rounded value plus a small integer
        return chain.apply(rounded, lanes, zy)
    return tirx.Cast(vec_i32, rounded) + tirx.Broadcast(tirx.IntImm("int32", zy), lanes)


def int8_conv_func(s: ConvShape, tile: Int8ConvTile, instr: DotInstruction, x_dtype: str, out_dtype: str,
                   zx: int, zy: int, parallel: bool = True, layout: str = "NCHW", chain=None, wide: bool = False):
    """The scheduled PrimFunc (x [N,C,H,W] x_dtype, packed weight, folded bias [OCp] int32,
    multiplier [OCp] float32) -> y [N,OC,OH,OW] out_dtype; with ``layout="NHWC"``, x [N,H,W,C] and
    y [N,OH,OW,OC]: the pack reads each pixel's channels contiguously (a group of 4 byte operands is one
    word of the input, its offset an XOR) and each output vector is one store of ``lanes`` channels,
    where NCHW writes its lanes one byte at a time to ``lanes`` planes. With ``chain`` (a
    quantized_chain.QuantizedChain), y holds the chain's output for each quantized output, in the
    chain's ``out_dtype`` (an elementwise function after the unit folded into its epilogue). With
    ``wide``, the multiplier argument is followed by each channel's float32 bias rest (wide_folded_bias)."""
    from tvm.script import tirx as T

    n_, c_, h_, w_ = s.batch, s.in_channels, s.height, s.width
    oc, oh_, ow_ = s.out_channels, s.out_height, s.out_width
    kh_, kw_ = s.kernel
    (sh, sw), (dh, dw), (pt, pl, _, _) = s.strides, s.dilation, s.padding
    g, lanes, op, wop = instr.group, instr.lanes, instr.operand, instr.weight_operand
    ob = tile.ob
    vectors = ob // lanes
    cg_ = -(-c_ // g)
    ocp = tile.padded_channels(oc)
    blocks = ocp // ob
    col_tiles = tile.column_tiles(ow_)
    # a 1x1 kernel reads only every stride-th pixel: the pack keeps those alone and the conv steps by 1
    psh, psw = (sh, sw) if (kh_, kw_) == (1, 1) else (1, 1)
    csh, csw = sh // psh, sw // psw
    hp = (oh_ - 1) * csh + dh * (kh_ - 1) + 1
    wp = (ow_ - 1) * csw + dw * (kw_ - 1) + 1
    # the rows and columns of xp that hold input pixels: [h_lo, h_hi) x [w_lo, w_hi)
    h_lo, h_hi = -(-pt // psh), min(hp, -(-(h_ + pt) // psh))
    w_lo, w_hi = min(wp, -(-pl // psw)), min(wp, -(-(w_ + pl) // psw))
    w_hi = max(w_hi, w_lo)
    offset = instr.offset(x_dtype, zx)
    pad_value = zx - offset
    vec_i32, vec_op = f"int32x{lanes}", f"{op}x{lanes * g}"
    group_int = {2: "int32", 4: "int32"}[g * (2 if op == "int16" else 1)]
    bits = 16 if op == "int16" else 8  # one operand's bits in the group word
    mask = (1 << bits) - 1
    pad_word = sum((pad_value & mask) << (gi * bits) for gi in range(g))
    pad_word = pad_word - (1 << 32) if pad_word >= 1 << 31 else pad_word  # as an int32
    pad_tasks, conv_tasks = n_ * hp, n_ * blocks * oh_
    accumulates = instr.accumulates
    intrinsic = instr.intrinsic
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"int8 conv layout {layout!r}: NCHW or NHWC")
    nhwc = layout == "NHWC"
    x_shape, y_shape = ((n_, h_, w_, c_), (n_, oh_, ow_, oc)) if nhwc else ((n_, c_, h_, w_), (n_, oc, oh_, ow_))
    # NHWC with whole groups of byte operands: a group is 4 adjacent input bytes, and subtracting the
    # offset (0 or +-128) from each byte modulo 256 is an XOR of the word with 0x80 per byte
    word_copy = nhwc and c_ % g == 0 and bits == 8 and g == 4
    xor_word = sum(((-offset) & mask) << (gi * bits) for gi in range(g))
    xor_word = xor_word - (1 << 32) if xor_word >= 1 << 31 else xor_word
    # no padding, whole groups of bytes in NHWC: no packed copy at all; the conv reads the input's words in
    # place (XOR-ed in a register)
    direct = word_copy and accumulates and not any(s.padding)
    stored = chain.out_dtype if chain is not None else out_dtype
    vec_out = f"{stored}x{lanes}"
    full_vectors = oc % lanes == 0

    def column_tile(width: int):
        """One tile of ``width`` output columns from column ``col`` of the task's row and block: the
        accumulators zeroed, the dot products, the epilogue, the stores."""

        @T.macro
        def tile(x, xw, xp, wt, bias, mult, rest, y, task, col):
            acc = T.decl_buffer((width * vectors * lanes,), "int32", scope="local")
            out = T.decl_buffer((width * vectors * lanes,), "int32", scope="local")
            for a in T.unroll(width * vectors):
                acc[T.ramp(a * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
            for cg, r, t in T.grid(cg_, kh_, kw_):
                for p in T.unroll(width):
                    for v in T.unroll(vectors):
                        if direct:
                            acc[T.ramp((p * vectors + v) * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                                vec_i32, intrinsic, acc[T.ramp((p * vectors + v) * lanes, 1, lanes)],
                                T.reinterpret(vec_op, T.broadcast(T.bitwise_xor(xw[
                                    task // (blocks * oh_), (task % oh_) * sh + r * dh,
                                    (col + p) * sw + t * dw, cg], xor_word), lanes)),
                                wt[task // oh_ % blocks, cg, r, t, T.ramp(v * lanes * g, 1, lanes * g)])
                        elif accumulates:
                            acc[T.ramp((p * vectors + v) * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                                vec_i32, intrinsic, acc[T.ramp((p * vectors + v) * lanes, 1, lanes)],
                                T.reinterpret(vec_op, T.broadcast(xp[
                                    task // (blocks * oh_), (task % oh_) * csh + r * dh,
                                    (col + p) * csw + t * dw, cg], lanes)),
                                wt[task // oh_ % blocks, cg, r, t, T.ramp(v * lanes * g, 1, lanes * g)])
                        else:
                            acc[T.ramp((p * vectors + v) * lanes, 1, lanes)] = \
                                acc[T.ramp((p * vectors + v) * lanes, 1, lanes)] + T.call_llvm_pure_intrin(
                                    vec_i32, intrinsic,
                                    T.reinterpret(vec_op, T.broadcast(xp[
                                        task // (blocks * oh_), (task % oh_) * csh + r * dh,
                                        (col + p) * csw + t * dw, cg], lanes)),
                                    wt[task // oh_ % blocks, cg, r, t, T.ramp(v * lanes * g, 1, lanes * g)])
            for p in T.unroll(width):
                for v in T.unroll(vectors):
                    out[T.ramp((p * vectors + v) * lanes, 1, lanes)] = requantized(
                        acc[T.ramp((p * vectors + v) * lanes, 1, lanes)]
                        + bias[T.ramp((task // oh_ % blocks) * ob + v * lanes, 1, lanes)],
                        mult[T.ramp((task // oh_ % blocks) * ob + v * lanes, 1, lanes)], lanes, out_dtype, zy,
                        chain, rest[T.ramp((task // oh_ % blocks) * ob + v * lanes, 1, lanes)] if wide else None)
            if nhwc:
                for p in T.unroll(width):
                    for v in T.unroll(vectors):
                        if full_vectors:
                            if (task // oh_ % blocks) * ob + v * lanes < oc:
                                y[task // (blocks * oh_), task % oh_, col + p,
                                  T.ramp((task // oh_ % blocks) * ob + v * lanes, 1, lanes)] = \
                                    T.Cast(vec_out, out[T.ramp((p * vectors + v) * lanes, 1, lanes)])
                        else:
                            for lane in T.serial(lanes):
                                if (task // oh_ % blocks) * ob + v * lanes + lane < oc:
                                    y[task // (blocks * oh_), task % oh_, col + p,
                                      (task // oh_ % blocks) * ob + v * lanes + lane] = \
                                        T.Cast(stored, out[(p * vectors + v) * lanes + lane])
            else:
                for v, lane, p in T.grid(vectors, lanes, width):
                    if (task // oh_ % blocks) * ob + v * lanes + lane < oc:
                        y[task // (blocks * oh_), (task // oh_ % blocks) * ob + v * lanes + lane, task % oh_,
                          col + p] = T.Cast(stored, out[(p * vectors + v) * lanes + lane])

        return tile

    (wide_count, wide_width), (narrow_count, narrow_width) = (col_tiles * 2)[:2]
    two_widths = len(col_tiles) == 2
    wide_tile, narrow_tile = column_tile(wide_width), column_tile(narrow_width)

    @T.prim_func(private=True)
    def int8_conv(x: T.Buffer(x_shape, x_dtype), wt: T.Buffer((blocks, cg_, kh_, kw_, ob * g), wop),
                  bias: T.Buffer((ocp,), "int32"), mult: T.Buffer((ocp * (2 if wide else 1),), "float32"),
                  y: T.Buffer(y_shape, stored)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        rest = T.decl_buffer((ocp,), "float32", data=mult.data, elem_offset=ocp)  # with wide
        xw = T.decl_buffer((n_, h_, w_, cg_), "int32", data=x.data)  # NHWC x as words of 4 channels (direct)
        # xp[n, row, col, cg]: the ``group`` operands of channel group cg as one int32 word (operand gi in
        # bits gi * bits, little-endian, as the dot instruction reads the bytes), built in a register and
        # stored once; channel groups outside, columns inside, so the input is read along its rows and
        # the padding columns and rows are written apart, without a test per element
        xp = T.alloc_buffer((n_, hp, wp, cg_) if not direct else (1,), group_int)
        if not direct:  # the packed copy
            for task in T.parallel(pad_tasks) if parallel else T.serial(pad_tasks):
                if nhwc and task % hp >= h_lo and task % hp < h_hi:
                    for ww, cg in T.grid(w_lo, cg_):
                        xp[task // hp, task % hp, ww, cg] = pad_word
                    for ww, cg in T.grid(w_hi - w_lo, cg_):
                        if word_copy:
                            xp[task // hp, task % hp, ww + w_lo, cg] = T.bitwise_xor(
                                T.bitwise_or(T.bitwise_or(
                                    T.Cast("int32", T.reinterpret("uint8", x[task // hp, (task % hp) * psh - pt,
                                                                             (ww + w_lo) * psw - pl, cg * 4])),
                                    T.shift_left(T.Cast("int32", T.reinterpret("uint8", x[
                                        task // hp, (task % hp) * psh - pt, (ww + w_lo) * psw - pl, cg * 4 + 1])), 8)),
                                    T.bitwise_or(
                                    T.shift_left(T.Cast("int32", T.reinterpret("uint8", x[
                                        task // hp, (task % hp) * psh - pt, (ww + w_lo) * psw - pl, cg * 4 + 2])), 16),
                                    T.shift_left(T.Cast("int32", T.reinterpret("uint8", x[
                                        task // hp, (task % hp) * psh - pt, (ww + w_lo) * psw - pl, cg * 4 + 3])), 24))),
                                xor_word)
                        else:
                            word = T.decl_buffer((1,), "int32", scope="local")
                            word[0] = 0
                            for gi in T.unroll(g):
                                word[0] = word[0] | T.shift_left(T.bitwise_and(T.if_then_else(
                                    cg * g + gi < c_,
                                    T.Cast("int32", x[task // hp, (task % hp) * psh - pt, (ww + w_lo) * psw - pl,
                                                      cg * g + gi]) - offset,
                                    pad_value), mask), gi * bits)
                            xp[task // hp, task % hp, ww + w_lo, cg] = word[0]
                    for ww, cg in T.grid(wp - w_hi, cg_):
                        xp[task // hp, task % hp, ww + w_hi, cg] = pad_word
                elif task % hp >= h_lo and task % hp < h_hi:
                    for cg in T.serial(cg_):
                        for ww in T.serial(w_lo):
                            xp[task // hp, task % hp, ww, cg] = pad_word
                        for ww in T.serial(w_hi - w_lo):
                            word = T.decl_buffer((1,), "int32", scope="local")
                            word[0] = 0
                            for gi in T.unroll(g):
                                word[0] = word[0] | T.shift_left(T.bitwise_and(T.if_then_else(
                                    cg * g + gi < c_,
                                    T.Cast("int32", x[task // hp, cg * g + gi, (task % hp) * psh - pt,
                                                      (ww + w_lo) * psw - pl]) - offset,
                                    pad_value), mask), gi * bits)
                            xp[task // hp, task % hp, ww + w_lo, cg] = word[0]
                        for ww in T.serial(wp - w_hi):
                            xp[task // hp, task % hp, ww + w_hi, cg] = pad_word
                else:
                    for ww, cg in T.grid(wp, cg_):
                        xp[task // hp, task % hp, ww, cg] = pad_word
        for task in T.parallel(conv_tasks) if parallel else T.serial(conv_tasks):
            for wo in T.serial(wide_count):
                wide_tile(x, xw, xp, wt, bias, mult, rest, y, task, wo * wide_width)
            if two_widths:
                for wo in T.serial(narrow_count):
                    narrow_tile(x, xw, xp, wt, bias, mult, rest, y, task, wide_count * wide_width + wo * narrow_width)

    return int8_conv
