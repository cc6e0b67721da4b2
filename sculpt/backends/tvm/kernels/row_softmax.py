"""Softmax over long rows with vector reductions.

TVM legalizes softmax as a max reduction, exp, a sum reduction and a division, each a scalar loop
along the row: a CTC recognizer's 40 x 6625 class scores took 2.6 ms on one thread, 8% of
PP-OCRv6 rec. Here the row is read as ``lanes`` interleaved partial rows, so both reductions are
vector operations, and the row is padded to whole vectors (the padding contributes exactly 0):

    for each row:
        pmax[j] = max over i of x[i * lanes + j]                # vector max, j < lanes
        m = max(pmax)
        e[c] = fast_exp(x[c] - m)   (0 past the row's end)      # vectorized, whole vectors
        psum[j] = sum over i of e[i * lanes + j]; s = sum(psum)
        y[c] = e[c] * (1 / s)                                   # sliced back to the row's length

The exponential is TVM's ``fast_exp``, the one FastMathTransform gives the other softmaxes, so the
results match the rest of the fast-math build. Mechanism: ``rewrite_row_softmax`` replaces
``relax.nn.softmax`` over the last axis of static rows of at least ``MIN_ROW`` elements with a
``call_tir`` (batch dims flattened, padded columns sliced off); ``schedule_row_softmax`` schedules
it (its blocks are named ``sculpt_softmax_*``)."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_calls, static_shape

BLOCK_PREFIX = "sculpt_softmax_"
# shorter rows (attention's 40 or 80 keys) keep TVM's softmax: the partial rows would be mostly empty
MIN_ROW = 256


def row_softmax_func(rows: int, length: int, lanes: int):
    """The TE definition: x [rows, length] -> y [rows, padded length]."""
    from tvm import te, tirx, topi

    groups = -(-length // lanes)
    padded = groups * lanes
    i64 = lambda *d: [tirx.IntImm("int64", int(v)) for v in d]  # noqa: E731 - Relax indexes in int64
    x = te.placeholder(i64(rows, length), "float32", name="x")
    lowest = tirx.const(-3.4028234663852886e38, "float32")
    zero = tirx.const(0.0, "float32")

    i = te.reduce_axis(i64(0, groups), "i")
    pmax = te.compute(i64(rows, lanes), lambda r, j: te.max(
        tirx.if_then_else(i * lanes + j < length, x[r, tirx.min(i * lanes + j, length - 1)], lowest), axis=i),
        name=BLOCK_PREFIX + "partial_max")
    j = te.reduce_axis(i64(0, lanes), "j")
    rmax = te.compute(i64(rows), lambda r: te.max(pmax[r, j], axis=j), name=BLOCK_PREFIX + "max")
    shifted = te.compute(i64(rows, padded), lambda r, c: x[r, tirx.min(c, length - 1)] - rmax[r], name="shifted")
    exp = topi.fast_exp(shifted)  # inlined into the next stage
    e = te.compute(i64(rows, padded), lambda r, c: tirx.if_then_else(c < length, exp[r, c], zero),
                   name=BLOCK_PREFIX + "exp")
    i2 = te.reduce_axis(i64(0, groups), "i2")
    psum = te.compute(i64(rows, lanes), lambda r, jj: te.sum(e[r, i2 * lanes + jj], axis=i2),
                      name=BLOCK_PREFIX + "partial_sum")
    j2 = te.reduce_axis(i64(0, lanes), "j2")
    rsum = te.compute(i64(rows), lambda r: te.sum(psum[r, j2], axis=j2), name=BLOCK_PREFIX + "sum")
    y = te.compute(i64(rows, padded), lambda r, c: e[r, c] * (tirx.const(1.0, "float32") / rsum[r]),
                   name=BLOCK_PREFIX + "normalize")
    return te.create_prim_func([x, y])


def rewrite_row_softmax(mod, lanes: int):
    """``mod`` with every softmax over the last axis of long static rows replaced (module docstring)."""
    made: dict[tuple, object] = {}

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.nn.softmax":
            return None
        x = call.args[0]
        shape = static_shape(x)
        if shape is None or not shape or str(x.ty.dtype) != "float32" or int(call.attrs.axis) not in (-1, len(shape) - 1):
            return None
        length = shape[-1]
        rows = 1
        for d in shape[:-1]:
            rows *= d
        if length < MIN_ROW or rows == 0:
            return None
        key = (rows, length)
        if key not in made:
            func = row_softmax_func(rows, length, lanes).without_attr("global_symbol")
            made[key] = rewriter.add_func(func, f"sculpt_row_softmax{len(made)}")
        padded = -(-length // lanes) * lanes
        flat = rewriter.emit(relax.op.reshape(x, (rows, length)))
        y = rewriter.emit(relax.call_tir(made[key], [flat], relax.TensorType((rows, padded), "float32")))
        if padded != length:
            y = rewriter.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[length]))
        return relax.op.reshape(y, shape)

    return rewrite_calls(mod, rule)


def is_row_softmax(sch) -> bool:
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks

    return any(sch.get(b).name_hint.startswith(BLOCK_PREFIX + "partial_max") for b in root_blocks(sch))


def schedule_row_softmax(sch, lanes: int, parallel: bool) -> None:
    """One row at a time (its exponentials stay in cache): every stage under the row loop of the
    last one, the partial reductions and the elementwise stages vectorized over ``lanes``; a
    reshape or slice fused around it is inlined, or else scheduled on its own."""
    from sculpt.backends.tvm.kernels.block_analysis import root_blocks
    from sculpt.backends.tvm.kernels.register_tile import schedule_injective_block

    for b in root_blocks(sch):
        if not sch.get(b).name_hint.startswith(BLOCK_PREFIX):
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(b)
                    break
                except Exception:  # noqa: BLE001 - stays a stage of its own
                    continue
    blocks = {sch.get(b).name_hint[len(BLOCK_PREFIX):]: b for b in root_blocks(sch)
              if sch.get(b).name_hint.startswith(BLOCK_PREFIX)}
    others = [b for b in root_blocks(sch) if not sch.get(b).name_hint.startswith(BLOCK_PREFIX)]
    last = blocks["normalize"]
    r, c = sch.get_loops(last)[:2]
    sch.vectorize(sch.split(c, factors=[None, lanes])[1])
    for name in ("sum", "partial_sum", "exp", "max", "partial_max"):
        sch.compute_at(blocks[name], r, preserve_unit_loops=True)
    if parallel:  # before any reduction is decomposed: the loop primitives refuse decomposed blocks
        sch.parallel(r)
    for name in ("partial_max", "partial_sum"):
        b = blocks[name]
        lane, reduce = sch.get_loops(b)[-2:]
        sch.reorder(reduce, lane)
        sch.vectorize(lane)
    for name in ("partial_max", "partial_sum"):  # last: the loop primitives refuse a decomposed block
        sch.decompose_reduction(blocks[name], sch.get_loops(blocks[name])[-2])
    sch.vectorize(sch.split(sch.get_loops(blocks["exp"])[-1], factors=[None, lanes])[1])
    for b in others:
        schedule_injective_block(sch, b, lanes)
