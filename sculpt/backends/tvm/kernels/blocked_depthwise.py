"""Depthwise convolutions over channel-blocked activations (NCHW<c>c in and out).

In NCHW the depthwise kernel vectorizes along the output width, so a 46-, 23- or 7-wide map leaves
vectors partly empty, and strided widths are de-interleaved first. In NCHW<c>c the vector is the
block's ``c`` channels, contiguous for every pixel: the same code for any width or stride, and it
keeps the activations of a MobileNet-style block (pointwise -> depthwise -> pointwise) blocked from
one pointwise conv to the next.

    for each band of th rows of a channel block (parallel):
        pad the band's input rows (once)
        for each tile of tw columns:
            acc[th][tw] = 0                                    # th * tw vector registers
            for kh, kw: acc[r][c] += x[block, r*s+kh, c*s+kw, :] * w[block, kh, kw, :]
            epilogue(acc) -> y[n, block, row, col, :]

Mechanism only: ``blocked_depthwise_call`` emits the ``call_tir`` (before legalization, so FuseOps
fuses the epilogue) and ``schedule_blocked_depthwise`` schedules the fused function, found by its
main block's name (``sculpt_dw_h<th>_w<tw>``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape, static_conv_of
from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, i64
from sculpt.backends.tvm.kernels.tiling import PER_PLANE_MIN_PLANES

BLOCK_PREFIX = "sculpt_dw_h"
_BLOCK_NAME = re.compile(rf"{BLOCK_PREFIX}(\d+)_w(\d+)_p(\d+)")


@dataclass(frozen=True)
class DepthwiseTile:
    """Rows and columns of one register tile; ``per_plane``: the padding is computed for a whole
    channel-block plane at a time (else per band of rows)."""

    th: int
    tw: int
    per_plane: int = 0

    def padded_width(self, out_width: int) -> int:
        return -(-out_width // self.tw) * self.tw

    @property
    def name(self) -> str:
        return f"{BLOCK_PREFIX}{self.th}_w{self.tw}_p{self.per_plane}"


def tile_from_block_name(name: str) -> DepthwiseTile | None:
    m = _BLOCK_NAME.search(name)
    return DepthwiseTile(*(int(g) for g in m.groups())) if m else None


def depthwise_shape_of(call) -> ConvShape | None:
    """The shape of a ``relax.nn.conv2d`` that is depthwise (NCHW/OIHW, float32, static, a constant
    weight, one input and one output channel per group), as a ConvShape of all its channels."""
    found = static_conv_of(call)
    if found is None:
        return None
    if found.in_channels != 1 or found.out_channels != 1 or found.groups == 1:
        return None
    return replace(found, in_channels=found.groups, out_channels=found.groups, groups=1)


# accumulators of one tile (one vector register each); the loads feed the FMAs directly
DEPTHWISE_ACCUMULATORS = 8


def depthwise_tile(shape: ConvShape, lanes: int, registers: int = 16) -> DepthwiseTile:
    """Columns (and rows) per register tile: the widest tile of up to ``DEPTHWISE_ACCUMULATORS``
    (half the register file) pixels with the least padded width; two rows when the map is narrow.
    The padding per plane when a band of one row would pad more than twice the rows it computes
    (a kernel taller than twice the stride): measured on AVX2, 1 thread, per band -> per plane,
    256 channels 5x5 at 14x14 0.104 -> 0.080 ms, 96 channels 7x7 at 184x184 6.7 -> 5.0 ms, 64
    channels 3x3 at 56x56 0.131 -> 0.106 ms; 32 channels 3x3 stride 2 at 112x112 0.084 -> 0.093; not
    with fewer than PER_PLANE_MIN_PLANES planes, whose parallel loop would be too short."""
    budget = min(DEPTHWISE_ACCUMULATORS, registers // 2)
    best, best_key = DepthwiseTile(1, 1), None
    for th in (1, 2):
        if shape.out_height % th:
            continue
        for tw in range(1, budget // th + 1):
            padded = -(-shape.out_width // tw) * tw
            key = (round(shape.out_width / padded, 2), th * tw, -th)
            if best_key is None or key > best_key:
                best, best_key = DepthwiseTile(th, tw), key
    planes = shape.batch * (shape.in_channels // lanes)
    per_plane = shape.kernel[0] > 2 * shape.strides[0] and planes >= PER_PLANE_MIN_PLANES
    return DepthwiseTile(best.th, best.tw, int(per_plane))


def pack_depthwise_weight(w: np.ndarray, block: int) -> np.ndarray:
    """[C, 1, KH, KW] -> [C/block, KH, KW, block]."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c // block, block, kh, kw).transpose(0, 2, 3, 1))


def blocked_depthwise_func(shape: ConvShape, tile: DepthwiseTile, block: int):
    """The TE definition: padding stage, then the depthwise block over the padded output width."""
    from tvm import te, tirx

    s = shape
    owp = tile.padded_width(s.out_width)
    (sh, sw), (dh, dw), (pt, pl, _, _) = s.strides, s.dilation, s.padding
    kh, kw = s.kernel
    need_h = (s.out_height - 1) * sh + dh * (kh - 1) + 1
    need_w = (owp - 1) * sw + dw * (kw - 1) + 1


    blocks = s.in_channels // block
    x = te.placeholder(i64(s.batch, blocks, s.height, s.width, block), "float32", name="x")
    w = te.placeholder(i64(blocks, kh, kw, block), "float32", name="w")
    if pt or pl or need_h > s.height + pt or need_w > s.width + pl:
        def pad(n, c, h, wi, lane):
            inside = tirx.all(h >= pt, h < s.height + pt, wi >= pl, wi < s.width + pl)
            return tirx.if_then_else(inside, x[n, c, h - pt, wi - pl, lane], tirx.const(0.0, "float32"))
        src = te.compute(i64(s.batch, blocks, need_h, need_w, block), pad, name="pad_temp")
    else:
        src = x
    ry = te.reduce_axis(i64(0, kh), "ry")
    rx = te.reduce_axis(i64(0, kw), "rx")
    y = te.compute(i64(s.batch, blocks, s.out_height, owp, block),
                   lambda n, c, h, wi, lane: te.sum(src[n, c, h * sh + ry * dh, wi * sw + rx * dw, lane]
                                                    * w[c, ry, rx, lane], axis=[ry, rx]),
                   name=tile.name)
    return te.create_prim_func([x, w, y])


class BlockedDepthwiseBuilder:
    """Emits the blocked depthwise kernel for depthwise conv2d calls (one PrimFunc per shape)."""

    def __init__(self, block: int, registers: int = 16):
        self.block, self.registers = block, registers
        self._made: dict[tuple, object] = {}

    def takes(self, call) -> bool:
        shape = depthwise_shape_of(call)
        return shape is not None and shape.in_channels % self.block == 0

    def rewrite(self, call, x, rewriter):
        """The blocked replacement of depthwise ``call`` whose input ``x`` is NCHW<block>c."""
        from tvm import relax

        shape = depthwise_shape_of(call)
        tile = depthwise_tile(shape, self.block, self.registers)
        key = (shape, tile)
        if key not in self._made:
            func = blocked_depthwise_func(shape, tile, self.block).without_attr("global_symbol")
            self._made[key] = rewriter.add_func(func, f"sculpt_dw{len(self._made)}")
        packed = relax.const(pack_depthwise_weight(constant_value(call.args[1]).numpy(), self.block))
        owp, blocks = tile.padded_width(shape.out_width), shape.in_channels // self.block
        y = relax.call_tir(self._made[key], [x, packed],
                           relax.TensorType((shape.batch, blocks, shape.out_height, owp, self.block), "float32"))
        if owp == shape.out_width:
            return y
        y = rewriter.emit(y)
        return relax.op.strided_slice(y, axes=[3], begin=[0], end=[shape.out_width])


def schedule_blocked_depthwise(sch, func, main, tile: DepthwiseTile, lanes: int, parallel: bool) -> None:
    """The register tile of the module docstring on the main block (n, c, h, w, lane | ry, rx)."""
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks
    from sculpt.backends.tvm.kernels.register_tile import (
        accumulator_tail, inline_branch_free_producers, inline_epilogue, schedule_other_epilogue_stages,
        schedule_padding_at, vectorize_blocked_tail, vectorize_in_registers)

    epilogue = inline_epilogue(sch, func, main)
    inline_branch_free_producers(sch, main)
    skip = {sch.get(b).name_hint for b in epilogue} | {sch.get(main).name_hint}
    producers = [b for b in root_blocks(sch) if sch.get(b).name_hint not in skip]
    n, c, h, w, lane, ry, rx = sch.get_loops(main)
    ho, hi = sch.split(h, factors=[None, tile.th])
    wo, wi = sch.split(w, factors=[None, tile.tw])
    sch.reorder(n, c, ho, wo, ry, rx, hi, wi, lane)
    tail, epilogue = accumulator_tail(sch, main, epilogue)
    sch.reverse_compute_at(tail, wo, preserve_unit_loops=True)
    for lp in (hi, wi):
        if int(sch.get(lp).extent) > 1:
            sch.unroll(lp)
    vectorize_in_registers(sch, lane, lanes)
    vectorize_blocked_tail(sch, tail, lanes)
    outer = sch.fuse(n, c) if tile.per_plane else sch.fuse(n, c, ho)
    if parallel:
        sch.parallel(outer)
    sch.decompose_reduction(main, ry)
    schedule_other_epilogue_stages(sch, epilogue, tail, lanes)
    for b in producers:
        schedule_padding_at(sch, b, outer, lanes, blocked=True)
