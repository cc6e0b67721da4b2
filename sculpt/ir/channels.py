"""The channel-dependency graph.

Every tensor dimension that can carry channels is a node ``Dim(tensor, axis)`` of a networkx graph.
An op that ties the channels of two dimensions adds an edge with an index map: equal indices
(elementwise ops, BatchNorm, depthwise Conv, pooling), an offset (Concat, Split, Slice on that axis),
a repeat (Flatten/Reshape into a Gemm: flat index j belongs to channel j // factor), a stride (one
of several axes merged by a Reshape: j belongs to (j // inner) % size) or a period (a grouped Conv:
channel i of every group is one unit, so that the groups stay equal). Per-op
handlers (sculpt.ir.channel_handlers) know these maps; an op without a handler, a graph input or
output, or a tensor of unknown shape *freezes* the dimensions it touches.

Two levels of grouping:

- a **group** is a connected component of the graph (e.g. the output of a Conv, its BatchNorm,
  activation, the residual Add it feeds and the other Conv feeding that Add);
- a **unit** is one channel index of a group followed through the index maps (channel 5 of the
  first Concat input is channel 5 of the Concat output, channel 69 of the next one …). Units are
  the connected components of the element-level graph, computed with scipy.

A unit can be removed when none of its elements is frozen and at least one of them is produced by
a *source* (Conv, ConvTranspose, Gemm or MatMul with constant weights). Removing it deletes that
channel from every dimension of the group: the mechanism is :meth:`ChannelGraph.remove_units`,
which asks each op's handler to rewrite its weights and attributes. Which units to remove is the
business of the passes (policy).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import numpy as np
import onnx

from sculpt.errors import InvalidModelError
from sculpt.ir.graph_index import subgraph_outer_inputs
from sculpt.ir.model import Model


@dataclass(frozen=True, order=True)
class Dim:
    tensor: str
    axis: int

    def __str__(self) -> str:
        return f"{self.tensor}[{self.axis}]"


@dataclass
class Source:
    """A node whose output channels can be removed (their weights deleted)."""

    dim: Dim
    node: str
    op_type: str


@dataclass
class Consumer:
    """A node that reduces over a channel dimension of its input (its weights lose rows).

    ``ChannelGraph.consumers`` holds the dense ones (Conv with group 1, ConvTranspose, Gemm, MatMul:
    every output reads every input channel, so a refit by least squares applies);
    ``ChannelGraph.partial_consumers`` the grouped Convs, which reduce within each group only."""

    dim: Dim
    node: str
    op_type: str


@dataclass
class Group:
    """A connected set of dimensions that share channel indices."""

    id: int
    dims: list[Dim]
    units: list[int]  # unit ids (element-level components)
    prunable_units: list[int]
    sources: list[Source]
    consumers: list[Consumer]
    frozen_reasons: list[str]
    partial_consumers: list[Consumer] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return bool(self.prunable_units)

    def describe(self) -> str:
        src = ", ".join(sorted({s.node for s in self.sources})) or "-"
        return f"group {self.id}: {self.size} channels, sources {src}"


class ChannelGraph:
    """Build with ``ChannelGraph.build(model)``; the model needs static shapes (fix the inputs and
    canonicalize first)."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = nx.Graph()
        self.sizes: dict[Dim, int] = {}
        self.frozen: dict[Dim, str] = {}
        self.sources: list[Source] = []
        self.consumers: list[Consumer] = []
        self.partial_consumers: list[Consumer] = []  # grouped Convs (see Consumer)
        self._edges: list[tuple[Dim, Dim, str, tuple, str]] = []  # (a, b, kind, args, node name)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.unknown_ops: dict[str, str] = {}
        self.constants: set[str] = set()
        self._linked: set[Dim] = set()
        self._touched: set[Dim] = set()  # dims the node being related tied, consumed or produced
        # element level (filled by _components)
        self.offsets: dict[Dim, int] = {}
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.groups: list[Group] = []
        self.unit_group: dict[int, int] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model: Model) -> "ChannelGraph":
        with model.indexed():  # shape and constant lookups per tensor: one graph index answers them
            return cls._build(model)

    @classmethod
    def _build(cls, model: Model) -> "ChannelGraph":
        from sculpt.ir.channel_handlers import handler_for

        cg = cls(model)
        work = model
        work.infer_shapes(refresh=True)
        for vi in list(work.graph.input) + list(work.graph.value_info) + list(work.graph.output):
            s = work.static_shape(vi.name)
            if s is not None:
                cg.shapes[vi.name] = s
        for t in work.graph.initializer:
            cg.shapes[t.name] = tuple(t.dims)
        constants = work.constant_names()
        cg.constants = constants
        for node in work.graph.node:
            tensors = [t for t in list(node.input) + list(node.output) if t and t not in constants]
            missing = [t for t in tensors if t not in cg.shapes]
            handler = handler_for(node)
            if missing:
                cg.freeze_node(node, f"shape of '{missing[0]}' unknown")
                continue
            if handler is None:
                cg.unknown_ops[node.name] = node.op_type
                cg.freeze_node(node, f"no channel handler for {node.op_type} ('{node.name}')")
                continue
            cg._touched = set()
            handler.relate(cg, node)
            # a dimension of this node's inputs or outputs that the handler neither tied to another
            # one, nor marked as a source or a consumer, cannot change size without breaking the node
            # (an output would keep its size, an input the size the node expects): freeze it
            for t in list(node.input) + list(node.output):
                if t and t in cg.shapes and t not in constants:
                    for axis in range(len(cg.shapes[t])):
                        d = cg.dim(t, axis)
                        if d not in cg._touched:
                            cg.freeze(d, f"{node.op_type} '{node.name}' does not map this axis")
        for vi in work.graph.input:
            cg.freeze_tensor(vi.name, f"graph input '{vi.name}'")
        for vi in work.graph.output:
            cg.freeze_tensor(vi.name, f"graph output '{vi.name}'")
        cg._components()
        return cg

    def dim(self, tensor: str, axis: int) -> Dim:
        shape = self.shapes[tensor]
        axis = axis + len(shape) if axis < 0 else axis
        d = Dim(tensor, axis)
        if d not in self.sizes:
            self.sizes[d] = int(shape[axis])
            self.graph.add_node(d)
        return d

    def eq(self, a: Dim, b: Dim, op: str) -> None:
        if self.sizes[a] != self.sizes[b]:
            raise InvalidModelError(f"channel handler for '{op}': {a} has {self.sizes[a]} channels, {b} has "
                                    f"{self.sizes[b]}")
        self.graph.add_edge(a, b)
        self._link(a, b)
        self._edges.append((a, b, "eq", (), op))

    def slice(self, whole: Dim, offset: int, part: Dim, op: str) -> None:
        """``whole[offset + i] ≡ part[i]`` for i < size(part)."""
        self.graph.add_edge(whole, part)
        self._link(whole, part)
        self._edges.append((whole, part, "slice", (offset,), op))

    def repeat(self, coarse: Dim, fine: Dim, factor: int, op: str) -> None:
        """``fine[j] ≡ coarse[j // factor]`` (a flattened channel axis)."""
        if self.sizes[coarse] * factor != self.sizes[fine]:
            raise InvalidModelError(f"channel handler for '{op}': {fine} is not {coarse} × {factor}")
        self.graph.add_edge(coarse, fine)
        self._link(coarse, fine)
        self._edges.append((coarse, fine, "repeat", (factor,), op))

    def stride(self, coarse: Dim, fine: Dim, inner: int, op: str) -> None:
        """``fine[j] ≡ coarse[(j // inner) % size(coarse)]``: ``coarse`` is one of several axes
        merged (row-major) into ``fine``, with ``inner`` elements of the later axes per index."""
        n = self.sizes[coarse]
        if inner < 1 or self.sizes[fine] % (n * inner):
            raise InvalidModelError(f"channel handler for '{op}': {coarse} cannot be an axis of {fine} "
                                    f"with stride {inner}")
        self.graph.add_edge(coarse, fine)
        self._link(coarse, fine)
        self._edges.append((coarse, fine, "stride", (inner,), op))

    def period(self, d: Dim, p: int, op: str) -> None:
        """``d[i] ≡ d[i % p]``: the channels of ``d`` fall in ``size / p`` blocks of ``p`` that must
        lose the same indices (the inputs and outputs of a grouped Conv)."""
        if p < 1 or self.sizes[d] % p:
            raise InvalidModelError(f"channel handler for '{op}': {d} has no period {p}")
        self.graph.add_node(d)
        self._link(d)
        self._edges.append((d, d, "period", (p,), op))

    def _link(self, *dims: Dim) -> None:
        self._linked.update(dims)
        self._touched.update(dims)

    def freeze(self, d: Dim, reason: str) -> None:
        self.frozen.setdefault(d, reason)

    def freeze_tensor(self, tensor: str, reason: str) -> None:
        if tensor in self.shapes and tensor not in self.constants:
            for axis in range(len(self.shapes[tensor])):
                self.freeze(self.dim(tensor, axis), reason)

    def freeze_node(self, node: onnx.NodeProto, reason: str) -> None:
        for t in list(node.input) + list(node.output) + sorted(subgraph_outer_inputs(node)):
            if t:
                self.freeze_tensor(t, reason)

    def add_source(self, d: Dim, node: onnx.NodeProto) -> None:
        self.sources.append(Source(d, node.name, node.op_type))
        self._link(d)

    def add_consumer(self, d: Dim, node: onnx.NodeProto, *, partial: bool = False) -> None:
        (self.partial_consumers if partial else self.consumers).append(Consumer(d, node.name, node.op_type))
        self._link(d)

    # ------------------------------------------------------------------ element level
    def _components(self) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        total = 0
        for d in sorted(self.sizes):
            self.offsets[d] = total
            total += self.sizes[d]
        rows, cols = [], []
        for a, b, kind, args, _ in self._edges:
            oa, ob = self.offsets[a], self.offsets[b]
            if kind == "eq":
                idx = np.arange(self.sizes[a])
                rows.append(oa + idx)
                cols.append(ob + idx)
            elif kind == "slice":
                idx = np.arange(self.sizes[b])
                rows.append(oa + args[0] + idx)
                cols.append(ob + idx)
            elif kind == "repeat":
                j = np.arange(self.sizes[b])
                rows.append(oa + j // args[0])
                cols.append(ob + j)
            elif kind == "stride":
                j = np.arange(self.sizes[b])
                rows.append(oa + (j // args[0]) % self.sizes[a])
                cols.append(ob + j)
            elif kind == "period":
                i = np.arange(self.sizes[a])
                rows.append(oa + i % args[0])
                cols.append(oa + i)
            else:  # pragma: no cover - the kinds above are all there is
                raise AssertionError(kind)
        if rows:
            r = np.concatenate(rows)
            c = np.concatenate(cols)
        else:
            r = c = np.zeros(0, dtype=np.int64)
        adj = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(total, total))
        _, labels = connected_components(adj, directed=False)
        self.labels = labels.astype(np.int64)
        frozen_units = set()
        for d in self.frozen:
            frozen_units.update(self.unit_labels(d).tolist())
        source_units = set()
        for s in self.sources:
            source_units.update(self.unit_labels(s.dim).tolist())
        # groups: connected components of the dim graph
        self.groups = []
        for gid, comp in enumerate(sorted(nx.connected_components(self.graph), key=lambda c: min(c))):
            dims = sorted(comp)
            units = sorted(set(np.concatenate([self.unit_labels(d) for d in dims]).tolist()))
            srcs = [s for s in self.sources if s.dim in comp]
            cons = [c for c in self.consumers if c.dim in comp]
            partial = [c for c in self.partial_consumers if c.dim in comp]
            reasons = sorted({self.frozen[d] for d in dims if d in self.frozen})
            prunable = [u for u in units if u in source_units and u not in frozen_units]
            g = Group(gid, dims, units, prunable, srcs, cons, reasons, partial)
            self.groups.append(g)
            for u in units:
                self.unit_group[u] = gid
        self._frozen_units = frozen_units

    def edges_of(self, node_name: str) -> list[tuple[Dim, Dim, str, tuple]]:
        """The index maps a node added: (a, b, kind, args) with kind eq, slice, repeat, stride or
        period (see the methods of the same names)."""
        if not hasattr(self, "_edges_by_node"):
            by: dict[str, list] = defaultdict(list)
            for a, b, kind, args, op in self._edges:
                by[op].append((a, b, kind, args))
            self._edges_by_node = by
        return self._edges_by_node.get(node_name, [])

    def element_index(self, d: Dim) -> slice:
        """Where the channels of ``d`` sit in element-level arrays (``labels`` and friends)."""
        o = self.offsets[d]
        return slice(o, o + self.sizes[d])

    def unit_labels(self, d: Dim) -> np.ndarray:
        """The unit id of each channel index of ``d``."""
        o = self.offsets[d]
        return self.labels[o:o + self.sizes[d]]

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable and g.sources]

    def group_of(self, d: Dim) -> Group:
        return self.groups[self.unit_group[int(self.unit_labels(d)[0])]]

    # ------------------------------------------------------------------ removal (the mechanism)
    def kept_indices(self, removed_units: Iterable[int]) -> dict[Dim, np.ndarray]:
        """For every dimension that loses channels: the indices it keeps."""
        removed = np.zeros(self.labels.max() + 1 if self.labels.size else 0, dtype=bool)
        units = list(removed_units)
        for u in units:
            if u in self._frozen_units:
                raise InvalidModelError(f"unit {u} is frozen and cannot be removed")
        if units:
            removed[np.asarray(units, dtype=np.int64)] = True
        kept: dict[Dim, np.ndarray] = {}
        for d in self.sizes:
            lab = self.unit_labels(d)
            mask = removed[lab]
            if mask.any():
                keep = np.nonzero(~mask)[0]
                if keep.size == 0:
                    raise InvalidModelError(f"removing these channels would leave {d} with none")
                kept[d] = keep
        return kept

    def remove_units(self, removed_units: Iterable[int]) -> dict[Dim, np.ndarray]:
        """Remove channels physically from the model (weights, attributes, shapes). Returns the kept
        indices per changed dimension."""
        from sculpt.ir.channel_handlers import handler_for

        kept = self.kept_indices(removed_units)
        if not kept:
            return kept
        by_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for d, k in kept.items():
            by_tensor[d.tensor][d.axis] = k

        def lookup(tensor: str, axis: int) -> np.ndarray | None:
            shape = self.shapes.get(tensor)
            if shape is None:
                return None
            axis = axis + len(shape) if axis < 0 else axis
            return by_tensor.get(tensor, {}).get(axis)

        model = self.model
        for node in list(model.graph.node):
            touched = any(t in by_tensor for t in list(node.input) + list(node.output) if t)
            if not touched:
                continue
            handler = handler_for(node)
            if handler is None:  # cannot happen: unknown ops freeze their tensors
                raise InvalidModelError(f"node '{node.name}' ({node.op_type}) has no channel handler")
            handler.rewrite(self, node, lookup)
        # every dimension that changed is in `kept`: patch the recorded shapes in place (exact, and
        # much cheaper than running shape inference again on a big model)
        for vi in list(model.graph.value_info) + list(model.graph.output):
            axes = by_tensor.get(vi.name)
            if not axes or not vi.type.HasField("tensor_type"):
                continue
            dims = vi.type.tensor_type.shape.dim
            for ax, k in axes.items():
                if ax < len(dims):
                    dims[ax].Clear()
                    dims[ax].dim_value = int(len(k))
        model.remove_unused()
        return kept

    def feasible(self, units: Iterable[int], min_keep: int = 1) -> list[int]:
        """The units of ``units`` (in order of preference: earlier ones first) that can be removed
        together while every dimension keeps at least ``min_keep`` channels (or all of them, when it
        has fewer). A Concat ties its inputs into one group: removing the lowest-ranked channels of
        the group could otherwise empty one of the inputs, which :meth:`remove_units` refuses."""
        units = [int(u) for u in units]
        if not units:
            return []
        wanted = np.zeros(self.labels.max() + 1, dtype=bool)
        wanted[np.asarray(units, dtype=np.int64)] = True
        # for each wanted unit: the dimensions it has channels in, with how many
        hits: dict[int, list[tuple[int, int]]] = defaultdict(list)
        budget: list[int] = []
        for k, d in enumerate(sorted(self.sizes)):
            lab = self.unit_labels(d)
            sel = lab[wanted[lab]]
            budget.append(self.sizes[d] - min(min_keep, self.sizes[d]))
            if sel.size:
                u, n = np.unique(sel, return_counts=True)
                for uu, nn in zip(u.tolist(), n.tolist()):
                    hits[uu].append((k, nn))
        out: list[int] = []
        seen: set[int] = set()
        for u in units:
            if u in seen:
                continue
            seen.add(u)
            if all(budget[k] >= n for k, n in hits[u]):
                for k, n in hits[u]:
                    budget[k] -= n
                out.append(u)
        return out

    # ------------------------------------------------------------------ reporting
    def summary(self) -> list[dict]:
        rows = []
        for g in self.groups:
            if not g.sources:
                continue
            rows.append({
                "group": g.id, "channels": g.size, "prunable_channels": len(g.prunable_units),
                "sources": sorted({s.node for s in g.sources}),
                "consumers": sorted({c.node for c in g.consumers + g.partial_consumers}),
                "dims": [str(d) for d in g.dims],
                "frozen": g.frozen_reasons,
            })
        return rows
