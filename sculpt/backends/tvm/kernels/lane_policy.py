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
"""

from __future__ import annotations

from sculpt.backends.tvm.kernels.target_traits import TargetTraits

# the share of a model's conv multiply-adds whose channels divide into wide blocks above which its
# convs take them
WIDE_SHARE = 0.7
# a stem reading this few channels (an image) runs NCHW in any case
STEM_CHANNELS = 4


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


def wide_share(shapes: list, block: int) -> float:
    """The share of the convs' multiply-adds whose channels (per group) are whole blocks of ``block``:
    output channels, and input channels unless the conv reads an image (a stem)."""
    total = wide = 0
    for s in shapes:
        macs = conv_macs(s)
        total += macs
        depthwise = s.in_channels == 1 and s.groups > 1
        channels = [s.groups] if depthwise else [s.out_channels] + ([s.in_channels] if s.in_channels > STEM_CHANNELS else [])
        if all(c % block == 0 for c in channels):
            wide += macs
    return wide / total if total else 0.0


def conv_traits_for(mod, traits: TargetTraits) -> TargetTraits:
    """The traits the blocked convs of ``mod`` are planned and scheduled with: ``traits.widened()``
    when at least WIDE_SHARE of the conv multiply-adds have channels in whole wide blocks, else
    ``traits``."""
    wide = traits.widened()
    if wide is traits:
        return traits
    return wide if wide_share(conv_shapes(mod), wide.vector_lanes) >= WIDE_SHARE else traits
