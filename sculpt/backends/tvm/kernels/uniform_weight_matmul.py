"""A matmul by a weight whose every entry is the same constant, computed as a sum times that constant.

``x @ W`` with ``W[k, n] = c`` for all k, n is ``c · Σ_k x[..., k]`` in every column. Such a weight
comes from a ``ConstantOfShape`` (the onnx wheel's light models store VGG-19's 25088 × 4096 fc6 weight
so: the importer's ``broadcast_to(c, [4096, 25088])``, transposed for Gemm's transB). As a matmul it
reads the broadcast 103M times (VGG-19 fc6: 19 ms on one thread here); as a sum it reads ``x`` once.
The result differs from the matmul's by the order of the float32 sum only."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls, static_shape


def rewrite_uniform_weight_matmuls(mod):
    """``mod`` with each matmul whose second operand is ``broadcast_to`` of a constant with a single value
    (possibly transposed) replaced by ``broadcast_to(sum(x, axis=-1, keepdims) * c, out_shape)``."""
    return rewrite_calls(mod, _as_sum)


def _uniform_value(expr, rewriter) -> float | None:
    """The single value of a 2-D operand bound to [permute_dims of] broadcast_to(constant), else None."""
    bound = rewriter.bound(expr)
    if getattr(getattr(bound, "op", None), "name", "") == "relax.permute_dims":
        bound = rewriter.bound(bound.args[0])
    if getattr(getattr(bound, "op", None), "name", "") != "relax.broadcast_to":
        return None
    value = constant_value(bound.args[0])
    if value is None:
        return None
    array = value.numpy()
    if array.dtype != np.float32 or array.size == 0 or not np.all(array == array.reshape(-1)[0]):
        return None
    return float(array.reshape(-1)[0])


def _as_sum(call, rewriter):
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.matmul":
        return None
    x, w = call.args
    out_shape, x_shape, w_shape = static_shape(call), static_shape(x), static_shape(w)
    if out_shape is None or x_shape is None or w_shape is None or len(w_shape) != 2 or len(x_shape) < 1 \
            or str(call.ty.dtype) != "float32" or str(x.ty.dtype) != "float32":
        return None
    c = _uniform_value(w, rewriter)
    if c is None:
        return None
    total = rewriter.emit(relax.op.sum(x, axis=[-1], keepdims=True))
    scaled = rewriter.emit(relax.op.multiply(total, relax.const(np.float32(c), "float32")))
    return relax.op.broadcast_to(scaled, out_shape)
