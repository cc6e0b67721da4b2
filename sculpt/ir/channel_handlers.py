"""Per-op channel handlers: how each op ties channel dimensions (``relate``) and how it is rewritten
when channels are removed (``rewrite``). An op without a handler freezes every dimension it touches.

``rewrite(cg, node, kept)``: ``kept(tensor, axis)`` gives the indices a dimension keeps, or None
when it is unchanged; the handler slices the node's constant inputs and fixes its attributes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from sculpt.ir.channels import ChannelGraph

Kept = Callable[[str, int], "np.ndarray | None"]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _set_input_constant(cg: ChannelGraph, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    cg.model.replace_constant_input(node, index, value, suffix="pruned")


class Handler:
    def relate(self, cg: ChannelGraph, node: onnx.NodeProto) -> None:
        raise NotImplementedError

    def rewrite(self, cg: ChannelGraph, node: onnx.NodeProto, kept: Kept) -> None:
        return None


# ------------------------------------------------------------------ elementwise
class Elementwise(Handler):
    """Unary and broadcasting n-ary elementwise ops: an axis of an input ties to the same output
    axis when their sizes match (a broadcast axis of size 1 does not tie). Constant inputs are
    sliced along the channels removed from the output."""

    def __init__(self, data_inputs: tuple[int, ...] | None = None):
        self.data_inputs = data_inputs  # which inputs broadcast with the output (None: all)

    def _inputs(self, node):
        idx = range(len(node.input)) if self.data_inputs is None else self.data_inputs
        return [(i, node.input[i]) for i in idx if i < len(node.input) and node.input[i]]

    def relate(self, cg, node):
        out = node.output[0]
        oshape = cg.shapes[out]
        for i, t in self._inputs(node):
            if t in cg.constants:
                continue
            ishape = cg.shapes[t]
            shift = len(oshape) - len(ishape)
            for ax in range(len(ishape)):
                if ishape[ax] == oshape[ax + shift] and ishape[ax] > 1:
                    cg.eq(cg.dim(t, ax), cg.dim(out, ax + shift), node.name)
                elif ishape[ax] == oshape[ax + shift]:  # size 1 on both: tie, harmless
                    cg.eq(cg.dim(t, ax), cg.dim(out, ax + shift), node.name)
        # an output axis that only broadcasts from constants has nothing to follow
        for extra in node.output[1:]:
            if extra:
                cg.freeze_tensor(extra, f"second output of {node.op_type} '{node.name}'")

    def rewrite(self, cg, node, kept):
        out = node.output[0]
        oshape = cg.shapes[out]
        for i, t in self._inputs(node):
            if t not in cg.constants:
                continue
            value = cg.model.get_constant(t)
            if value is None:
                continue
            shift = len(oshape) - value.ndim
            new = value
            for ax in range(value.ndim):
                k = kept(out, ax + shift)
                if k is not None and value.shape[ax] > 1:
                    new = np.take(new, k, axis=ax)
            if new is not value:
                _set_input_constant(cg, node, i, new)


# ------------------------------------------------------------------ sources and consumers
def _const(cg, name):
    return cg.model.get_constant(name) if name else None


def _relate_batch_and_channels(cg: ChannelGraph, node: onnx.NodeProto, x: str, y: str) -> None:
    """A layer that mixes channels: the batch axis ties input to output, the input's channel axis
    (1) is reduced (a consumer), the output's is a source."""
    cg.eq(cg.dim(x, 0), cg.dim(y, 0), node.name)
    cg.add_consumer(cg.dim(x, 1), node)
    cg.add_source(cg.dim(y, 1), node)


def _slice_weight(cg: ChannelGraph, node: onnx.NodeProto, w: np.ndarray, rows, cols) -> None:
    """Keep only ``rows`` of the weight ``w`` (input 1) on its first axis and ``cols`` on its
    second (None: all of them); the weight is replaced only when something is removed."""
    new = w
    if rows is not None:
        new = new[rows]
    if cols is not None:
        new = new[:, cols]
    if new is not w:
        _set_input_constant(cg, node, 1, np.ascontiguousarray(new))


def _slice_bias(cg: ChannelGraph, node: onnx.NodeProto, kout) -> None:
    """Keep only the output channels ``kout`` of the bias (input 2), if there is one."""
    if kout is not None and len(node.input) > 2 and node.input[2]:
        _set_input_constant(cg, node, 2, cg.model.get_constant(node.input[2])[kout])


class ConvHandler(Handler):
    """Conv. group=1: the input's channel axis is reduced (consumer), the output's is a source.
    Depthwise (one input channel per group): input channel c is output channels c·m … c·m + m - 1
    (m = 1: the same channel). Other grouped Convs: channel i of every input group is one unit (a
    period), likewise for the outputs, so that every group loses the same channels and stays valid."""

    def relate(self, cg, node):
        x, w_name, y = node.input[0], node.input[1], node.output[0]
        w = _const(cg, w_name)
        if w is None or (len(node.input) > 2 and node.input[2] and _const(cg, node.input[2]) is None):
            cg.freeze_node(node, f"Conv '{node.name}' has non-constant weights")
            return
        group = int(attr(node, "group", 1))
        cin, cout = cg.shapes[x][1], cg.shapes[y][1]
        if group == 1:
            _relate_batch_and_channels(cg, node, x, y)
            return
        cg.eq(cg.dim(x, 0), cg.dim(y, 0), node.name)
        if group < 1 or cin % group or cout % group:
            cg.freeze_node(node, f"Conv '{node.name}': group={group} does not divide its channels")
            return
        per_in, per_out = cin // group, cout // group
        if per_in == 1 and per_out == 1:  # depthwise: channel c in → channel c out
            cg.eq(cg.dim(x, 1), cg.dim(y, 1), node.name)
        elif per_in == 1:  # depthwise with a channel multiplier
            cg.repeat(cg.dim(x, 1), cg.dim(y, 1), per_out, node.name)
        else:
            cg.period(cg.dim(x, 1), per_in, node.name)
            cg.period(cg.dim(y, 1), per_out, node.name)
            cg.add_consumer(cg.dim(x, 1), node, partial=True)
            cg.add_source(cg.dim(y, 1), node)

    def rewrite(self, cg, node, kept):
        x, y = node.input[0], node.output[0]
        w = cg.model.get_constant(node.input[1])
        group = int(attr(node, "group", 1))
        kin, kout = kept(x, 1), kept(y, 1)
        cols = None
        if group == 1:
            cols = kin
        elif w.shape[1] == 1:  # depthwise: one group per input channel
            if kin is not None:
                set_attr(node, "group", int(len(kin)))
        elif kin is not None:  # grouped: kin repeats the same indices in every group
            cols = kin[:len(kin) // group]
        _slice_weight(cg, node, w, kout, cols)
        _slice_bias(cg, node, kout)


class DenseChannelHandler(Handler):
    """A layer whose constant weight (input 1) mixes every input channel into every output channel
    (axis 1 of its input and of its output, batch on axis 0); subclasses say when it must be frozen
    and how the weight and bias are sliced."""

    def freeze_reason(self, cg, node) -> str | None:
        raise NotImplementedError

    def slice_constants(self, cg, node, w: np.ndarray, kin, kout) -> None:
        raise NotImplementedError

    def relate(self, cg, node):
        reason = self.freeze_reason(cg, node)
        if reason:
            cg.freeze_node(node, reason)
            return
        _relate_batch_and_channels(cg, node, node.input[0], node.output[0])

    def rewrite(self, cg, node, kept):
        w = cg.model.get_constant(node.input[1])
        self.slice_constants(cg, node, w, kept(node.input[0], 1), kept(node.output[0], 1))


class ConvTransposeHandler(DenseChannelHandler):
    def freeze_reason(self, cg, node):
        if _const(cg, node.input[1]) is None or int(attr(node, "group", 1)) != 1 or \
                attr(node, "output_shape") is not None:
            return f"ConvTranspose '{node.name}' is grouped, has output_shape or dynamic weights"
        return None

    def slice_constants(self, cg, node, w, kin, kout):
        _slice_bias(cg, node, kout)
        _slice_weight(cg, node, w, kin, kout)  # [C_in, C_out, ...]


class GemmHandler(DenseChannelHandler):
    def freeze_reason(self, cg, node):
        c_ok = len(node.input) < 3 or not node.input[2] or _const(cg, node.input[2]) is not None
        if _const(cg, node.input[1]) is None or not c_ok or attr(node, "transA", 0) or \
                len(cg.shapes[node.input[0]]) != 2:
            return f"Gemm '{node.name}' has dynamic weights or transA"
        return None

    def slice_constants(self, cg, node, b, kin, kout):
        if attr(node, "transB", 0):  # [N, K]
            _slice_weight(cg, node, b, kout, kin)
        else:  # [K, N]
            _slice_weight(cg, node, b, kin, kout)
        if kout is not None and len(node.input) > 2 and node.input[2]:
            c = cg.model.get_constant(node.input[2])
            if c.ndim >= 1 and c.shape[-1] > 1:
                _set_input_constant(cg, node, 2, np.take(c, kout, axis=-1))


class MatMulHandler(Handler):
    """MatMul with a constant 2-D right operand: the left operand's last axis is reduced (consumer),
    the output's last axis is a source. Two dynamic operands (attention) freeze their tensors."""

    def relate(self, cg, node):
        a, b_name, y = node.input[0], node.input[1], node.output[0]
        b = _const(cg, b_name)
        if b is None or b.ndim != 2 or a in cg.constants:
            cg.freeze_node(node, f"MatMul '{node.name}' has two dynamic operands")
            return
        ra, ry = len(cg.shapes[a]), len(cg.shapes[y])
        for ax in range(ra - 1):
            cg.eq(cg.dim(a, ax), cg.dim(y, ax + ry - ra), node.name)
        cg.add_consumer(cg.dim(a, ra - 1), node)
        cg.add_source(cg.dim(y, ry - 1), node)

    def rewrite(self, cg, node, kept):
        b = cg.model.get_constant(node.input[1])
        a, y = node.input[0], node.output[0]
        kin, kout = kept(a, len(cg.shapes[a]) - 1), kept(y, len(cg.shapes[y]) - 1)
        _slice_weight(cg, node, b, kin, kout)


class BatchNormHandler(Handler):
    def relate(self, cg, node):
        if any(_const(cg, t) is None for t in node.input[1:5]) or len([o for o in node.output if o]) > 1:
            cg.freeze_node(node, f"BatchNormalization '{node.name}' in training mode or with dynamic statistics")
            return
        x, y = node.input[0], node.output[0]
        for ax in range(len(cg.shapes[x])):
            cg.eq(cg.dim(x, ax), cg.dim(y, ax), node.name)

    def rewrite(self, cg, node, kept):
        k = kept(node.output[0], 1)
        if k is not None:
            for i in range(1, 5):
                _set_input_constant(cg, node, i, cg.model.get_constant(node.input[i])[k])


# ------------------------------------------------------------------ shape-preserving and movement
class SameShape(Handler):
    """Ops whose output has the input's shape on the listed axes (pooling keeps N and C, Resize
    keeps the axes it does not scale, Pad the axes it does not pad)."""

    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        xs, ys = cg.shapes[x], cg.shapes[y]
        if len(xs) != len(ys):
            cg.freeze_node(node, f"{node.op_type} '{node.name}' changes rank")
            return
        for ax in range(len(xs)):
            if xs[ax] == ys[ax] and self.ties(cg, node, ax):
                cg.eq(cg.dim(x, ax), cg.dim(y, ax), node.name)
        for extra in node.output[1:]:
            if extra:
                cg.freeze_tensor(extra, f"second output of {node.op_type} '{node.name}'")

    def ties(self, cg, node, axis) -> bool:
        return True

    def rewrite(self, cg, node, kept):
        if node.op_type in ("Resize", "Upsample") and len(node.input) >= 4 and node.input[3]:
            sizes = cg.model.get_constant(node.input[3])
            if sizes is not None:
                new = sizes.copy()
                changed = False
                for ax in range(len(new)):
                    k = kept(node.output[0], ax)
                    if k is not None:
                        new[ax] = len(k)
                        changed = True
                if changed:
                    _set_input_constant(cg, node, 3, new)


class PoolHandler(SameShape):
    def ties(self, cg, node, axis):
        return axis < 2  # N and C; spatial axes shrink or are reduced

    def relate(self, cg, node):
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            cg.freeze_node(node, f"MaxPool '{node.name}' returns indices")
            return
        x, y = node.input[0], node.output[0]
        for ax in (0, 1):
            cg.eq(cg.dim(x, ax), cg.dim(y, ax), node.name)


class PadHandler(SameShape):
    def ties(self, cg, node, axis):
        pads = attr(node, "pads") if len(node.input) < 2 else cg.model.get_constant(node.input[1])
        if pads is None:
            return False
        pads = list(np.asarray(pads).reshape(-1))
        rank = len(cg.shapes[node.input[0]])
        if len(node.input) > 3 and node.input[3]:  # opset 18 axes input: only those axes are padded
            axes = _const(cg, node.input[3])
            if axes is None:
                return False
            axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
            if axis not in axes:
                return True
            i = axes.index(axis)
            return pads[i] == 0 and pads[i + len(axes)] == 0
        return pads[axis] == 0 and pads[axis + rank] == 0


class TransposeHandler(Handler):
    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        rank = len(cg.shapes[x])
        perm = attr(node, "perm") or list(reversed(range(rank)))
        for out_ax, in_ax in enumerate(perm):
            cg.eq(cg.dim(x, in_ax), cg.dim(y, out_ax), node.name)


def _tie_slice(cg: ChannelGraph, node: onnx.NodeProto, whole: str, part: str, axis: int, offset: int, *,
               whole_is_input: bool) -> None:
    """``part`` (a Concat input, a Split output) is ``whole`` on every axis but ``axis``, where it is
    the slice of ``whole`` from ``offset``. Ties are recorded input first, as everywhere."""
    for ax in range(len(cg.shapes[whole])):
        if ax == axis:
            cg.slice(cg.dim(whole, ax), offset, cg.dim(part, ax), node.name)
        else:
            a, b = (whole, part) if whole_is_input else (part, whole)
            cg.eq(cg.dim(a, ax), cg.dim(b, ax), node.name)


class ConcatHandler(Handler):
    def relate(self, cg, node):
        y = node.output[0]
        rank = len(cg.shapes[y])
        axis = int(attr(node, "axis")) % rank
        if any(t in cg.constants for t in node.input if t):
            cg.freeze_node(node, f"Concat '{node.name}' has a constant input")
            return
        offset = 0
        for t in node.input:
            if not t:
                continue
            _tie_slice(cg, node, y, t, axis, offset, whole_is_input=False)
            offset += cg.shapes[t][axis]


class SplitHandler(Handler):
    def relate(self, cg, node):
        x = node.input[0]
        rank = len(cg.shapes[x])
        axis = int(attr(node, "axis", 0)) % rank
        offset = 0
        for t in node.output:
            if not t:
                cg.freeze_node(node, f"Split '{node.name}' has an unused output slot")
                return
            _tie_slice(cg, node, x, t, axis, offset, whole_is_input=True)
            offset += cg.shapes[t][axis]

    def rewrite(self, cg, node, kept):
        rank = len(cg.shapes[node.input[0]])
        axis = int(attr(node, "axis", 0)) % rank
        sizes = []
        for t in node.output:
            k = kept(t, axis)
            sizes.append(len(k) if k is not None else cg.shapes[t][axis])
        sizes = np.array(sizes, dtype=np.int64)
        for a in list(node.attribute):
            if a.name in ("split", "num_outputs"):
                node.attribute.remove(a)
        if cg.model.opset >= 13:
            cg.model.set_input(node, 1, cg.model.add_initializer(f"{node.name}_split", sizes))
        else:
            set_attr(node, "split", [int(s) for s in sizes])


class SliceHandler(Handler):
    """Slice with constant starts/ends/axes and step 1 on the sliced axes."""

    def _params(self, cg, node):
        rank = len(cg.shapes[node.input[0]])
        if cg.model.opset < 10:
            starts, ends = attr(node, "starts"), attr(node, "ends")
            axes = attr(node, "axes") or list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            vals = [_const(cg, node.input[i]) if len(node.input) > i and node.input[i] else None
                    for i in range(1, 5)]
            if vals[0] is None or vals[1] is None or (len(node.input) > 3 and node.input[3] and vals[2] is None) \
                    or (len(node.input) > 4 and node.input[4] and vals[3] is None):
                return None
            starts, ends = list(vals[0]), list(vals[1])
            axes = list(vals[2]) if vals[2] is not None else list(range(len(starts)))
            steps = list(vals[3]) if vals[3] is not None else [1] * len(starts)
        out = {}
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = int(a) % rank
            size = cg.shapes[node.input[0]][a]
            if st != 1:
                out[a] = None
                continue
            s = int(s) + size if s < 0 else int(s)
            e = int(e) + size if e < 0 else int(e)
            out[a] = (max(0, min(s, size)), max(0, min(e, size)))
        return out

    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        params = self._params(cg, node)
        if params is None:
            cg.freeze_node(node, f"Slice '{node.name}' has dynamic parameters")
            return
        for ax in range(len(cg.shapes[x])):
            if ax not in params:
                cg.eq(cg.dim(x, ax), cg.dim(y, ax), node.name)
            elif params[ax] is None:
                cg.freeze(cg.dim(x, ax), f"Slice '{node.name}' with a step")
                cg.freeze(cg.dim(y, ax), f"Slice '{node.name}' with a step")
            else:
                cg.slice(cg.dim(x, ax), params[ax][0], cg.dim(y, ax), node.name)

    def rewrite(self, cg, node, kept):
        x = node.input[0]
        params = self._params(cg, node)
        changed = {ax: kept(x, ax) for ax, p in params.items() if p is not None and kept(x, ax) is not None}
        if not changed:
            return
        if cg.model.opset < 10:
            starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
            axes = list(attr(node, "axes") or range(len(starts)))
        else:
            starts = list(cg.model.get_constant(node.input[1]))
            ends = list(cg.model.get_constant(node.input[2]))
            axes = list(cg.model.get_constant(node.input[3])) if len(node.input) > 3 and node.input[3] \
                else list(range(len(starts)))
        rank = len(cg.shapes[x])
        for i, a in enumerate(axes):
            a = int(a) % rank
            if a in changed:
                k = changed[a]
                s, e = params[a]
                starts[i] = int(np.searchsorted(k, s))
                ends[i] = int(np.searchsorted(k, e))
        if cg.model.opset < 10:
            set_attr(node, "starts", [int(v) for v in starts])
            set_attr(node, "ends", [int(v) for v in ends])
        else:  # starts, ends, axes and steps share one index type (int32 or int64): keep it
            dtype = cg.model.get_constant(node.input[1]).dtype
            _set_input_constant(cg, node, 1, np.array(starts, dtype=dtype))
            _set_input_constant(cg, node, 2, np.array(ends, dtype=dtype))


def _reshape_blocks(xs, ys):
    """Match the axes of a reshape: the longest common prefix axis by axis, then blocks of input
    axes and output axes with equal products (axes of size 1 join whichever block is open). Returns
    a list of (input axes, output axes), or None when the shapes do not match up."""
    p = 0
    while p < min(len(xs), len(ys)) and xs[p] == ys[p]:
        p += 1
    blocks = [([a], [a]) for a in range(p)]
    i, j = p, p
    while i < len(xs) or j < len(ys):
        ins, outs = [], []
        pi = pj = 1
        while True:
            # take axes of size 1 eagerly, then the side with the smaller product
            if i < len(xs) and (xs[i] == 1 or pi < pj or (pi == pj and not ins)):
                ins.append(i)
                pi *= xs[i]
                i += 1
            elif j < len(ys) and (ys[j] == 1 or pj < pi or (pi == pj and not outs)):
                outs.append(j)
                pj *= ys[j]
                j += 1
            else:
                break
            if pi == pj and ins and outs and not (i < len(xs) and xs[i] == 1) and \
                    not (j < len(ys) and ys[j] == 1):
                break
        if pi != pj:
            return None
        blocks.append((ins, outs))
    return blocks


class ReshapeHandler(Handler):
    """Reshape/Flatten with a constant target. The axes are matched into blocks of equal products:
    an axis kept as it is ties (eq); several input axes merged into one output axis tie through one
    of them (the one carrying prunable channels: Flatten into a Gemm, channel c covers flat indices
    c·HW … c·HW + HW - 1); one input axis split into several output axes ties to the largest of them
    (a channel shuffle's (groups, channels) keeps the groups). The other axes of a block freeze."""

    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        xs, ys = cg.shapes[x], cg.shapes[y]
        target = None
        if node.op_type == "Reshape":
            target = _const(cg, node.input[1])
            if target is None:
                cg.freeze_node(node, f"Reshape '{node.name}' has a computed shape")
                return
        blocks = _reshape_blocks(xs, ys)
        if blocks is None:
            cg.freeze_node(node, f"{node.op_type} '{node.name}': cannot match input and output axes")
            return
        if target is not None and not attr(node, "allowzero", 0):
            # a 0 in the target copies the input's axis of the same index: only where that is a tie
            same = {o[0] for i, o in blocks if len(i) == 1 and len(o) == 1 and i == o}
            if any(int(v) == 0 and k not in same for k, v in enumerate(np.asarray(target).reshape(-1))):
                cg.freeze_node(node, f"Reshape '{node.name}' copies an input axis (0) that moves")
                return
        why = f"{node.op_type} '{node.name}' merges or splits this axis"
        for ins, outs in blocks:
            ins_real = [a for a in ins if xs[a] != 1]
            outs_real = [a for a in outs if ys[a] != 1]
            if len(ins) == 1 and len(outs) == 1:
                cg.eq(cg.dim(x, ins[0]), cg.dim(y, outs[0]), node.name)
            elif len(ins_real) <= 1 and len(outs_real) <= 1:
                if ins_real and outs_real:
                    cg.eq(cg.dim(x, ins_real[0]), cg.dim(y, outs_real[0]), node.name)
            elif len(outs_real) == 1:  # merge
                carrier = max(ins_real, key=lambda a: (_carries_channels(cg, cg.dim(x, a)), xs[a], a))
                _tie_merged_axes(cg, node, x, xs, ins_real, carrier, cg.dim(y, outs_real[0]), why)
            elif len(ins_real) == 1:  # split
                carrier = max(outs_real, key=lambda a: (ys[a], a))
                _tie_merged_axes(cg, node, y, ys, outs_real, carrier, cg.dim(x, ins_real[0]), why)
            else:
                for a in ins:
                    cg.freeze(cg.dim(x, a), why)
                for a in outs:
                    cg.freeze(cg.dim(y, a), why)

    def rewrite(self, cg, node, kept):
        if node.op_type != "Reshape":
            return
        target = cg.model.get_constant(node.input[1])
        y = node.output[0]
        new = target.copy()
        changed = False
        for ax in range(len(new)):
            k = kept(y, ax)
            if k is not None and new[ax] not in (-1, 0):
                new[ax] = len(k)
                changed = True
            # -1 is inferred, 0 copies the (already pruned) input axis it is tied to
        if changed:
            _set_input_constant(cg, node, 1, new)


def _tie_merged_axes(cg: ChannelGraph, node: onnx.NodeProto, tensor: str, shape, axes: list[int], carrier: int,
                     merged, why: str) -> None:
    """The ``axes`` of ``tensor`` merge into the one dimension ``merged`` of the other side (or it
    splits into them): the ``carrier`` axis ties to it, as a repeat when it is the outermost, else
    as a stride, by the size of the axes inside it; the other axes are frozen."""
    inner = int(np.prod([shape[a] for a in axes if a > carrier]))
    if carrier == axes[0]:
        cg.repeat(cg.dim(tensor, carrier), merged, inner, node.name)
    else:
        cg.stride(cg.dim(tensor, carrier), merged, inner, node.name)
    for a in axes:
        if a != carrier:
            cg.freeze(cg.dim(tensor, a), why)


def _carries_channels(cg: ChannelGraph, d) -> bool:
    """Whether the dimension is (so far) connected to a source and to nothing frozen."""
    import networkx as nx

    comp = nx.node_connected_component(cg.graph, d)
    if any(c in cg.frozen for c in comp):
        return False
    return any(s.dim in comp for s in cg.sources)


def _given_axes(cg: ChannelGraph, node: onnx.NodeProto) -> tuple[object, bool]:
    """(the ``axes`` attribute, else the constant input 1, None when neither is given; whether they
    are computed instead: the node is then frozen)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _const(cg, node.input[1])
        if axes is None:
            cg.freeze_node(node, f"{node.op_type} '{node.name}' has dynamic axes")
            return None, True
    return axes, False


class SqueezeHandler(Handler):
    """Squeeze/Unsqueeze: the axes that stay tie in order."""

    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        xs, ys = cg.shapes[x], cg.shapes[y]
        axes, dynamic = _given_axes(cg, node)
        if dynamic:
            return
        if node.op_type == "Squeeze":
            if axes is None:
                axes = [i for i, d in enumerate(xs) if d == 1]
            drop = {int(a) % len(xs) for a in axes}
            kept_in = [ax for ax in range(len(xs)) if ax not in drop]
            for out_ax, in_ax in enumerate(kept_in):
                cg.eq(cg.dim(x, in_ax), cg.dim(y, out_ax), node.name)
        else:
            add = {int(a) % len(ys) for a in axes}
            kept_out = [ax for ax in range(len(ys)) if ax not in add]
            for in_ax, out_ax in enumerate(kept_out):
                cg.eq(cg.dim(x, in_ax), cg.dim(y, out_ax), node.name)


class ReduceHandler(Handler):
    """Reductions, Softmax-like and normalization ops over some axes: the other axes tie; the
    reduced axes are frozen (fewer channels would change a mean or a normalization)."""

    def relate(self, cg, node):
        x, y = node.input[0], node.output[0]
        xs, ys = cg.shapes[x], cg.shapes[y]
        rank = len(xs)
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            default = -1 if cg.model.opset >= 13 else 1
            axis = int(attr(node, "axis", default)) % rank
            axes = [axis] if cg.model.opset >= 13 else list(range(axis, rank))
            keepdims = 1
        elif node.op_type in ("LayerNormalization",):
            axis = int(attr(node, "axis", -1)) % rank
            axes = list(range(axis, rank))
            keepdims = 1
        elif node.op_type in ("ArgMax", "ArgMin"):
            axes = [int(attr(node, "axis", 0)) % rank]
            keepdims = int(attr(node, "keepdims", 1))
        else:
            axes, dynamic = _given_axes(cg, node)
            if dynamic:
                return
            if axes is None or len(axes) == 0:
                if attr(node, "noop_with_empty_axes", 0):
                    axes = []
                else:
                    axes = list(range(rank))
            axes = [int(a) % rank for a in axes]
            keepdims = int(attr(node, "keepdims", 1))
        out_ax = 0
        for ax in range(rank):
            if ax in axes:
                cg.freeze(cg.dim(x, ax), f"{node.op_type} '{node.name}' reduces over this axis")
                if keepdims:
                    cg.freeze(cg.dim(y, out_ax), f"{node.op_type} '{node.name}' reduces over this axis")
                    out_ax += 1
                continue
            if out_ax < len(ys):
                cg.eq(cg.dim(x, ax), cg.dim(y, out_ax), node.name)
            out_ax += 1
        for extra in node.output[1:]:
            if extra:
                cg.freeze_tensor(extra, f"extra output of {node.op_type} '{node.name}'")

    def rewrite(self, cg, node, kept):
        if node.op_type == "LayerNormalization":
            return  # its normalized axes are frozen; scale/bias live there


# ------------------------------------------------------------------ registry
UNARY = ["Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
         "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal",
         "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "Identity", "Cast", "IsNaN", "IsInf",
         "ThresholdedRelu", "Shrink"]
BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
          "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "Where"]

HANDLERS: dict[str, Handler] = {}
for _op in UNARY + BINARY:
    HANDLERS[_op] = Elementwise()
HANDLERS["Clip"] = Elementwise(data_inputs=(0,))
HANDLERS["Dropout"] = Elementwise(data_inputs=(0,))
HANDLERS["Conv"] = ConvHandler()
HANDLERS["ConvTranspose"] = ConvTransposeHandler()
HANDLERS["Gemm"] = GemmHandler()
HANDLERS["MatMul"] = MatMulHandler()
HANDLERS["BatchNormalization"] = BatchNormHandler()
for _op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
    HANDLERS[_op] = PoolHandler()
HANDLERS["Resize"] = SameShape()
HANDLERS["Upsample"] = SameShape()
HANDLERS["Pad"] = PadHandler()
HANDLERS["Transpose"] = TransposeHandler()
HANDLERS["Concat"] = ConcatHandler()
HANDLERS["Split"] = SplitHandler()
HANDLERS["Slice"] = SliceHandler()
HANDLERS["Reshape"] = ReshapeHandler()
HANDLERS["Flatten"] = ReshapeHandler()
HANDLERS["Squeeze"] = SqueezeHandler()
HANDLERS["Unsqueeze"] = SqueezeHandler()
for _op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "Softmax", "LogSoftmax", "Hardmax",
            "LayerNormalization", "ArgMax", "ArgMin"):
    HANDLERS[_op] = ReduceHandler()


def handler_for(node: onnx.NodeProto) -> Handler | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return None
    return HANDLERS.get(node.op_type)
