"""Relax rewrite: evaluate shape-only and tiny operations on constants with numpy, before TVM's
FoldConstant does (it compiles and runs one TIR function per folded call through LLVM).

The ONNX importer emits, per Conv, ``reshape(bias, (1, C, 1, 1))``, and per Clip/HardSwish
``where(isnan(c), -inf, c)`` on scalars; on PP-OCR det that is ~150 calls whose folding took about
half of the whole compile time. Here they become constants directly; the result is identical."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls

# op -> numpy evaluation on constant arguments (attrs from the call)
_NUMPY_EVAL = {
    "relax.reshape": lambda call, args: args[0].reshape(args[1]),
    "relax.isnan": lambda call, args: np.isnan(args[0]),
    "relax.where": lambda call, args: np.where(args[0], args[1], args[2]).astype(np.result_type(args[1], args[2])),
    "relax.permute_dims": lambda call, args: np.transpose(
        args[0], None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]),
}


def _argument_value(expr):
    values = getattr(expr, "values", None)  # a relax.ShapeExpr (reshape's target shape)
    if values is not None:
        return tuple(int(v) for v in values)
    value = constant_value(expr)
    return None if value is None else value.numpy()


def fold_small_constants(mod):
    """The module with every call in ``_NUMPY_EVAL`` on constant arguments replaced by its value."""
    return rewrite_calls(mod, _evaluated)


def _evaluated(call, rewriter):
    from tvm import relax

    evaluate = _NUMPY_EVAL.get(getattr(call.op, "name", ""))
    if evaluate is None:
        return None
    args = [_argument_value(rewriter.bound(a)) for a in call.args]
    if any(a is None for a in args):
        return None
    try:
        value = np.array(evaluate(call, args), order="C")  # keeps 0-d scalars 0-d
    except Exception:  # noqa: BLE001 - anything unusual is left to TVM's FoldConstant
        return None
    return relax.const(value, str(value.dtype))
