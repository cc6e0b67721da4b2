"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3), on the channel-blocked kernel.

A direct 3x3 conv spends 9 multiply-adds per output and input channel; F(2x2, 3x3) computes each 2x2
output tile from a 4x4 input tile with 16, 2.25x fewer. The blocked direct kernel already runs at
about one FMA per cycle (VGG-19's and resnet50's 3x3 convs: ~105-111 GFLOP/s on AVX-512, as
onnxruntime's do), so fewer multiplies is what is left to gain on 3x3-heavy CNNs.

    V[xi, cb, t, c]  = (B^T d B)[xi]  for every 4x4 input tile t (stride 2) and channel c  (input transform)
    M[xi, kb, t, k]  = sum_c U[xi, k, c] * V[xi, t, c]        16 products of (K x C) by (C x tiles):
                                                              a 1x1 conv of 16 groups on the blocked kernel
    y[k, 2x2 tile t] = A^T M[:, t, k] A  (+ bias, activation, residual: fused)     (output transform)

with U = G g G^T, the 3x3 weights transformed once at compile time (in float64, stored float32).
The transformed tensors are channel-blocked (NCHW<c>c): the transforms are whole-vector adds and
subtractions over the ``c`` channels of a pixel (the conv's own input and output may be NCHW, at the
graph's edges: then the input transform gathers and the output transform scatters the lanes); the
product is the blocked conv kernel itself (``blocked_conv``, 1x1, ``groups`` = 16), so it keeps that
kernel's register tiles and tile search.

Error: the transforms' coefficients are 0, +-1/2 and +-1; against the direct conv, the output differs
by rounding only (tests/test_tvm_winograd_conv.py, against onnxruntime and the direct build).

Mechanism only: ``WinogradBuilder.rewrite`` emits the three calls for one conv (before legalization,
so FuseOps fuses the output transform with the epilogue); ``schedule_winograd_transform`` schedules
a fused function whose main block is a transform (found by the block names ``sculpt_wino_in`` /
``sculpt_wino_out``). Which convs take it is a policy (``tiling.winograd_worth``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape, ConvTile
from sculpt.backends.tvm.kernels.relax_rewrite import OPAQUE_PATTERN, i64

INPUT_BLOCK = "sculpt_wino_in"
PRODUCT_NAME = "sculpt_wino_product"  # the products' function (the blocked kernel's) in layer tables
OUTPUT_BLOCK = "sculpt_wino_out"
TILE = 2  # outputs per tile side: F(2x2, 3x3)
POSITIONS = (TILE + 2) ** 2  # transformed tile positions: 16 products

# F(2, 3) (Lavin and Gray, 2015): y = A^T [(G g G^T) * (B^T d B)] A
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_applies(shape: ConvShape, block: int, weight: np.ndarray | None = None) -> bool:
    """The mechanism's own limits: a 3x3, stride-1, undilated, ungrouped conv whose input and output
    channels are whole blocks of ``block`` (the transformed tensors are NCHW<block>c; the conv's own
    input and output may be NCHW or NCHW<block>c). Integer weights are refused: such a conv is
    integer arithmetic run exactly in float32 (the int8 lowering's exact units), which the
    transforms' halves and rounding would break."""
    if weight is not None and np.array_equal(weight, np.round(weight)):
        return False
    return (shape.kernel == (3, 3) and shape.strides == (1, 1) and shape.dilation == (1, 1)
            and shape.groups == 1 and block > 0
            and shape.in_channels % block == 0 and shape.out_channels % block == 0)


def transformed_weight(w: np.ndarray) -> np.ndarray:
    """OIHW 3x3 weights -> U as the weight of a 1x1 conv of 16 groups: [16 * O, I, 1, 1], group
    ``xi`` = 4 * a + b holding (G g G^T)[a, b] of every (o, i)."""
    g = np.asarray(G, np.float64)
    u = np.einsum("ar,oirc,bc->aboi", g, w.astype(np.float64), g)  # [4, 4, O, I]
    o, i = w.shape[:2]
    return np.ascontiguousarray(u.reshape(POSITIONS * o, i, 1, 1).astype(np.float32))


def _signed_sum(terms):
    """sum(sign * value) for (sign, value) pairs with sign +-1, as adds and subtractions only."""
    terms = sorted(terms, key=lambda t: -t[0])  # a positive term first where there is one
    sign, total = terms[0]
    total = total if sign > 0 else -total
    for sign, value in terms[1:]:
        total = total + value if sign > 0 else total - value
    return total


def _select(index, options):
    """options[index] for a loop index the schedule unrolls (the selects then fold away)."""
    from tvm import tirx

    out = options[-1]
    for k in range(len(options) - 2, -1, -1):
        out = tirx.Select(index == k, options[k], out)
    return out


def tile_counts(shape: ConvShape) -> tuple[int, int]:
    return -(-shape.out_height // TILE), -(-shape.out_width // TILE)


def input_transform_func(shape: ConvShape, block: int, tiles_w: int, nchw: bool = False):
    """x [N, C/block, H, W, block] (``nchw``: [N, C, H, W]) -> V [N, 16 * C/block, TH, tiles_w, block]
    (tiles beyond the map read zeros: the padding)."""
    from tvm import te, tirx

    s = shape
    cb = s.in_channels // block
    th, _ = tile_counts(s)
    pt, pl = s.padding[0], s.padding[1]


    if nchw:
        x = te.placeholder(i64(s.batch, s.in_channels, s.height, s.width), "float32", name="x")
    else:
        x = te.placeholder(i64(s.batch, cb, s.height, s.width, block), "float32", name="x")

    def read(n, ch, h, w, lane):
        return x[n, ch * block + lane, h, w] if nchw else x[n, ch, h, w, lane]

    def value(n, c, t_h, t_w, lane):
        xi, ch = c // cb, c % cb
        a, b = xi // 4, xi % 4

        def d(r, q):
            h, w = t_h * TILE + r - pt, t_w * TILE + q - pl
            inside = tirx.all(h >= 0, h < s.height, w >= 0, w < s.width)
            return tirx.if_then_else(inside, read(n, ch, h, w, lane), tirx.const(0.0, "float32"))

        rows = []
        for ra in range(4):
            cols = []
            for rb in range(4):
                terms = [(B_T[ra][r] * B_T[rb][q], d(r, q)) for r in range(4) for q in range(4)
                         if B_T[ra][r] and B_T[rb][q]]
                cols.append(_signed_sum(terms))
            rows.append(_select(b, cols))
        return _select(a, rows)

    v = te.compute(i64(s.batch, POSITIONS * cb, th, tiles_w, block), value, name=INPUT_BLOCK)
    return te.create_prim_func([x, v])


def output_transform_func(shape: ConvShape, block: int, tiles_w: int, blocks_per_position: int, nchw: bool = False):
    """M [N, 16 * blocks_per_position, TH, tiles_w, block] -> y [N, K/block, OH, OW, block]
    (``nchw``: [N, K, OH, OW])."""
    from tvm import te, tirx

    s = shape
    kb = s.out_channels // block
    th, _ = tile_counts(s)


    m = te.placeholder(i64(s.batch, POSITIONS * blocks_per_position, th, tiles_w, block), "float32", name="m")

    def value(n, k, h, w, lane):
        t_h, i, t_w, j = h // TILE, h % TILE, w // TILE, w % TILE
        rows = []
        for oi in range(TILE):
            cols = []
            for oj in range(TILE):
                terms = [(A_T[oi][a] * A_T[oj][b], m[n, (4 * a + b) * blocks_per_position + k, t_h, t_w, lane])
                         for a in range(4) for b in range(4) if A_T[oi][a] and A_T[oj][b]]
                cols.append(_signed_sum(terms))
            rows.append(_select(j, cols))
        return _select(i, rows)

    if nchw:
        y = te.compute(i64(s.batch, s.out_channels, s.out_height, s.out_width),
                       lambda n, k, h, w: value(n, k // block, h, w, k % block), name=OUTPUT_BLOCK)
    else:
        y = te.compute(i64(s.batch, kb, s.out_height, s.out_width, block), value, name=OUTPUT_BLOCK)
    return te.create_prim_func([m, y])


def product_shape(shape: ConvShape, tiles_w: int) -> ConvShape:
    """The 16 products as a 1x1 conv of 16 groups over the tile grid."""
    th, _ = tile_counts(shape)
    return ConvShape(shape.batch, shape.in_channels, th, tiles_w, shape.out_channels, (1, 1), (1, 1), (1, 1),
                     (0, 0, 0, 0), POSITIONS)


class WinogradBuilder:
    """Emits the three calls of a Winograd conv (one PrimFunc per distinct shape of each)."""

    def __init__(self):
        self._made: dict[tuple, object] = {}

    def _func(self, key, make, name, rewriter):
        if key not in self._made:
            self._made[key] = rewriter.add_func(make().without_attr("global_symbol"), f"{name}{len(self._made)}")
        return self._made[key]

    def product_tile(self, shape: ConvShape, choose, traits, in_block: int, out_block: int) -> tuple[ConvTile, int] | None:
        """(tile of the blocked kernel for the products, tiles per row computed): the tile grid's width
        padded to whole register tiles, so the product reads no padding stage."""
        _, tiles_w = tile_counts(shape)
        for _ in range(3):
            tile = choose(product_shape(shape, tiles_w), traits, in_block, out_block)
            if tile is None:
                return None
            padded = tile.padded_width(tiles_w)
            if padded == tiles_w:
                return replace(tile, lanes=traits.vector_lanes), tiles_w
            tiles_w = padded
        return None

    def rewrite(self, x, weight: np.ndarray, shape: ConvShape, tile: ConvTile, tiles_w: int, rewriter, padded_call,
                nchw_input: bool = False, nchw_output: bool = False):
        """y (before the epilogue) of the conv ``shape`` of input ``x``, each NCHW<block>c (``block``
        the product tile's in_block and out_block) or NCHW (``nchw_input``, ``nchw_output``);
        ``padded_call(x, weight, shape, tile, rewriter)`` is the blocked kernel's call
        (BlockedConvBuilder.padded_call)."""
        from tvm import relax

        ib, ob = tile.in_block, tile.out_block
        th, _ = tile_counts(shape)
        # opaque to FuseOps: an output transform before it would fuse with it into one function
        # (both injective) that no single schedule serves
        v_func = self._func(("in", shape, ib, tiles_w, nchw_input),
                            lambda: input_transform_func(shape, ib, tiles_w, nchw_input).with_attr(
                                "op_pattern", OPAQUE_PATTERN),
                            INPUT_BLOCK, rewriter)
        v = rewriter.emit(relax.call_tir(v_func, [x], relax.TensorType(
            (shape.batch, POSITIONS * shape.in_channels // ib, th, tiles_w, ib), "float32")))
        m = rewriter.emit(padded_call(v, transformed_weight(weight), product_shape(shape, tiles_w), tile, rewriter,
                                      name=PRODUCT_NAME))
        blocks_per_position = tile.padded_channels(shape.out_channels) // ob
        y_func = self._func(("out", shape, ob, tiles_w, blocks_per_position, nchw_output),
                            lambda: output_transform_func(shape, ob, tiles_w, blocks_per_position, nchw_output),
                            OUTPUT_BLOCK, rewriter)
        out = (shape.batch, shape.out_channels, shape.out_height, shape.out_width) if nchw_output else \
            (shape.batch, shape.out_channels // ob, shape.out_height, shape.out_width, ob)
        return relax.call_tir(y_func, [m], relax.TensorType(out, "float32"))


def transform_block(sch):
    """The transform block of a fused function (input or output transform), or None."""
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks

    found = [b for b in root_blocks(sch) if sch.get(b).name_hint in (INPUT_BLOCK, OUTPUT_BLOCK)]
    return found[0] if len(found) == 1 else None


def _blocked_lanes_read(sch, block) -> int:
    """The lanes of the NCHW<c>c tensor a transform block reads (the products, for an output transform)."""
    return next(int(r.source.shape[-1]) for r in sch.get(block).reads if len(r.source.shape) == 5)


def schedule_winograd_transform(sch, block, parallel: bool) -> None:
    """One transform block: parallel over (batch, channel blocks, tile rows), the tile's positions
    unrolled (their selects fold to one sum each), the channel block's lanes as one vector. Copies
    before it are inlined; the epilogue after an output transform (bias, activation, residual; SiLU
    reads its input twice) is computed per 2x2 tile from the transform's values, which stay in
    registers, rather than substituted into it (that would repeat the transform per read); an op
    that reads them elsewhere than at its own position (a concat) runs as a stage of its own."""
    from sculpt.backends.tvm.kernels.block_analysis import reads_pointwise, root_blocks
    from sculpt.backends.tvm.kernels.register_tile import inline_epilogue, schedule_injective_block

    name = sch.get(block).name_hint
    blocks = root_blocks(sch)
    position = [sch.get(b).name_hint for b in blocks].index(name)
    for b in reversed(blocks[:position]):
        sch.compute_inline(b)
    epilogue = inline_epilogue(sch, sch.mod["main"], block)
    loops = sch.get_loops(block)
    if len(loops) == 4:  # an NCHW output: channels = (block, lane), the block's lanes innermost
        n, k, h, w = loops
        c, lane = sch.split(k, factors=[None, _blocked_lanes_read(sch, block)])
    else:
        n, c, h, w, lane = loops
    if name == INPUT_BLOCK:
        # channel axis = (position a, position b, channel block): positions innermost, unrolled
        extent = int(sch.get(c).extent)
        a, b, ch = sch.split(c, factors=[4, 4, extent // POSITIONS])
        sch.reorder(n, ch, h, w, a, b, lane)
        outer, tile_loop, unrolled = sch.fuse(n, ch, h), w, (a, b)
    else:
        t_h, i = sch.split(h, factors=[None, TILE])
        t_w, j = sch.split(w, factors=[None, TILE])
        sch.reorder(n, c, t_h, t_w, i, j, lane)
        outer, tile_loop, unrolled = sch.fuse(n, c, t_h), t_w, (i, j)
    for lp in unrolled:
        sch.unroll(lp)
    sch.vectorize(lane)
    for tail in epilogue:
        if not reads_pointwise(sch, tail, block):
            # a concat (DenseNet's) or another op that reads the transform's values at positions other
            # than its own: a stage of its own over the whole tensor (per tile it would write only
            # the part its region analysis maps to the tile)
            schedule_injective_block(sch, tail, int(sch.get(lane).extent))
            continue
        sch.reverse_compute_at(tail, tile_loop, preserve_unit_loops=True)
        loops = sch.get_loops(tail)
        inner = loops[len(sch.get_loops(block)) - len(unrolled) - 1:]
        for lp in inner[:-1]:
            if int(sch.get(lp).extent) > 1:
                sch.unroll(lp)
        sch.vectorize(inner[-1])
    if parallel:
        sch.parallel(outer)
