"""Local response normalization (LRN) as one pass over its input.

TVM imports ONNX's LRN as ``x / (bias + alpha * avg_pool3d(expand_dims(x * x)))) ** beta``: the
squares are padded over the channels into a copy (a zero fill of the whole padded tensor, then the
copy), averaged by a 3-D pool over ``(1, 1, C, H, W)`` and normalized by a second elementwise pass.
In ZFNet (96 x 109 x 109) the pool took 0.78 ms and the normalization 0.45 of its 11 ms on 2 threads.
Here one kernel reads ``x`` once per output row:

    y[n, c, h, w] = x[n, c, h, w] / (bias + alpha * sum_k x[n, c + k - pad, h, w] ** 2 / size) ** beta

the sum over the ``size`` channels of the window that exist (the pool counts the padding: the
divisor is ``size`` everywhere), unrolled; ``** beta`` for beta in quarters as square roots and
products (fast_math's rule: 0.75 in AlexNet, GoogLeNet and ZFNet). Rows are vectorized along the width
(their whole vectors; the rest a scalar loop), in parallel over channels and rows.

Mechanism: ``rewrite_local_response_norms`` matches the importer's chain, ending in the divide, for
a static float32 NCHW tensor with an odd window of at most ``MAX_WINDOW`` channels and beta in
quarters (any other LRN keeps TVM's form) and replaces it with a ``call_tir``;
``schedule_local_response_norm`` schedules it (its block, named ``BLOCK``: ``local_response_norm_block``)."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.relax_rewrite import OPAQUE_PATTERN, i64, rewrite_ops, scalar_constant, static_shape

BLOCK = "sculpt_lrn"
MAX_WINDOW = 15  # the window's terms are unrolled


def _quarter_power(base, beta: float):
    """``base ** beta`` for beta a positive multiple of 1/4 as products of square roots."""
    from tvm import tirx

    whole, quarters = divmod(round(beta * 4), 4)
    factors = [base] * whole
    if quarters == 2:
        factors.append(tirx.sqrt(base))
    elif quarters:
        root = tirx.sqrt(base)
        factors += [root, tirx.sqrt(root)] if quarters == 3 else [tirx.sqrt(root)]
    product = factors[0]
    for f in factors[1:]:
        product = product * f
    return product


def local_response_norm_func(shape: tuple[int, int, int, int], size: int, pad: int, alpha: float,
                             bias: float, beta: float):
    """The TE definition: x [N, C, H, W] -> y, the window ``[c - pad, c - pad + size)`` over channels."""
    from tvm import te, tirx

    n, c, h, w = shape
    x = te.placeholder(i64(n, c, h, w), "float32", name="x")
    channels = tirx.IntImm("int64", c)
    zero, one = tirx.const(0.0, "float32"), tirx.const(1.0, "float32")

    def lrn(b, ch, row, col):
        total = None
        for k in range(size):
            src = ch + tirx.IntImm("int64", k - pad)
            # the index clamped into the tensor and the term masked by a factor: a Select around the
            # load would let the simplifier drop the clamp inside it (its condition says the index is in
            # range), and the vector code loads both sides of a Select: planes before the tensor
            v = x[b, tirx.max(tirx.min(src, channels - 1), tirx.IntImm("int64", 0)), row, col]
            inside = tirx.Select(tirx.all(src >= tirx.IntImm("int64", 0), src < channels), one, zero)
            term = v * v * inside
            total = term if total is None else total + term
        scale = tirx.Var("scale", "float32")
        mean = total / tirx.const(float(size), "float32")
        value = tirx.const(bias, "float32") + tirx.const(alpha, "float32") * mean
        return tirx.Let(scale, value, x[b, ch, row, col] / _quarter_power(scale, beta))

    y = te.compute(i64(n, c, h, w), lrn, name=BLOCK)
    return te.create_prim_func([x, y])


def _op(expr) -> str:
    return str(getattr(getattr(expr, "op", None), "name", ""))


def _match(call, rewriter):
    """(x, size, pad, alpha, bias, beta) when ``call`` (a divide) ends the importer's LRN chain, else None."""
    if len(call.args) != 2:
        return None
    x, power = call.args[0], rewriter.value(call.args[1])
    if _op(power) != "relax.power":
        return None
    beta = scalar_constant(power.args[1])
    add = rewriter.value(power.args[0])
    if beta is None or not 0 < beta <= 3 or beta * 4 != round(beta * 4) or _op(add) != "relax.add":
        return None
    bias = scalar_constant(add.args[1])
    mul = rewriter.value(add.args[0])
    if bias is None or _op(mul) != "relax.multiply":
        return None
    alpha = scalar_constant(mul.args[1])
    squeeze = rewriter.value(mul.args[0])
    if alpha is None or _op(squeeze) != "relax.squeeze" or [int(a) for a in (squeeze.attrs.axis or [])] != [1]:
        return None
    pool = rewriter.value(squeeze.args[0])
    if _op(pool) != "relax.nn.avg_pool3d":
        return None
    a = pool.attrs
    size = int(a.pool_size[0])
    pad = int(a.padding[0])
    if ([int(v) for v in a.pool_size[1:]] != [1, 1] or [int(v) for v in a.strides] != [1, 1, 1]
            or [int(v) for v in a.dilation] != [1, 1, 1]
            or [int(v) for v in a.padding] != [pad, 0, 0, size - 1 - pad, 0, 0]
            or not bool(a.count_include_pad) or bool(a.ceil_mode) or str(a.layout) != "NCDHW"
            or not 0 < size <= MAX_WINDOW):
        return None
    expand = rewriter.value(pool.args[0])
    if _op(expand) != "relax.expand_dims" or [int(v) for v in expand.attrs.axis] != [1]:
        return None
    square = rewriter.value(expand.args[0])
    if _op(square) != "relax.multiply" or not (square.args[0].same_as(x) and square.args[1].same_as(x)):
        return None
    return x, size, pad, alpha, bias, beta


def rewrite_local_response_norms(mod):
    """``mod`` with each LRN of the importer's form replaced by one kernel (module docstring)."""
    from tvm import relax

    made: dict[tuple, object] = {}

    def divide_rule(call, rewriter):
        found = _match(call, rewriter)
        if found is None:
            return None
        x, size, pad, alpha, bias, beta = found
        shape = static_shape(x)
        if shape is None or len(shape) != 4 or str(x.ty.dtype) != "float32" or static_shape(call) != shape:
            return None
        key = (shape, size, pad, alpha, bias, beta)
        if key not in made:
            # opaque: fused into the conv before it, the window's neighbours would be that kernel's
            # epilogue (Inception v1's second LRN, after a Winograd conv: 0.67 ms for 192 x 56 x 56)
            func = local_response_norm_func(*key).without_attr("global_symbol").with_attr("op_pattern", OPAQUE_PATTERN)
            made[key] = rewriter.add_func(func, f"sculpt_local_response_norm{len(made)}")
        return relax.call_tir(made[key], [x], relax.TensorType(shape, "float32"))

    return rewrite_ops(mod, {"relax.divide": divide_rule}, drop_unused=True)


def local_response_norm_block(sch):
    """The block of sculpt's LRN kernel in a schedule's function, else None."""
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks

    return next((b for b in root_blocks(sch) if sch.get(b).name_hint == BLOCK), None)


def schedule_local_response_norm(sch, block, lanes: int, parallel: bool) -> None:
    """Parallel over (n, c, h) rows, each row vectorized over its whole vectors."""
    from sculpt.backends.tvm.kernels.row_softmax import vectorize_whole_vectors

    *rows, col = sch.get_loops(block)
    if parallel:
        sch.parallel(sch.fuse(*rows))
    vectorize_whole_vectors(sch, col, lanes)
