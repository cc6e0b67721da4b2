"""The mechanism shared by sculpt's Relax rewrites: visit every call of every Relax function
(post-order) and let a rule replace it, emitting helper bindings as needed."""

from __future__ import annotations

from typing import Callable


def constant_value(expr):
    """The tensor of a Relax constant (``.value`` in TVM 0.27, ``.data`` before), else None."""
    for attr in ("value", "data"):
        value = getattr(expr, attr, None)
        if value is not None and hasattr(value, "numpy") and hasattr(value, "shape"):
            return value
    return None


def scalar_constant(expr) -> float | None:
    """The value of a Relax constant holding a single number, else None."""
    value = constant_value(expr)
    if value is None or int(value.numpy().size) != 1:
        return None
    return float(value.numpy().reshape(-1)[0])


RESIZE_OP = "relax.image.resize2d"
OPAQUE_PATTERN = 8  # TVM's OpPatternKind kOpaque (a PrimFunc's "op_pattern"): FuseOps leaves such a call alone


def in_layout(call, x, layout: str):
    """The pool, adaptive average pool or 2-D resize ``call`` rebuilt over ``x`` with ``layout`` as its
    input and output layout (NHWC, NCHW<c>c), its other attributes kept."""
    from tvm import relax

    a = call.attrs
    if str(call.op.name) == RESIZE_OP:
        return relax.op.image.resize2d(x, call.args[1], [float(v) for v in a.roi], layout, str(a.method),
                                       str(a.coordinate_transformation_mode), str(a.rounding_method),
                                       float(a.cubic_alpha), int(a.cubic_exclude), float(a.extrapolation_value))
    if str(call.op.name) == "relax.nn.adaptive_avg_pool2d":
        size = None if a.output_size is None else [int(d) for d in a.output_size]
        return relax.op.nn.adaptive_avg_pool2d(x, size, layout, layout)
    make = relax.op.nn.max_pool2d if str(call.op.name) == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
    return make(x, [int(d) for d in a.pool_size], [int(d) for d in a.strides], [int(d) for d in a.padding],
                [int(d) for d in a.dilation], bool(a.ceil_mode), bool(a.count_include_pad), layout, layout)


def i64(*dims) -> list:
    """Extents as int64 constants, for TE definitions emitted next to Relax's legalized functions:
    those index in int64, and FuseTIR needs equal buffer types."""
    from tvm import tirx

    return [tirx.IntImm("int64", int(d)) for d in dims]


def static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a Relax expression's tensor type, or None (symbolic or not a tensor)."""
    try:
        return tuple(int(d) for d in expr.ty.shape)
    except (TypeError, AttributeError, ValueError):
        return None


def four_pads(attrs) -> list[int] | None:
    """A conv/pool's 2-D padding as [top, left, bottom, right] (Relax allows 2 values), else None."""
    pads = [int(p) for p in attrs.padding]
    if len(pads) == 2:
        pads = pads * 2
    return pads if len(pads) == 4 else None


class Rewriter:
    """Handed to a rule: ``emit(expr)`` binds a helper expression and returns its variable;
    ``bound(var)`` is the expression a variable was bound to (or the variable itself), ``value(var)``
    the same through variables bound to variables."""

    def __init__(self, mutator):
        self._mutator = mutator

    def emit(self, expr):
        return self._mutator.builder_.emit(expr)

    def add_func(self, func, name: str):
        """Add a PrimFunc to the module under a fresh name; returns its GlobalVar."""
        return self._mutator.builder_.add_func(func, name)

    def bound(self, expr):
        from tvm import relax

        if isinstance(expr, relax.Var):
            value = self._mutator.lookup_binding(expr)
            return value if value is not None else expr
        return expr

    def value(self, expr):
        """``bound`` through bindings of one variable to another (a rule's result is bound to a new
        variable that the original one is then bound to)."""
        from tvm import relax

        found = self.bound(expr)
        while found is not expr and isinstance(found, relax.Var):
            expr, found = found, self.bound(found)
        return found


def rewrite_calls(mod, rule: Callable, *, before: Callable | None = None, on_function: Callable | None = None):
    """``mod`` with each call ``c`` replaced by ``rule(c, rewriter)`` unless that returns None.

    ``before(original_call, rewriter, visit)``, if given, sees each call as it was, before its
    operands are rewritten, and may return its replacement (``visit(expr)`` rewrites an operand);
    ``on_function(func)`` is called before each Relax function is visited."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.module = module
            self.rewriter = Rewriter(self)

        def visit_call_(self, call):
            if before is not None:
                new = before(call, self.rewriter, self.visit_expr)
                if new is not None:
                    return new
            call = super().visit_call_(call)
            new = rule(call, self.rewriter)
            return call if new is None else new

        def run(self):
            for gv, func in self.module.functions_items():
                if isinstance(func, relax.Function):
                    if on_function is not None:
                        on_function(func)
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _Mutator(mod).run()


def rewrite_ops(mod, rules: dict, *, drop_unused: bool = False):
    """``rewrite_calls`` with one rule per Relax op name (``{"relax.matmul": rule, ...}``);
    ``drop_unused``: the bindings the rewrites left unused are removed afterwards."""
    from tvm import relax

    def rule(call, rewriter):
        chosen = rules.get(getattr(call.op, "name", ""))
        return None if chosen is None else chosen(call, rewriter)

    out = rewrite_calls(mod, rule)
    return relax.transform.DeadCodeElimination()(out) if drop_unused else out
