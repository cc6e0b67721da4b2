"""remove-identity: drop Identity nodes and inference-mode Dropout nodes."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register


def _is_passthrough(model: Model, node: onnx.NodeProto, consumers) -> bool:
    if node.domain not in ("", "ai.onnx") or len(node.input) < 1 or not node.input[0]:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        # the mask output must be unused; training_mode (opset >= 12) must be absent or constant false
        if len(node.output) > 1 and node.output[1] and (consumers.get(node.output[1])
                                                         or node.output[1] in model.output_names):
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
        for node in list(model.graph.node):
            consumers = model.consumers()
            if not _is_passthrough(model, node, consumers):
                continue
            src, dst = node.input[0], node.output[0]
            outputs = set(model.output_names)
            if dst not in outputs:
                model.graph.node.remove(node)
                model.replace_uses(dst, src)
                removed += 1
                continue
            producers = model.producers()
            if src in graph_inputs or src in outputs or src not in producers:
                continue
            model.graph.node.remove(node)
            prod = producers[src]
            for k, o in enumerate(prod.output):
                if o == src:
                    prod.output[k] = dst
            model.replace_uses(src, dst)
            for vi in model.graph.value_info:
                if vi.name == src:
                    model.graph.value_info.remove(vi)
                    break
            removed += 1
        return PassResult(model, removed > 0, {"removed_nodes": removed})
