"""Tile sizes for the register-tiled kernels: a heuristic per target (policy only, no TIR here).

A register tile keeps ``broadcast x rows x ceil(vector / lanes)`` accumulator vectors live across
the whole reduction. The heuristic picks, among divisors of the axis extents (no tails, so every
inner loop is fully unrolled or vectorized):

- a vector tile that fills whole registers (little lane waste), then the largest one;
- the largest tile that fits the accumulator registers of the target, preferring the arithmetic
  intensity of the inner step: FMAs per load = acc / (broadcast + rows x vregs);
- enough outer tiles to keep every core busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from sculpt.backends.tvm.kernels.target_traits import TargetTraits


@dataclass(frozen=True)
class Tile:
    vector: int
    broadcast: int = 1
    rows: int = 1

    def as_list(self) -> list[int]:
        return [self.vector, self.broadcast, self.rows]


def divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0 and d <= n]


def vector_candidates(extent: int, lanes: int) -> list[int]:
    """Divisors of ``extent`` worth vectorizing: up to 4 registers wide, made of power-of-two
    vectors when possible. An extent without such a divisor is taken whole: up to 4 registers it
    is one (odd-sized) vector; longer, it is a *streaming* tile (see ``is_streaming``)."""
    small = [d for d in divisors(extent, min(extent, 4 * lanes)) if d >= min(lanes, extent) // 2 or d == extent]
    friendly = [d for d in small if _is_power_of_two(vector_width(d, lanes))]
    return friendly or [extent]


def is_streaming(vector_tile: int, lanes: int) -> bool:
    """A vector tile too long for registers (an extent like 6625 = 5^3 x 53 with no power-of-two
    divisor): its accumulators live in memory and LLVM vectorizes the loop over it, remainder
    included."""
    return vector_tile > 4 * lanes


def _is_power_of_two(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0


# below this many multiply-adds (or elements) a kernel runs on one thread: waking the pool costs
# microseconds, and far more when the cores are shared. Measured with the shared thread policy on
# 2 threads (one run idle, one with the other core busy): doc-orientation 10.5 -> 6.4 ms idle and
# 9.5 -> 9.0 busy, ShuffleNet 12.6 -> 10.6 and 10.3 -> 8.7, PP-OCRv4 rec 34 -> 32, inception_v1
# and the 800x608 layout detector within noise, going from 2^17 to 2^20
PARALLEL_MIN_WORK = 1 << 20


# the same for copies and elementwise blocks, counted in elements: an element moves bytes through
# memory where a conv's vector loop retires tens of multiply-adds in the same time. 2^17 against 2^20,
# 2 threads, builds interleaved (session 18): PP-OCRv4 det int8 7.11 -> 6.49 ms (its FPN's resize +
# add and pixel shuffle), fp32 10.43 -> 10.27; the 800x608 layout detector int8 34.1 -> 32.2; rec and
# doc-orientation within 2%; with the other core busy all four within 2%. 2^15 was no better
PARALLEL_MIN_ELEMENTS = 1 << 17


# a kernel that computes its padding per channel plane runs its parallel loop over (n, c) planes only:
# with fewer planes than this it pads and runs per band of rows instead, in parallel over the bands (a
# stem's one 16-channel block at 160x160 or ZFNet's LRN over 5 channels of a (1, 1, 96, 109, 109)
# tensor ran in one thread)
PER_PLANE_MIN_PLANES = 4


# what one unit of a kernel's work (one multiply-add, or one window element of a pool) costs against
# a conv's multiply-add in its register tile, 1 thread: a depthwise's has no reuse across channels (4x),
# a pool's window element is a load and a max or add, strided or gathered at stride 2 (16x; AlexNet's
# 3x3 stride-2 max pool, 584k of them, took 0.56 ms in one thread, ZFNet's 5x5 conv ~0.015 ns per
# multiply-add). With these (and PER_PLANE_MIN_PLANES), 2 threads idle, old and new builds in the same
# rounds: AlexNet 12.5 -> 11.9 ms, doc-orientation 1.88 -> 1.66, inception_v1 10.6 -> 9.9, PP-OCRv6 rec
# 9.1 -> 8.9; with both cores busy with other processes each 0-6% faster
WORK_COST = {"depthwise": 4, "pool": 16}  # by ReductionAnatomy.kind; the blocked depthwise counts as "depthwise"


def worth_parallel(work: int, kind: str = "") -> bool:
    return work * WORK_COST.get(kind, 1) >= PARALLEL_MIN_WORK


def worth_parallel_elements(elements: int) -> bool:
    return elements >= PARALLEL_MIN_ELEMENTS


def vector_width(vector_tile: int, lanes: int) -> int:
    """Lanes of one vector instruction for a vector tile: the largest power of two <= the register
    width dividing the tile (LLVM splits wider or odd vector types into inserts and shuffles); a
    tile with no such divisor >= 4 is vectorized whole."""
    width = lanes
    while width >= 4:
        if vector_tile % width == 0:
            return width
        width //= 2
    return vector_tile


def vector_registers(vector_tile: int, lanes: int) -> int:
    width = vector_width(vector_tile, lanes)
    return ceil(vector_tile / width) * ceil(width / lanes)


def tile_score(tile: Tile, lanes: int, budget: int, outer_tiles: int, threads: int) -> tuple:
    if is_streaming(tile.vector, lanes):
        return (min(outer_tiles / (2 * threads), 1.0), tile.broadcast, tile.vector)
    vregs = vector_registers(tile.vector, lanes)
    acc = tile.broadcast * tile.rows * vregs
    if acc > budget:
        return (-1.0,)
    lane_use = tile.vector / (ceil(tile.vector / lanes) * lanes)
    loads = tile.broadcast + tile.rows * vregs
    intensity = min(acc / loads, 6.0)
    busy = min(outer_tiles / (2 * threads), 1.0)
    return (round(lane_use * intensity * (0.5 + 0.5 * busy), 3), acc, tile.vector)


def candidate_tiles(vector_extent: int, broadcast_extent: int, row_extent: int,
                    traits: TargetTraits, row_length: int = 0) -> list[Tile]:
    """``row_length`` (a vector axis fused from rows of that length): a tile must cover whole rows
    or divide one, or the epilogue of a tile would span a partial row."""
    budget = traits.accumulator_registers
    out = []
    vectors = vector_candidates(vector_extent, traits.vector_lanes)
    if row_length:
        vectors = [v for v in _aligned_vectors(vector_extent, traits.vector_lanes, row_length)] or [row_length]
    for v in vectors:
        if is_streaming(v, traits.vector_lanes):  # accumulators in memory: a few rows, no register budget
            out += [Tile(v, b, 1) for b in divisors(broadcast_extent, min(broadcast_extent, 4))]
            continue
        vregs = vector_registers(v, traits.vector_lanes)
        for b in divisors(broadcast_extent, min(broadcast_extent, 16)):
            if b * vregs > budget:
                continue
            for r in divisors(row_extent, min(row_extent, 16)):
                if b * r * vregs <= budget:
                    out.append(Tile(v, b, r))
    return out


def _aligned_vectors(extent: int, lanes: int, row_length: int) -> list[int]:
    return [v for v in vector_candidates(extent, lanes) + divisors(extent, min(extent, 4 * lanes))
            if (v % row_length == 0 or row_length % v == 0) and _is_power_of_two(vector_width(v, lanes))]


# a matrix-vector product (one output row) with up to this many columns keeps one accumulator per
# column in memory and streams the weight rows whole, in order: AlexNet's 9216x4096 fully connected
# layer 17 -> 9.7 ms (onnxruntime 7-8), 4096x1000 1.7 -> 0.42 ms (0.46), 1 thread; a tile of part
# of a row (2048 columns) read the weights as strided streams and measured no faster than 32 columns
GEMV_MAX_COLUMNS = 4096


def gemv_tile(vector_extent: int, reduce_extent: int, other_extent: int, lanes: int) -> Tile | None:
    """The whole-row streaming tile for a matrix-vector product, or None for other reductions."""
    if other_extent == 1 and 4 * lanes < vector_extent <= GEMV_MAX_COLUMNS and reduce_extent >= 256:
        return Tile(vector_extent, 1, 1)
    return None


def ranked_tiles(vector_extent: int, broadcast_extent: int, row_extent: int, traits: TargetTraits,
                 other_parallel: int = 1, threads: int = 2, count: int = 4, row_length: int = 0) -> list[Tile]:
    """The ``count`` best tiles by the heuristic score (candidates for a local search)."""
    scored = []
    for t in sorted(set(candidate_tiles(vector_extent, broadcast_extent, row_extent, traits, row_length)),
                    key=lambda t: t.as_list()):
        outer = other_parallel * (vector_extent // t.vector) * (broadcast_extent // t.broadcast) \
            * (row_extent // t.rows)
        scored.append((tile_score(t, traits.vector_lanes, traits.accumulator_registers, outer, threads), t))
    scored.sort(key=lambda st: st[0], reverse=True)
    return [t for _, t in scored[:count]]


# computing up to this many times the output channels (zero weights, sliced off) beats the
# width-vectorized kernel on rows of whole vectors: ShuffleNet's 34- and 68-channel groups compute 40
# and 72 (grouped 1x1 convs over planes of whole vectors run as matmuls instead since session 20:
# grouped_pointwise_as_matmul). On other widths up to twice: PP-OCRv6 det's 24->12 2x2 at 368x368 (367
# wide) ran at 2.1x onnxruntime's time with the width kernel, 0.95x with 16 channels computed.
MAX_CHANNEL_PADDING = 1.25


# wider channel blocks may compute up to this fraction more channels than whole vectors do (zero
# weights): SqueezeNet's 512->1000 1x1 at 13x13 computes 1008 channels in blocks of 3 vectors
# (9 accumulators) instead of 1000 in blocks of one (7)
EXTRA_BLOCK_PADDING = 1 / 16


# a blocked input on AVX-512 (32 registers; Zen 4 issues one 16-lane FMA per cycle and two loads):
# once a tile makes one FMA per load, more accumulators buy nothing, while padded columns and unused
# rows cost in proportion; 8 accumulators hide the FMA latency. So the score caps the intensity at
# SATURATING_INTENSITY and scales tiles of fewer than MIN_ACCUMULATORS down. Measured on Zen 4 (each
# conv alone, 1 thread, thread CPU time, best of 9): SqueezeNet's 512->1000 1x1 at 13x13 as 16
# channels x 13 columns instead of 48 x 7 (one padded column) 1.92 -> 1.67 ms (onnxruntime 1.75), all
# its convs 6.93 -> 6.44 ms; inception_v1's 27.4 -> 26.1, PP-OCRv6 det small's 129.8 -> 127.6,
# resnet50's 72.9 -> 71.9; PP-OCR det, doc-orientation and vgg19 within 0.5%. Not for NCHW inputs
# (PP-OCRv6 det's 24->96 1x1 at 184x184 read from NCHW: 3.5 -> 3.9 ms with the cap) nor for targets
# not measured (AVX2's 16 registers, NEON).
SATURATING_INTENSITY = 1.0
MIN_ACCUMULATORS = 8


def grouped_pointwise_as_matmul(shape, conv_traits: TargetTraits, matmul_traits: TargetTraits) -> bool:
    """Whether a grouped 1x1 conv (blocked_conv.ConvShape; grouped_pointwise_matmul.is_grouped_pointwise)
    runs as one matmul per group over its planes rather than in the channel-blocked kernel: when the
    blocked kernel would pad each group's output channels to whole vectors and the planes are whole
    vectors of the matmul kernel (which vectorizes over pixels: nothing padded). Measured on an Intel
    Xeon (16 lanes for both), ShuffleNet, 1 thread, whole model (8 interleaved rounds): its 34-channel
    groups at 28x28 (computed as 48 channels) and 28-channel groups at 56x56 and 28x28 as matmuls 4.67 ->
    4.23 ms, with their bias, residual add and ReLU fused into the matmuls 4.08 (onnxruntime 4.29); the
    68- and 136-channel groups at 14x14 and 7x7 (planes of 196 and 49 pixels) as matmuls too: 18 ms."""
    return shape.out_channels % conv_traits.vector_lanes != 0 \
        and (shape.height * shape.width) % matmul_traits.vector_lanes == 0


def conv_tile(shape, traits: TargetTraits, in_block: int = 0, out_block: int = 0):
    """The channel-blocked conv kernel's tile for a conv2d (blocked_conv.ConvShape) reading NCHW
    (``in_block`` 0) or NCHW<in_block>c and writing NCHW or NCHW<out_block>c, or None to keep the
    width-vectorized kernel (output channels that whole vectors would pad by more than
    ``MAX_CHANNEL_PADDING``, or a short reduction over rows of whole vectors).

    Measured on AVX2 (16 registers): 8-9 accumulator vectors is the sweet spot (12-16 spill and run
    at half speed); 3 vectors of channels x 3 pixels (9 accumulators, 3 weight vectors and the
    broadcast: 13 registers) beat 2 x 4 by 10-25% where the channels allow it. So: accumulators,
    weights and the broadcast within the register file less 3, and at most half of it plus one for
    accumulators; pixels as columns (a row pair when the width is small); the least padding of the
    width, then the most FMAs per load.

    A blocked input (its broadcasts walk contiguous channels) takes up to 3/4 of the register file
    in accumulators, all but the weights and the broadcast: on AVX2 3 vectors of channels x 4 pixels
    (12 accumulators) beat 3 x 3 by 8-20% with NCHW8c in and out (resnet50's 64->256 1x1 at 56x56
    1.33 -> 1.21 ms, 128->512 1x1 at 28x28 1.38 -> 1.21, 256->256 3x3 at 14x14 3.00 -> 2.66;
    PP-OCRv6 det's 384->192 1x1 at 46x46 4.8 -> 3.7 with 2 rows x 2 columns, no padded width)."""

    lanes = traits.vector_lanes
    channels = -(-shape.out_channels // lanes) * lanes  # computed: whole vectors, extra rows zero
    # a width of no whole vectors costs the width kernel as much: then up to twice the channels
    if channels > (MAX_CHANNEL_PADDING if shape.out_width % lanes == 0 else 2) * shape.out_channels:
        return None
    if shape.in_channels * shape.kernel[0] * shape.kernel[1] <= 32 and shape.out_width % lanes == 0 \
            and shape.strides == (1, 1) and not (in_block or out_block):
        # short reductions over whole vectors of width (PP-OCR cls 16->104 1x1 at 3x96, det 12->96 at
        # 80x80): the width-vectorized kernel measured up to 1.8x faster. Not at stride 2, where it
        # reads every other column: PP-OCRv6 det's 3->24 3x3 stem at 736x736 7.3 -> 3.7 ms blocked
        # (2.7 writing NCHW8c; onnxruntime 4.5). Nor between blocked layers: doc-orientation's 16->32
        # 1x1 at 112x112 0.34 ms with the width kernel (and NCHW around it), 0.29 blocked in and out
        return None
    ranking = conv_tile_ranking(shape, traits, in_block, out_block)
    return ranking[0] if ranking else None


def conv_tile_ranking(shape, traits: TargetTraits, in_block: int = 0, out_block: int = 0, count: int = 0) -> list:
    """The channel-blocked conv kernel's tiles for ``shape`` in these layouts, best-scored first
    (``count`` > 0: only that many), whatever ``conv_tile`` would decide about the width kernel: the
    candidates a measured search times (tile_search)."""
    from sculpt.backends.tvm.kernels.blocked_conv import ConvTile

    lanes = traits.vector_lanes
    channels = -(-shape.out_channels // lanes) * lanes
    oh, ow = shape.out_height, shape.out_width
    saturating = bool(in_block) and traits.isa == "avx512"
    scored = []
    for vregs in (3, 2, 1):
        ob = vregs * lanes
        computed = -(-channels // ob) * ob
        if computed > channels * (1 + EXTRA_BLOCK_PADDING):
            continue
        if in_block and traits.wide_at_full_rate:
            # two FMA units need twice the accumulators in flight: every register but the weights
            # and the broadcast. SqueezeNet's 512->1000 1x1 at 13x13 (NCHW16c in), 1 thread, in the
            # model: 16 x 13 1.45-1.57 ms, 48 x 7 1.35-1.42, 32 x 13 (26 accumulators) 1.30
            budget = traits.vector_registers - vregs - 1
        elif in_block:
            budget = min(traits.vector_registers * 3 // 4, traits.vector_registers - vregs - 1)
            if vregs == 2 and shape.kernel == (1, 1):
                # 2 vectors of channels of a 1x1 conv: half the register file (4 pixels on AVX2), not
                # 3/4 (6 pixels): resnet50's 512->128 at 28x28 and densenet121's 256->128 at 14x14
                # (NCHW8c) 5% faster, min of 18 interleaved runs; the tile search picked the same on
                # 30 of densenet121's 1x1 convs. The 3x3 convs keep 6 pixels (64->64 at 56x56: 6%
                # faster than 4)
                budget = min(budget, traits.vector_registers // 2)
        else:
            budget = min(traits.vector_registers // 2 + 1, traits.vector_registers - 3 - vregs - 1)
        pixels = max(1, budget // vregs)
        for th in (1, 2, 4):
            # rows the tile does not divide (a blocked input only): the last band is partial
            if th > pixels or th > oh or (oh % th and not in_block):
                continue
            rows_used = oh / (-(-oh // th) * th)
            for tw in range(1, min(pixels // th, ow) + 1):
                padded = -(-ow // tw) * tw
                acc = th * tw * vregs
                intensity = acc / (th * tw + vregs)
                if saturating:
                    intensity = min(intensity, SATURATING_INTENSITY) * min(acc / MIN_ACCUMULATORS, 1.0)
                # on a tie, rows the tile leaves unused over padded columns: resnet50's 512->512 3x3
                # and 512->2048 1x1 at 7x7 (NCHW8c) ran 7-17% faster with 4 rows x 1 column than with
                # 1 x 4 (same waste: 7 of 8 rows or columns), no padded width or slice after the conv
                score = (round(intensity * rows_used * ow / padded * channels / computed, 3), padded == ow, vregs,
                         -th, tw)
                scored.append((score, ConvTile(ob, th, tw)))
    scored.sort(key=lambda st: st[0], reverse=True)
    rows_outer = int(_rows_outer(shape, channels, traits))
    tiles = [ConvTile(t.ob, t.th, t.tw, 0, rows_outer, in_block, out_block) for _, t in scored]
    return tiles[:count] if count > 0 else tiles


def _rows_outer(shape, channels: int, traits: TargetTraits) -> bool:
    """Bands of rows outermost when the input map does not stay in cache across the channel blocks
    and the weights, re-read once per band, are not much larger than the input: the input is then
    read (and padded) once, not once per channel block. Measured on AVX2, 1 thread, against
    onnxruntime's time: PP-OCRv6 det's 48->96 1x1 at 184x184 1.7x -> 1.1x, its 48->24 3x3 stride 2
    at 368x368 1.7x -> 1.2x; VGG's 128->128 3x3 at 112x112 (590 KB of weights) 1.43x -> 1.08x, its
    256->256 at 56x56 (2.4 MB of weights) 1.51x -> 1.38x; 512->512 at 28x28 (9.4 MB of weights,
    1.6 MB of input) within noise either way.

    On a core with two 512-bit units (the Intel server cores: 1-2 MB of L2, where the traits say 1 MB)
    an input up to the whole L2 still serves every channel block from cache: rows outer from there.
    Intel Xeon, 1 thread, whole models A/B (6-8 interleaved rounds), two runs: resnet50 -3.8% and
    -0.8%, PP-OCRv6 rec small -1.6% and -0.9% (its 384->192 and 768->384 1x1 convs over 737 KB
    inputs), inception_v1 +1.0% and -0.5%; seven other zoo models within +-0.8% in one run."""
    input_bytes = 4 * shape.in_channels * shape.height * shape.width
    weight_bytes = 4 * channels * shape.in_channels * shape.kernel[0] * shape.kernel[1]
    threshold = traits.l2_bytes if traits.wide_at_full_rate else traits.l2_bytes // 2
    return input_bytes > threshold and weight_bytes <= 4 * input_bytes


# F(2x2, 3x3) (winograd_conv) in place of the direct blocked kernel: a 3x3 stride-1 conv of at least
# this many channels on each side and this many multiply-adds. Measured on AVX-512 (Zen 4), 1 thread,
# one conv + bias + ReLU between two blocked 1x1 convs, whole model, direct -> Winograd (medians of 5
# rounds): 256->256 at 28x28 8.2 -> 4.0 ms per conv, 64->64 at 224x224 52.7 -> 41.5 ms (whole model),
# 96->24 at 184x184 24.5 -> 20.8, 24->24 at 92x92 1.27 -> 0.87, 32->16 at 56x56 0.36 -> 0.31, 16->16
# at 112x112 0.77 -> 0.70, 48->48 at 23x23 0.26 -> 0.17, 128->32 at 7x7 (1.8M multiply-adds) 0.049 ->
# 0.044; nothing measured was slower. Smaller convs and 8-channel ones are left direct, unmeasured.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_MACS = 1_000_000
# on a core with two 512-bit units (TargetTraits.wide_at_full_rate) the direct kernel runs twice the
# FMAs per cycle while the transforms, memory-bound, do not speed up. Per output pixel Winograd saves
# 5 Ci Co of the direct kernel's 9 Ci Co multiply-adds and its transforms cost in proportion to Ci + Co:
# there it needs Ci Co / (Ci + Co) of at least this. Intel Xeon, 1 thread, 8-10 interleaved rounds:
# SqueezeNet's 16->64 at 55x55 (12.8) direct 4.02 -> 3.87 ms (onnxruntime 3.89), its 32->128 at 27x27
# (25.6) direct too 3.97; PP-OCRv6 det small's 96->24 at 184x184 (19.2) direct 104.8 -> 106.2
WINOGRAD_MIN_CHANNEL_PRODUCT_FULL_RATE = 16
# Winograd's product reads 16 Ci Co transformed weights against the direct kernel's 9 Ci Co, each once
# per conv. Weights over L2 come from memory, and on a small map the product does too little per weight
# to hide it: ResNet-50's 512->512 at 7x7 (16 MB transformed, 16 tiles) took 1.82 ms per conv in the
# Winograd product alone (in the model, 1 thread, Intel Xeon; onnxruntime's conv 1.68), the direct
# kernel 1.30 alone; direct, the model went 42.9 -> 41.9 ms (8 interleaved rounds). Such a conv stays
# direct below this many output pixels (14x14's 196 keep Winograd: ResNet's 256->256 0.65 ms against
# onnxruntime's 1.14).
WINOGRAD_MIN_PIXELS_WEIGHTS_OVER_L2 = 64


def winograd_worth(shape, traits: TargetTraits) -> bool:
    """Whether a blocked 3x3 stride-1 conv (blocked_conv.ConvShape) is computed by F(2x2, 3x3)
    (winograd_conv) rather than directly."""
    macs = shape.in_channels * shape.out_channels * shape.out_height * shape.out_width * 9
    ci, co = shape.in_channels, shape.out_channels
    if traits.wide_at_full_rate and ci * co < WINOGRAD_MIN_CHANNEL_PRODUCT_FULL_RATE * (ci + co):
        return False
    transformed_weight_bytes = 16 * ci * co * 4
    if transformed_weight_bytes > traits.l2_bytes \
            and shape.out_height * shape.out_width < WINOGRAD_MIN_PIXELS_WEIGHTS_OVER_L2:
        return False
    return min(ci, co) >= WINOGRAD_MIN_CHANNELS and macs >= WINOGRAD_MIN_MACS
