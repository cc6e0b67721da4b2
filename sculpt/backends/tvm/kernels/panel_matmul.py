"""Relax rewrite: a matmul whose constant weight is larger than L2 and has a long reduction reads
that weight packed in column panels.

``x [.., M, K] @ W [K, N]`` becomes ``x' [M', K] @ Wp [P, K, nb]`` (a batch of P panels of ``nb``
columns, each stored contiguously: ``Wp[p, k, j] = W[k, p * nb + j]``, zero-padded to whole
panels), a ``[P, M', nb]`` result turned back to ``[.., M, N]`` by a transpose, a reshape and a slice
that fuse with the bias add after them. The kernel then streams each panel as one contiguous block,
reused from L2 by every block of rows, where reading a column strip of ``W`` jumps a whole weight
row (32 KB for 8210 columns) at every step of the reduction: a new page each time.

Measured on an AMD EPYC (Zen 4), 1 thread, CPU time, the matmul + bias alone: ddddocr's classifier
20x1024 by 1024x8210 (34 MB of weights) 5.6-6.0 -> 3.8-4.0 ms (onnxruntime 4.6-5.0); 80x512 by
512x1024 0.89-1.09 -> 0.78. With a short reduction the result's transpose costs more than the
panels save (PP-OCRv6 rec's 40x120 by 120x18720: 2.6 -> 4.1 ms), so K must be at least
``MIN_REDUCTION``.
"""

from __future__ import annotations

import math

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls, static_shape

MIN_REDUCTION = 256  # K: shorter reductions keep the plain kernel (see above); one row (a matrix-vector
# product) too: its kernel reads whole weight rows in order


def panel_width(lanes: int) -> int:
    """Columns per panel: two vectors (the matmul kernel's vector tile)."""
    return 2 * lanes


def pack_panels(w: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [ceil(N / nb), K, nb], zero columns past N."""
    k, n = w.shape
    panels = -(-n // nb)
    padded = np.zeros((k, panels * nb), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, nb).transpose(1, 0, 2))


def rewrite_panel_matmuls(mod, traits):
    """The module with every such matmul reading packed panels (see the module docstring)."""
    nb = panel_width(traits.vector_lanes)

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.matmul":
            return None
        weight = constant_value(call.args[1])
        x_shape = static_shape(call.args[0])
        if weight is None or len(weight.shape) != 2 or str(weight.dtype) != "float32" or x_shape is None:
            return None
        k, n = (int(d) for d in weight.shape)
        if (k < MIN_REDUCTION or k * n * 4 < traits.l2_bytes or len(x_shape) < 2 or x_shape[-1] != k
                or str(call.args[0].ty.dtype) != "float32" or n < nb):
            return None
        rows = math.prod(x_shape[:-1])
        if rows < 2:  # a matrix-vector product streams whole weight rows in order already (AlexNet's FCs)
            return None
        packed = pack_panels(weight.numpy(), nb)
        panels = packed.shape[0]
        x = call.args[0] if len(x_shape) == 2 else rewriter.emit(relax.op.reshape(call.args[0], (rows, k)))
        y = rewriter.emit(relax.op.matmul(x, relax.const(packed)))               # [P, rows, nb]
        y = rewriter.emit(relax.op.permute_dims(y, [1, 0, 2]))                  # [rows, P, nb]
        y = rewriter.emit(relax.op.reshape(y, (rows, panels * nb)))
        if panels * nb != n:
            y = rewriter.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
        return y if len(x_shape) == 2 else relax.op.reshape(y, (*x_shape[:-1], n))

    return rewrite_calls(mod, rule)
