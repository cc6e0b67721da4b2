"""simplify-shapes: replace shape computations that are static by constants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import (MAX_ROUNDS, Pass, allow_plain_initializers, PassContext, PassResult, check_range,
                                option, register)
from sculpt.passes.constant_folding import ConstantFolding


def _shape_slice(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    start, end = 0, None
    for a in node.attribute:
        if a.name == "start":
            start = a.i
        elif a.name == "end":
            end = a.i
    return np.array(shape[slice(start, end)], dtype=np.int64)


_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_MAX_DEPTH = 16

# an element of a shape tensor: a known value (int), dimension k of a tensor ((tensor, k)), or unknown (None)
def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _shape_elements(model: Model, name: str, producers: dict, depth: int = 0) -> list | None:
    """The elements of a 1-D int shape tensor, each a value, (tensor, dimension) where it is read from
    Shape, or None where unknown; None when even the length is unknown. Follows Shape, Slice and Gather
    with constant indices, Concat, Cast between integer types, Unsqueeze and Squeeze."""
    value = model.get_constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.ndim <= 1 and value.dtype.kind in "iu" else None
    node = producers.get(name)
    static = model.static_shape(name)
    unknown = [None] * int(np.prod(static)) if static is not None and len(static) <= 1 else None
    if node is None or depth > _MAX_DEPTH or node.domain not in ("", "ai.onnx"):
        return unknown
    op, ins = node.op_type, list(node.input)

    def sub(i: int) -> list | None:
        return _shape_elements(model, ins[i], producers, depth + 1) if i < len(ins) and ins[i] else None

    def const(i: int):
        v = model.get_constant(ins[i]) if i < len(ins) and ins[i] else None
        return None if v is None else [int(x) for x in v.reshape(-1)]

    out: list | None = None
    if op == "Shape":
        dims = model.tensor_shape(ins[0])
        if dims is not None:
            rank = len(dims)
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            out = [(ins[0], k) for k in range(rank)][slice(start, end)]
    elif op == "Cast" and _attr(node, "to") in _INT_TYPES:
        out = sub(0)
    elif op in ("Unsqueeze", "Squeeze", "Identity"):
        out = sub(0)
    elif op == "Concat" and _attr(node, "axis") in (0, -1):
        parts = [sub(i) for i in range(len(ins))]
        out = None if any(p is None for p in parts) else [e for p in parts for e in p]
    elif op == "Gather" and _attr(node, "axis", 0) == 0:
        data, idx = sub(0), const(1)
        if data is not None and idx is not None and all(-len(data) <= i < len(data) for i in idx):
            out = [data[i] for i in idx]
    elif op == "Slice" and len(ins) >= 3:
        data, starts, ends = sub(0), const(1), const(2)
        axes = const(3) if len(ins) > 3 and ins[3] else [0]
        steps = const(4) if len(ins) > 4 and ins[4] else [1]
        if data is not None and starts is not None and ends is not None and axes in ([0], [-1]) \
                and steps == [1] and len(starts) == len(ends) == 1:
            out = data[slice(starts[0], ends[0])]
    return out if out is not None else unknown


def constant_reshape_target(model: Model, node: onnx.NodeProto, producers: dict) -> list[int] | None:
    """A constant target equivalent to a Reshape's computed one for every input shape, or None: an element
    read from dimension j of the Reshape's own input at position j becomes 0 (copy; allowzero=0), one
    from a static dimension its value, and a single element left unknown becomes -1 (inferred)."""
    if _attr(node, "allowzero", 0):
        return None
    elements = _shape_elements(model, node.input[1], producers)
    if not elements:
        return None
    data = node.input[0]
    target: list[int | None] = []
    for j, e in enumerate(elements):
        if isinstance(e, tuple):
            tensor, k = e
            dims = model.tensor_shape(tensor)
            if tensor == data and k == j:
                e = 0
            elif dims is not None and k < len(dims) and isinstance(dims[k], int) and dims[k] > 0:
                e = dims[k]
            else:
                e = None
        target.append(e)
    unknown = [j for j, e in enumerate(target) if e is None]
    if len(unknown) > 1 or (unknown and -1 in target) or any(e is not None and e < -1 for e in target):
        return None
    return [-1 if e is None else e for e in target]


@register
@dataclass
class SimplifyShapes(Pass):
    """Fold Shape and Size of tensors whose shape is static (after shape inference), and give
    Reshape a constant target where its input and output shapes are static, or where its computed
    target reads its own input's dimensions in place and leaves at most one unknown (0 and -1: the
    dynamic dimensions stay dynamic); then fold constants,
    repeating until nothing changes. This turns the computed-shape patterns that TVM's Relax ONNX
    importer rejects into constants. Fix dynamic inputs first (``--input-shape``) to reach them all."""

    name = "simplify-shapes"
    exact = True

    max_rounds: int = option(8, help="rounds of shape folding + constant folding")

    def __post_init__(self):
        check_range("max_rounds", self.max_rounds, 1, MAX_ROUNDS)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        total = {"shape_nodes": 0, "reshape_targets": 0, "folded_nodes": 0}
        folding = ConstantFolding()
        for _ in range(max(1, self.max_rounds)):
            model.infer_shapes()
            changed = 0
            outputs = set(model.output_names)
            constants = model.constant_names()
            producers = {o: n for n in model.graph.node for o in n.output if o}
            keep = []
            for node in model.graph.node:
                if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") \
                        and node.output[0] not in outputs:
                    shape = model.static_shape(node.input[0])
                    if shape is not None:
                        if node.op_type == "Shape":
                            value = _shape_slice(node, shape)
                            total["shape_nodes"] += 1
                        else:
                            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
                            total["shape_nodes"] += 1
                        model.append_initializer(onnx.numpy_helper.from_array(value, node.output[0]))
                        changed += 1
                        continue
                if node.domain in ("", "ai.onnx") and node.op_type == "Reshape" and len(node.input) > 1 \
                        and node.input[1] not in constants:
                    in_shape = model.static_shape(node.input[0])
                    out_shape = model.static_shape(node.output[0])
                    if in_shape is not None and out_shape is not None and 0 not in out_shape and \
                            int(np.prod(in_shape, dtype=np.int64)) == int(np.prod(out_shape, dtype=np.int64)):
                        target = list(out_shape)
                    else:  # dynamic: a constant target with 0 (copy) and -1 (inferred) where that is exact
                        target = constant_reshape_target(model, node, producers)
                    if target is not None:
                        name = model.add_initializer(node.name + "_shape", np.array(target, dtype=np.int64))
                        model.set_input(node, 1, name)
                        # allowzero=1 would give 0 a literal meaning; a static target has no zeros to read
                        total["reshape_targets"] += 1
                        changed += 1
                keep.append(node)
            if len(keep) != len(model.graph.node):
                del model.graph.node[:]
                model.graph.node.extend(keep)
                model.graph_edited()
            folded = folding(model, ctx, copy=False)
            total["folded_nodes"] += folded.stats.get("folded_nodes", 0)
            if not changed and not folded.stats.get("folded_nodes", 0):
                break
        model.remove_unused()
        modified = any(total.values())
        return PassResult(model, modified, total)
