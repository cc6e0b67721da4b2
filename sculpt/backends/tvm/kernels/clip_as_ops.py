"""Relax rewrite: the ONNX importer's Clip as Relax ops.

TVM's ONNX importer emits Clip (opset 11+, the ReLU6 and HardSwish of MobileNet-style models) as
``call_tir`` of TE functions made from ``topi.maximum`` / ``topi.minimum`` with the bound as a tensor
operand. Opaque calls hide an elementwise op from sculpt's Relax rewrites (the blocked layout keeps a
tensor blocked only through ops it can see). With a constant scalar bound they are exactly
``relax.maximum`` / ``relax.minimum``, which legalize to the same TE functions."""

from __future__ import annotations

import re

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls, static_shape

_TE_NAME = re.compile(r"^(maximum|minimum)\d*$")


def rewrite_clip_calls(mod):
    """``mod`` with each ``call_tir`` of an importer's maximum/minimum by a constant scalar replaced
    by the Relax op."""
    return rewrite_calls(mod, _as_op)


def _as_op(call, rewriter):
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.call_tir" or len(call.args) < 2:
        return None
    match = _TE_NAME.match(str(getattr(call.args[0], "name_hint", "")))
    operands = getattr(call.args[1], "fields", None)
    if match is None or operands is None or len(operands) != 2:
        return None
    x, bound = operands
    value = constant_value(rewriter.bound(bound))
    shape = static_shape(x)
    if value is None or int(value.numpy().size) != 1 or shape is None or static_shape(call) != shape:
        return None
    if str(value.dtype) != str(x.ty.dtype) or str(call.ty.dtype) != str(x.ty.dtype):
        return None
    op = relax.op.maximum if match.group(1) == "maximum" else relax.op.minimum
    return op(x, relax.const(value.numpy().reshape(()), str(value.dtype)))
