"""constant-folding: evaluate every node whose inputs are all constants, once, in onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from sculpt.errors import InvalidModelError
from sculpt.ir.graph_index import subgraph_outer_inputs
from sculpt.ir.model import Model, constant_node_value
from sculpt.passes.base import (MAX_TENSOR_MB, Pass, allow_plain_initializers, PassContext, PassResult, check_range,
                                option, register)

NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
# ops whose output can be far larger than their inputs: folded only when the inferred size is known
EXPANDING_OPS = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot"}


def constants_to_initializers(model: Model) -> int:
    """Turn Constant nodes into initializers (graph outputs excepted). Returns how many."""
    outputs = set(model.output_names)
    keep, moved = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            try:
                value = constant_node_value(node)
            except InvalidModelError:
                keep.append(node)
                continue
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph_edited()
    return moved


def _element_count(model: Model, name: str) -> int | None:
    shape = model.static_shape(name)
    if shape is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


@register
@dataclass
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are all constants and replace them by initializers.

    Constant nodes become initializers. Random ops, ops with subgraphs and ops of non-standard
    domains are left alone, as are nodes that produce a graph output, and nodes whose result would
    exceed ``max_tensor_mb``. The constant subgraph is evaluated in one onnxruntime session, so the
    folded values are exactly what the runtime would have computed."""

    name = "constant-folding"
    exact = True

    max_tensor_mb: float = option(256.0, help="largest folded tensor (MB); bigger results stay as nodes")

    def __post_init__(self):
        check_range("max_tensor_mb", self.max_tensor_mb, 0, MAX_TENSOR_MB)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        moved = constants_to_initializers(model)
        model.infer_shapes()
        constants = model.constant_names()
        outputs = set(model.output_names)
        limit = self.max_tensor_mb * 1e6 / 4  # elements, counted as 4-byte values
        foldable: list[onnx.NodeProto] = []
        for node in model.graph.node:
            if (node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC_OPS
                    or subgraph_outer_inputs(node) or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                      onnx.AttributeProto.GRAPHS)
                                                           for a in node.attribute)):
                continue
            if not node.input or not all(i == "" or i in constants for i in node.input):
                continue
            if any(o in outputs for o in node.output):
                continue
            sizes = [_element_count(model, o) for o in node.output if o]
            if any(s is not None and s > limit for s in sizes):
                continue
            if node.op_type in EXPANDING_OPS and any(s is None for s in sizes):
                continue
            foldable.append(node)
            constants.update(o for o in node.output if o)
        folded = 0
        if foldable:
            values = _evaluate(model, foldable)
            done = set()
            for node in foldable:
                outs = [o for o in node.output if o]
                if not all(o in values for o in outs):
                    continue
                if any(values[o].size > limit for o in outs):
                    continue
                for o in outs:
                    model.append_initializer(numpy_helper.from_array(values[o], o))
                done.add(node.name)
                folded += 1
            if done:
                keep = [n for n in model.graph.node if n.name not in done]
                del model.graph.node[:]
                model.graph.node.extend(keep)
                model.graph_edited()
        removed = model.remove_unused()
        return PassResult(model, bool(moved or folded or removed),
                          {"constants_to_initializers": moved, "folded_nodes": folded, "removed_unused": removed})


def _evaluate(model: Model, nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Evaluate a constant subgraph in onnxruntime (one session; per node on failure)."""
    needed = {i for n in nodes for i in n.input if i}
    produced = {o for n in nodes for o in n.output if o}
    inits = [t for t in model.graph.initializer if t.name in needed - produced]
    try:
        return _run_subgraph(model, nodes, inits)
    except Exception:
        pass
    # one node at a time: a node onnxruntime cannot evaluate is simply not folded
    values: dict[str, np.ndarray] = {}
    init_map = {t.name: t for t in model.graph.initializer}
    for node in nodes:
        if not all(i == "" or i in values or i in init_map for i in node.input):
            continue
        local = [init_map[i] if i in init_map else numpy_helper.from_array(values[i], i)
                 for i in node.input if i]
        try:
            values.update(_run_subgraph(model, [node], local))
        except Exception:
            continue
    return values


def _run_subgraph(model: Model, nodes, inits) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    outputs = [o for n in nodes for o in n.output if o]
    graph = onnx.helper.make_graph(list(nodes), "fold", [], [onnx.ValueInfoProto(name=o) for o in outputs],
                                   initializer=list(inits))
    proto = onnx.helper.make_model(graph, opset_imports=list(model.proto.opset_import))
    proto.ir_version = model.proto.ir_version
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = sess.run(outputs, {})
    # sequences and optionals are not tensors: such nodes are not folded
    return {o: v for o, v in zip(outputs, values) if isinstance(v, np.ndarray)}
