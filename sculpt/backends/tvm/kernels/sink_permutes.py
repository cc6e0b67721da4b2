"""Move layout transposes (``relax.permute_dims``) down through ops that do not care about the layout,
until two meet and cancel.

A kernel that computes in another layout than the graph's (the int8 conv kernel in NHWC in an NCHW
model) is called as ``permute_dims(kernel(permute_dims(x, to_nhwc)), to_nchw)``. Between two such
kernels the graph usually holds only elementwise ops, pools, means and concats: each of them, applied
to ``permute_dims(s, p)``, equals ``permute_dims(op'(s), p)`` with ``op'`` the same op on the source
layout (an axis attribute mapped through ``p``; a binary op's other operand, when it is a constant
or a tensor of at most SMALL_OPERAND elements such as a squeeze-and-excitation scale, transposed to
meet it; a pool or nearest/linear resize in its NHWC form). Applied bottom-up over the graph, the transpose after
one kernel moves down to the transpose before the next, and ``permute_dims(permute_dims(s, p), q)``
with ``q`` undoing ``p`` is ``s``. Where a transpose meets an op it cannot cross (a reshape, a matmul,
a float conv), it stays there.

Mechanism only: which calls are emitted in another layout is the caller's choice."""

from __future__ import annotations

import functools

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import RESIZE_OP, constant_value, in_layout, rewrite_calls

# one tensor operand (the first), every other operand a scalar or an attribute
_UNARY = frozenset({
    "relax.astype", "relax.clip", "relax.nn.relu", "relax.round", "relax.floor", "relax.ceil", "relax.abs",
    "relax.negative", "relax.sigmoid", "relax.tanh", "relax.exp", "relax.sqrt", "relax.nn.gelu",
    "relax.nn.silu", "relax.quantize", "relax.dequantize", "relax.erf", "relax.log", "relax.rsqrt", "relax.square",
})
# two tensor operands of the same shape, or one of them a scalar, a constant or small (_to_source_layout)
_BINARY = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum", "relax.power",
})
_POOLS = frozenset({"relax.nn.max_pool2d", "relax.nn.avg_pool2d"})
_REDUCTION_NAMES = ("sum", "mean", "max", "min")
_NHWC_TO_NCHW = (0, 3, 1, 2)


@functools.cache
def _reductions():
    from tvm import relax

    return {f"relax.{n}": getattr(relax.op, n) for n in _REDUCTION_NAMES}


def _axes(call) -> tuple[int, ...] | None:
    axes = call.attrs.axes
    return None if axes is None else tuple(int(a) for a in axes)


def _is_scalar(expr) -> bool:
    if isinstance(getattr(expr, "value", None), (int, float)):  # an IntImm/FloatImm: clip's bounds
        return True
    value = constant_value(expr)
    if value is not None:
        return int(value.numpy().size) == 1
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return shape is not None and all(int(d) == 1 for d in shape)
    except (TypeError, ValueError):
        return False


def _permuted(expr, rewriter):
    """(source, axes) when ``expr`` is bound to ``permute_dims(source, axes)`` with explicit axes."""
    from tvm import relax

    bound = rewriter.bound(expr)
    if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.permute_dims":
        axes = _axes(bound)
        if axes is not None:
            return bound.args[0], axes
    return None


def _permute(expr, axes: list[int]):
    from tvm import relax

    return expr if axes == list(range(len(axes))) else relax.op.permute_dims(expr, axes)


def _permuted_fields(expr, rewriter):
    """[(source, axes)] of a tuple whose every field is permuted the same way, else None."""
    from tvm import relax

    parts = rewriter.bound(expr)
    if not isinstance(parts, relax.Tuple) or not parts.fields:
        return None
    permuted = [_permuted(f, rewriter) for f in parts.fields]
    if any(p is None for p in permuted) or len({p[1] for p in permuted}) != 1:
        return None
    return permuted


# a tensor operand of a binary op this small (elements) is transposed to meet the other one's layout: a
# squeeze-and-excitation scale [1, C, 1, 1] times a permuted map crosses as [1, 1, 1, C] (C elements moved)
SMALL_OPERAND = 4096


def _to_source_layout(operand, axes: tuple[int, ...], rewriter):
    """``operand`` of a binary op whose other operand is ``permute_dims(s, axes)``, in ``s``'s layout: a
    constant of the same rank transposed here, a small tensor of the same rank by a transpose, a
    scalar as it is; None for anything else."""
    from tvm import relax

    if _is_scalar(operand):
        return operand
    shape = getattr(getattr(operand, "ty", None), "shape", None)
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        return None
    if len(dims) != len(axes):
        return None
    inverse = [axes.index(k) for k in range(len(axes))]
    value = constant_value(rewriter.bound(operand))
    if value is not None:
        array = value.numpy()
        return relax.const(array.transpose(inverse).copy(), str(array.dtype))
    if int(np.prod(dims)) <= SMALL_OPERAND:
        return rewriter.emit(relax.op.permute_dims(operand, inverse))
    return None


def _same_dtype_out(call) -> bool:
    out = call.attrs.out_dtype
    return out is None or str(out) in ("", "void", str(call.args[0].ty.dtype))


def _rule(call, rewriter):
    from tvm import relax

    name = getattr(call.op, "name", "")
    if not call.args:
        return None
    reductions = _reductions()
    if name == "relax.permute_dims":
        inner, outer = _permuted(call.args[0], rewriter), _axes(call)
        if inner is None or outer is None:
            return None
        source, axes = inner
        composed = tuple(axes[a] for a in outer)
        if composed == tuple(range(len(composed))):
            return source
        return relax.op.permute_dims(source, list(composed))
    first = _permuted(call.args[0], rewriter)
    if name in _UNARY:
        if first is None or not all(_is_scalar(a) for a in call.args[1:]):
            return None
        source, axes = first
        inner = rewriter.emit(relax.Call(call.op, [source, *call.args[1:]], call.attrs))
        return relax.op.permute_dims(inner, list(axes))
    if name in _BINARY and len(call.args) == 2:
        second = _permuted(call.args[1], rewriter)
        if first is not None and second is not None and first[1] == second[1]:
            operands, axes = [first[0], second[0]], first[1]
        elif first is not None and (other := _to_source_layout(call.args[1], first[1], rewriter)) is not None:
            operands, axes = [first[0], other], first[1]
        elif second is not None and (other := _to_source_layout(call.args[0], second[1], rewriter)) is not None:
            operands, axes = [other, second[0]], second[1]
        else:
            return None
        return relax.op.permute_dims(rewriter.emit(relax.Call(call.op, operands, call.attrs)), list(axes))
    layout_op = (name in _POOLS and str(call.attrs.out_layout) == "NCHW") or (name == RESIZE_OP and _same_dtype_out(call))
    if layout_op and first is not None and first[1] == _NHWC_TO_NCHW and str(call.attrs.layout) == "NCHW":
        return relax.op.permute_dims(rewriter.emit(in_layout(call, first[0], "NHWC")), list(_NHWC_TO_NCHW))
    if name in reductions and first is not None and call.attrs.axis is not None:
        source, axes = first
        rank = len(axes)
        reduced = sorted({int(a) % rank for a in call.attrs.axis})
        inner = rewriter.emit(reductions[name](source, [axes[k] for k in reduced], keepdims=bool(call.attrs.keepdims)))
        if bool(call.attrs.keepdims):
            return relax.op.permute_dims(inner, list(axes))
        kept_source = [a for a in range(rank) if a not in {axes[k] for k in reduced}]
        return _permute(inner, [kept_source.index(axes[k]) for k in range(rank) if k not in reduced])
    if name == "relax.broadcast_to" and first is not None:
        source, axes = first
        target = [int(d) for d in call.args[1].values] if hasattr(call.args[1], "values") else None
        if target is None or len(target) != len(axes):
            return None
        source_target = [0] * len(axes)
        for k, a in enumerate(axes):
            source_target[a] = target[k]
        return relax.op.permute_dims(rewriter.emit(relax.op.broadcast_to(source, source_target)), list(axes))
    if name == "relax.stack":
        permuted = _permuted_fields(call.args[0], rewriter)
        if permuted is None or call.attrs.axis is None:
            return None
        axes = permuted[0][1]
        at = int(call.attrs.axis) % (len(axes) + 1)
        inner = rewriter.emit(relax.op.stack([p[0] for p in permuted], axis=0))
        shifted = [a + 1 for a in axes]
        return relax.op.permute_dims(inner, shifted[:at] + [0] + shifted[at:])
    if name == "relax.concat":
        permuted = _permuted_fields(call.args[0], rewriter)
        if permuted is None or call.attrs.axis is None:
            return None
        axes = permuted[0][1]
        inner = rewriter.emit(relax.op.concat([p[0] for p in permuted], axis=axes[int(call.attrs.axis) % len(axes)]))
        return relax.op.permute_dims(inner, list(axes))
    return None


def sink_permutes(mod):
    """``mod`` with its ``permute_dims`` moved below layout-agnostic ops and cancelled in pairs (the
    module docstring); transposes left without a consumer are removed."""
    from tvm import relax

    return relax.transform.DeadCodeElimination()(rewrite_calls(mod, _rule))
