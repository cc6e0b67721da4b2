"""An int8 depthwise convolution over NHWC activations, with the requantization in its epilogue: the QDQ
depthwise unit ``quantize(conv(dequantize(x_q), dequantize(w_q), groups=C) + bias)`` in one PrimFunc,
int8/uint8 in, int8/uint8 out, channels innermost so that it sits between NHWC int8 conv kernels
(int8_conv) without a transpose.

A depthwise conv has no reduction over channels, so there is nothing for a dot-product instruction to
sum: each output is ``kh * kw`` products. Those run as float32 multiply-adds, exactly: ``x - zx`` is an
integer of magnitude at most 255, the weights are int8, and the caller takes a unit only when every
partial sum stays below 2^24, where float32 holds every integer (int8.py's ``_exact_in_float32`` test), so
the float accumulator equals the int32 one; the int32 bias is added to it as an integer.

    for each (image, block of ``lanes`` channels, band of th output rows) (parallel):
        band[r, col, 0:lanes] = float32(x[row, col, block] - zx), 0 outside the image    # once per band
        for each output row of the band, each tile of tw output columns:
            acc[tw] = 0                                           # tw vector registers
            for kh, kw: acc[p] += band[row*s + kh*d, (col+p)*s + kw*d, :] * w[kh, kw, block]
            y[n, oh, ow, block] = saturate(nearbyint(min(max(float32(int32(acc) + bias) * M, lo), hi)) + zy)

One vector is ``lanes`` channels of one pixel, for any width or stride; a band's input rows are
converted once, not once per tap. The epilogue is the int8 conv kernel's (QuantizeLinear's round half
to even and saturation, ``M = float32(sx * sw) / sy`` per channel).

Mechanism only: the functions here build the PrimFunc and lay out its constants; int8.py decides which
units take it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.int8_conv import padded_multiplier, requantized, split_bias

# a band's float32 input rows fit in this many bytes: at stride 1, in L2 (each input row is converted
# once per band that reads it, (th - 1 + kh) / th times: tall bands convert less), at stride 2 in L1 (its
# bands read each row about twice whatever their height). One depthwise unit alone, 1 thread, an Intel
# Xeon, 32 KiB -> 128 KiB bands: 240 channels 5x5 at 12x80 0.156 -> 0.127 ms, 480 5x5 at 6x80 0.154 ->
# 0.132, 64 3x3 at 24x160 0.107 -> 0.079, 96 5x5 at 100x76 0.527 -> 0.44, 48 3x3 at 200x152 0.70 -> 0.52;
# at stride 2 taller bands measured up to 10% slower (96 3x3 at 200x152: 0.74 ms with 1 row, 0.79-0.82
# with 2-8)
BAND_BYTES = 32 * 1024
STRIDE_ONE_BAND_BYTES = 128 * 1024
# bands are split further while the unit has fewer tasks (channel blocks x bands) than this: work for
# two or more threads
MIN_TASKS = 4
# output columns per register tile (one accumulator each; the rest of the registers hold the weight and
# input vectors of the taps)
MAX_TILE_COLUMNS = 8


@dataclass(frozen=True)
class Int8DepthwiseTile:
    """``lanes`` channels per vector, ``th`` output rows per band, ``tw`` output columns per tile."""

    lanes: int
    th: int
    tw: int

    def padded_channels(self, channels: int) -> int:
        return -(-channels // self.lanes) * self.lanes


def int8_depthwise_tile(shape: ConvShape, lanes: int, registers: int) -> Int8DepthwiseTile:
    """Columns: up to MAX_TILE_COLUMNS accumulators (fewer on a target with under 12 vector registers),
    an even split of the row; rows per band: as many as keep the band's float rows within
    STRIDE_ONE_BAND_BYTES (stride 1) or BAND_BYTES, and leave MIN_TASKS tasks (at least one row), an
    even split of the output's rows."""
    budget = min(MAX_TILE_COLUMNS, registers - 4)
    tiles = -(-shape.out_width // max(1, min(budget, shape.out_width)))
    tw = -(-shape.out_width // tiles)
    sh, dh, kh = shape.strides[0], shape.dilation[0], shape.kernel[0]
    width = _band_width(shape, tw)
    budget = STRIDE_ONE_BAND_BYTES if sh == 1 else BAND_BYTES
    th = shape.out_height
    while th > 1 and ((th - 1) * sh + dh * (kh - 1) + 1) * width * lanes * 4 > budget:
        th -= 1
    blocks = -(-shape.out_channels // lanes)
    while th > 1 and blocks * -(-shape.out_height // th) < MIN_TASKS:
        th -= 1
    bands = -(-shape.out_height // th)  # an even split of the rows
    return Int8DepthwiseTile(lanes, -(-shape.out_height // bands), tw)


def _band_width(shape: ConvShape, tw: int) -> int:
    owp = -(-shape.out_width // tw) * tw
    return (owp - 1) * shape.strides[1] + shape.dilation[1] * (shape.kernel[1] - 1) + 1


def depthwise_constants(w_q: np.ndarray, b_q: np.ndarray | None, multiplier: np.ndarray,
                        tile: Int8DepthwiseTile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights [KH, KW, Cp] float32, bias [Cp] int32, multiplier [Cp] float32, then with a ``wide`` kernel
    each channel's bias rest [Cp] float32) from the unit's int8 weights [C, 1, KH, KW], int32 bias and
    per-channel multiplier; the padding channels are zero. A channel whose bias and sums could overflow
    int32 keeps a bias within 64 of zero; the rest goes to the float64 epilogue (int8_conv.split_bias)."""
    c, _, kh, kw = w_q.shape
    cp = tile.padded_channels(c)
    w = np.zeros((kh, kw, cp), np.float32)
    w[:, :, :c] = w_q[:, 0].transpose(1, 2, 0)
    b = np.zeros(cp, np.int64)
    if b_q is not None:
        b[:c] = b_q.reshape(-1)
    reach = np.zeros(cp, np.int64)
    reach[:c] = np.abs(w_q.reshape(c, -1).astype(np.int64)).sum(axis=1) * 256
    rest = None
    for channel in np.flatnonzero(np.abs(b) + reach >= 2 ** 31):
        rest = split_bias(b, int(channel), rest)
    mult = padded_multiplier(multiplier, c, cp)
    return w, b.astype(np.int32), mult if rest is None else np.concatenate([mult, rest])


def int8_depthwise_func(s: ConvShape, tile: Int8DepthwiseTile, x_dtype: str, out_dtype: str, zx: int, zy: int,
                        parallel: bool = True, chain=None, wide: bool = False):
    """The scheduled PrimFunc (x [N,H,W,C] x_dtype, weights [KH,KW,Cp] float32, bias [Cp] int32,
    multiplier [Cp] float32) -> y [N,OH,OW,C] out_dtype, for the depthwise ``s`` (``in_channels`` =
    ``out_channels`` = C, one channel per group). The int32 bias plus the sum stays within int32 (depthwise_constants). With
    ``chain``, y holds the chain's output for each quantized output; with ``wide``, the multiplier is
    followed by each channel's bias rest, added in float64 (int8_conv_func, depthwise_constants)."""
    from tvm.script import tirx as T

    n_, c_, h_, w_ = s.batch, s.in_channels, s.height, s.width
    oh_, ow_ = s.out_height, s.out_width
    kh_, kw_ = s.kernel
    (sh, sw), (dh, dw), (pt, pl, _, _) = s.strides, s.dilation, s.padding
    lanes, th, tw = tile.lanes, tile.th, tile.tw
    cp = tile.padded_channels(c_)
    cblocks = cp // lanes
    bands = -(-oh_ // th)
    wtiles = -(-ow_ // tw)
    rows = (th - 1) * sh + dh * (kh_ - 1) + 1
    cols = _band_width(s, tw)
    # the band's columns that hold input pixels: [w_lo, w_hi)
    w_lo, w_hi = min(cols, pl), min(cols, w_ + pl)
    tasks = n_ * cblocks * bands
    stored = chain.out_dtype if chain is not None else out_dtype
    vec_f32, vec_i32, vec_out = f"float32x{lanes}", f"int32x{lanes}", f"{stored}x{lanes}"
    full_vectors = c_ % lanes == 0
    full_rows = oh_ % th == 0
    full_width = wtiles * tw == ow_

    @T.prim_func(private=True)
    def int8_depthwise(x: T.Buffer((n_, h_, w_, c_), x_dtype), wt: T.Buffer((kh_, kw_, cp), "float32"),
                       bias: T.Buffer((cp,), "int32"), mult: T.Buffer((cp * (2 if wide else 1),), "float32"),
                       y: T.Buffer((n_, oh_, ow_, c_), stored)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        rest = T.decl_buffer((cp,), "float32", data=mult.data, elem_offset=cp)  # with wide
        for task in T.parallel(tasks) if parallel else T.serial(tasks):
            band = T.decl_buffer((rows * cols * lanes,), "float32")
            # task = (image, channel block, band of rows); the band's first input row
            for r in T.serial(rows):
                if (task % bands) * th * sh + r - pt >= 0 and (task % bands) * th * sh + r - pt < h_:
                    for col in T.serial(w_lo):
                        band[T.ramp((r * cols + col) * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                    for col in T.serial(w_hi - w_lo):
                        if full_vectors:
                            band[T.ramp((r * cols + col + w_lo) * lanes, 1, lanes)] = T.Cast(vec_f32, x[
                                task // (cblocks * bands), (task % bands) * th * sh + r - pt, col + w_lo - pl,
                                T.ramp(task // bands % cblocks * lanes, 1, lanes)]) - T.broadcast(T.float32(zx), lanes)
                        else:
                            for lane in T.serial(lanes):
                                band[(r * cols + col + w_lo) * lanes + lane] = T.if_then_else(
                                    task // bands % cblocks * lanes + lane < c_,
                                    T.Cast("float32", x[task // (cblocks * bands), (task % bands) * th * sh + r - pt,
                                                        col + w_lo - pl,
                                                        T.min(task // bands % cblocks * lanes + lane, c_ - 1)])
                                    - T.float32(zx), T.float32(0))
                    for col in T.serial(cols - w_hi):
                        band[T.ramp((r * cols + col + w_hi) * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                else:
                    for col in T.serial(cols):
                        band[T.ramp((r * cols + col) * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
            for row in T.serial(th):
                if full_rows or (task % bands) * th + row < oh_:
                    for wo in T.serial(wtiles):
                        acc = T.decl_buffer((tw * lanes,), "float32", scope="local")
                        out = T.decl_buffer((tw * lanes,), "int32", scope="local")
                        for p in T.unroll(tw):
                            acc[T.ramp(p * lanes, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for r, t in T.grid(kh_, kw_):
                            for p in T.unroll(tw):
                                acc[T.ramp(p * lanes, 1, lanes)] = acc[T.ramp(p * lanes, 1, lanes)] + band[T.ramp(
                                    ((row * sh + r * dh) * cols + (wo * tw + p) * sw + t * dw) * lanes, 1, lanes)] \
                                    * wt[r, t, T.ramp(task // bands % cblocks * lanes, 1, lanes)]
                        for p in T.unroll(tw):
                            out[T.ramp(p * lanes, 1, lanes)] = requantized(
                                T.Cast(vec_i32, acc[T.ramp(p * lanes, 1, lanes)])
                                + bias[T.ramp(task // bands % cblocks * lanes, 1, lanes)],
                                mult[T.ramp(task // bands % cblocks * lanes, 1, lanes)], lanes, out_dtype, zy,
                                chain, rest[T.ramp(task // bands % cblocks * lanes, 1, lanes)] if wide else None)
                        for p in T.unroll(tw):
                            if full_width or wo * tw + p < ow_:
                                if full_vectors:
                                    y[task // (cblocks * bands), (task % bands) * th + row, wo * tw + p,
                                      T.ramp(task // bands % cblocks * lanes, 1, lanes)] = \
                                        T.Cast(vec_out, out[T.ramp(p * lanes, 1, lanes)])
                                else:
                                    for lane in T.serial(lanes):
                                        if task // bands % cblocks * lanes + lane < c_:
                                            y[task // (cblocks * bands), (task % bands) * th + row, wo * tw + p,
                                              task // bands % cblocks * lanes + lane] = \
                                                T.Cast(stored, out[p * lanes + lane])

    return int8_depthwise
