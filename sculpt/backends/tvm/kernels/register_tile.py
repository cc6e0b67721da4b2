"""The register-tiled kernel schedule (mechanism): conv2d k x k, 1x1 conv, depthwise, matmul, pooling.

Layout is NCHW throughout (the layout ONNX models come in): the contiguous output axis (ow, or j of
a matmul) is the vector axis, so no layout transform is needed anywhere in the model. For one main
reduction block with anatomy ``a`` (block_analysis) and a ``Tile``:

    parallel for (all outer tiles, broadcast tiles innermost so the streamed rows stay in cache)
        acc[broadcast][rows][vector] = init              # "local" buffer -> registers
        for reduction axes (rc, ry, rx / k):
            for b in unrolled(broadcast): for r in unrolled(rows):
                acc[b][r][:] += w[b] * x[r][:]           # vector FMA, w broadcast from a scalar
        epilogue(acc) -> output                          # bias, activation, residual: fused, vectorized

1x1 conv is this GEMM with M = co, N = (oh, ow), K = ci; a k x k conv adds ry, rx to the
reduction (direct convolution on the padded input, no im2col); depthwise has no broadcast axis
(rows only); matmul vectorizes j and broadcasts i; pooling is the same loop with max/sum.
Padding stays a separate parallel stage (inlining it would put a branch in the inner loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sculpt.backends.tvm.kernels.block_analysis import (
    ReductionAnatomy, contiguous_along_last_axis, has_if_then_else, is_reduction, reads_pointwise, root_blocks,
    writes_function_output)
from sculpt.backends.tvm.kernels.tiling import (PER_PLANE_MIN_PLANES, Tile, is_streaming, vector_width, worth_parallel,
                                                worth_parallel_elements)


ACCUMULATOR_SCOPE = "global"


@dataclass
class KernelDecision:
    """What was done to one PrimFunc (for reports and tests)."""

    func: str
    kind: str
    shape: tuple
    tile: list[int] | None
    note: str = ""


def inline_epilogue(sch, func, main) -> list:
    """Inline every elementwise block after the main block into its consumer; the remaining
    blocks after ``main`` are returned (normally one: the block writing the output)."""
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    main_pos = names.index(sch.get(main).name_hint)
    remaining = []
    for b in blocks[main_pos + 1:]:
        if writes_function_output(sch, b, func):
            remaining.append(b)
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - a block that cannot inline stays a separate stage
            remaining.append(b)
    return remaining


def accumulator_tail(sch, main, epilogue: list) -> tuple[object, list]:
    """(tail, epilogue): the block computed per register tile from the accumulators, and the blocks
    that run as stages of their own. The tail is the one epilogue block (bias, activation, residual
    inlined) when it reads the kernel's output pointwise; otherwise (a padding, a broadcast gate, a
    shuffle after the kernel) a cache stage of the accumulators, and the epilogue gets its own stage."""
    if len(epilogue) == 1 and reads_pointwise(sch, epilogue[0], main):
        return epilogue[0], epilogue
    tail = sch.cache_write(main, 0, ACCUMULATOR_SCOPE)
    return tail, (epilogue + [tail] if len(epilogue) == 1 else epilogue)


def inline_branch_free_producers(sch, main) -> None:
    """Inline copies/reshapes before the main block; padding (a branch) stays a separate stage."""
    main_name = sch.get(main).name_hint
    for b in root_blocks(sch):
        if sch.get(b).name_hint == main_name:
            break
        if not has_if_then_else(sch, b) and not is_reduction(sch, b):
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - stays a separate stage
                pass


def deinterleave_strided_input(sch, main, anatomy: ReductionAnatomy) -> bool:
    """Horizontal stride s > 1: store the padded input as (..., w % s, w // s) so that the kernel's
    vector loads along ow are contiguous instead of strided (the padding stage writes it so)."""
    from tvm import tirx

    block = sch.get(main)
    ow = block.iter_vars[anatomy.vector.index].var
    for read_index, region in enumerate(block.reads):
        buf = region.source
        last = region.region[-1].min
        stride = _coefficient_of(last, ow)
        if stride is None or stride <= 1:
            continue
        width = int(buf.shape[-1])
        producers = [b for b in root_blocks(sch) if any(w.source.same_as(buf) for w in sch.get(b).writes)]
        if len(producers) != 1 or width % stride:
            return False
        index_map = tirx.IndexMap.from_func(_split_last_axis(stride), ndim=len(buf.shape))
        sch.transform_layout(producers[0], ("write", 0), index_map)
        # iterate the padding stage in the new layout: contiguous stores along w // s
        sch.transform_block_layout(producers[0], index_map)
        return True
    return False


def _split_last_axis(stride: int):
    def split_last(*idx):
        return (*idx[:-1], idx[-1] % stride, idx[-1] // stride)
    return split_last


def _coefficient_of(expr, var) -> int | None:
    """c when expr is c * var + (terms without var), else None."""
    from tvm import tirx

    if isinstance(expr, tirx.Add):
        a, b = _coefficient_of(expr.a, var), _coefficient_of(expr.b, var)
        if a is not None and b is not None:
            return a + b
        return None
    if isinstance(expr, tirx.Mul):
        if isinstance(expr.b, tirx.IntImm):
            inner = _coefficient_of(expr.a, var)
            return None if inner is None else inner * int(expr.b.value)
        if isinstance(expr.a, tirx.IntImm):
            inner = _coefficient_of(expr.b, var)
            return None if inner is None else inner * int(expr.a.value)
    if isinstance(expr, tirx.Var):
        return 1 if expr.same_as(var) else 0
    if isinstance(expr, tirx.IntImm):
        return 0
    return None


def vectorize_in_registers(sch, loop, lanes: int) -> None:
    """Vectorize ``loop``; longer than one register and a multiple of it, as unrolled whole registers
    (LLVM splits odd-sized vectors badly)."""
    width = int(sch.get(loop).extent)
    if width > lanes and width % lanes == 0:
        regs, loop = sch.split(loop, factors=[None, lanes])
        sch.unroll(regs)
    sch.vectorize(loop)


def vectorize_blocked_tail(sch, tail, lanes: int) -> None:
    """The tail computed per register tile into an NCHW<c>c output (bias, activation, residual add
    read from the accumulators): its lanes as whole vectors, its other loops unrolled. Left to LLVM,
    the tail ran as scalar code: resnet50's 64->256 1x1 at 56x56 with its residual add, NCHW8c in
    and out, 1.72 -> 1.20 ms (the conv alone 1.19)."""
    own = sch.get_loops(tail)[-len(sch.get(tail).iter_vars):]
    if int(sch.get(own[-1]).extent) % lanes:
        return
    for lp in own[:-1]:
        if int(sch.get(lp).extent) > 1:
            sch.unroll(lp)
    vectorize_in_registers(sch, own[-1], lanes)


def schedule_other_epilogue_stages(sch, epilogue: list, tail, lanes: int) -> None:
    """The epilogue blocks that are not computed per tile from the accumulators: stages of their own."""
    if len(epilogue) > 1:
        for b in epilogue:
            if not sch.get(b).same_as(sch.get(tail)):
                schedule_injective_block(sch, b, lanes)


def schedule_padding_block(sch, block, lanes: int) -> None:
    """A padding stage: split into a zero fill and a branch-free copy of the interior when TVM can
    (both then vectorize), else an injective schedule."""
    if has_if_then_else(sch, block):
        try:
            fill = sch.decompose_padding(block, sch.get_loops(block)[0])
        except Exception:  # noqa: BLE001 - keep the single stage
            fill = None
        if fill is not None:
            schedule_injective_block(sch, fill, lanes)
    schedule_injective_block(sch, block, lanes)


def schedule_padding_at(sch, block, loop, lanes: int, blocked: bool = False) -> None:
    """A padding stage computed under ``loop`` of its consumer (only the rows one iteration reads):
    a zero fill and a branch-free copy of the interior when TVM can split it, whole vectors of the
    innermost loop vectorized, nothing parallel (``loop`` is). ``blocked``: the padded tensor is
    NCHW<c>c (channel blocks, rows, columns, lanes) instead of NCHW."""
    sch.compute_at(block, loop, preserve_unit_loops=True)
    stages = [block]
    if has_if_then_else(sch, block):
        try:
            stages.insert(0, sch.decompose_padding(block, sch.get_loops(block)[-4 if blocked else -3]))
        except Exception:  # noqa: BLE001 - keep the single stage
            pass
    for stage in stages:
        inner = sch.get_loops(stage)[-1]
        extent = int(sch.get(inner).extent)
        if extent % lanes == 0 and extent >= lanes and contiguous_along_last_axis(sch, stage) \
                and not has_if_then_else(sch, stage):
            sch.vectorize(sch.split(inner, factors=[None, lanes])[1] if extent > lanes else inner)


def schedule_injective_block(sch, block, lanes: int, max_vector: int = 64) -> None:
    """Parallel over the outer loops (when the block is big enough), vectorized innermost loop
    (when its reads are contiguous or constant along it and branch-free)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    work = 1
    for e in extents:
        work *= e
    reduction = is_reduction(sch, block)
    inner = loops[-1]
    vectorize = not reduction and contiguous_along_last_axis(sch, block) and extents[-1] > 1
    if vectorize and extents[-1] > max_vector:
        factor = next((d for d in range(max_vector - max_vector % lanes, lanes - 1, -lanes)
                       if d > 0 and extents[-1] % d == 0), None)
        if factor is None:
            vectorize = False
        else:
            _, inner = sch.split(inner, factors=[None, factor])
            loops = sch.get_loops(block)
    if reduction:
        kinds = _loop_kinds(sch, block)
        outer = loops[:kinds.index("R")] if "R" in kinds else loops
    else:
        outer = loops[:-1]
    if outer and worth_parallel_elements(work):
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if int(sch.get(fused).extent) > 1:
            sch.parallel(fused)
    if vectorize:
        sch.vectorize(inner)


def _loop_kinds(sch, block) -> list[str]:
    """'S' for a loop bound only to spatial iter vars, 'R' otherwise (loops match iter vars)."""
    ivs = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    if len(loops) != len(ivs):
        return ["R"] * len(loops)
    return ["S" if int(iv.iter_type) == 0 else "R" for iv in ivs]


# depthwise and pool inputs whose padded channel plane has at least this many elements are padded one
# plane at a time (measured on AVX2, 1 thread: 64 channels at 56x56 0.18 -> 0.13 ms, 32 at 112x112
# stride 2 0.32 -> 0.21, 96 at 184x184 7x7 20 -> 13, a 3x3 stride-2 max pool over 64 x 112x112
# 1.08 -> 0.66); on smaller planes (14x14, 28x28) one pass over the whole input measured faster
PER_PLANE_MIN_ELEMENTS = 2048


def _plane_elements(sch, block) -> int:
    """Elements of one channel plane (one channel block's, in NCHW<c>c) of the tensor ``block``
    writes: everything after its batch and channel axes."""
    return math.prod(int(d) for d in sch.get(block).writes[0].source.shape[2:])


def schedule_register_tile(sch, func, main, anatomy: ReductionAnatomy, tile: Tile, lanes: int) -> None:
    """Apply the register-tiled schedule to ``main`` (see the module docstring)."""
    a = anatomy
    epilogue = inline_epilogue(sch, func, main)
    inline_branch_free_producers(sch, main)
    deinterleaved = deinterleave_strided_input(sch, main, a)
    skip = {sch.get(b).name_hint for b in epilogue} | {sch.get(main).name_hint}
    producers = [b for b in root_blocks(sch) if sch.get(b).name_hint not in skip]

    loops = sch.get_loops(main)
    if a.fused_rows:  # (oh, ow) -> one contiguous axis: the 1x1 conv as a plain GEMM over oh*ow
        sch.fuse(loops[a.vector.index], loops[a.vector.index + 1])
        loops = sch.get_loops(main)
    outer_of, inner_of = {}, {}
    for axis, size in ((a.vector, tile.vector), (a.broadcast, tile.broadcast), (a.row, tile.rows)):
        if axis is None:
            continue
        o, i = sch.split(loops[axis.index], factors=[None, size])
        outer_of[axis.index], inner_of[axis.index] = o, i
    tiled = [x.index for x in (a.broadcast, a.row, a.vector) if x is not None]
    outer = []
    for s in a.spatial:
        if s.index in outer_of:
            if a.broadcast is not None and s.index == a.broadcast.index:
                continue
            outer.append(outer_of[s.index])
        else:
            outer.append(loops[s.index])
    if a.broadcast is not None:
        outer.append(outer_of[a.broadcast.index])
    reduce_loops = [loops[r.index] for r in a.reduce]
    inner = [inner_of[i] for i in tiled]
    sch.reorder(*outer, *reduce_loops, *inner)

    # The accumulator tile: an intermediate buffer that CompactBufferAllocation shrinks to the tile.
    # It stays in "global" scope: TVM 0.27 lowers small "global" allocations to a stack alloca that
    # LLVM promotes to registers, but every "local" one to a TVMBackendAllocWorkspace call.
    tail, epilogue = accumulator_tail(sch, main, epilogue)
    sch.reverse_compute_at(tail, outer[-1], preserve_unit_loops=True)
    streaming = is_streaming(tile.vector, lanes)
    width = vector_width(tile.vector, lanes)
    if streaming:  # left to LLVM's loop vectorizer (it handles the remainder)
        width = tile.vector
    elif width < tile.vector:
        vec_unrolled, vec_lanes = sch.split(inner[-1], factors=[None, width])
        inner = inner[:-1] + [vec_unrolled, vec_lanes]
    if not streaming:
        for lp in inner[:-1]:
            sch.unroll(lp)
        sch.vectorize(inner[-1])
    tail_loops = sch.get_loops(tail)  # per tile: (broadcast, rows, vector), or whole rows when fused
    tail_extent = int(sch.get(tail_loops[-1]).extent)
    tail_width = vector_width(tail_extent, lanes)
    if streaming or tail_extent == 1:
        pass
    elif tail_width < tail_extent:
        _, tail_lanes = sch.split(tail_loops[-1], factors=[None, tail_width])
        sch.vectorize(tail_lanes)
    else:
        sch.vectorize(tail_loops[-1])
    # depthwise and pools: padding per channel plane (it stays in cache) instead of one pass over the
    # whole input, so the parallel loop covers (n, c) only and the tiles of a plane run inside it
    # (when there are enough planes to share out)
    per_plane = a.kind in ("depthwise", "pool") and len(outer) > 2 and len(producers) == 1 \
        and _plane_elements(sch, producers[0]) >= PER_PLANE_MIN_ELEMENTS \
        and math.prod(int(sch.get(lp).extent) for lp in outer[:2]) >= PER_PLANE_MIN_PLANES
    fused = sch.fuse(*outer[:2]) if per_plane else sch.fuse(*outer)
    work = a.reduce_extent
    for ax in a.spatial:
        work *= ax.extent
    if worth_parallel(work, a.kind):
        sch.parallel(fused)
    # last: after decomposition the update block is neither complete nor a reduction, and the
    # loop primitives above refuse such blocks; the init loops inherit the annotations
    sch.decompose_reduction(main, reduce_loops[0])
    if len(epilogue) != 1:
        for b in epilogue:
            if not sch.get(b).same_as(sch.get(tail)):
                schedule_injective_block(sch, b, lanes)
    for b in producers:
        if per_plane:
            schedule_padding_at(sch, b, fused, lanes)
        elif deinterleaved:  # zero-fill + interior copy in the split layout measured slower than one pass
            schedule_injective_block(sch, b, lanes)
        else:
            schedule_padding_block(sch, b, lanes)
