"""Relax rewrite: a float32 mean over many terms accumulates in float64.

TVM's reduction adds the terms one at a time into one float32 accumulator per output, so a mean over
a large map loses about n * 2^-24 of the sum of the terms' magnitudes, and when the terms have both
signs the mean can be far smaller than that. PP-OCRv6 det small's squeeze-and-excitation means over
a depthwise conv's 184x184 map came out 2.4e-4 (relative) off a float64 run of the same graph, where
onnxruntime's vectorized partial sums were 2.6e-5 off, and the model's output 4.3e-4 off (over
`sculpt verify`'s 1e-4; onnxruntime 1.2e-5). The mean becomes one TE function that converts each term
as it reads it: a Relax cast before the mean would fuse into the conv that produces the map and
make it write a float64 copy (PP-OCRv6 det 189 -> 217 ms)."""

from __future__ import annotations

import math

from sculpt.backends.tvm.kernels.relax_rewrite import i64, rewrite_calls, static_shape

MIN_TERMS = 4096  # a mean over fewer terms keeps float32 accumulation


def float64_mean_func(shape: tuple[int, ...], axes: list[int], keepdims: bool):
    """The TE definition: the mean of a float32 tensor of ``shape`` over ``axes``, summed in float64."""
    from tvm import te, tirx


    x = te.placeholder(i64(*shape), "float32", name="x")
    reduce = {a: te.reduce_axis(i64(0, shape[a]), f"r{a}") for a in axes}
    kept = [d for a, d in enumerate(shape) if a not in reduce]
    out_shape = [1 if a in reduce else d for a, d in enumerate(shape)] if keepdims else kept
    count = math.prod(shape[a] for a in axes)

    def total(*index):
        it = iter(index)
        full = []
        for a in range(len(shape)):
            if a in reduce:
                if keepdims:
                    next(it)
                full.append(reduce[a])
            else:
                full.append(next(it))
        return te.sum(x[tuple(full)].astype("float64"), axis=list(reduce.values()))

    s = te.compute(i64(*out_shape), total, name="long_mean_sum")
    y = te.compute(i64(*out_shape), lambda *i: (s[i] / tirx.const(float(count), "float64")).astype("float32"),
                   name="long_mean")
    return te.create_prim_func([x, y])


def rewrite_long_means(mod):
    """The module with every such mean summed in float64 (see the module docstring)."""
    made: dict = {}

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.mean" or len(call.args) != 1:
            return None
        shape = static_shape(call.args[0])
        if shape is None or str(call.args[0].ty.dtype) != "float32" or call.attrs.axis is None:
            return None
        axes = sorted({int(a) % len(shape) for a in call.attrs.axis})
        if math.prod(shape[a] for a in axes) < MIN_TERMS:
            return None
        keepdims = bool(call.attrs.keepdims)
        key = (shape, tuple(axes), keepdims)
        if key not in made:
            made[key] = rewriter.add_func(float64_mean_func(shape, axes, keepdims).without_attr("global_symbol"),
                                          f"sculpt_long_mean{len(made)}")
        out = [1 if a in axes else d for a, d in enumerate(shape)] if keepdims else \
            [d for a, d in enumerate(shape) if a not in axes]
        return relax.call_tir(made[key], [call.args[0]], relax.TensorType(out, "float32"))

    return rewrite_calls(mod, rule)
