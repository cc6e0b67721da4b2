"""explicit-pads: a Conv's auto_pad (SAME_UPPER, SAME_LOWER, VALID) as explicit pads."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sculpt.ir.channel_handlers import attr as attribute
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register


def same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """(begin, end) padding of one axis under SAME_UPPER/SAME_LOWER: the output is ceil(size / stride)
    long; the odd unit of padding goes at the end (UPPER) or the beginning (LOWER)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


@register
@dataclass
class ExplicitPads(Pass):
    """Replace a Conv's ``auto_pad`` by the ``pads`` it means, where the input's spatial size is known:
    the same convolution. TVM's importer computes ``SAME_UPPER`` as a separate Pad of the input before
    the Conv (PP-HGNet's stem, TensorFlow exports): one more pass over the tensor and, in a QDQ model,
    a Conv that is no longer an int8 unit (dequantize -> pad -> conv)."""

    name = "explicit-pads"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rewritten = 0
        for conv in model.graph.node:
            mode = attribute(conv, "auto_pad", b"NOTSET")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or mode == "NOTSET":
                continue
            shape = model.static_shape(conv.input[0])
            weight = model.get_constant(conv.input[1]) if len(conv.input) > 1 else None
            if shape is None or len(shape) < 3:
                continue
            spatial = len(shape) - 2
            kernel = attribute(conv, "kernel_shape") or (list(weight.shape[2:]) if weight is not None else None)
            if kernel is None or len(kernel) != spatial:
                continue
            strides = attribute(conv, "strides") or [1] * spatial
            dilations = attribute(conv, "dilations") or [1] * spatial
            if mode == "VALID":
                pads = [0] * (2 * spatial)
            elif mode in ("SAME_UPPER", "SAME_LOWER"):
                both = [same_pads(shape[2 + i], kernel[i], strides[i], dilations[i], mode == "SAME_UPPER")
                        for i in range(spatial)]
                pads = [b for b, _ in both] + [e for _, e in both]
            else:
                continue
            kept = [a for a in conv.attribute if a.name not in ("auto_pad", "pads")]
            del conv.attribute[:]
            conv.attribute.extend(kept + [onnx.helper.make_attribute("pads", pads)])
            rewritten += 1
        return PassResult(model, rewritten > 0, {"rewritten": rewritten})
