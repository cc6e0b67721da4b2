"""Relax rewrite: transcendental functions as polynomial approximations that LLVM vectorizes,
instead of one scalar libm call per element.

TVM legalizes ``erf``, ``exp``, ``tanh`` and ``sigmoid`` to intrinsics that the CPU code generator
emits as calls to libm (``erff``, ``expf``, ...), one scalar call per element, which also keeps a
fused epilogue out of vector registers. Measured on this machine (1 thread): the GELUs fused after
PP-OCRv6 det's convs took about 100 of 500 ms with ``erff``; a sigmoid over 4 x 368 x 368 (a
detection head's) 2.2 ms with ``expf``, 0.32 ms approximated; a softmax over 40 x 6625 classes
(PP-OCRv6 rec) ran about as fast either way (its time is in the reductions, not in exp). The
approximations are TVM's own (``relax.transform.FastMathTransform``: softmax, exp, erf, tanh as
``topi.fast_softmax`` / ``fast_exp`` / ``fast_erf`` / ``fast_tanh``), plus sigmoid as
``1 / (1 + fast_exp(-x))``, which that pass leaves alone. Accuracy in float32: erf about 1e-7
absolute; exp within 4.1e-6 relative over [-87, 88] (results below about 1e-38 flush to zero).
onnxruntime computes these functions with vectorized approximations too. Powers by a constant in
quarters (LRN's x ** 0.75) become square roots and products (``power_rule``): AlexNet's LRN over
96 x 55 x 55 went from 3.2 to 0.48 ms."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_calls, scalar_constant, static_shape


def _sigmoid(x):
    from tvm import topi, tirx

    one = tirx.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def rewrite_fast_math(mod):
    """``mod`` with every float32 softmax, exp, erf, tanh and sigmoid replaced by its vectorizable
    approximation."""
    from tvm import relax

    made: dict[tuple, object] = {}

    def sigmoid_rule(call, rewriter):
        from tvm import te, tirx

        if getattr(call.op, "name", "") != "relax.sigmoid" or len(call.args) != 1:
            return None
        shape = static_shape(call.args[0])
        if shape is None or str(call.args[0].ty.dtype) != "float32":
            return None
        if shape not in made:
            x = te.placeholder([tirx.IntImm("int64", d) for d in shape], "float32", name="x")
            func = te.create_prim_func([x, _sigmoid(x)]).without_attr("global_symbol")
            made[shape] = rewriter.add_func(func, f"sculpt_fast_sigmoid{len(made)}")
        return relax.call_tir(made[shape], [call.args[0]], relax.TensorType(shape, "float32"))

    def rule(call, rewriter):
        new = sigmoid_rule(call, rewriter)
        return new if new is not None else power_rule(call, rewriter)

    return relax.transform.FastMathTransform()(rewrite_calls(mod, rule))


def power_rule(call, rewriter):
    """``x ** p`` for a constant p in quarters up to 3 (LRN's 0.75 in AlexNet, GoogLeNet and ZFNet)
    as square roots and products, which are vector instructions, instead of one ``powf`` call per
    element; each square root is correctly rounded, so the result is within about 2 ulp of powf."""
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.power" or len(call.args) != 2 \
            or str(call.args[0].ty.dtype) != "float32":
        return None
    p = scalar_constant(call.args[1])
    if p is None or p * 4 != int(p * 4) or not 0 < abs(p) <= 3:
        return None
    x = call.args[0]
    whole, quarters = divmod(int(abs(p) * 4), 4)
    factors = [x] * whole  # expressions; the last one is built as a call, not bound
    if quarters == 2:
        factors.append(relax.op.sqrt(x))
    elif quarters:
        root = rewriter.emit(relax.op.sqrt(x))
        factors += [root, relax.op.sqrt(root)] if quarters == 3 else [relax.op.sqrt(root)]
    if len(factors) == 1 and p > 0:
        return None if factors[0] is x else factors[0]
    product = factors[0]
    for f in factors[1:]:
        product = relax.op.multiply(rewriter.emit(product) if isinstance(product, relax.Call) else product,
                                    rewriter.emit(f) if isinstance(f, relax.Call) else f)
    if p > 0:
        return product
    return relax.op.divide(relax.const(1.0, "float32"), rewriter.emit(product) if isinstance(product, relax.Call)
                           else product)
