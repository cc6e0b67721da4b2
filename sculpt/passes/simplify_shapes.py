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


@register
@dataclass
class SimplifyShapes(Pass):
    """Fold Shape and Size of tensors whose shape is static (after shape inference), and give
    Reshape a constant target where its input and output shapes are static; then fold constants,
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
                        name = model.add_initializer(node.name + "_shape", np.array(out_shape, dtype=np.int64))
                        model.set_input(node, 1, name)
                        # allowzero=1 would give 0 a literal meaning; the static target has no zeros to read
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
