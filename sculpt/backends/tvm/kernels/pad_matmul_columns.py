"""Relax rewrite: a matmul with constant weights whose column count has no power-of-two factor
(PP-OCR rec's classifier: 120 x 6625, 6625 = 5^3 x 53) gets its weight padded with zero columns to
a multiple of 16 and its output sliced back.

The matmul kernel vectorizes the columns; with 6625 of them there is no vector tile without a
remainder, and the kernel fell to scalar code (27x slower than onnxruntime on that layer). Padded,
it runs on full vectors; the slice fuses with the bias add after it."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls

COLUMN_MULTIPLE = 16  # a multiple of every target's float32 lanes (NEON 4, AVX2 8, AVX-512 16)
MIN_COLUMNS = 64      # below this the kernel takes the columns as one (odd-sized) vector


def _padded_columns(n: int) -> int | None:
    if n < MIN_COLUMNS or n % 4 == 0:  # a power-of-two vector >= 4 already divides it
        return None
    return -(-n // COLUMN_MULTIPLE) * COLUMN_MULTIPLE


def pad_matmul_columns(mod):
    """The module with every such matmul padded (see the module docstring)."""
    return rewrite_calls(mod, _padded_matmul)


def _padded_matmul(call, rewriter):
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.matmul":
        return None
    weight = constant_value(call.args[1])
    if weight is None or len(weight.shape) != 2 or str(weight.dtype) != "float32":
        return None
    k, n = (int(d) for d in weight.shape)
    padded = _padded_columns(n)
    if padded is None:
        return None
    w = np.zeros((k, padded), np.float32)
    w[:, :n] = weight.numpy()
    out = rewriter.emit(relax.op.matmul(call.args[0], relax.const(w)))
    rank = len(call.args[0].ty.shape)
    return relax.op.strided_slice(out, axes=[rank - 1], begin=[0], end=[n])
