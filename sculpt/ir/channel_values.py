"""Which channels are provably constant: a forward analysis over the channel-dependency graph.

For every channel dimension ``Dim(t, axis)`` and index ``i``, ``values[i]`` is ``v`` when the slice
``t[..., i, ...]`` (along ``axis``) equals ``v`` everywhere for every input of the model, and NaN
when that is not proven. Sources: a Conv/Gemm/MatMul output channel whose weights are all zero is
its bias. Then through the ops: unary functions of constants, x·0 = 0, sums of constants,
BatchNorm's affine map, pooling (with care for zero padding), movement ops along their index maps.
"""

from __future__ import annotations

import numpy as np
import onnx

from sculpt.ir.channel_handlers import attr
from sculpt.ir.channels import ChannelGraph, Dim


def _hsig(v, node):
    return np.clip(attr(node, "alpha", 0.2) * v + attr(node, "beta", 0.5), 0, 1)


UNARY_FUNCS = {
    "Relu": lambda v, n: np.maximum(v, 0),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, v * attr(n, "alpha", 0.01)),
    "Sigmoid": lambda v, n: 1 / (1 + np.exp(-v)),
    "HardSigmoid": _hsig,
    "HardSwish": lambda v, n: v * np.clip(v / 6 + 0.5, 0, 1),
    "Tanh": lambda v, n: np.tanh(v),
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "Exp": lambda v, n: np.exp(v),
    "Identity": lambda v, n: v,
    "Dropout": lambda v, n: v,
    "Cast": lambda v, n: v,
    "Elu": lambda v, n: np.where(v >= 0, v, attr(n, "alpha", 1.0) * (np.exp(v) - 1)),
    "Softplus": lambda v, n: np.log1p(np.exp(v)),
    "Sqrt": lambda v, n: np.sqrt(v),
    "Reciprocal": lambda v, n: 1 / v,
}
MOVEMENT = {"Transpose", "Concat", "Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Resize", "Upsample", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax",
            "ReduceMin"}


class ChannelValues:
    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        n = int(cg.labels.size)
        self.values = np.full(n, np.nan)

    def get(self, d: Dim) -> np.ndarray:
        return self.values[self.cg.element_index(d)]

    def set(self, d: Dim, v: np.ndarray) -> None:
        self.values[self.cg.element_index(d)] = v

    # ------------------------------------------------------------------
    def analyse(self) -> "ChannelValues":
        cg = self.cg
        model = cg.model
        for node in model.graph.node:
            try:
                self._node(node)
            except (KeyError, ValueError, IndexError, TypeError):
                continue  # not proven: leave NaN
        return self

    def _node(self, node: onnx.NodeProto) -> None:
        cg, op = self.cg, node.op_type
        model = cg.model
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            self._source(node)
            return
        if op in MOVEMENT or (op == "AveragePool"):
            for a, b, kind, args in cg.edges_of(node.name):
                self._move(a, b, kind, args, node)
            return
        if op == "Pad":
            mode = attr(node, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            pad_value = 0.0
            if mode == "constant":
                if len(node.input) > 2 and node.input[2]:
                    pv = model.get_constant(node.input[2])
                    pad_value = float(pv) if pv is not None and pv.size == 1 else np.nan
                else:
                    pad_value = float(attr(node, "value", 0.0))
            for a, b, kind, args in cg.edges_of(node.name):
                v = self.get(a)
                self.set(b, v if mode != "constant" else np.where(v == pad_value, v, np.nan))
            return
        if op == "BatchNormalization":
            x, y = node.input[0], node.output[0]
            g, bta, mean, var = (model.get_constant(t).astype(np.float64) for t in node.input[1:5])
            scale = g / np.sqrt(var + attr(node, "epsilon", 1e-5))
            d_in, d_out = Dim(x, 1), Dim(y, 1)
            if d_in in cg.sizes and d_out in cg.sizes:
                # gamma = 0: the channel is beta whatever comes in
                self.set(d_out, np.where(scale == 0, bta, self.get(d_in) * scale + (bta - mean * scale)))
            return
        if op in UNARY_FUNCS or op == "Clip":
            for a, b, kind, args in cg.edges_of(node.name):
                if a.tensor != node.input[0]:
                    continue
                v = self.get(a)
                if op == "Clip":
                    lo, hi = self._clip_bounds(node)
                    out = np.clip(v, lo, hi)
                else:
                    with np.errstate(all="ignore"):
                        out = UNARY_FUNCS[op](v, node)
                self.set(b, out)
            return
        if op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"):
            self._binary(node)

    def _clip_bounds(self, node):
        model = self.cg.model
        if len(node.input) > 1 or model.opset >= 11:
            lo = model.get_constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))
        return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))

    def _move(self, a: Dim, b: Dim, kind: str, args: tuple, node) -> None:
        """Carry the values along one index map of a movement op, from its input to its output (the
        map may be stored either way round: Concat's slices go from the output to an input)."""
        ins = {t for t in node.input if t}
        outs = {t for t in node.output if t}
        if a.tensor in ins and b.tensor in outs:
            src, forward = a, True
        elif b.tensor in ins and a.tensor in outs:
            src, forward = b, False
        else:
            return
        v = self.get(src)
        if node.op_type == "AveragePool":
            pads = attr(node, "pads") or []
            include = attr(node, "count_include_pad", 0)
            if include and any(pads):
                v = np.where(v == 0, v, np.nan)
        if kind == "eq":
            self.set(b if forward else a, v)
        elif kind == "slice":
            off = args[0]
            if forward:  # a is the whole input, b the part
                self.set(b, v[off:off + self.cg.sizes[b]])
            else:  # b is one input, a the whole output
                whole = self.get(a).copy()
                whole[off:off + len(v)] = v
                self.set(a, whole)
        elif kind in ("repeat", "stride"):
            j = np.arange(self.cg.sizes[b])
            idx = j // args[0] if kind == "repeat" else (j // args[0]) % self.cg.sizes[a]
            if forward:  # coarse input → fine output
                self.set(b, v[idx])
            else:  # fine input → coarse output: constant where all of its elements agree
                out = np.full(self.cg.sizes[a], np.nan)
                for c in range(len(out)):
                    vals = v[idx == c]
                    if vals.size and not np.isnan(vals).any() and (vals == vals[0]).all():
                        out[c] = vals[0]
                self.set(a, out)

    def _source(self, node) -> None:
        cg, model = self.cg, self.cg.model
        op = node.op_type
        w = model.get_constant(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            return
        y = node.output[0]
        if op == "Conv":
            d_out = Dim(y, 1)
            if d_out not in cg.sizes:
                return
            group = int(attr(node, "group", 1))
            bias = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0])
            zero = ~w.reshape(w.shape[0], -1).any(axis=1)
            out = np.where(zero, bias.astype(np.float64), np.nan)
            d_in = Dim(node.input[0], 1)
            if group != 1 and w.shape[1] == 1 and d_in in cg.sizes:
                # depthwise: an input channel that is zero everywhere gives its outputs their bias
                vin = self.get(d_in)
                per = w.shape[0] // len(vin)
                out = np.where(np.repeat(vin, per) == 0, bias.astype(np.float64), out)
            self.set(d_out, out)
        elif op == "ConvTranspose":
            d_out = Dim(y, 1)
            if d_out in cg.sizes:
                bias = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] \
                    else np.zeros(w.shape[1])
                zero = ~np.moveaxis(w, 1, 0).reshape(w.shape[1], -1).any(axis=1)
                self.set(d_out, np.where(zero, bias.astype(np.float64), np.nan))
        elif op == "Gemm":
            d_out = Dim(y, 1)
            if d_out in cg.sizes:
                cols = w.T if not attr(node, "transB", 0) else w  # [N, K]
                zero = ~cols.any(axis=1)
                c = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                bias = np.zeros(cols.shape[0]) if c is None else np.broadcast_to(
                    c.reshape(-1) if c.ndim <= 1 or c.shape[0] == 1 else np.full(cols.shape[0], np.nan),
                    (cols.shape[0],)) * attr(node, "beta", 1.0)
                self.set(d_out, np.where(zero, bias, np.nan))
        elif op == "MatMul" and w.ndim == 2:
            d_out = Dim(y, len(cg.shapes[y]) - 1)
            if d_out in cg.sizes:
                self.set(d_out, np.where(~w.any(axis=0), 0.0, np.nan))

    def _binary(self, node) -> None:
        cg, model = self.cg, self.cg.model
        y = node.output[0]
        oshape = cg.shapes[y]
        rank = len(oshape)
        for ax in range(rank):
            d_out = Dim(y, ax)
            if d_out not in cg.sizes:
                continue
            n = oshape[ax]
            operands = []
            for t in node.input:
                if not t:
                    continue
                shape = cg.shapes.get(t)
                const = model.get_constant(t) if t in cg.constants else None
                if shape is None:
                    operands.append(np.full(n, np.nan))
                    continue
                shift = rank - len(shape)
                a = ax - shift
                if const is not None:
                    # constant along every axis but this one?
                    other = [s for i, s in enumerate(const.shape) if i != a]
                    if all(s == 1 for s in other):
                        vec = const.reshape(-1) if a >= 0 else const.reshape(-1)[:1]
                        operands.append(np.broadcast_to(vec.astype(np.float64), (n,)))
                    else:
                        operands.append(np.full(n, np.nan))
                    continue
                if a >= 0 and Dim(t, a) in cg.sizes and cg.sizes[Dim(t, a)] == n:
                    operands.append(self.get(Dim(t, a)))
                elif a >= 0 and Dim(t, a) in cg.sizes and cg.sizes[Dim(t, a)] == 1:
                    operands.append(np.broadcast_to(self.get(Dim(t, a)), (n,)))
                else:
                    operands.append(np.full(n, np.nan))
            op = node.op_type
            with np.errstate(all="ignore"):
                if op == "Mul":
                    out = operands[0] * operands[1]
                    zero = (operands[0] == 0) | (operands[1] == 0)
                    out = np.where(zero, 0.0, out)
                elif op == "Div":
                    out = np.where(operands[0] == 0, 0.0, operands[0] / operands[1])
                elif op in ("Add", "Sum"):
                    out = np.sum(operands, axis=0)
                elif op == "Sub":
                    out = operands[0] - operands[1]
                elif op == "Max":
                    out = np.max(operands, axis=0)
                else:
                    out = np.min(operands, axis=0)
            self.set(d_out, out)
