"""Relax rewrite: evaluate shape-only and tiny operations on constants with numpy, before TVM's
FoldConstant does (it compiles and runs one TIR function per folded call through LLVM).

The ONNX importer emits, per Conv, ``reshape(bias, (1, C, 1, 1))``, and per Clip/HardSwish
``where(isnan(c), -inf, c)`` on scalars; on PP-OCR det that is ~150 calls whose folding took about
half of the whole compile time. Here they become constants directly; the result is identical."""

from __future__ import annotations

import numpy as np

# op -> numpy evaluation on constant arguments (attrs from the call)
_NUMPY_EVAL = {
    "relax.reshape": lambda call, args: args[0].reshape(args[1]),
    "relax.isnan": lambda call, args: np.isnan(args[0]),
    "relax.where": lambda call, args: np.where(args[0], args[1], args[2]).astype(np.result_type(args[1], args[2])),
    "relax.permute_dims": lambda call, args: np.transpose(
        args[0], None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]),
}


def _constant_value(expr):
    values = getattr(expr, "values", None)  # a relax.ShapeExpr (reshape's target shape)
    if values is not None:
        return tuple(int(v) for v in values)
    for attr in ("value", "data"):
        value = getattr(expr, attr, None)
        if value is not None and hasattr(value, "numpy"):
            return value.numpy()
    return None


def fold_small_constants(mod):
    """The module with every call in ``_NUMPY_EVAL`` on constant arguments replaced by its value."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Folder(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module

        def _const_arg(self, arg):
            if isinstance(arg, relax.Var):
                bound = self.lookup_binding(arg)
                arg = bound if bound is not None else arg
            return _constant_value(arg)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            evaluate = _NUMPY_EVAL.get(getattr(call.op, "name", ""))
            if evaluate is None:
                return call
            args = [self._const_arg(a) for a in call.args]
            if any(a is None for a in args):
                return call
            try:
                value = np.array(evaluate(call, args), order="C")  # keeps 0-d scalars 0-d
            except Exception:  # noqa: BLE001 - anything unusual is left to TVM's FoldConstant
                return call
            return relax.const(value, str(value.dtype))

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _Folder(mod).run()
