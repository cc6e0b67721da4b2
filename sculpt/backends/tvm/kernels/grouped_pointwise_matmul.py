"""Relax rewrite: a grouped 1x1 conv (stride 1, no padding) as a batched matmul over the groups.

``conv2d(x [N, G*Ci, H, W], w [G*Co, Ci, 1, 1], groups=G)`` is, per group, ``w_g [Co, Ci] @ x_g
[Ci, H*W]``: ``reshape(matmul(w' [G, Co, Ci], reshape(x, [N, G, Ci, H*W])), [N, G*Co, H, W])``, both
reshapes free (NCHW keeps each group's channels and each plane contiguous). The matmul kernel
vectorizes over the plane's H*W pixels and broadcasts the weights, so no lane holds a padding
channel, where the channel-blocked kernel computes each group's channels in whole vectors (ShuffleNet's
34-channel groups as 48 with 16 lanes).

The elementwise ops after the conv (its bias, a residual add, a ReLU, a clip's maximum and minimum)
move before the reshape back to NCHW, in the matmul's shape (a per-channel constant as [G, Co, 1], a
tensor of the conv's output shape reshaped to it), so that they fuse into the matmul kernel's
epilogue instead of running as a copy of their own behind the reshape; any other operand (a
constant broadcast along rows, a squeeze-and-excitation scale) leaves the op in NCHW.

Mechanism only: ``choose(ConvShape)`` says which convs."""

from __future__ import annotations

from typing import Callable

import numpy as np

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape, static_conv_of
from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls, static_shape

_UNARY = frozenset({"relax.nn.relu", "relax.sigmoid"})  # a clip is a maximum and a minimum by now (clip_as_ops)
_BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum"})


def is_grouped_pointwise(shape: ConvShape) -> bool:
    """A grouped conv this rewrite can take: 1x1, stride 1, no padding."""
    return (shape.groups > 1 and shape.kernel == (1, 1) and shape.strides == (1, 1)
            and shape.padding == (0, 0, 0, 0))


def rewrite_grouped_pointwise_matmuls(mod, choose: Callable[[ConvShape], bool]):
    """``mod`` with every grouped 1x1 conv that ``choose`` accepts computed as a batched matmul, and
    the elementwise ops after it in the matmul's shape."""
    from tvm import relax

    # the NCHW view of a rewritten result -> (its [N, G, Co, H*W] tensor, the NCHW shape)
    inner_of: dict = {}

    def as_nchw(rewriter, y, nchw):
        out = rewriter.emit(relax.op.reshape(y, nchw))
        inner_of[out] = (y, nchw)
        return out

    def conv_rule(call, rewriter):
        shape = static_conv_of(call)
        if shape is None or not is_grouped_pointwise(shape) or not choose(shape):
            return None
        s = shape
        weight = constant_value(call.args[1]).numpy().reshape(s.groups, s.out_channels, s.in_channels)
        x = rewriter.emit(relax.op.reshape(call.args[0], (s.batch, s.groups, s.in_channels, s.height * s.width)))
        y = rewriter.emit(relax.op.matmul(relax.const(weight), x))
        return as_nchw(rewriter, y, (s.batch, s.groups * s.out_channels, s.height, s.width))

    def tracked(rewriter, arg):
        return inner_of.get(arg) or inner_of.get(rewriter.bound(arg))

    def operand_inside(rewriter, arg, inner_shape, nchw):
        """How ``arg`` enters the matmul's shape, as a function of the rewriter emitting it: a rewritten
        result's tensor, a scalar as it is, a per-channel constant as [G, Co, 1], a tensor of the NCHW
        shape reshaped; None for anything else."""
        found = tracked(rewriter, arg)
        if found is not None:
            return (lambda: found[0]) if found[1] == nchw else None
        value = constant_value(rewriter.bound(arg))
        if value is not None:
            v = value.numpy()
            if v.size == 1:
                return lambda: arg
            if tuple(v.shape) in ((nchw[1], 1, 1), (1, nchw[1], 1, 1)):
                return lambda: relax.const(np.ascontiguousarray(v.reshape(inner_shape[1], inner_shape[2], 1)))
            return None
        if static_shape(arg) == nchw:
            return lambda: rewriter.emit(relax.op.reshape(arg, inner_shape))
        return None

    def elementwise_rule(call, rewriter):
        unary = str(call.op.name) in _UNARY
        found = next((t for t in (tracked(rewriter, a) for a in call.args[:1 if unary else 2]) if t is not None), None)
        if found is None:
            return None
        y, nchw = found
        inner_shape = tuple(int(d) for d in y.ty.shape)
        if unary:
            return as_nchw(rewriter, rewriter.emit(relax.Call(call.op, [y], call.attrs)), nchw)
        operands = [operand_inside(rewriter, a, inner_shape, nchw) for a in call.args]
        if any(o is None for o in operands):
            return None
        return as_nchw(rewriter, rewriter.emit(relax.Call(call.op, [o() for o in operands], call.attrs)), nchw)

    def rule(call, rewriter):
        if getattr(call.op, "name", "") == "relax.nn.conv2d":
            return conv_rule(call, rewriter)
        if str(getattr(call.op, "name", "")) in _UNARY | _BINARY:
            return elementwise_rule(call, rewriter)
        return None

    return rewrite_calls(mod, rule)
