"""remove-identity: drop Identity nodes and inference-mode Dropout nodes."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register


def _is_passthrough(model: Model, node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or len(node.input) < 1 or not node.input[0]:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        # the mask output must be unused; training_mode (opset >= 12) must be absent or constant false
        if len(node.output) > 1 and node.output[1] and (model.index.consumer_count(node.output[1])
                                                         or model.index.is_output(node.output[1])):
            return False
        if len(node.input) >= 3 and node.input[2]:
            mode = model.get_constant(node.input[2])
            if mode is None or bool(mode):
                return False
        for a in node.attribute:  # opset < 7: is_test=0 means training behaviour
            if a.name == "is_test" and a.i == 0:
                return False
        return True
    return False


@register
@dataclass
class RemoveIdentity(Pass):
    """Remove Identity nodes and Dropout nodes in inference mode, rewiring their readers.

    Where the removed node's output is a graph output, the producer of its input is renamed to keep
    the graph's interface unchanged; when that is not possible (input is itself a graph input or
    output) the node is kept."""

    name = "remove-identity"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        graph_inputs = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
        # the edits go through the model's editing methods, which keep the index valid
        with model.indexed() as index:
            for node in list(model.graph.node):
                if not _is_passthrough(model, node):
                    continue
                src, dst = node.input[0], node.output[0]
                if not index.is_output(dst):
                    model.remove_node(node)
                    model.replace_uses(dst, src)
                    removed += 1
                    continue
                prod = index.producer(src)
                if src in graph_inputs or index.is_output(src) or prod is None:
                    continue
                model.remove_node(node)
                for k, o in enumerate(prod.output):
                    if o == src:
                        model.set_output(prod, k, dst)
                model.replace_uses(src, dst)
                model.remove_value_info(src)
                removed += 1
        return PassResult(model, removed > 0, {"removed_nodes": removed})
