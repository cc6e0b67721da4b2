"""The schedule rule that turns every legalized PrimFunc of a Relax module into a sculpt kernel.

Applied after LegalizeOps + FuseOps + FuseTIR, so the epilogues (bias, activation, residual add)
that Relax fused into a conv/matmul are scheduled with it. Dispatch, per PrimFunc:

- one main reduction block with a vectorizable output axis -> register-tiled kernel
  (conv2d, conv2d_1x1, depthwise, matmul, pool; tiles from the per-target heuristic or the cache
  of the local search);
- no reduction -> injective kernel (elementwise chains, padding, resize, transposes): parallel,
  vectorized;
- anything else (softmax, layer norm, global means) -> every block parallel over its spatial loops.
If a schedule fails on an unusual function, the next simpler one is used; a function is never
left worse than TVM's default (naive loops)."""

from __future__ import annotations

from typing import Callable

from sculpt.backends.tvm.kernels.block_analysis import (
    analyze_reduction, is_reduction, root_blocks, rows_fusable, with_fused_rows, writes_function_output)
from sculpt.backends.tvm.kernels.register_tile import (
    KernelDecision, inline_epilogue, schedule_injective_block, schedule_register_tile)
from sculpt.backends.tvm.kernels.blocked_conv import schedule_blocked_conv, tile_from_block_name
from sculpt.backends.tvm.kernels import blocked_depthwise, winograd_conv
from sculpt.backends.tvm.kernels.local_response_norm import local_response_norm_block, schedule_local_response_norm
from sculpt.backends.tvm.kernels.row_softmax import is_row_softmax, schedule_row_softmax, softmax_lanes
from sculpt.backends.tvm.kernels.target_traits import TargetTraits, traits_of
from sculpt.backends.tvm.kernels.tiling import Tile, gemv_tile, ranked_tiles, worth_parallel

# (anatomy, traits, PrimFunc) -> Tile: the heuristic, or tile_search.cached_chooser (search cache first)
TileChooser = Callable[..., Tile]


def tile_ranking(anatomy, traits: TargetTraits, count: int = 1) -> list[Tile]:
    """The heuristic's best ``count`` tiles for a kernel (tiling.ranked_tiles on its axes)."""
    a = anatomy
    other = 1
    for s in a.spatial:
        if s not in (a.vector, a.broadcast, a.row):
            other *= s.extent
    return ranked_tiles(a.vector.extent, a.broadcast.extent if a.broadcast else 1,
                        a.row.extent if a.row else 1, traits, other_parallel=other, count=count,
                        row_length=a.row_length)


def heuristic_chooser(anatomy, traits: TargetTraits, func=None) -> Tile:
    a = anatomy
    if a.broadcast is None and a.row is None and len(a.reduce) == 1 and not a.fused_rows:
        other = 1
        for s in a.spatial:
            if s is not a.vector:
                other *= s.extent
        gemv = gemv_tile(a.vector.extent, a.reduce[0].extent, other, traits.vector_lanes)
        if gemv is not None:
            return gemv
    ranked = tile_ranking(anatomy, traits)
    return ranked[0] if ranked else Tile(1)


def main_reduction(sch):
    """The one reduction block of a scheduled function, or None (none or several)."""
    reductions = [b for b in root_blocks(sch) if is_reduction(sch, b)]
    return reductions[0] if len(reductions) == 1 else None


def blocked_kernel(block_name: str) -> bool:
    """A main block of the channel-blocked conv or depthwise kernel (its tile is in its name)."""
    return tile_from_block_name(block_name) is not None or blocked_depthwise.tile_from_block_name(block_name) is not None


def try_register_tile(func, traits: TargetTraits, choose: TileChooser, name: str = ""):
    """(schedule, decision) with the register-tiled kernel, or None when it does not apply."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    main = main_reduction(sch)
    if main is None:
        return None
    conv_tile = tile_from_block_name(sch.get(main).name_hint)
    if conv_tile is not None:
        return _blocked_conv(sch, main, conv_tile, traits, name)
    dw_tile = blocked_depthwise.tile_from_block_name(sch.get(main).name_hint)
    if dw_tile is not None:
        shape, work = _output_and_work(sch, main)
        blocked_depthwise.schedule_blocked_depthwise(sch, sch.mod["main"], main, dw_tile, block_lanes(shape[-1], traits),
                                                     worth_parallel(work, "depthwise"))
        return sch, KernelDecision(name, "depthwise_blocked", shape, [dw_tile.th, dw_tile.tw, dw_tile.per_plane])
    anatomy = analyze_reduction(sch, main)
    if anatomy is None:
        return None
    # narrow rows (det's 20x20, 10x10) leave vectors half empty: tile oh*ow as one axis instead;
    # on wide rows (rec's 80, 160) the separate row tile measured faster
    if anatomy.vector.extent < 2 * traits.vector_lanes and rows_fusable(sch, main, anatomy):
        anatomy = with_fused_rows(anatomy)
    if anatomy.kind == "matmul":
        traits = traits.for_matmuls()
    tile = choose(anatomy, traits, func)
    schedule_register_tile(sch, sch.mod["main"], main, anatomy, tile, traits.vector_lanes)
    return sch, KernelDecision(name, anatomy.kind, anatomy.output_shape, tile.as_list())


def block_lanes(block: int, traits: TargetTraits) -> int:
    """The vector width for a kernel over channel blocks of ``block`` (NCHW<block>c): the target's
    wide vectors when the block is one of them (lane_policy chose wide blocks), else its default."""
    return block if traits.wide_lanes and block == traits.wide_lanes else traits.vector_lanes


def _output_and_work(sch, main) -> tuple[tuple, int]:
    """The main block's output shape and its multiply-adds (the product of its loop extents)."""
    block = sch.get(main)
    work = 1
    for iv in block.iter_vars:
        work *= int(iv.dom.extent)
    return tuple(int(d) for d in block.writes[0].source.shape), work


def _blocked_conv(sch, main, tile, traits: TargetTraits, name: str):
    shape, work = _output_and_work(sch, main)
    schedule_blocked_conv(sch, sch.mod["main"], main, tile, tile.lanes or traits.vector_lanes, worth_parallel(work))
    return sch, KernelDecision(name, "conv2d_blocked", shape, tile.as_list())


def try_winograd_transform(func, traits: TargetTraits, name: str = ""):
    """(schedule, decision) for a Winograd input or output transform (winograd_conv), or None."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = winograd_conv.transform_block(sch)
    if block is None:
        return None
    shape, work = _output_and_work(sch, block)
    kind = sch.get(block).name_hint
    # work: the block's output elements; each costs a sum of 4 (input) to 9 (output) vector terms
    winograd_conv.schedule_winograd_transform(sch, block, worth_parallel(16 * work))
    return sch, KernelDecision(name, kind.replace("sculpt_", ""), shape, None)


def try_row_softmax(func, traits: TargetTraits, name: str = ""):
    """(schedule, decision) for sculpt's long-row softmax (row_softmax), or None."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if not is_row_softmax(sch):
        return None
    shape, work = _output_and_work(sch, next(b for b in root_blocks(sch)
                                             if sch.get(b).name_hint.endswith("partial_max")))
    schedule_row_softmax(sch, softmax_lanes(traits), worth_parallel(4 * work))
    return sch, KernelDecision(name, "softmax_rows", shape, None)


def try_local_response_norm(func, traits: TargetTraits, name: str = ""):
    """(schedule, decision) for sculpt's one-pass LRN (local_response_norm), or None."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = local_response_norm_block(sch)
    if block is None:
        return None
    shape, work = _output_and_work(sch, block)
    # an output element reads its window's channels (5 in the zoo's LRNs) and takes square roots
    schedule_local_response_norm(sch, block, traits.vector_lanes, worth_parallel(work, "pool"))
    return sch, KernelDecision(name, "local_response_norm", shape, None)


def inlined_copies(func):
    """An injective function of several blocks (a padded conv output sliced, reshaped, shuffled and
    added to: ShuffleNet's units) as one block: indices simplified over the blocks' domains first
    (Relax's reshapes index with divisions and remainders that hide a plain row copy), then every
    block but the outputs inlined into its readers. The one block left reads its inputs along their
    last axis, so it vectorizes; before, ShuffleNet's took 0.17 ms per 136x28x28 tensor in scalar
    loops, 3.9 of its 13.8 ms. A block that cannot be inlined stays (the function as it was)."""
    import tvm
    from tvm import s_tir

    simplified = s_tir.transform.StmtSimplify()(tvm.IRModule({"main": func}))["main"]
    sch = s_tir.Schedule(simplified)
    for b in root_blocks(sch):
        if writes_function_output(sch, b, sch.mod["main"]):
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - not a copy (a reduction, a padding read twice): kept
            return func
    return sch.mod["main"]



def schedule_every_block(func, traits: TargetTraits, name: str = ""):
    """Injective and multi-reduction functions: inline elementwise chains, parallelize each block."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = root_blocks(sch)
    has_reduction = any(is_reduction(sch, b) for b in blocks)
    if not has_reduction and len(blocks) > 1:
        sch = s_tir.Schedule(inlined_copies(func))
    for b in root_blocks(sch):
        schedule_injective_block(sch, b, traits.vector_lanes)
    return sch, KernelDecision(name, "reduce" if has_reduction else "injective", (), None)


def schedule_func(func, traits: TargetTraits, choose: TileChooser = heuristic_chooser, name: str = ""):
    """(scheduled PrimFunc or None, decision) for one legalized PrimFunc."""
    errors = []
    for attempt in (lambda: try_winograd_transform(func, traits, name),
                    lambda: try_row_softmax(func, traits, name),
                    lambda: try_local_response_norm(func, traits, name),
                    lambda: try_register_tile(func, traits, choose, name),
                    lambda: schedule_every_block(func, traits, name)):
        try:
            result = attempt()
        except Exception as e:  # noqa: BLE001 - fall back to the next simpler schedule
            errors.append(_last_line(e))
            continue
        if result is not None:
            sch, decision = result
            decision.note = "; ".join(errors)
            return sch.mod["main"].with_attr("tirx.is_scheduled", True), decision
    return None, KernelDecision(name, "unscheduled", (), None, note="; ".join(errors))


def _last_line(e: Exception) -> str:
    """The last line of an error: TVM's schedule errors are a traceback with the message at the end
    (common.one_line would join the whole traceback)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def schedule_module(mod, target, choose: TileChooser = heuristic_chooser) -> tuple[object, list[KernelDecision]]:
    """Schedule every not-yet-scheduled PrimFunc of ``mod`` for ``target``; returns (mod, decisions)."""
    from tvm import tirx

    traits = traits_of(target)
    decisions = []
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1:
            continue
        new, decision = schedule_func(func, traits, choose, gv.name_hint)
        decisions.append(decision)
        if new is not None:
            updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod, decisions
