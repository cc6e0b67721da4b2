"""Relax rewrite: a matmul whose constant weight is a 4-bit quantized weight (``weight-quant``'s
int4 codes times per-column or per-group scales, folded to float32 by ``canonicalize``) keeps the
weight packed at 4 bits in the compiled module and unpacks it inside its kernel (8-bit weights: a
byte a code, below).

Why the weights are found in float32 constants: ``sculpt compile`` canonicalizes first, and constant
folding evaluates the weights' DequantizeLinear in onnxruntime, so the Relax module holds
``float32(code) * scale`` (one rounding). TVM 0.27's importer cannot take the int4 initializers
anyway (``TensorCopyFromBytes: size mismatch``: it expects a byte per element) nor MatMulNBits (no
converter). The rewrite recovers the codes and scales from the float32 weight and accepts them only
when they reproduce every weight bit for bit (:func:`int4_codes`); a float weight never passes, so
nothing but quantized weights changes, and the kernel computes with exactly the same weights.

``x [.., M, K] @ W [K, N]`` becomes ``call_tir(int4_matmul, x [M, K], Wp, S) -> [M, P * nb]`` (then
a slice and a reshape that fuse with the bias add after them), with

- ``Wp`` int8 ``[P, K, L]``: panel ``p`` of ``nb = 2L`` columns (``L`` = the target's float32 lanes),
  byte ``t`` of row ``k`` holding column ``p*nb + t`` in its low nibble and ``p*nb + L + t`` in its
  high nibble (two's complement), zero codes past ``N``: K * N / 2 bytes;
- ``S`` float32 ``[G, P * nb]``: one scale per column (``G = 1``) or per group of ``group`` rows.

The kernel (TVMScript, scheduled in its loops), per panel (the parallel axis): unpack the panel's
codes into a ``[K, nb]`` float32 buffer once (sign-extended nibbles by vector shifts, converted,
times their scale), then for every tile of ``R`` rows a register tile of ``R x 2`` vector
accumulators over the whole reduction, a broadcast of ``x[i, k]`` times the two unpacked vectors.
The unpacking is 1/M of the multiply-adds; the packed panel is read once. With one row tile (a
matrix-vector product) the codes are unpacked in registers at each step instead.

8-bit weights (``weight-quant:bits=8``: codes up to +-127) that have no int4 form take the same
path with one byte a code (``Wp`` int8 ``[P, K, nb]``).

Convolution weights are not rewritten: they stay float32 constants (sculpt's blocked conv repacks
them at build time). A dequantizing ``call_tir`` of its own in front of the conv would not keep
them packed: Relax's FoldConstant evaluates a call_tir whose arguments are all constants and folds
it back into a float32 constant. The unpacking has to be inside the conv kernel's definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import OPAQUE_PATTERN, constant_value, rewrite_calls, static_shape

CODE_RANGE = {4: (-8, 7), 8: (-128, 127)}  # int4, int8
MIN_ELEMENTS = 1024  # smaller weights stay float32 (weight-quant's own default floor)
GROUP_SIZES = (256, 128, 64, 32, 16)  # tried after per-column scales, largest first
MAX_ROW_TILE = 12
# the scale of a group is found from its largest magnitude: that element's code is +-m for one m
# (7 for weight-quant's 4-bit codes; 1 for ternary/binary); the division may round the scale one
# or two ulps off the one the codes were multiplied by, so its neighbours are tried too
_CODE_MAGNITUDES = {4: (7, 8, 1, 2, 3, 4, 5, 6), 8: (127, 128)}  # 8 bits: weight-quant's codes reach +-127
_ULP_STEPS = (0, -1, 1, -2, 2)


@dataclass(frozen=True)
class Int4Weight:
    """A [K, N] weight as int4 (or int8) codes and float32 scales: ``W[k, n] == float32(codes[k, n])
    * scales[k // group, n]`` bit for bit."""

    codes: np.ndarray   # int8 [K, N], values in [-8, 7] (bits 4) or [-128, 127] (bits 8)
    scales: np.ndarray  # float32 [ceil(K / group), N]
    group: int          # rows per scale (K: one scale per column)
    bits: int = 4

    def dequantized(self) -> np.ndarray:
        return self.codes.astype(np.float32) * np.repeat(self.scales, self.group, axis=0)[:self.codes.shape[0]]


def _group_codes(blocks: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes, scales) of ``blocks`` [G, g, N] float32 (zero rows past K) with one scale per (G, N),
    reproducing every element exactly, or None."""
    amax = np.abs(blocks).max(axis=1)                      # [G, N]
    zero = amax == 0
    scales = np.zeros(amax.shape, np.float32)
    codes = np.zeros(blocks.shape, np.float32)
    done = zero.copy()
    low, high = CODE_RANGE[bits]
    for m in _CODE_MAGNITUDES[bits]:
        base = (amax / np.float32(m)).astype(np.float32)
        for step in _ULP_STEPS:
            if done.all():
                break
            s = base
            for _ in range(abs(step)):
                s = np.nextafter(s, np.float32(np.inf if step > 0 else 0)).astype(np.float32)
            s = np.where(done | (s == 0), np.float32(1), s).astype(np.float32)
            c = np.rint(blocks / s[:, None, :])
            ok = ((c >= low) & (c <= high) & ((c.astype(np.float32) * s[:, None, :]) == blocks)).all(axis=1)
            new = ok & ~done
            if new.any():
                scales = np.where(new, s, scales)
                codes = np.where(new[:, None, :], c, codes)
                done |= new
        if done.all():
            return codes.astype(np.int8), np.where(zero, np.float32(1), scales).astype(np.float32)
    return None


def int4_codes(weight: np.ndarray, bits: int = 4) -> Int4Weight | None:
    """``weight`` [K, N] float32 as int4 (``bits`` 8: int8) codes times per-column scales, or
    per-group scales over ``GROUP_SIZES`` rows (the largest group that fits), reproducing it bit for
    bit; else None."""
    w = np.asarray(weight)
    if w.ndim != 2 or w.dtype != np.float32 or not np.isfinite(w).all():
        return None
    if w.size and (w == w.flat[0]).all():
        # one value everywhere (a fill, as in the onnx wheel's light models): trivially "codes", but
        # no quantized weight; compressing it would flatter those models' benchmarks
        return None
    k, n = w.shape
    for group in (k, *(g for g in GROUP_SIZES if g < k)):
        groups = -(-k // group)
        padded = np.zeros((groups * group, n), np.float32)
        padded[:k] = w
        blocks = padded.reshape(groups, group, n)
        # a float weight fails on its first columns already: check a few before the whole matrix
        if n > 8 and _group_codes(blocks[:, :, :8], bits) is None:
            continue
        found = _group_codes(blocks, bits)
        if found is not None:
            codes, scales = found
            return Int4Weight(np.ascontiguousarray(codes.reshape(groups * group, n)[:k]), scales, group, bits)
    return None


def pack_int4_panels(codes: np.ndarray, lanes: int) -> np.ndarray:
    """int8 [P, K, lanes]: panel p's byte t of row k holds column p*2*lanes + t (low nibble) and
    p*2*lanes + lanes + t (high nibble); zero codes past the last column."""
    k, n = codes.shape
    nb = 2 * lanes
    panels = -(-n // nb)
    padded = np.zeros((k, panels * nb), np.int16)
    padded[:, :n] = codes
    p = padded.reshape(k, panels, 2, lanes).transpose(1, 0, 2, 3)     # [P, K, 2, L]
    byte = (p[:, :, 0, :] & 0xF) | ((p[:, :, 1, :] & 0xF) << 4)
    return np.ascontiguousarray(byte.astype(np.uint8).view(np.int8))


def pack_int8_panels(codes: np.ndarray, lanes: int) -> np.ndarray:
    """int8 [P, K, 2 * lanes]: panel p's row k holds columns p*2*lanes ... + 2*lanes - 1, one byte a
    code; zero codes past the last column."""
    k, n = codes.shape
    nb = 2 * lanes
    panels = -(-n // nb)
    padded = np.zeros((k, panels * nb), np.int8)
    padded[:, :n] = codes
    return np.ascontiguousarray(padded.reshape(k, panels, nb).transpose(1, 0, 2))


def pack_panels(weight: Int4Weight, lanes: int) -> np.ndarray:
    """The codes of ``weight`` packed for the kernel: nibbles (4 bits) or bytes (8 bits)."""
    return pack_int4_panels(weight.codes, lanes) if weight.bits == 4 else pack_int8_panels(weight.codes, lanes)


def pad_scales(scales: np.ndarray, lanes: int) -> np.ndarray:
    """float32 [G, P * 2 * lanes]: the scales with zeros past the last column."""
    g, n = scales.shape
    width = -(-n // (2 * lanes)) * 2 * lanes
    out = np.zeros((g, width), np.float32)
    out[:, :n] = scales
    return out


def row_tile(rows: int, traits) -> int:
    """Rows per register tile: two accumulator vectors per row within the target's accumulator
    registers (at most MAX_ROW_TILE); a divisor of ``rows`` when one is at least half of that."""
    limit = max(1, min(MAX_ROW_TILE, traits.accumulator_registers // 2, rows))
    for r in range(limit, 0, -1):
        if rows % r == 0 and 2 * r >= limit:
            return r
    return limit


def int4_matmul_kernel(m: int, k: int, panels: int, lanes: int, groups: int, group: int, rows: int,
                       parallel: bool, direct: bool | None = None, group_sums: bool = False, bits: int = 4):
    """PrimFunc ``(X [m, k] f32, Wp [panels, k, lanes] i8, S [groups, panels*2*lanes] f32,
    Y [m, panels*2*lanes] f32)``: ``Y = X @ dequantized(Wp, S)`` (see the module docstring).
    ``bits`` 8: ``Wp`` is [panels, k, 2 * lanes], one code a byte (pack_int8_panels).

    ``direct`` (default: when one tile of ``rows`` rows covers ``m``): the codes are unpacked into
    registers at every step of the reduction instead of into a panel buffer read by every row tile.
    One scale per column (``groups`` 1) multiplies the accumulators once, at the store.
    ``group_sums`` (direct, per-group scales): each group's products are summed apart and scaled once
    a group (twice the accumulators), instead of scaling the unpacked codes at every step."""
    from tvm.script import tirx as T

    L = lanes
    NB = 2 * lanes
    NP = panels * NB
    R = rows
    RT = -(-m // R)
    if direct is None:
        direct = RT == 1
    per_column = groups == 1
    WB = L if bits == 4 else NB  # bytes a panel row
    group_sums = group_sums and direct and not per_column

    def scale(S, kk, column, scaled, code):
        """The code times its scale (``scaled``: per-group scales applied as the codes are unpacked)."""
        return code * S[kk // group, column] if scaled else code

    @T.macro
    def unpack(Wp, S, w, at, p, kk, scaled):
        if bits == 4:
            # a nibble sign-extended: shifted to the top of an int32 and back (arithmetic shift)
            for t in T.vectorized(L):
                w[at + t] = scale(S, kk, p * NB + t, scaled,
                                  T.Cast("float32", T.shift_right(T.shift_left(T.Cast("int32", Wp[p, kk, t]), 28), 28)))
                w[at + L + t] = scale(S, kk, p * NB + L + t, scaled,
                                      T.Cast("float32", T.shift_right(T.Cast("int32", Wp[p, kk, t]), 4)))
        else:
            for v in T.vectorized(NB):
                w[at + v] = scale(S, kk, p * NB + v, scaled, T.Cast("float32", Wp[p, kk, v]))

    @T.macro
    def store(S, Y, acc, p, rt):
        for r in T.unroll(R):
            if rt * R + r < m:
                for v in T.vectorized(NB):
                    if per_column:
                        Y[rt * R + r, p * NB + v] = acc[r, v] * S[0, p * NB + v]
                    else:
                        Y[rt * R + r, p * NB + v] = acc[r, v]

    last = m - 1

    if m % R == 0:  # whole row tiles: no clamp on the row index
        def row(i):
            return i
    else:  # the last tile's rows past m read row m - 1 (not stored)
        def row(i):
            return T.min(i, last)

    @T.macro
    def zero(acc):
        for r in T.unroll(R):
            for v in T.vectorized(NB):
                acc[r, v] = T.float32(0)

    @T.macro
    def buffered(X, Wp, S, Y, p):
        w = T.decl_buffer((k * NB,), "float32", scope="local")
        acc = T.decl_buffer((R, NB), "float32", scope="local")
        for kk in range(k):
            unpack(Wp, S, w, kk * NB, p, kk, not per_column)
        for rt in range(RT):
            zero(acc)
            for kk in range(k):
                for r in T.unroll(R):
                    for v in T.vectorized(NB):
                        acc[r, v] = acc[r, v] + X[row(rt * R + r), kk] * w[kk * NB + v]
            store(S, Y, acc, p, rt)

    @T.macro
    def in_registers(X, Wp, S, Y, p):
        w = T.decl_buffer((NB,), "float32", scope="local")
        acc = T.decl_buffer((R, NB), "float32", scope="local")
        for rt in range(RT):
            zero(acc)
            for kk in range(k):
                unpack(Wp, S, w, 0, p, kk, not per_column)
                for r in T.unroll(R):
                    for v in T.vectorized(NB):
                        acc[r, v] = acc[r, v] + X[row(rt * R + r), kk] * w[v]
            store(S, Y, acc, p, rt)

    @T.macro
    def in_registers_by_group(X, Wp, S, Y, p):
        w = T.decl_buffer((NB,), "float32", scope="local")
        acc = T.decl_buffer((R, NB), "float32", scope="local")
        part = T.decl_buffer((R, NB), "float32", scope="local")
        for rt in range(RT):
            zero(acc)
            for gi in range(groups):
                zero(part)
                for kk in range(gi * group, T.min(k, gi * group + group)):
                    unpack(Wp, S, w, 0, p, kk, False)
                    for r in T.unroll(R):
                        for v in T.vectorized(NB):
                            part[r, v] = part[r, v] + X[row(rt * R + r), kk] * w[v]
                for r in T.unroll(R):
                    for v in T.vectorized(NB):
                        acc[r, v] = acc[r, v] + part[r, v] * S[gi, p * NB + v]
            store(S, Y, acc, p, rt)

    body = (in_registers_by_group if group_sums else in_registers) if direct else buffered
    loop = T.parallel if parallel else T.serial

    @T.prim_func
    def int4_matmul(X: T.Buffer((m, k), "float32"), Wp: T.Buffer((panels, k, WB), "int8"),
                    S: T.Buffer((groups, NP), "float32"), Y: T.Buffer((m, NP), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for p in loop(panels):
            body(X, Wp, S, Y, p)

    return int4_matmul


def _constant_weight(expr, rewriter) -> np.ndarray | None:
    """The matmul's right operand as a numpy array: a constant, or a transposed constant (Gemm with
    transB, which the importer passes as ``permute_dims(W, [1, 0])``); else None."""
    value = constant_value(expr)
    if value is not None:
        return value.numpy()
    bound = rewriter.bound(expr)
    if getattr(getattr(bound, "op", None), "name", "") != "relax.permute_dims":
        return None
    value = constant_value(bound.args[0])
    axes = getattr(bound.attrs, "axes", None)
    if value is None or len(value.shape) != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
        return None
    return np.ascontiguousarray(value.numpy().T)


def rewrite_int4_matmuls(mod, traits, stats: dict | None = None):
    """The module with every matmul on a 4-bit (else 8-bit) quantized constant weight computed by the
    int4 kernel on its packed codes (see the module docstring). ``stats`` (a dict) receives
    ``int4_matmuls`` and ``int8_matmuls`` (how many) and ``packed_bytes`` (the packed codes and scales)."""
    from sculpt.backends.tvm.kernels.tiling import worth_parallel

    lanes = traits.vector_lanes
    counts = {"int4_matmuls": 0, "int8_matmuls": 0, "packed_bytes": 0}
    kernels: dict = {}

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.matmul":
            return None
        weight = _constant_weight(call.args[1], rewriter)
        x_shape = static_shape(call.args[0])
        if (weight is None or weight.ndim != 2 or weight.dtype != np.float32 or x_shape is None
                or len(x_shape) < 2 or str(call.args[0].ty.dtype) != "float32"):
            return None
        k, n = weight.shape
        if x_shape[-1] != k or k * n < MIN_ELEMENTS:
            return None
        found = int4_codes(weight) or int4_codes(weight, bits=8)
        if found is None:
            return None
        rows = math.prod(x_shape[:-1])
        packed = pack_panels(found, lanes)
        scales = pad_scales(found.scales, lanes)
        panels = packed.shape[0]
        tile = row_tile(rows, traits)
        direct = rows <= tile  # one row tile: unpack into registers (a panel buffer would be read once)
        group_sums = direct and scales.shape[0] > 1 and 4 * tile <= traits.accumulator_registers
        key = (rows, k, panels, scales.shape[0], found.group, tile, worth_parallel(rows * k * n), direct, group_sums,
               found.bits)
        if key not in kernels:  # one function per shape, shared by the matmuls of that shape
            name = f"int{found.bits}_matmul_{len(kernels)}"
            # opaque (op_pattern 8): scheduled already, fusion must not merge it with its neighbours
            kernels[key] = rewriter.add_func(int4_matmul_kernel(*key[:3], lanes, *key[3:]).with_attr(
                "global_symbol", name).with_attr("op_pattern", OPAQUE_PATTERN), name)
        gv = kernels[key]
        x = call.args[0] if len(x_shape) == 2 else rewriter.emit(relax.op.reshape(call.args[0], (rows, k)))
        y = rewriter.emit(relax.call_tir(gv, [x, relax.const(packed), relax.const(scales)],
                                         relax.TensorType((rows, panels * 2 * lanes), "float32")))
        counts[f"int{found.bits}_matmuls"] += 1
        counts["packed_bytes"] += packed.nbytes + scales.nbytes
        if panels * 2 * lanes != n:
            y = rewriter.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
        return y if len(x_shape) == 2 else relax.op.reshape(y, (*x_shape[:-1], n))

    out = rewrite_calls(mod, rule)
    if stats is not None:
        stats.update(counts)
    return out
