"""Which vector width the channel-blocked convs of a model use (policy only).

A target with wider vectors than its default (AVX-512: 16 float32 lanes against the 8 the other
kernels use) gives the blocked convs and their NCHW<c>c activations blocks of 16 channels when the
model's channel counts allow it: a conv whose channels are not a multiple of the block stays NCHW,
and the layout transforms around it cost more than wider vectors save. Measured on an AMD EPYC
(Zen 4), 1 thread, sculpt / onnxruntime, blocks of 8 against 16 for every conv: resnet50 1.09 / 1.02,
squeezenet 1.18 / 1.13, PP-LCNet doc-orientation 0.96 / 0.78 (channels multiples of 16 for 75-100%
of the conv MACs); PP-OCR cls 0.45 / 0.60, ShuffleNet 1.30 / 1.62, PP-OCR det 0.72 / 0.77 (8-36%).
The other kernels (matmuls, softmax, depthwise over the width) keep the default width: with 16 lanes
PP-OCRv6 rec's long-row softmax took 1.39 ms instead of 0.93 and its convs the same time.

A conv whose output channels fill wide blocks but for a few (SqueezeNet's 1000-class conv: 1008
computed) counts as wide. The threshold sits between the models measured both ways: PP-OCRv6 det
small (72% of its conv MACs wide; its 24- and 12-channel stem convs fall back to the width kernel at
16 lanes and its 96->24 3x3 computes 32 channels) 0.94 of onnxruntime's time with blocks of 8, 1.09
with 16 (1 thread, CPU time, one run each, Zen 4); SqueezeNet (100% once its classifier counts)
1.13 with 16, 1.18 with 8; the models below 40% (PP-OCR det and cls, ShuffleNet) faster with 8.

All of that is Zen 4, which splits a 512-bit op in two halves. Where the core has two 512-bit units
(Intel's AVX-512 server cores, Zen 5: ``wide_at_full_rate``) every conv of a model of
FULL_RATE_MIN_MACS or more takes wide blocks.
"""

from __future__ import annotations

from sculpt.backends.tvm.kernels.target_traits import TargetTraits

# the share of a model's conv multiply-adds whose channels divide into wide blocks above which its
# convs take them
WIDE_SHARE = 0.8
# output channels that whole wide blocks pad by at most this fraction still count as wide (the same
# allowance as tiling.EXTRA_BLOCK_PADDING for wider channel blocks)
WIDE_OUTPUT_PADDING = 1 / 16
# a stem reading this few channels (an image) runs NCHW in any case
STEM_CHANNELS = 4
# on a core with two 512-bit units (TargetTraits.wide_at_full_rate) wide blocks pay whatever the
# channels, but for a model this small, where the layout transforms weigh more than the convs. On an
# Intel Xeon (session 18), 1 thread, sculpt / onnxruntime with blocks of 8 -> 16 for every conv, the
# models below WIDE_SHARE: PP-OCR det (0.56 GMAC, 40% wide) 0.76 -> 0.67, ShuffleNet (0.12, 4%) 1.09 ->
# 0.97, PP-OCR cls (0.016, 31%) 0.43 -> 0.58; those above it 0.89 -> 0.67 (rec), 1.31 -> 1.01
# (squeezenet), 1.32 -> 1.03 (PP-OCRv6 rec)
FULL_RATE_MIN_MACS = 50_000_000


def conv_shapes(mod) -> list:
    """The ConvShape of every static float32 conv2d of ``mod``'s Relax functions."""
    from tvm import relax

    from sculpt.backends.tvm.kernels.blocked_conv import static_conv_of

    shapes = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            shape = static_conv_of(expr)
            if shape is not None:
                shapes.append(shape)

    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return shapes


def conv_macs(shape) -> int:
    kh, kw = shape.kernel
    return shape.groups * shape.out_channels * shape.in_channels * kh * kw * shape.out_height * shape.out_width


def _whole_blocks(channels: int, block: int, slack: float = 0.0) -> bool:
    """Whether whole blocks of ``block`` hold ``channels`` with at most ``slack`` of them padding."""
    return -(-channels // block) * block <= channels * (1 + slack)


def wide_share(shapes: list, block: int) -> float:
    """The share of the convs' multiply-adds whose channels (per group) are whole blocks of ``block``:
    output channels (or all but WIDE_OUTPUT_PADDING of them), and input channels unless the conv
    reads an image (a stem)."""
    total = wide = 0
    for s in shapes:
        macs = conv_macs(s)
        total += macs
        if s.in_channels == 1 and s.groups > 1:  # depthwise: its channels are its groups
            fits = _whole_blocks(s.groups, block)
        else:
            fits = _whole_blocks(s.out_channels, block, WIDE_OUTPUT_PADDING) and \
                (s.in_channels <= STEM_CHANNELS or _whole_blocks(s.in_channels, block))
        if fits:
            wide += macs
    return wide / total if total else 0.0


def conv_traits_for(mod, traits: TargetTraits) -> TargetTraits:
    """The traits the blocked convs of ``mod`` are planned and scheduled with: ``traits.widened()``
    when at least WIDE_SHARE of the conv multiply-adds have channels in whole wide blocks, or, on a
    target that runs its wide vectors at full rate, when the convs do FULL_RATE_MIN_MACS or more;
    else ``traits``."""
    wide = traits.widened()
    if wide is traits:
        return traits
    shapes = conv_shapes(mod)
    if traits.wide_at_full_rate and sum(conv_macs(s) for s in shapes) >= FULL_RATE_MIN_MACS:
        return wide
    return wide if wide_share(shapes, wide.vector_lanes) >= WIDE_SHARE else traits
