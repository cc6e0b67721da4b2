"""The inputs of a model's layers, reached one after another in topological order, over a fixed set
of samples, while the layers already passed may be edited.

A sequential refit needs, for each layer in network order, what that layer receives in the model
*as refit so far*. Running the whole model once per layer costs L full passes per sample. Here each
step runs only the nodes between the previous stop and the next one, starting from the tensors that
cross that boundary (the frontier, cached per sample), so reaching every layer of a network costs
about one pass through it. Each step's sub-model is cut from the model's current state, so an edit
to the node just reached (a refit of its weights) is seen by the next step.

Graphs whose nodes carry subgraphs (If, Loop, Scan read outer tensors implicitly) are run whole,
once per step, as before.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from sculpt.ir.model import Model
from sculpt.runtime.session import make_session, run


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in graph.node for a in n.attribute)


class LayerInputStream:
    """``stream.inputs(position, tensor)``: the value of ``tensor`` (produced before node number
    ``position``, or a graph input) for every sample, with the model as it is now. Positions must
    not decrease between calls; nodes before the current position must not change (the node at it
    may). If the node list is changed otherwise, the stream starts again from the graph inputs."""

    def __init__(self, model: Model, samples: list[dict]):
        self.model = model
        self.samples = samples
        self._whole = _has_subgraphs(model.graph)
        self._reset()

    def _reset(self):
        graph = self.model.graph
        self._names = [n.name for n in graph.node]
        self._position = 0
        inits = {t.name for t in graph.initializer}
        feeds = [i.name for i in graph.input if i.name not in inits]
        self._frontier = [{k: s[k] for k in feeds if k in s} for s in self.samples]
        # last node that reads each tensor (the frontier keeps a tensor until then)
        self._last_read: dict[str, int] = {}
        for k, node in enumerate(graph.node):
            for name in node.input:
                if name:
                    self._last_read[name] = k

    def inputs(self, position: int, tensor: str) -> list[np.ndarray]:
        if self._whole:
            sess = make_session(self.model, extra_outputs=[tensor])
            feeds = {i.name for i in sess.get_inputs()}
            return [run(self.model, {k: v for k, v in s.items() if k in feeds}, session=sess, outputs=[tensor])[tensor]
                    for s in self.samples]
        if [n.name for n in self.model.graph.node] != self._names or position < self._position:
            self._reset()
        if position > self._position:
            self._advance(position)
        out = []
        for values in self._frontier:
            if tensor not in values:
                raise KeyError(f"tensor '{tensor}' is not available before node {position}")
            out.append(values[tensor])
        return out

    def _advance(self, stop: int):
        """Run nodes [current position, stop) from the frontier; keep what nodes ≥ stop read."""
        graph = self.model.graph
        nodes = list(graph.node[self._position:stop])
        produced = [o for n in nodes for o in n.output if o]
        keep = [t for t in dict.fromkeys(list(self._frontier[0]) + produced)
                if self._last_read.get(t, -1) >= stop]
        made_here, kept = set(produced), set(keep)
        fetch = [t for t in keep if t in made_here]
        if fetch:
            proto = self._segment(nodes, fetch)
            sess = make_session(proto)
            feeds = [i.name for i in sess.get_inputs()]
            for values in self._frontier:
                values.update(run(proto, {k: values[k] for k in feeds}, session=sess, outputs=fetch))
        for values in self._frontier:
            for t in [t for t in values if t not in kept]:
                del values[t]
        self._position = stop

    def _segment(self, nodes: list[onnx.NodeProto], outputs: list[str]) -> onnx.ModelProto:
        """A model of ``nodes`` alone: frontier tensors they read become inputs (typed from the
        cached values), the initializers they read are copied."""
        graph = self.model.graph
        read = {name for n in nodes for name in n.input if name}
        inits = [t for t in graph.initializer if t.name in read]
        init_names = {t.name for t in inits}
        sample = self._frontier[0]
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(sample[name].dtype),
                                                list(sample[name].shape))
                  for name in dict.fromkeys(name for n in nodes for name in n.input)
                  if name and name in sample and name not in init_names]
        outs = [onnx.ValueInfoProto(name=name) for name in outputs]
        sub = helper.make_graph(nodes, "segment", inputs, outs, initializer=inits)
        proto = self.model.proto
        return helper.make_model(sub, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                                 functions=list(proto.functions))
