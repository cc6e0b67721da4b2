"""Relax rewrite: a matmul whose constant weight is larger than L2 reads that weight packed in
column panels.

``x [.., M, K] @ W [K, N]`` becomes ``einsum("mk,pkj->mpj", x' [M', K], Wp [P, K, nb])``: P panels of
``nb`` columns, each stored contiguously (``Wp[p, k, j] = W[k, p * nb + j]``, zero-padded to whole
panels). The ``[M', P, nb]`` result *is* ``[M', P * nb]`` row-major, so a reshape (free) and a slice
give ``[.., M, N]``. The kernel (the register-tiled matmul
kernel over j, broadcast over m, P outermost) streams each panel as one contiguous block, reused
from L1/L2 by every block of rows, where reading a column strip of ``W`` jumps a whole weight row at
every step of the reduction (32 KB for 8210 columns, 75 KB for 18,710): a new page each time, more
TLB misses than multiply-adds are worth.

Measured on an AMD EPYC (Zen 4), 1 thread, CPU time, the matmul + bias alone (one-node model,
medians of 20, three rounds; onnxruntime on the same model beside it): PP-OCRv4 rec's classifier
40x120 by 120x6625 1.5-1.75 -> 0.75-0.98 ms (onnxruntime 0.66-0.92); PP-OCRv6 rec's 40x120 by
120x18710 3.8-3.9 -> 3.0-3.3 (2.7-3.0); ddddocr's 20x1024 by 1024x8210 (34 MB) 4.1-5.1 with
the panels' result transposed back (the form before this one) -> 4.0-4.1 (4.7-4.9). Before the
einsum form the transpose cost more than the panels saved on short reductions (K = 120), so they
were used only from K = 256.

A tile takes two or more panels at once where it can: the reduction then reads as many streams
from memory side by side, where one stream alone leaves a core's bandwidth unused (the hardware
prefetchers stop at each page). A prime panel count allows no such tile, so it gets one zero panel
more. Intel Xeon, 1 thread, the matmul + bias alone, 8 rounds of 10 interleaved, medians:
ddddocr's 20x1024 by 1024x8210 (257 panels) in tiles of 10 rows x 1 panel 5.4 ms; with 258 panels,
4 rows x 3 panels 3.7, 5 rows x 2 panels 3.6 (onnxruntime 3.4-3.5).

A bias added to such a matmul (``add(matmul(x, W), b)``, b constant over the columns) is added to
the panels' result before the slice, zero-padded like the weight: the add joins the einsum's
epilogue and the slice stays the one copy after it (a row softmax after it reads the padded rows in
place: row_softmax). PP-OCRv6 rec's classifier: the slice + bias add after the einsum took 0.4 ms.

A matrix-vector product (one row: VGG's and AlexNet's FCs) reads panels too: its plain kernel
streams whole weight rows into an accumulator row in memory (a load and a store per multiply-add),
the panels keep their accumulators in registers. Gemm + Relu alone, same measurement: 25088 x 4096
(411 MB) 21.7 -> 18.4 ms (onnxruntime 22-23), 9216 x 4096 6.4 ms (9.1), 4096 x 4096 4.4 -> 2.7
(3.5-3.9), 4096 x 1000 (16 MB, in L3) 1.14 -> 0.35 (0.40-0.52).
"""

from __future__ import annotations

import math

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_ops, static_shape



def panel_width(lanes: int) -> int:
    """Columns per panel: two vectors (the matmul kernel's vector tile)."""
    return 2 * lanes


def panel_count(n: int, nb: int) -> int:
    """Panels for ``n`` columns: whole panels, one more (all zeros) when that count is prime (a
    register tile then takes two or three panels at once, see the module docstring)."""
    panels = -(-n // nb)
    return panels + 1 if panels > 3 and all(panels % d for d in range(2, math.isqrt(panels) + 1)) else panels


def pack_panels(w: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [panel_count(N, nb), K, nb], zero columns past N."""
    k, n = w.shape
    panels = panel_count(n, nb)
    padded = np.zeros((k, panels * nb), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, nb).transpose(1, 0, 2))


def rewrite_panel_matmuls(mod, traits):
    """The module with every such matmul reading packed panels (see the module docstring)."""
    from tvm import relax

    nb = panel_width(traits.for_matmuls().vector_lanes)
    # the variable a rewritten matmul's result is bound to -> (its [rows, P, nb] panels' result, N, its shape)
    panels_of: dict = {}

    def from_panels(rewriter, y, n: int, out_shape):
        """``y`` [rows, P, nb] as the matmul's [.., M, N] result: a reshape (free) and a slice."""
        rows, panels, width = (int(d) for d in y.ty.shape)
        flat = rewriter.emit(relax.op.reshape(y, (rows, panels * width)))
        if panels * width != n:
            flat = rewriter.emit(relax.op.strided_slice(flat, axes=[1], begin=[0], end=[n]))
        return flat if len(out_shape) == 2 else rewriter.emit(relax.op.reshape(flat, out_shape))

    def matmul_rule(call, rewriter):
        weight = constant_value(call.args[1])
        x_shape = static_shape(call.args[0])
        if weight is None or len(weight.shape) != 2 or str(weight.dtype) != "float32" or x_shape is None:
            return None
        k, n = (int(d) for d in weight.shape)
        if (k * n * 4 < traits.l2_bytes or len(x_shape) < 2 or x_shape[-1] != k
                or str(call.args[0].ty.dtype) != "float32" or n < nb):
            return None
        rows = math.prod(x_shape[:-1])
        x = call.args[0] if len(x_shape) == 2 else rewriter.emit(relax.op.reshape(call.args[0], (rows, k)))
        y = rewriter.emit(relax.op.einsum([x, relax.const(pack_panels(weight.numpy(), nb))], "mk,pkj->mpj"))
        out_shape = (*x_shape[:-1], n)
        result = from_panels(rewriter, y, n, out_shape)
        panels_of[result] = (y, n, out_shape)
        return result

    def bias_rule(call, rewriter):
        for a, b in (call.args, call.args[::-1]):
            found = panels_of.get(rewriter.bound(a))
            bias = constant_value(rewriter.bound(b))
            if found is None or bias is None or str(bias.dtype) != "float32":
                continue
            y, n, out_shape = found
            values = bias.numpy()
            if values.size != n or values.shape[-1:] != (n,):  # one value per column, broadcast over rows
                continue
            padded = pack_panels(values.reshape(1, n), nb)[:, 0]  # [P, nb], zeros past N like the weight
            biased = rewriter.emit(relax.op.add(y, relax.const(padded)))
            return from_panels(rewriter, biased, n, out_shape)
        return None

    # the result without its bias, now unused, goes
    return rewrite_ops(mod, {"relax.matmul": matmul_rule, "relax.add": bias_rule}, drop_unused=True)
