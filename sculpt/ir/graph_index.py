"""One index of a model's graph: producers, consumers, value infos, initializers and nodes by name.

Looking a tensor up in a ``GraphProto`` means scanning it; a pass that does so for every node is
quadratic, and a 50,000-node graph then takes hours. The index answers those questions in O(1).

Validity. The index is a view of ``model.proto.graph`` and must never answer from a graph that has
changed since. Three mechanisms keep it so:

- **Scopes.** ``Model.index`` caches an index only inside ``with model.indexed():`` (every pass run
  and the cost model enter one). Outside a scope each access builds a fresh index, so code that edits
  the proto directly and then asks the Model (tests, users, the backends) sees exactly what it did
  before the index existed.
- **Edits through the index.** Inside a scope sculpt edits the graph through the Model's editing
  methods (``remove_node``, ``set_input``, ``set_output``, ``replace_uses``, ``set_initializer``,
  ``add_initializer``, ``append_initializer``, ``remove_value_info``), which update the index in place
  (O(log n) or better). Whole-graph edits (``remove_unused``, ``topological_sort``, ``infer_shapes``,
  rebuilding ``graph.node``) call ``invalidate()``; the index is then rebuilt lazily, part by part, at
  the next question.
- **A change detector.** Each part records the graph object and the lengths of the repeated fields it
  was built from and checks them (O(1)) before every answer: an edit that adds or removes nodes,
  initializers, inputs, outputs or value infos behind the index's back causes a rebuild, not a stale
  answer. An in-place rewiring (``node.input[0] = ...``) cannot be seen that cheaply: sculpt's own code
  does those through the methods above or invalidates, and the test suite runs with
  ``SCULPT_CHECK_INDEX=1``, which checks every answer against a scan of the graph and raises
  ``StaleIndexError`` on a difference.

Answers match the scans they replace exactly, invalid graphs included: a tensor produced twice has as
producer its last writer (as ``Model.producers()``), ``consumers`` lists readers in graph order with a
node once per input slot (and once more when a subgraph reads the tensor), ``value_info`` prefers
outputs over ``graph.value_info`` over inputs (as ``Model.value_infos()``).
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

import onnx

# checked mode: every answer is compared with a scan of the graph (the test suite turns it on)
CHECK = os.environ.get("SCULPT_CHECK_INDEX", "") not in ("", "0")


class StaleIndexError(AssertionError):
    """The graph index disagrees with the graph: an edit went around it (a bug in sculpt)."""


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _outer_inputs(node: onnx.NodeProto) -> set[str]:
    return subgraph_outer_inputs(node) if _has_subgraph(node) else set()


def subgraph_outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                for i in n.input:
                    if i and i not in local:
                        names.add(i)
                names.update(x for x in subgraph_outer_inputs(n) if x not in local)
            for o in g.output:
                if o.name not in local:
                    names.add(o.name)
    return names


def _grouped_by_name(entries) -> dict[str, list]:
    """{name: the entries called name, in order} of a graph's initializers, inputs, outputs or value infos."""
    grouped: dict[str, list] = {}
    for entry in entries:
        grouped.setdefault(entry.name, []).append(entry)
    return grouped


def _remove_one(keys: list[int], key: int) -> None:
    i = bisect.bisect_left(keys, key)
    if i == len(keys) or keys[i] != key:
        raise StaleIndexError(f"graph index: entry {key} missing")
    del keys[i]


def _move_key(table: dict[str, list[int]], key: int, old: str, new: str) -> None:
    """Node ``key`` no longer reads (or produces) ``old`` but ``new``: the sorted key lists follow."""
    if old:
        _remove_one(table[old], key)
    if new:
        bisect.insort(table.setdefault(new, []), key)


class GraphIndex:
    """Lookups over one model's graph; see the module docstring for when it is valid."""

    def __init__(self, model):
        self._model = model
        # what each part was built from: the graph object (compared with `is`) and field lengths
        self._nodes_graph = None
        self._nodes_len = -1
        self._tensors_graph = None
        self._tensors_lens = None
        # each rebuild of a part starts a new generation; the names counter belongs to one pair
        self._nodes_gen = 0
        self._tensors_gen = 0
        self._names: Counter | None = None
        self._names_gen = None

    # ------------------------------------------------------------------ validity
    def invalidate(self) -> None:
        """Forget everything; the next question rebuilds what it needs."""
        self._nodes_graph = None
        self.invalidate_tensors()

    def invalidate_tensors(self) -> None:
        """Forget initializers, inputs, outputs and value infos (after shape inference, say)."""
        self._tensors_graph = None
        self._names = None

    def _graph(self) -> onnx.GraphProto:
        return self._model.proto.graph

    @staticmethod
    def _lens(g: onnx.GraphProto) -> tuple[int, int, int, int]:
        return (len(g.initializer), len(g.input), len(g.output), len(g.value_info))

    def _nodes(self) -> onnx.GraphProto:
        g = self._graph()
        if self._nodes_graph is not g or self._nodes_len != len(g.node):
            self._build_nodes(g)
        return g

    def _tensors(self) -> onnx.GraphProto:
        g = self._graph()
        if self._tensors_graph is not g or self._tensors_lens != self._lens(g):
            self._build_tensors(g)
        return g

    def _live_names(self) -> Counter | None:
        """The names counter if it matches the current parts (to be updated by an edit), else None."""
        if self._names is not None and self._names_gen != (self._nodes_gen, self._tensors_gen):
            self._names = None
        return self._names

    def _build_nodes(self, g: onnx.GraphProto) -> None:
        nodes: dict[int, onnx.NodeProto] = {}
        key_of: dict[int, int] = {}
        producers: dict[str, list[int]] = {}
        readers: dict[str, list[int]] = {}
        by_name: dict[str, list[int]] = {}
        subgraph_nodes: list[int] = []
        outer: dict[int, set[str]] = {}
        for k, node in enumerate(g.node):
            nodes[k] = node
            key_of[id(node)] = k
            for o in node.output:
                if o:
                    producers.setdefault(o, []).append(k)
            for i in node.input:
                if i:
                    readers.setdefault(i, []).append(k)
            by_name.setdefault(node.name, []).append(k)
            if node.attribute and _has_subgraph(node):
                subgraph_nodes.append(k)
                names = _outer_inputs(node)
                outer[k] = names
                for i in names:
                    readers.setdefault(i, []).append(k)
        self._node_of = nodes
        self._key_of = key_of
        self._order = list(range(len(nodes)))
        self._next_key = len(nodes)
        self._producers = producers
        self._readers = readers
        self._by_name = by_name
        self._subgraph_nodes = subgraph_nodes
        self._outer = outer
        self._nodes_graph = g
        self._nodes_len = len(g.node)
        self._nodes_gen += 1

    def _build_tensors(self, g: onnx.GraphProto) -> None:
        self._inits = _grouped_by_name(g.initializer)
        self._inputs = _grouped_by_name(g.input)
        self._outputs = _grouped_by_name(g.output)
        self._value_info = _grouped_by_name(g.value_info)
        self._tensors_graph = g
        self._tensors_lens = self._lens(g)
        self._tensors_gen += 1

    def _names_counter(self) -> Counter:
        self._nodes()
        g = self._tensors()
        if self._live_names() is None:
            names: Counter = Counter(t.name for t in g.initializer)
            names.update(i.name for i in g.input)
            names.update(o.name for o in g.output)
            names.update(v.name for v in g.value_info)
            for node in g.node:
                names.update(node.output)
                names[node.name] += 1
            self._names = names
            self._names_gen = (self._nodes_gen, self._tensors_gen)
        return self._names

    # ------------------------------------------------------------------ questions
    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node writing tensor ``name`` (the last one if several do), or None."""
        self._nodes()
        keys = self._producers.get(name) if name else None
        node = self._node_of[keys[-1]] if keys else None
        if CHECK:
            fresh = None
            for n in self._graph().node:
                if name and name in n.output:
                    fresh = n
            self._expect(node is fresh, f"producer of '{name}'")
        return node

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        """Nodes reading ``name``, in graph order, once per input slot, and once more per node whose
        subgraphs read it (as ``Model.consumers()``)."""
        self._nodes()
        keys = self._readers.get(name) if name else None
        out = [self._node_of[k] for k in keys] if keys else []
        if CHECK:
            fresh = self._model.consumers().get(name, []) if name else []
            self._expect_same_list(out, fresh, f"consumers of '{name}'")
        return out

    def consumer_count(self, name: str) -> int:
        """``len(consumers(name))`` without building the list."""
        if CHECK:
            return len(self.consumers(name))
        self._nodes()
        keys = self._readers.get(name) if name else None
        return len(keys) if keys else 0

    def node(self, name: str) -> onnx.NodeProto | None:
        """The first node called ``name``, or None."""
        self._nodes()
        keys = self._by_name.get(name)
        node = self._node_of[keys[0]] if keys else None
        if CHECK:
            fresh = next((n for n in self._graph().node if n.name == name), None)
            self._expect(node is fresh, f"node '{name}'")
        return node

    def constant_node(self, name: str) -> onnx.NodeProto | None:
        """The first node with op_type Constant whose first output is ``name`` (as ``get_constant``)."""
        self._nodes()
        found = None
        for k in (self._producers.get(name) or ()) if name else ():
            n = self._node_of[k]
            if n.op_type == "Constant" and n.output[0] == name:
                found = n
                break
        if CHECK:
            fresh = next((n for n in self._graph().node if n.op_type == "Constant" and n.output[0] == name), None)
            self._expect(found is fresh, f"Constant node of '{name}'")
        return found

    def initializer(self, name: str, *, last: bool = False) -> onnx.TensorProto | None:
        """The first (or ``last``) initializer called ``name``, or None."""
        self._tensors()
        ts = self._inits.get(name)
        t = (ts[-1] if last else ts[0]) if ts else None
        if CHECK:
            fresh = [x for x in self._graph().initializer if x.name == name]
            want = (fresh[-1] if last else fresh[0]) if fresh else None
            self._expect(t is want, f"initializer '{name}'")
        return t

    def is_input(self, name: str) -> bool:
        """Whether a graph input (initializer-backed or not) is called ``name``."""
        self._tensors()
        return self._checked_member(name, self._inputs, "input")

    def is_output(self, name: str) -> bool:
        """Whether a graph output is called ``name``."""
        self._tensors()
        return self._checked_member(name, self._outputs, "output")

    def _checked_member(self, name: str, names, field: str) -> bool:
        """``name in names`` (this index's copy of the graph's ``field`` list), checked against the
        graph when CHECK is on."""
        ans = name in names
        if CHECK:
            self._expect(ans == any(v.name == name for v in getattr(self._graph(), field)), f"{field} '{name}'")
        return ans

    def value_info(self, name: str) -> onnx.ValueInfoProto | None:
        """The value info recorded for ``name``: an output's, else value_info's, else an input's (the last
        of each; as ``Model.value_infos()``)."""
        self._tensors()
        vi = None
        for table in (self._outputs, self._value_info, self._inputs):
            entries = table.get(name)
            if entries:
                vi = entries[-1]
                break
        if CHECK:
            fresh = self._model.value_infos().get(name)
            self._expect(vi is fresh, f"value info of '{name}'")
        return vi

    def name_taken(self, name: str) -> bool:
        """Whether ``name`` is a tensor or node name of the graph (as ``Model._all_names()``)."""
        ans = self._names_counter()[name] > 0
        if CHECK:
            self._expect(ans == (name in self._model._all_names()), f"name '{name}'")
        return ans

    def _expect(self, ok: bool, what: str) -> None:
        if not ok:
            raise StaleIndexError(f"graph index is stale: {what} differs from the graph (an edit bypassed the index)")

    def _expect_same_list(self, out: list, fresh: list, what: str) -> None:
        """The same objects in the same order."""
        self._expect(len(out) == len(fresh) and all(a is b for a, b in zip(out, fresh)), what)

    # ------------------------------------------------------------------ edits that keep it valid
    def _key(self, node: onnx.NodeProto) -> int:
        k = self._key_of.get(id(node))
        if k is None or self._node_of.get(k) is not node:
            raise ValueError(f"node '{node.name}' is not in the graph")
        return k

    def _unindex_reads(self, k: int, node: onnx.NodeProto) -> None:
        for i in node.input:
            if i:
                _remove_one(self._readers[i], k)
        for i in self._outer.get(k, ()):
            _remove_one(self._readers[i], k)

    def _index_reads(self, k: int, node: onnx.NodeProto) -> None:
        for i in node.input:
            if i:
                bisect.insort(self._readers.setdefault(i, []), k)
        if k in self._outer:
            self._outer[k] = _outer_inputs(node)
            for i in self._outer[k]:
                bisect.insort(self._readers.setdefault(i, []), k)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Delete ``node`` from the graph (O(log n) to find it, where ``graph.node.remove`` compares
        every node before it)."""
        g = self._nodes()
        names = self._live_names()
        k = self._key(node)
        pos = bisect.bisect_left(self._order, k)
        if g.node[pos] is not node:
            raise StaleIndexError(f"graph index: node '{node.name}' is not at position {pos}")
        self._unindex_reads(k, node)
        for o in node.output:
            if o:
                _remove_one(self._producers[o], k)
        _remove_one(self._by_name[node.name], k)
        if names is not None:
            names[node.name] -= 1
            names.subtract(node.output)
        if k in self._outer:
            del self._outer[k]
            self._subgraph_nodes.remove(k)
        del self._order[pos]
        del self._node_of[k]
        del self._key_of[id(node)]
        del g.node[pos]
        self._nodes_len = len(g.node)

    def append_node(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """Append a copy of ``node`` at the end of the graph; returns the graph's element."""
        g = self._nodes()
        names = self._live_names()
        g.node.append(node)
        added = g.node[len(g.node) - 1]
        k = self._next_key
        self._next_key += 1
        self._node_of[k] = added
        self._key_of[id(added)] = k
        self._order.append(k)
        for o in added.output:
            if o:
                self._producers.setdefault(o, []).append(k)
        self._by_name.setdefault(added.name, []).append(k)
        if added.attribute and _has_subgraph(added):
            self._subgraph_nodes.append(k)
            self._outer[k] = set()
        self._index_reads(k, added)
        if names is not None:
            names[added.name] += 1
            names.update(added.output)
        self._nodes_len = len(g.node)
        return added

    def _key_or_none(self, node: onnx.NodeProto) -> int | None:
        k = self._key_of.get(id(node))
        return k if k is not None and self._node_of.get(k) is node else None

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """``node.input[index] = name`` (padding the inputs with "" up to ``index``)."""
        self._nodes()
        k = self._key_or_none(node)
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        if old == name:
            return
        node.input[index] = name
        if k is None:  # not a node of this graph (as far as the index knows): forget rather than guess
            self.invalidate()
            return
        _move_key(self._readers, k, old, name)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """``node.output[index] = name``."""
        self._nodes()
        names = self._live_names()
        k = self._key_or_none(node)
        old = node.output[index]
        if old == name:
            return
        node.output[index] = name
        if k is None:
            self.invalidate()
            return
        _move_key(self._producers, k, old, name)
        if names is not None:
            names[old] -= 1
            names[name] += 1

    def replace_uses(self, old: str, new: str, rename) -> None:
        """Apply ``rename(node, old, new)`` to every node that may read ``old`` (its direct readers and
        every node with a subgraph, in graph order), re-indexing what they read."""
        self._nodes()
        keys = sorted(set(self._readers.get(old, ())) | set(self._subgraph_nodes)) if old else list(self._order)
        for k in keys:
            node = self._node_of[k]
            self._unindex_reads(k, node)
            rename(node, old, new)
            self._index_reads(k, node)

    def append_initializer(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """Append a copy of ``tensor`` to ``graph.initializer``; returns the graph's element."""
        g = self._tensors()
        names = self._live_names()
        g.initializer.append(tensor)
        added = g.initializer[len(g.initializer) - 1]
        self._inits.setdefault(added.name, []).append(added)
        self._tensors_lens = self._lens(g)
        if names is not None:
            names[added.name] += 1
        return added

    def remove_value_info(self, vi: onnx.ValueInfoProto) -> None:
        """Delete entry ``vi`` of ``graph.value_info`` (the object found through ``value_info_entries``)."""
        g = self._tensors()
        names = self._live_names()
        name = vi.name
        entries = self._value_info.get(name, [])
        if not any(e is vi for e in entries):
            raise ValueError(f"value info '{name}' is not in the graph")
        pos = next(j for j, e in enumerate(g.value_info) if e is vi)
        del g.value_info[pos]
        entries[:] = [e for e in entries if e is not vi]
        if not entries:
            del self._value_info[name]
        self._tensors_lens = self._lens(g)
        if names is not None:
            names[name] -= 1

    def value_info_entries(self, name: str) -> list[onnx.ValueInfoProto]:
        """The entries of ``graph.value_info`` called ``name`` (not inputs or outputs), in order."""
        self._tensors()
        return self._entries_named(name, self._value_info, "value_info")

    def inputs_named(self, name: str) -> list[onnx.ValueInfoProto]:
        """The graph inputs called ``name``, in order."""
        self._tensors()
        return self._entries_named(name, self._inputs, "input")

    def _entries_named(self, name: str, table: dict, field: str) -> list[onnx.ValueInfoProto]:
        """The entries of the graph's ``field`` list called ``name``, from ``table`` (this index's
        copy of it), checked against the graph when CHECK is on."""
        out = list(table.get(name, ()))
        if CHECK:
            fresh = [v for v in getattr(self._graph(), field) if v.name == name]
            self._expect_same_list(out, fresh, f"{field} '{name}'")
        return out

    # ------------------------------------------------------------------ checks
    def verify(self) -> None:
        """Compare every entry with a fresh scan of the graph; raise StaleIndexError on a difference."""
        fresh = GraphIndex(self._model)
        g = self._nodes()
        self._tensors()
        fresh._nodes()
        fresh._tensors()

        def nodes_of(ix, table):
            return {k: [id(ix._node_of[x]) for x in v] for k, v in table.items() if v}

        for what in ("_producers", "_readers", "_by_name"):
            if nodes_of(self, getattr(self, what)) != nodes_of(fresh, getattr(fresh, what)):
                raise StaleIndexError(f"graph index is stale: {what[1:]} differ from the graph")
        for what in ("_inits", "_inputs", "_outputs", "_value_info"):
            mine = {k: [id(x) for x in v] for k, v in getattr(self, what).items() if v}
            theirs = {k: [id(x) for x in v] for k, v in getattr(fresh, what).items() if v}
            if mine != theirs:
                raise StaleIndexError(f"graph index is stale: {what[1:]} differ from the graph")
        if [id(self._node_of[k]) for k in self._order] != [id(n) for n in g.node]:
            raise StaleIndexError("graph index is stale: node order differs from the graph")
        if self._live_names() is not None and +self._names != +fresh._names_counter():
            raise StaleIndexError("graph index is stale: names differ from the graph")
