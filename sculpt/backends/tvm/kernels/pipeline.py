"""The Relax compilation pipeline with sculpt's kernels: TVM's CPU pipeline plus one scheduling step.

    [sculpt: constant reshapes / isnan / where evaluated in numpy (fold_small_constants)]
             -> [sculpt: the importer's Clip (call_tir of TE maximum/minimum) as Relax ops (clip_as_ops)]
             -> [sculpt: batch_norm with constant statistics as a multiply and an add (batch_norm_as_affine)]
             -> [sculpt: ONNX Sum's stack + reduce as adds (sum_as_adds)]
             -> [sculpt: a matmul by a weight of one repeated constant as a sum times it (uniform_weight_matmul)]
             -> [sculpt: transposed convs with stride == kernel -> 1x1 conv + pixel shuffle]
             -> [sculpt: conv2d -> the channel-blocked kernel where the policy gives a tile (blocked_conv),
                 activations NCHW<lanes>c between such convs where no transform is needed (blocked_layout);
                 3x3 stride-1 convs between blocked tensors by Winograd F(2x2, 3x3) (winograd_conv)]
             -> [sculpt: means over 4096+ terms summed in float64 (long_means)]
             -> [sculpt: strided pools/depthwise over odd widths get an unused column (even_strided_width)]
             -> [sculpt: depthwise convs over widths of no whole vectors computed wider, sliced (whole_vector_width)]
             -> [sculpt: matmuls with weights over L2 read them in column panels (panel_matmul)]
             -> [sculpt: matmul weights padded to whole vectors of columns (pad_matmul_columns)]
             -> [sculpt: LRN's square, channel pool and normalization as one kernel (local_response_norm)]
             -> [sculpt: softmax over long rows with vector reductions (row_softmax)]
             -> [sculpt: softmax/exp/erf/tanh/sigmoid as approximations that vectorize (fast_math)]
             -> dispatch -> LegalizeOps -> AnnotateTIROpPattern -> FoldConstant
             -> [sculpt: concats that can be placed in place kept out of fusion (concat_in_place)]
             -> FuseOps -> FuseTIR
             -> [sculpt: schedule every PrimFunc (rules.schedule_module)]
             -> dataflow lowering
             -> [sculpt: concats whose inputs' kernels write their ranges of the output (concat_in_place)]
             -> memory planning / VM lowering

Fusion is TVM's own (a conv2d/matmul absorbs the elementwise ops after it), so the kernels are
scheduled with their epilogues in place."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.fold_small_constants import fold_small_constants
from sculpt.backends.tvm.kernels.clip_as_ops import rewrite_clip_calls
from sculpt.backends.tvm.kernels.batch_norm_as_affine import rewrite_batch_norm_as_affine
from sculpt.backends.tvm.kernels.pad_matmul_columns import pad_matmul_columns
from sculpt.backends.tvm.kernels.panel_matmul import rewrite_panel_matmuls
from sculpt.backends.tvm.kernels.int4_matmul import rewrite_int4_matmuls
from sculpt.backends.tvm.kernels.local_response_norm import rewrite_local_response_norms
from sculpt.backends.tvm.kernels.long_means import rewrite_long_means
from sculpt.backends.tvm.kernels.blocked_layout import rewrite_in_blocked_layout
from sculpt.backends.tvm.kernels.even_strided_width import rewrite_even_strided_widths
from sculpt.backends.tvm.kernels.sum_as_adds import rewrite_sum_of_stack
from sculpt.backends.tvm.kernels.uniform_weight_matmul import rewrite_uniform_weight_matmuls
from sculpt.backends.tvm.kernels.grouped_pointwise_matmul import rewrite_grouped_pointwise_matmuls
from sculpt.backends.tvm.kernels.fast_math import rewrite_fast_math
from sculpt.backends.tvm.kernels.row_softmax import rewrite_row_softmax, softmax_lanes
from sculpt.backends.tvm.kernels.target_traits import traits_of
from sculpt.backends.tvm.kernels.lane_policy import conv_traits_for
from sculpt.backends.tvm.kernels.blocked_conv import ConvPolicy
from sculpt.backends.tvm.kernels.tiling import grouped_pointwise_as_matmul, winograd_worth
from sculpt.backends.tvm.kernels.whole_vector_width import rewrite_depthwise_widths
from sculpt.backends.tvm.kernels.transposed_conv import rewrite_transposed_convs
from sculpt.backends.tvm.kernels.rules import TileChooser, schedule_module
from sculpt.backends.tvm.kernels.concat_in_place import isolate_placeable_concats, place_concats


def _module_pass(name: str, rewrite):
    """A TVM module pass running ``rewrite(mod)``."""
    import tvm

    return tvm.transform.module_pass(lambda mod, _ctx: rewrite(mod), opt_level=0, name=name)


def _grouped_pointwise_matmuls(mod, traits):
    conv_traits, matmul_traits = conv_traits_for(mod, traits), traits.for_matmuls()
    return rewrite_grouped_pointwise_matmuls(
        mod, lambda shape: grouped_pointwise_as_matmul(shape, conv_traits, matmul_traits))


def _front_passes(target, conv_policy: ConvPolicy | None = None, conv_decisions: list | None = None) -> list:
    """Up to and including FuseTIR: the module whose PrimFuncs the kernels schedule. ``conv_policy``
    (the blocked convs' tiles) defaults to the search cache, then the heuristic
    (tile_search.cached_conv_policy, tiling.conv_tile); ``conv_decisions`` (a list) receives the
    blocked convs' (ConvShape, ConvTile) pairs."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    if conv_policy is None:
        from sculpt.backends.tvm.kernels.tile_search import cached_conv_policy

        conv_policy = cached_conv_policy()
    traits = traits_of(target)
    rewrites = [
        ("SculptFoldSmallConstants", fold_small_constants),
        ("SculptClipAsOps", rewrite_clip_calls),
        ("SculptBatchNormAsAffine", rewrite_batch_norm_as_affine),
        ("SculptSumAsAdds", rewrite_sum_of_stack),
        ("SculptUniformWeightMatmuls", rewrite_uniform_weight_matmuls),
        ("SculptRewriteTransposedConvs", rewrite_transposed_convs),
        ("SculptGroupedPointwiseMatmuls", lambda mod: _grouped_pointwise_matmuls(mod, traits)),
        ("SculptBlockedConvs", lambda mod: rewrite_in_blocked_layout(mod, conv_policy, conv_traits_for(mod, traits),
                                                                     conv_decisions, winograd_worth)),
        ("SculptLongMeans", rewrite_long_means),
        ("SculptEvenStridedWidths", rewrite_even_strided_widths),
        ("SculptDepthwiseWidths", lambda mod: rewrite_depthwise_widths(mod, traits.vector_lanes)),
        ("SculptInt4Matmuls", lambda mod: rewrite_int4_matmuls(mod, traits)),
        ("SculptPanelMatmuls", lambda mod: rewrite_panel_matmuls(mod, traits)),
        ("SculptPadMatmulColumns", pad_matmul_columns),
        ("SculptLocalResponseNorms", rewrite_local_response_norms),
        ("SculptRowSoftmax", lambda mod: rewrite_row_softmax(mod, softmax_lanes(traits))),
        ("SculptFastMath", rewrite_fast_math),
    ]
    # reshapes of reshapes (the rewrites' and the importer's) as one reshape, the identical ones gone:
    # a lone reshape is a view at run time, a fused chain of them was a copy (0.24 ms in PP-OCRv6 rec)
    return [_module_pass(name, rewrite) for name, rewrite in rewrites] + [relax.transform.RemoveRedundantReshape()] \
        + cpu.library_dispatch_passes(target) + _legalize_passes(target)


def _legalize_passes(target) -> list:
    """TVM's CPU legalization and fusion, with the concats to be placed in place kept out of fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = list(cpu.legalize_passes(target))
    fuse = next(i for i, p in enumerate(passes) if p.info.name == "FuseOps")
    return passes[:fuse] + [_module_pass("SculptIsolateConcats", isolate_placeable_concats)] + passes[fuse:]


def legalized_and_fused(mod, target, conv_policy: ConvPolicy | None = None, conv_decisions: list | None = None):
    """``mod`` after the front of the pipeline (legalized, fused, not yet scheduled)."""
    import tvm

    with target:
        return tvm.transform.Sequential(_front_passes(target, conv_policy, conv_decisions))(mod)


def sculpt_relax_pipeline(target, choose: TileChooser | None = None, decisions: list | None = None):
    """A relax_pipeline for ``tvm.compile``; ``decisions`` (if a list) receives what was scheduled.
    ``choose`` defaults to the search cache, then the heuristic (tile_search.cached_chooser)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    if choose is None:
        from sculpt.backends.tvm.kernels.tile_search import cached_chooser

        choose = cached_chooser()

    @tvm.transform.module_pass(opt_level=0, name="SculptScheduleKernels")
    def schedule_kernels(mod, _ctx):
        mod, made = schedule_module(mod, target, choose)
        if decisions is not None:
            decisions.extend(made)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="SculptPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                _front_passes(target) + [schedule_kernels]
                + cpu.dataflow_lower_passes(target) + [_module_pass("SculptConcatInPlace", place_concats)]
                + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def compile_with_kernels(mod, target, choose: TileChooser | None = None, decisions: list | None = None):
    """``tvm.compile`` of a Relax module with the sculpt kernels for ``target`` (a tvm Target)."""
    import tvm

    return tvm.compile(mod, target=target, relax_pipeline=sculpt_relax_pipeline(target, choose, decisions))
