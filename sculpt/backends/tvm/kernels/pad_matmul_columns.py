"""Relax rewrite: a matmul with constant weights whose column count has no power-of-two factor
(PP-OCR rec's classifier: 120 x 6625, 6625 = 5^3 x 53) gets its weight padded with zero columns to
a multiple of 16 and its output sliced back.

The matmul kernel vectorizes the columns; with 6625 of them there is no vector tile without a
remainder, and the kernel fell to scalar code (27x slower than onnxruntime on that layer). Padded,
it runs on full vectors; the slice fuses with the bias add after it."""

from __future__ import annotations

import numpy as np

COLUMN_MULTIPLE = 16  # a multiple of every target's float32 lanes (NEON 4, AVX2 8, AVX-512 16)
MIN_COLUMNS = 64      # below this the kernel takes the columns as one (odd-sized) vector


def _constant_value(expr):
    for attr in ("value", "data"):
        value = getattr(expr, attr, None)
        if value is not None and hasattr(value, "numpy") and hasattr(value, "shape"):
            return value
    return None


def _padded_columns(n: int) -> int | None:
    if n < MIN_COLUMNS or n % 4 == 0:  # a power-of-two vector >= 4 already divides it
        return None
    return -(-n // COLUMN_MULTIPLE) * COLUMN_MULTIPLE


def pad_matmul_columns(mod):
    """The module with every such matmul padded (see the module docstring)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Padder(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.matmul":
                return call
            weight = _constant_value(call.args[1])
            if weight is None or len(weight.shape) != 2 or str(weight.dtype) != "float32":
                return call
            k, n = (int(d) for d in weight.shape)
            padded = _padded_columns(n)
            if padded is None:
                return call
            w = np.zeros((k, padded), np.float32)
            w[:, :n] = weight.numpy()
            out = self.builder_.emit(relax.op.matmul(call.args[0], relax.const(w)))
            rank = len(call.args[0].ty.shape)
            return relax.op.strided_slice(out, axes=[rank - 1], begin=[0], end=[n])

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _Padder(mod).run()
