"""Relax rewrite: ONNX ``Sum`` as a chain of adds.

TVM's ONNX importer turns ``Sum(a, b, ...)`` (ResNet's and ShuffleNet's residual joins in the onnx
wheel's models) into ``sum(stack([broadcast_to(a), broadcast_to(b), ...]), axis=0)``: every operand
is copied into a new 5-D tensor and then reduced, a memory pass per operand that an add does not
need, and a 5-D tensor that the layout passes cannot carry a channel layout through. As adds, the
join is an elementwise epilogue that TVM fuses into the conv before it. The result is bit-identical:
the reduction adds the operands in the same order, starting from zero (0 + a == a)."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_calls, static_shape


def rewrite_sum_of_stack(mod):
    """``mod`` with every ``sum(stack([broadcast_to(x_i, s)...], axis=0), axis=[0])`` replaced by
    ``x_0 + x_1 + ...`` (broadcast to ``s`` only if the adds do not already give that shape)."""

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.sum" or len(call.args) != 1:
            return None
        axis = call.attrs.axis
        if axis is None or [int(a) for a in axis] != [0] or bool(call.attrs.keepdims):
            return None
        stacked = rewriter.bound(call.args[0])
        if not isinstance(stacked, relax.Call) or getattr(stacked.op, "name", "") != "relax.stack" \
                or int(stacked.attrs.axis) != 0:
            return None
        parts = rewriter.bound(stacked.args[0])
        if not isinstance(parts, relax.Tuple) or len(parts.fields) < 2:
            return None
        out_shape = static_shape(call)
        operands = []
        for field in parts.fields:
            value = rewriter.bound(field)
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.broadcast_to":
                value = value.args[0]
            else:
                value = field
            if str(value.ty.dtype) != str(call.ty.dtype):
                return None
            operands.append(value)
        shapes = [static_shape(v) for v in operands]
        if out_shape is None or any(s is None for s in shapes):
            return None
        total = operands[0]
        for operand in operands[1:-1]:
            total = rewriter.emit(relax.op.add(total, operand))
        last = relax.op.add(total, operands[-1])
        if tuple(np.broadcast_shapes(*shapes)) == out_shape:
            return last
        return relax.op.broadcast_to(rewriter.emit(last), out_shape)

    from tvm import relax

    return relax.transform.DeadCodeElimination()(rewrite_calls(mod, rule))  # the stacks and broadcasts
