"""Softmax over long rows with vector reductions.

TVM legalizes softmax as a max reduction, exp, a sum reduction and a division, each a scalar loop
along the row: a CTC recognizer's 40 x 6625 class scores took 2.6 ms on one thread, 8% of
PP-OCRv6 rec. Here the row is read as ``lanes`` interleaved partial rows over its whole vectors, so
both reductions are vector operations; the last ``length % lanes`` elements are reduced apart:

    for each row:
        pmax[j] = max over i of x[i * lanes + j]                # vector max over whole vectors
        m = max(max(pmax), max of the tail)
        e[c] = fast_exp(x[c] - m)                               # whole vectors, then the tail
        psum[j] = sum over i of e[i * lanes + j]; s = sum(psum) + sum of the tail
        y[c] = e[c] * (1 / s)                                   # whole vectors, then the tail

No stage holds a bound check: the elementwise row loops are partitioned into whole vectors
(vectorized) and the rest (a scalar loop). An earlier form padded the row to whole vectors and
masked the padding, and TVM's simplifier turned the mask (``c < 18710``) into ``c // 2 < 9355``,
which kept every stage but one scalar: PP-OCRv6 rec's 40 x 18710 took 1.55 ms, 0.6 ms now
(onnxruntime 0.22-0.33), PP-OCR rec's 40 x 6625 0.38 -> 0.14 (0.09-0.12), 1 thread, CPU time.
The vectors are the target's widest (AVX-512: 16 lanes): the rows are long.

The exponential is TVM's ``fast_exp``, the one FastMathTransform gives the other softmaxes, so the
results match the rest of the fast-math build. Mechanism: ``rewrite_row_softmax`` replaces
``relax.nn.softmax`` over the last axis of static rows of at least ``MIN_ROW`` elements with a
``call_tir`` (batch dims flattened); ``schedule_row_softmax`` schedules
it (its blocks are named ``sculpt_softmax_*``)."""

from __future__ import annotations

import math

from sculpt.backends.tvm.kernels.relax_rewrite import rewrite_ops, static_shape

BLOCK_PREFIX = "sculpt_softmax_"
# shorter rows (attention's 40 or 80 keys) keep TVM's softmax: the partial rows would be mostly empty
MIN_ROW = 256


def softmax_lanes(traits) -> int:
    """The vector width of the row softmax: the target's widest vectors (its rows are long)."""
    return max(traits.vector_lanes, traits.wide_lanes)


def row_softmax_func(rows: int, length: int, lanes: int, row_stride: int | None = None,
                     out_shape: tuple[int, ...] | None = None):
    """The TE definition: x [rows, row_stride] -> y [rows, length], over each row's first ``length``
    elements (``row_stride``, default ``length``: rows padded past their length are read in place);
    y in ``out_shape`` (its leading dimensions ``rows`` together) if given: a reshape of the result
    is a copy where it is the function's output (Relax makes views of the others only).
    The partial reductions read the row's whole vectors; the last ``length % lanes`` elements are
    reduced apart (``tail_*``), so no stage holds a condition (a bound check on the lane index keeps
    TVM from vectorizing the loop)."""
    from tvm import te, tirx, topi

    groups, tail = divmod(length, lanes)
    full = groups * lanes
    i64 = lambda *d: [tirx.IntImm("int64", int(v)) for v in d]  # noqa: E731 - Relax indexes in int64
    x = te.placeholder(i64(rows, row_stride or length), "float32", name="x")

    i = te.reduce_axis(i64(0, groups), "i")
    pmax = te.compute(i64(rows, lanes), lambda r, j: te.max(x[r, i * lanes + j], axis=i),
                      name=BLOCK_PREFIX + "partial_max")
    j = te.reduce_axis(i64(0, lanes), "j")
    rmax = te.compute(i64(rows), lambda r: te.max(pmax[r, j], axis=j), name=BLOCK_PREFIX + "max")
    if tail:
        t = te.reduce_axis(i64(0, tail), "t")
        tmax = te.compute(i64(rows), lambda r: te.max(x[r, full + t], axis=t), name=BLOCK_PREFIX + "tail_max")
        rmax = te.compute(i64(rows), lambda r: te.max(rmax[r], tmax[r]), name=BLOCK_PREFIX + "row_max")
    shifted = te.compute(i64(rows, length), lambda r, c: x[r, c] - rmax[r], name="shifted")
    exp = topi.fast_exp(shifted)  # inlined into the next stage
    e = te.compute(i64(rows, length), lambda r, c: exp[r, c], name=BLOCK_PREFIX + "exp")
    i2 = te.reduce_axis(i64(0, groups), "i2")
    psum = te.compute(i64(rows, lanes), lambda r, jj: te.sum(e[r, i2 * lanes + jj], axis=i2),
                      name=BLOCK_PREFIX + "partial_sum")
    j2 = te.reduce_axis(i64(0, lanes), "j2")
    rsum = te.compute(i64(rows), lambda r: te.sum(psum[r, j2], axis=j2), name=BLOCK_PREFIX + "sum")
    if tail:
        t2 = te.reduce_axis(i64(0, tail), "t2")
        tsum = te.compute(i64(rows), lambda r: te.sum(e[r, full + t2], axis=t2), name=BLOCK_PREFIX + "tail_sum")
        rsum = te.compute(i64(rows), lambda r: rsum[r] + tsum[r], name=BLOCK_PREFIX + "row_sum")
    lead = list(out_shape[:-1]) if out_shape else [rows]

    def normalize(*index):
        r = index[0]
        for i, d in zip(index[1:-1], lead[1:]):
            r = r * d + i
        return e[r, index[-1]] * (tirx.const(1.0, "float32") / rsum[r])

    y = te.compute(i64(*lead, length), normalize, name=BLOCK_PREFIX + "normalize")
    return te.create_prim_func([x, y])


def rewrite_row_softmax(mod, lanes: int):
    """``mod`` with every softmax over the last axis of long static rows replaced (module docstring).
    A softmax of the first columns of a wider matrix (a padded matmul's result sliced back:
    panel_matmul) reads the wider rows in place instead of a sliced copy."""
    from tvm import relax

    made: dict[tuple, object] = {}
    key_of: dict = {}  # a made function's GlobalVar -> its key

    def softmax_call(rewriter, source, rows: int, length: int, stride: int, shape):
        key = (rows, length, stride, tuple(shape))
        if key not in made:
            func = row_softmax_func(rows, length, lanes, stride, tuple(shape)).without_attr("global_symbol")
            made[key] = rewriter.add_func(func, f"sculpt_row_softmax{len(made)}")
            key_of[made[key]] = key
        flat = rewriter.emit(relax.op.reshape(source, (rows, stride)))
        return relax.call_tir(made[key], [flat], relax.TensorType(shape, "float32"))

    def softmax_rule(call, rewriter):
        x = call.args[0]
        shape = static_shape(x)
        if shape is None or not shape or str(x.ty.dtype) != "float32" or int(call.attrs.axis) not in (-1, len(shape) - 1):
            return None
        length = shape[-1]
        rows = math.prod(shape[:-1])
        if length < MIN_ROW or rows == 0:
            return None
        wider = _wider_rows(x, rows, length, rewriter)
        stride = length if wider is None else static_shape(wider)[-1]
        return softmax_call(rewriter, x if wider is None else wider, rows, length, stride, shape)

    def reshape_rule(call, rewriter):
        """A reshape of a row softmax's result that keeps its rows: the softmax writes that shape."""
        made_call = rewriter.value(call.args[0])
        shape = static_shape(call)
        key = key_of.get(getattr(made_call, "args", [None])[0]) if made_call is not None else None
        if key is None or shape is None or not shape or shape[-1] != key[1] or math.prod(shape[:-1]) != key[0]:
            return None
        rows, length, stride, _ = key
        return softmax_call(rewriter, made_call.args[1][0], rows, length, stride, shape)

    # the slices read in place and the results reshaped go
    return rewrite_ops(mod, {"relax.nn.softmax": softmax_rule, "relax.reshape": reshape_rule}, drop_unused=True)


def _wider_rows(x, rows: int, length: int, rewriter):
    """The tensor ``x`` is the first ``length`` columns of (through reshapes that keep the rows), if
    it is a slice of a matrix of ``rows`` rows; else None."""
    expr = rewriter.value(x)
    while getattr(getattr(expr, "op", None), "name", "") == "relax.reshape":
        inner = static_shape(expr.args[0])
        if inner is None or inner[-1] != length:
            return None
        expr = rewriter.value(expr.args[0])
    if getattr(getattr(expr, "op", None), "name", "") != "relax.strided_slice" or len(expr.args) < 4:
        return None
    source = static_shape(expr.args[0])
    axes, begin, end = ([int(v.value) for v in t] for t in expr.args[1:4])
    strides = [int(v.value) for v in expr.args[4]] if len(expr.args) > 4 else [1]
    if (source is None or len(source) != 2 or source[0] != rows or axes not in ([1], [-1])
            or begin != [0] or end != [length] or strides != [1]):
        return None
    return expr.args[0]


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
    leading = sch.get_loops(last)[:-1]
    r = sch.fuse(*leading) if len(leading) > 1 else leading[0]
    order = ("row_sum", "tail_sum", "sum", "partial_sum", "exp", "row_max", "tail_max", "max", "partial_max")
    for name in order:
        if name in blocks:
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
    for name in ("exp", "normalize"):
        vectorize_whole_vectors(sch, sch.get_loops(blocks[name])[-1], lanes)
    for b in others:
        schedule_injective_block(sch, b, lanes)


def vectorize_whole_vectors(sch, loop, lanes: int) -> None:
    """Vectorize a row loop over its whole vectors; the last ``extent % lanes`` iterations stay a
    scalar loop of their own (a split with a remainder would put a bound check in every vector)."""
    extent = int(sch.get(loop).extent)
    full = extent // lanes * lanes
    if full and full != extent:
        loop = sch.loop_partition(loop, [full])[0]  # [0, full) and the rest
    if full:
        sch.vectorize(sch.split(loop, factors=[None, lanes])[1])
