"""Convolutions vectorized over blocks of output channels: the kernel design that does not depend on
the image's shape.

The NCHW register tile (register_tile) vectorizes along the output width, so a 55-, 27- or 13-wide
map leaves vectors partly empty and tiles badly. Here the vector axis is a block of ``ob`` output
channels instead (onnxruntime's MLAS and oneDNN do the same with NCHWc), which does not depend on the
image's shape; a channel count that is not a whole number of blocks is computed with zero weights
in the last block and sliced:

    for each tile of ob output channels x th rows x tw columns (parallel over channel blocks and rows):
        acc[th][tw][ob] = 0                                    # th * tw * ob / lanes vector registers
        for ic, kh, kw:
            w = packed[oc // ob, ic, kh, kw, 0:ob]             # ob / lanes vector loads
            for each of the th x tw pixels: acc[pixel][:] += broadcast(x[ic, ih, iw]) * w
        epilogue(acc) -> y[n, oc, oh, ow]                      # bias, activation, residual: fused

Activations stay NCHW at the graph's edges and between layers (no layout transform anywhere); only
the constant weights are repacked, once, at compile time ([O/ob, I, KH, KW, ob]). A width that the
column tile does not divide is computed over a padded width and sliced (the input padding covers
the extra columns). The loop over channel blocks is outermost (each block's weights stay in cache
over the whole map) or, for maps larger than the cache with small weights, inside bands of rows
(``rows_outer``: a band of input rows is padded and read once for every channel block).

Mechanism only: ``rewrite_blocked_convs`` replaces ``relax.nn.conv2d`` calls chosen by a policy
(``choose``) with ``call_tir`` to the TE definition below, before legalization, so TVM's FuseOps
still fuses the epilogues; ``schedule_blocked_conv`` schedules the fused function. The tile travels
in the main block's name (``sculpt_conv_oc<ob>_h<th>_w<tw>_c<rc>_r<rows_outer>``) through fusion."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, four_pads, i64, rewrite_calls, static_shape

BLOCK_PREFIX = "sculpt_conv_oc"
_BLOCK_NAME = re.compile(rf"{BLOCK_PREFIX}(\d+)_h(\d+)_w(\d+)_c(\d+)_r(\d+)(?:_i(\d+)_o(\d+))?(?:_l(\d+))?")


@dataclass(frozen=True)
class ConvShape:
    """A static NCHW/OIHW conv2d; ``in_channels`` and ``out_channels`` are those of one of its
    ``groups`` (a grouped conv reads channels [g * in_channels, (g + 1) * in_channels) for group g)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    groups: int = 1

    @property
    def out_height(self) -> int:
        return (self.height + self.padding[0] + self.padding[2] - self.dilation[0] * (self.kernel[0] - 1) - 1) \
            // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.padding[1] + self.padding[3] - self.dilation[1] * (self.kernel[1] - 1) - 1) \
            // self.strides[1] + 1


@dataclass(frozen=True)
class ConvTile:
    """Output channels per vector block (``ob``, a multiple of the vector width), rows and columns
    per register tile."""

    ob: int
    th: int
    tw: int
    rc: int = 0  # input channels per pass over a row (0: all); a chunk's weights stay in L1
    rows_outer: int = 0  # 1: bands of rows outermost, channel blocks inside (large maps, small weights)
    in_block: int = 0  # input layout: 0 NCHW, else NCHW<in_block>c (channels blocked innermost)
    out_block: int = 0  # output layout: 0 NCHW, else NCHW<out_block>c (ob a multiple of it)
    lanes: int = 0  # vector width the tile was chosen for (0: the target's default)

    def padded_width(self, out_width: int) -> int:
        return -(-out_width // self.tw) * self.tw

    def padded_channels(self, out_channels: int) -> int:
        """Output channels computed: a whole number of channel blocks (the weights' extra rows are
        zero and the extra channels are sliced off)."""
        return -(-out_channels // self.ob) * self.ob

    def as_list(self) -> list[int]:
        return [self.ob, self.th, self.tw, self.rc, self.rows_outer, self.in_block, self.out_block] \
            + ([self.lanes] if self.lanes else [])

    @property
    def weight_block(self) -> int:
        """Output channels per contiguous run of the packed weight: the output block of a blocked
        output layout, else the register tile's channel block."""
        return self.out_block or self.ob

    @property
    def name(self) -> str:
        return (f"{BLOCK_PREFIX}{self.ob}_h{self.th}_w{self.tw}_c{self.rc}_r{self.rows_outer}"
                f"_i{self.in_block}_o{self.out_block}" + (f"_l{self.lanes}" if self.lanes else ""))


# a policy: (ConvShape, TargetTraits, in_block=0, out_block=0) -> ConvTile in those layouts, or None
# to keep the width-vectorized kernel
ConvPolicy = Callable[..., "ConvTile | None"]


def tile_from_block_name(name: str) -> ConvTile | None:
    m = _BLOCK_NAME.search(name)
    return ConvTile(*(int(g) for g in m.groups() if g is not None)) if m else None


def static_conv_of(call) -> ConvShape | None:
    """The ConvShape (groups included) of a ``relax.nn.conv2d`` call with NCHW/OIHW layouts, float32,
    static shapes and a constant weight, else None."""
    if getattr(call.op, "name", "") != "relax.nn.conv2d" or len(call.args) != 2:
        return None
    a = call.attrs
    weight = constant_value(call.args[1])
    if weight is None or str(weight.dtype) != "float32":
        return None
    if (str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"
            or (a.out_dtype is not None and str(a.out_dtype) not in ("", "float32", "void"))):
        return None
    x_shape, pads = static_shape(call.args[0]), four_pads(a)
    groups = int(a.groups)
    w_shape = [int(d) for d in weight.shape]
    if (x_shape is None or pads is None or len(x_shape) != 4 or str(call.args[0].ty.dtype) != "float32"
            or len(w_shape) != 4 or groups < 1 or w_shape[0] % groups or w_shape[1] * groups != x_shape[1]):
        return None
    return ConvShape(x_shape[0], w_shape[1], x_shape[2], x_shape[3], w_shape[0] // groups, (w_shape[2], w_shape[3]),
                     tuple(int(s) for s in a.strides), tuple(int(d) for d in a.dilation), tuple(pads), groups)


def conv_shape_of(call) -> ConvShape | None:
    """The ConvShape of a ``relax.nn.conv2d`` call this kernel can take (NCHW/OIHW, groups 1, float32,
    static shapes, a constant weight), else None (``grouped_shape_of`` for groups > 1)."""
    found = static_conv_of(call)
    return found if found is not None and found.groups == 1 else None


MAX_BLOCKED_GROUPS = 8


def grouped_shape_of(call) -> ConvShape | None:
    """The ConvShape of a grouped conv2d with at most ``MAX_BLOCKED_GROUPS`` groups and at least 8
    input channels per group (not depthwise), else None."""
    found = static_conv_of(call)
    if found is None or not 1 < found.groups <= MAX_BLOCKED_GROUPS or found.in_channels < 8:
        return None
    return found


def pack_weight(w: np.ndarray, ob: int, in_block: int = 0, channels: int = 0, groups: int = 1) -> np.ndarray:
    """OIHW -> [ceil(O/ob), I, KH, KW, ob]: the ob output channels of one vector load are contiguous;
    a last partial block (and blocks up to ``channels`` output channels) are zero weights. With a
    blocked input layout (``in_block``): [ceil(O/ob), I/in_block, KH, KW, in_block, ob], in the
    order the kernel reads them. With ``groups``, each group's output channels are packed so (padded
    to whole blocks, up to ``channels`` a group) and the groups' blocks follow each other."""
    if groups > 1:
        return np.concatenate([pack_weight(part, ob, in_block, channels) for part in np.split(w, groups)])
    o, i, kh, kw = w.shape
    blocks = -(-max(o, channels) // ob)
    if blocks * ob != o:
        w = np.concatenate([w, np.zeros((blocks * ob - o, i, kh, kw), w.dtype)])
    if in_block:
        w = w.reshape(blocks, ob, i // in_block, in_block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
        return np.ascontiguousarray(w)
    return np.ascontiguousarray(w.reshape(blocks, ob, i, kh, kw).transpose(0, 2, 3, 4, 1))


def blocked_conv_func(shape: ConvShape, tile: ConvTile):
    """The TE definition (unscheduled PrimFunc): padding stage, then the conv block over the padded
    output width, reading the packed weight, in the tile's input and output layouts. A grouped conv
    writes each group's output channels padded to whole blocks (``tile.padded_channels``), the
    groups one after another: a channel block belongs to one group and reads only its inputs."""
    from tvm import te, tirx

    s = shape
    owp, ocp, ib, cb = tile.padded_width(s.out_width), tile.padded_channels(s.out_channels), tile.in_block, \
        tile.weight_block
    groups, blocks_per_group = s.groups, ocp // cb
    (sh, sw), (dh, dw), (pt, pl, _, _) = s.strides, s.dilation, s.padding
    (kh, kw) = s.kernel
    need_h = (s.out_height - 1) * sh + dh * (kh - 1) + 1
    need_w = (owp - 1) * sw + dw * (kw - 1) + 1

    channel_dims = (groups * s.in_channels // ib, ) if ib else (groups * s.in_channels, )
    lane_dims = (ib, ) if ib else ()
    x = te.placeholder(i64(s.batch, *channel_dims, s.height, s.width, *lane_dims), "float32", name="x")
    if ib:
        w = te.placeholder(i64(groups * blocks_per_group, s.in_channels // ib, kh, kw, ib, cb), "float32", name="w")
    else:
        w = te.placeholder(i64(groups * blocks_per_group, s.in_channels, kh, kw, cb), "float32", name="w")
    if pt or pl or need_h > s.height + pt or need_w > s.width + pl:
        def pad(n, c, h, wi, *lane):
            inside = tirx.all(h >= pt, h < s.height + pt, wi >= pl, wi < s.width + pl)
            return tirx.if_then_else(inside, x[(n, c, h - pt, wi - pl, *lane)], tirx.const(0.0, "float32"))
        src = te.compute(i64(s.batch, *channel_dims, need_h, need_w, *lane_dims), pad, name="pad_temp")
    else:
        src = x
    ry = te.reduce_axis(i64(0, kh), "ry")
    rx = te.reduce_axis(i64(0, kw), "rx")

    def first_input(o_block):  # the group's first input channel (block, with a blocked input)
        if groups == 1:
            return 0
        return o_block // blocks_per_group * (s.in_channels // ib if ib else s.in_channels)

    if ib:  # input channel blocks outermost, the block's channels innermost (contiguous broadcasts)
        rco, rci = te.reduce_axis(i64(0, s.in_channels // ib), "rco"), te.reduce_axis(i64(0, ib), "rci")
        axes = [rco, ry, rx, rci]
        def product(n, o_block, o_lane, h, wi):
            return src[n, first_input(o_block) + rco, h * sh + ry * dh, wi * sw + rx * dw, rci] \
                * w[o_block, rco, ry, rx, rci, o_lane]
    else:
        rc = te.reduce_axis(i64(0, s.in_channels), "rc")
        axes = [rc, ry, rx]
        def product(n, o_block, o_lane, h, wi):
            return src[n, first_input(o_block) + rc, h * sh + ry * dh, wi * sw + rx * dw] * w[o_block, rc, ry, rx, o_lane]
    if tile.out_block:
        y = te.compute(i64(s.batch, groups * ocp // cb, s.out_height, owp, cb),
                       lambda n, o, h, wi, lane: te.sum(product(n, o, lane, h, wi), axis=axes), name=tile.name)
    else:
        y = te.compute(i64(s.batch, groups * ocp, s.out_height, owp),
                       lambda n, o, h, wi: te.sum(product(n, o // cb, o % cb, h, wi), axis=axes), name=tile.name)
    return te.create_prim_func([x, w, y])


class BlockedConvBuilder:
    """Emits the blocked-channel kernel for ``relax.nn.conv2d`` calls that ``choose(shape, traits)``
    gives a tile (one PrimFunc per distinct shape and tile; ``decisions`` receives (ConvShape,
    ConvTile) pairs)."""

    def __init__(self, choose: ConvPolicy, traits, decisions: list | None = None,
                 winograd: Callable[..., bool] | None = None):
        self.choose, self.traits, self.decisions = choose, traits, decisions
        # policy: (ConvShape, traits) -> True for a blocked 3x3 conv to compute by F(2x2, 3x3)
        self.winograd = winograd
        self._winograd_builder = None
        self._made: dict[tuple, object] = {}

    def tile_for(self, call, block: int = 0) -> ConvTile | None:
        """The tile of a conv of one group this kernel takes (reading and writing NCHW<block>c),
        else None."""
        shape = conv_shape_of(call)
        if shape is None:
            return None
        return self.choose(shape, self.traits, block if shape.in_channels % max(block, 1) == 0 else 0, block)

    def padded_call(self, x, weight: np.ndarray, shape: ConvShape, tile: ConvTile, rewriter, name: str = "sculpt_conv_oc"):
        """The kernel's call as it computes: every group's output channels padded to whole blocks
        (``tile.padded_channels``) and the width to whole register tiles (``tile.padded_width``);
        ``name`` prefixes its function's name (what `sculpt bench --layers` shows)."""
        from tvm import relax

        key = (shape, tile)
        if key not in self._made:
            name = f"{name}{len(self._made)}"
            # private (no global symbol): once fused into its callers, DeadCodeElimination drops it
            self._made[key] = rewriter.add_func(blocked_conv_func(shape, tile).without_attr("global_symbol"), name)
        if self.decisions is not None:
            self.decisions.append((shape, tile))
        ocp, owp, cb, groups = tile.padded_channels(shape.out_channels), tile.padded_width(shape.out_width), \
            tile.out_block, shape.groups
        packed = relax.const(pack_weight(weight, tile.weight_block, tile.in_block, ocp, groups))
        if cb:
            out = (shape.batch, groups * ocp // cb, shape.out_height, owp, cb)
        else:
            out = (shape.batch, groups * ocp, shape.out_height, owp)
        return relax.call_tir(self._made[key], [x, packed], relax.TensorType(out, "float32"))

    def _emit(self, x, weight: np.ndarray, shape: ConvShape, tile: ConvTile, rewriter):
        from tvm import relax

        ocp, owp, cb, groups = tile.padded_channels(shape.out_channels), tile.padded_width(shape.out_width), \
            tile.out_block, shape.groups
        channel_end = shape.out_channels // cb if cb else shape.out_channels
        y = self.padded_call(x, weight, shape, tile, rewriter)
        if (ocp, owp) == (shape.out_channels, shape.out_width):
            return y
        y = rewriter.emit(y)
        if groups == 1 or ocp == shape.out_channels:
            return relax.op.strided_slice(y, axes=[1, 3], begin=[0, 0], end=[groups * channel_end, shape.out_width])
        # each group's padding channels dropped: [N, G, padded channels, H, W] sliced, then NCHW again
        split = rewriter.emit(relax.op.reshape(y, (shape.batch, groups, ocp, shape.out_height, owp)))
        kept = rewriter.emit(relax.op.strided_slice(split, axes=[2, 4], begin=[0, 0], end=[channel_end, shape.out_width]))
        return relax.op.reshape(kept, (shape.batch, groups * shape.out_channels, shape.out_height, shape.out_width))

    def rewrite(self, call, rewriter, in_block: int = 0, out_block: int = 0, x=None):
        """The replacement of ``call`` (its input ``x``, default its own, in NCHW<in_block>c, its
        output in NCHW<out_block>c; 0: NCHW), or None to keep it. A grouped conv (a few groups:
        AlexNet's 2, ShuffleNet's 3 and 4) runs as one kernel, NCHW in and out."""
        shape = conv_shape_of(call)
        x = call.args[0] if x is None else x
        if shape is None:
            shape = grouped_shape_of(call)
            if shape is None:
                return None
            in_block = out_block = 0
        tile = self.choose(shape, self.traits, in_block, out_block)
        if tile is None:
            return None
        # the schedule vectorizes with the width the tile was chosen for (lane_policy may widen it)
        tile = replace(tile, lanes=self.traits.vector_lanes)
        weight = constant_value(call.args[1]).numpy()
        if self.winograd is not None:
            y = self._winograd(x, weight, shape, in_block, out_block, rewriter)
            if y is not None:
                return y
        return self._emit(x, weight, shape, tile, rewriter)

    def _winograd(self, x, weight: np.ndarray, shape: ConvShape, in_block: int, out_block: int, rewriter):
        """The conv by winograd_conv where the mechanism applies and the policy asks for it, else None.
        Its transformed tensors take the blocked layout's block (the convs' vector width); the conv's
        own input and output stay as the plan has them (NCHW at the graph's edges)."""
        from sculpt.backends.tvm.kernels import winograd_conv

        block = in_block or out_block or self.traits.vector_lanes
        if not (winograd_conv.winograd_applies(shape, block, weight) and self.winograd(shape, self.traits)):
            return None
        if self._winograd_builder is None:
            self._winograd_builder = winograd_conv.WinogradBuilder()
        found = self._winograd_builder.product_tile(shape, self.choose, self.traits, block, block)
        if found is None:
            return None
        tile, tiles_w = found
        return self._winograd_builder.rewrite(x, weight, shape, tile, tiles_w, rewriter, self.padded_call,
                                              nchw_input=not in_block, nchw_output=not out_block)


def rewrite_blocked_convs(mod, choose: ConvPolicy, traits, decisions: list | None = None):
    """``mod`` with every conv2d that ``choose(shape, traits)`` gives a tile replaced by the
    blocked-channel kernel, NCHW in and out (``decisions`` receives (ConvShape, ConvTile) pairs)."""
    return rewrite_calls(mod, BlockedConvBuilder(choose, traits, decisions).rewrite)


def schedule_blocked_conv(sch, func, main, tile: ConvTile, lanes: int, parallel: bool) -> None:
    """The register tile of the module docstring on the main block ``main`` (n, o, h, w | rc, ry, rx)
    of a fused function; the epilogue blocks are inlined into the output block, which is computed per
    tile from the accumulators."""
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks
    from sculpt.backends.tvm.kernels.register_tile import (
        accumulator_tail, inline_branch_free_producers, inline_epilogue, schedule_other_epilogue_stages,
        schedule_padding_at, schedule_padding_block, vectorize_blocked_tail, vectorize_in_registers)

    epilogue = inline_epilogue(sch, func, main)
    inline_branch_free_producers(sch, main)
    skip = {sch.get(b).name_hint for b in epilogue} | {sch.get(main).name_hint}
    producers = [b for b in root_blocks(sch) if sch.get(b).name_hint not in skip]
    loops = sch.get_loops(main)
    rows_outer = tile.rows_outer and not tile.rc
    ob = tile.ob
    if tile.out_block:  # (n, channel blocks, h, w, lanes | reduction): ob / out_block blocks per tile
        n, o, h, w, lane = loops[:5]
        reduce = loops[5:]
        oo, ok = sch.split(o, factors=[None, ob // tile.out_block])
        channel = [ok, lane]
    else:
        n, o, h, w = loops[:4]
        reduce = loops[4:]
        oo, oi = sch.split(o, factors=[None, ob])
        channel = [oi]
    ho, hi = sch.split(h, factors=[None, tile.th])
    wo, wi = sch.split(w, factors=[None, tile.tw])
    if tile.rc and not tile.in_block:
        # one chunk of input channels at a time over the whole row: the chunk's weights stay in L1,
        # the row's accumulators live in a small stack buffer between chunks
        rc, ry, rx = reduce
        rco, rci = sch.split(rc, factors=[None, tile.rc])
        sch.reorder(n, oo, ho, rco, wo, rci, ry, rx, hi, wi, *channel)
        first_reduce, tail_at = rco, ho
    else:
        sch.reorder(*((n, ho, oo) if rows_outer else (n, oo, ho)), wo, *reduce, hi, wi, *channel)
        first_reduce, tail_at = reduce[0], wo
    # accumulators: the main block's output buffer, shrunk to one tile (a row with chunks) by
    # computing the output block per tile (a cache stage when the conv itself is the function's
    # output), with the channel block innermost so that the FMAs' stores are whole vectors and
    # LLVM keeps the buffer in registers
    tail, epilogue = accumulator_tail(sch, main, epilogue)
    if not tile.out_block:
        sch.transform_layout(main, ("write", 0), lambda a, b, c, d: (a, b // ob, c, d, b % ob))
    sch.reverse_compute_at(tail, tail_at, preserve_unit_loops=True)
    for lp in (hi, wi) + ((channel[0],) if tile.out_block else ()):
        if int(sch.get(lp).extent) > 1:
            sch.unroll(lp)
    vectorize_in_registers(sch, channel[-1], lanes)
    if tile.out_block:
        vectorize_blocked_tail(sch, tail, lanes)
    # rows outer: one band of input rows (padded once, below) serves every channel block in turn
    outer = sch.fuse(n, ho) if rows_outer else sch.fuse(n, oo, ho)
    if parallel:
        sch.parallel(outer)
    sch.decompose_reduction(main, first_reduce)
    schedule_other_epilogue_stages(sch, epilogue, tail, lanes)
    for b in producers:
        if rows_outer:
            schedule_padding_at(sch, b, outer, lanes, blocked=bool(tile.in_block))
        else:
            schedule_padding_block(sch, b, lanes)

