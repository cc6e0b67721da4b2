"""The ONNX-based IR: a thin, checked wrapper around ``onnx.ModelProto``.

A :class:`Model` owns one ``ModelProto``. Passes edit the proto through the helpers here
(constants, producers and consumers, initializers, unique names); the Model can always be handed
back to plain ONNX tooling (``model.proto``) or to onnx-graphsurgeon (``to_graphsurgeon``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from sculpt.common import atomic_write_bytes, one_line
from sculpt.errors import InvalidModelError, ModelLoadError, SculptWarning, ShapeError
from sculpt.ir.graph_index import GraphIndex, subgraph_outer_inputs

# protobuf refuses to serialize a message of 2 GiB or more: such models are saved with external data
_PROTOBUF_LIMIT = 2**31 - 1
# a model whose tensors declare more elements than this is treated as hostile rather than allocated
MAX_TENSOR_ELEMENTS = 2**34

ModelSource = "str | os.PathLike | bytes | onnx.ModelProto | Model"


def over_protobuf_limit(proto: onnx.ModelProto) -> bool:
    """True when the model is too big for protobuf to serialize in one piece (2 GiB): it then goes
    through files with external data."""
    return proto_byte_size(proto) > _PROTOBUF_LIMIT


def proto_byte_size(proto: onnx.ModelProto) -> int:
    """The serialized size of a model. Past 2 GiB protobuf refuses even to compute it (EncodeError):
    then it is the tensors' payload, which alone exceeds the limit (a lower bound, always > limit)."""
    from google.protobuf.message import EncodeError

    try:
        return proto.ByteSize()
    except EncodeError:
        return max(_PROTOBUF_LIMIT + 1, _tensor_payload(proto.graph))


def _copy_fields(src, dst, *, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except the field ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _tensor_payload(graph: onnx.GraphProto) -> int:
    """Bytes of tensor data held in a graph: initializers, Constant values, subgraphs."""
    def size(t: onnx.TensorProto) -> int:
        typed = (len(t.float_data) + len(t.int32_data)) * 4 + (len(t.int64_data) + len(t.double_data)
                                                               + len(t.uint64_data)) * 8
        return len(t.raw_data) + typed + sum(len(x) for x in t.string_data)

    total = sum(size(t) for t in graph.initializer)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += size(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                total += _tensor_payload(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                total += sum(_tensor_payload(g) for g in a.graphs)
    return total


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return "<ModelProto>"


class Model:
    """An ONNX model under compression.

    ``Model.load`` accepts a path, bytes, an ``onnx.ModelProto`` or another Model. Loading gives every
    node a unique, non-empty name (exporters often leave them empty) so that reports and errors can
    name nodes; nothing else about the model changes.

    Lookups by name (``tensor_shape``, ``get_constant``, ``node_by_name``, ``unique_name``) and the
    editing helpers go through a :class:`~sculpt.ir.graph_index.GraphIndex`, cached inside
    ``with model.indexed():`` (each pass run) and kept valid by the editing helpers; see that module.
    """

    # the cached graph index and how many `indexed()` scopes are open (class defaults: wrap and clone
    # build instances without __init__)
    _index: GraphIndex | None = None
    _index_depth: int = 0

    def __init__(self, proto: onnx.ModelProto, source_path: str | None = None):
        if not isinstance(proto, onnx.ModelProto):
            raise TypeError(f"Model wraps an onnx.ModelProto, got {type(proto).__name__}")
        self.proto = proto
        self.source_path = os.path.realpath(source_path) if source_path else None
        self._ensure_node_names()

    @classmethod
    def wrap(cls, proto: onnx.ModelProto) -> "Model":
        """A Model around ``proto`` itself: no copy, no check, node names left as they are."""
        m = cls.__new__(cls)
        m.proto = proto
        m.source_path = None
        return m

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, source, *, load_external_data: bool = True) -> "Model":
        """Load a model from a path, bytes, a ModelProto or a Model (which is cloned)."""
        if isinstance(source, Model):
            return source.clone()
        if isinstance(source, onnx.ModelProto):
            proto = copy.deepcopy(source)
            _check_is_model(proto, "<ModelProto>")
            return cls(proto)
        if isinstance(source, (bytes, bytearray)):
            proto = _parse(bytes(source), "<bytes>")
            _refuse_external_data(proto, "<bytes>")
            return cls(proto)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise ModelLoadError(f"{path}: no such file")
            if os.path.isdir(path):
                raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
            if not os.path.isfile(path):
                raise ModelLoadError(f"{path}: not a regular file")
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
            proto = _parse(data, path)
            if _uses_external_data(proto):
                _load_external_data(proto, path, read=load_external_data)
            return cls(proto, source_path=path)
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")

    def save(self, path: str | os.PathLike, *, overwrite_input: bool = False,
             external_data: bool | None = None) -> Path:
        """Write the model atomically (temporary file in the same folder, then rename).

        Refuses to overwrite the file the model was loaded from unless ``overwrite_input``.
        ``external_data=None`` stores tensors externally only when the model exceeds protobuf's
        2 GiB limit; the data file is then ``<name>.data`` beside the model.
        """
        path = Path(path)
        if self.source_path and os.path.realpath(path) == self.source_path and not overwrite_input:
            raise ModelLoadError(f"{path}: refusing to overwrite the input model (choose another output path)")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise ModelLoadError(f"{path}: the folder {parent} does not exist")
        if external_data is None:
            external_data = self.byte_size() > _PROTOBUF_LIMIT
        proto = self.proto
        if not external_data:
            data = proto.SerializeToString()
            try:
                atomic_write_bytes(path, data)
            except OSError as e:
                raise ModelLoadError(f"{path}: cannot write the model: {e.strerror or e}") from None
            return path
        # external data: write both files under temporary names, then rename the data, then the model
        location = path.name + ".data"
        try:
            with tempfile.TemporaryDirectory(dir=parent, prefix=".sculpt-") as tmp:
                proto = copy.deepcopy(self.proto)
                tmp_model = os.path.join(tmp, path.name)
                onnx.save_model(proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=location, size_threshold=1024)
                # no tensor reaches the threshold: onnx writes no data file and the model is self-contained
                if os.path.exists(os.path.join(tmp, location)):
                    os.replace(os.path.join(tmp, location), parent / location)
                os.replace(tmp_model, path)
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot write the model: {e.strerror or e}") from None
        return path

    def serialize(self) -> bytes:
        return self.proto.SerializeToString()

    def byte_size(self) -> int:
        """Serialized size in bytes (past protobuf's 2 GiB limit: the tensor payload, see proto_byte_size)."""
        return proto_byte_size(self.proto)

    def clone(self) -> "Model":
        m = Model.__new__(Model)
        m.proto = copy.deepcopy(self.proto)
        m.source_path = self.source_path
        return m

    def sha256(self) -> str:
        """Digest of the serialized model; past 2 GiB (not serializable in one piece) of the model
        without its initializers followed by each initializer, in order."""
        if self.byte_size() <= _PROTOBUF_LIMIT:
            return hashlib.sha256(self.proto.SerializeToString(deterministic=True)).hexdigest()
        digest = hashlib.sha256()
        stub = onnx.ModelProto()
        _copy_fields(self.proto, stub, skip="graph")
        _copy_fields(self.graph, stub.graph, skip="initializer")
        digest.update(stub.SerializeToString(deterministic=True))
        for t in self.graph.initializer:
            digest.update(t.SerializeToString(deterministic=True))
        return digest.hexdigest()

    # ------------------------------------------------------------------ graphsurgeon
    def to_graphsurgeon(self):
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(self.proto)
        # graphsurgeon keeps no model-level metadata (e.g. PP-OCR rec's 'character' list): carry it along
        graph._sculpt_model_info = _model_info(self.proto)
        return graph

    @classmethod
    def from_graphsurgeon(cls, graph, *, opset: int | None = None) -> "Model":
        import onnx_graphsurgeon as gs

        kwargs = {"do_type_check": True}
        proto = gs.export_onnx(graph, **kwargs)
        info = getattr(graph, "_sculpt_model_info", None)
        if info is not None:
            _restore_model_info(proto, info)
        if opset is not None:
            others = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx")]
            del proto.opset_import[:]
            proto.opset_import.append(onnx.helper.make_opsetid("", opset))
            proto.opset_import.extend(others)
        return cls(proto)

    # ------------------------------------------------------------------ basic views
    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    # ------------------------------------------------------------------ graph index
    @contextlib.contextmanager
    def indexed(self):
        """Cache the graph index while the block runs (re-entrant). Inside, edit the graph through this
        class's editing methods or call ``model.index.invalidate()`` after editing the proto directly."""
        if self._index_depth == 0:
            self._index = None
        self._index_depth += 1
        try:
            yield self.index
        finally:
            self._index_depth -= 1
            if self._index_depth == 0:
                self._index = None

    def graph_edited(self, *, nodes: bool = True) -> None:
        """Tell the cached graph index that the proto was edited directly (``nodes=False``: only
        initializers, inputs, outputs or value infos). A no-op outside ``indexed()``."""
        if self._index is not None:
            if nodes:
                self._index.invalidate()
            else:
                self._index.invalidate_tensors()

    @property
    def index(self) -> GraphIndex:
        """The graph index: the cached one inside ``indexed()``, else a fresh one (built lazily as it is
        asked, so outside a scope every lookup costs a scan, as before the index existed)."""
        if self._index_depth == 0:
            return GraphIndex(self)
        if self._index is None:
            self._index = GraphIndex(self)
        return self._index

    @property
    def opset(self) -> int:
        for op in self.proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                return op.version
        return 1

    def initializer_map(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @property
    def input_names(self) -> list[str]:
        """The real inputs: graph inputs that are not backed by an initializer."""
        inits = {t.name for t in self.graph.initializer}
        return [i.name for i in self.graph.input if i.name not in inits]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.graph.output]

    def input_shapes(self) -> dict[str, list[int | str | None]]:
        """Shapes of the real inputs; a dynamic dimension is its name (str) or None."""
        inits = {t.name for t in self.graph.initializer}
        shapes = {}
        for vi in self.graph.input:
            if vi.name in inits:
                continue
            shapes[vi.name] = value_info_dims(vi)
        return shapes

    def value_infos(self) -> dict[str, onnx.ValueInfoProto]:
        out = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            out[vi.name] = vi
        return out

    def tensor_shape(self, name: str) -> list[int | str | None] | None:
        """The shape recorded for a tensor (inputs, value_info, outputs or initializer), else None."""
        ix = self.index
        init = ix.initializer(name, last=True)
        if init is not None:
            return list(init.dims)
        vi = ix.value_info(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return value_info_dims(vi)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.tensor_shape(name)
        if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
            return None
        return tuple(shape)

    def producers(self) -> dict[str, onnx.NodeProto]:
        out = {}
        for node in self.graph.node:
            for o in node.output:
                if o:
                    out[o] = node
        return out

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for i in node.input:
                if i:
                    out[i].append(node)
            for sub in subgraph_outer_inputs(node):
                out[sub].append(node)
        return out

    def node_by_name(self, name: str) -> onnx.NodeProto | None:
        return self.index.node(name)

    # ------------------------------------------------------------------ constants
    def constant_names(self) -> set[str]:
        """Tensors whose value is known statically: initializers that are not graph inputs, and
        outputs of Constant nodes."""
        graph_inputs = {i.name for i in self.graph.input}
        names = {t.name for t in self.graph.initializer if t.name not in graph_inputs}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                names.add(node.output[0])
        return names

    def get_constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when ``name`` is not a constant."""
        ix = self.index
        if ix.is_input(name):
            return None
        t = ix.initializer(name)
        if t is not None:
            return numpy_helper.to_array(t)
        node = ix.constant_node(name)
        if node is not None:
            return constant_node_value(node)
        return None

    def set_initializer(self, name: str, value: np.ndarray) -> str:
        """Create or replace an initializer. Returns its name."""
        tensor = numpy_helper.from_array(np.asarray(value), name)
        ix = self.index
        # a recorded shape of the old value would now be stale; an input declaring it (an overridable
        # initializer) must declare the new type and shape
        for v in ix.value_info_entries(name):
            ix.remove_value_info(v)
        for vi in ix.inputs_named(name):
            vi.type.CopyFrom(onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
        t = ix.initializer(name)
        if t is not None:
            t.CopyFrom(tensor)
            return name
        ix.append_initializer(tensor)
        return name

    def add_initializer(self, prefix: str, value: np.ndarray) -> str:
        """Add an initializer under a fresh name derived from ``prefix``."""
        name = self.unique_name(prefix)
        self.append_initializer(numpy_helper.from_array(np.asarray(value), name))
        return name

    def append_initializer(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """``graph.initializer.append(tensor)``, keeping the graph index valid. Returns the graph's copy."""
        if self._index_depth == 0:
            self.graph.initializer.append(tensor)
            return self.graph.initializer[len(self.graph.initializer) - 1]
        return self.index.append_initializer(tensor)

    def replace_constant_input(self, node: onnx.NodeProto, index: int, value: np.ndarray,
                               suffix: str = "folded") -> str:
        """Make input ``index`` of ``node`` the constant ``value``. The old tensor is edited in place
        when this node is its only reader, otherwise a new initializer is added. Returns the name."""
        value = np.asarray(value)
        ix = self.index
        old = node.input[index] if index < len(node.input) else ""
        readers = ix.consumer_count(old) if old else 0
        is_init = old and ix.initializer(old) is not None
        if old and is_init and readers == 1 and not ix.is_input(old) and not ix.is_output(old):
            self.set_initializer(old, value)
            return old
        base = f"{old or node.name + '_input' + str(index)}_{suffix}"
        name = self.add_initializer(base, value)
        self.set_input(node, index, name)
        return name

    def unique_name(self, prefix: str) -> str:
        ix = self.index
        if not ix.name_taken(prefix):
            return prefix
        i = 1
        while ix.name_taken(f"{prefix}_{i}"):
            i += 1
        return f"{prefix}_{i}"

    def _all_names(self) -> set[str]:
        names = {t.name for t in self.graph.initializer}
        names.update(i.name for i in self.graph.input)
        names.update(o.name for o in self.graph.output)
        names.update(v.name for v in self.graph.value_info)
        for node in self.graph.node:
            names.update(node.output)
            names.add(node.name)
        return names

    # ------------------------------------------------------------------ structural edits
    # The editing methods below keep the cached graph index valid inside ``indexed()``; outside a
    # scope there is no cached index and they are the plain proto edits.
    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of tensor ``old`` (subgraphs included) read ``new`` instead."""
        if self._index_depth == 0:
            for node in self.graph.node:
                _rename_input(node, old, new)
            return
        self.index.replace_uses(old, new, _rename_input)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """``graph.node.remove(node)``; inside ``indexed()`` found in O(log n), not by comparing every node
        before it."""
        if self._index_depth == 0:
            self.graph.node.remove(node)
            return
        self.index.remove_node(node)

    def append_node(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """``graph.node.append(node)``. Returns the graph's copy."""
        if self._index_depth == 0:
            self.graph.node.append(node)
            return self.graph.node[len(self.graph.node) - 1]
        return self.index.append_node(node)

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """``node.input[index] = name``, the inputs padded with "" up to ``index``."""
        if self._index_depth == 0:
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = name
            return
        self.index.set_input(node, index, name)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """``node.output[index] = name``."""
        if self._index_depth == 0:
            node.output[index] = name
            return
        self.index.set_output(node, index, name)

    def remove_value_info(self, name: str) -> bool:
        """Delete the first ``graph.value_info`` entry called ``name``; False if there is none."""
        if self._index_depth == 0:
            for vi in self.graph.value_info:
                if vi.name == name:
                    self.graph.value_info.remove(vi)
                    return True
            return False
        ix = self.index
        entries = ix.value_info_entries(name)
        if not entries:
            return False
        ix.remove_value_info(entries[0])
        return True

    def remove_unused(self) -> int:
        """Remove nodes whose outputs nobody needs, and unused initializers/value_info.
        Returns the number of nodes removed."""
        needed = set(self.output_names)
        keep = []
        for node in reversed(list(self.graph.node)):
            if any(o in needed for o in node.output if o) or _has_side_effects(node):
                keep.append(node)
                needed.update(i for i in node.input if i)
                needed.update(subgraph_outer_inputs(node))
        keep.reverse()
        removed = len(self.graph.node) - len(keep)
        if removed:
            del self.graph.node[:]
            self.graph.node.extend(keep)
            self.graph_edited()
        graph_inputs = {i.name for i in self.graph.input}
        inits = [t for t in self.graph.initializer if t.name in needed or t.name in graph_inputs]
        if len(inits) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(inits)
            self.graph_edited(nodes=False)
        produced = needed | graph_inputs
        vis = [v for v in self.graph.value_info if v.name in produced]
        if len(vis) != len(self.graph.value_info):
            del self.graph.value_info[:]
            self.graph.value_info.extend(vis)
            self.graph_edited(nodes=False)
        return removed

    def topological_sort(self) -> None:
        """Reorder nodes topologically (stable: keeps the original order where it is valid)."""
        available = {i.name for i in self.graph.input} | {t.name for t in self.graph.initializer} | {""}
        pending = list(self.graph.node)
        ordered = []
        while pending:
            progress = False
            rest = []
            for node in pending:
                needs = [i for i in node.input] + list(subgraph_outer_inputs(node))
                if all(i in available for i in needs):
                    ordered.append(node)
                    available.update(node.output)
                    progress = True
                else:
                    rest.append(node)
            if not progress:
                pending_outputs = {o for m in rest for o in m.output}
                missing = sorted({i for n in rest for i in list(n.input) + sorted(subgraph_outer_inputs(n))
                                  if i not in available and i not in pending_outputs})
                if missing:
                    reader = next(n for n in rest
                                  if missing[0] in list(n.input) + sorted(subgraph_outer_inputs(n)))
                    raise InvalidModelError(
                        f"node '{reader.name}' reads tensor '{missing[0]}' that nothing produces")
                raise InvalidModelError(f"the graph has a cycle through node '{rest[0].name}'")
            pending = rest
        if [id(n) for n in ordered] != [id(n) for n in self.graph.node]:
            copies = [copy.deepcopy(n) for n in ordered]
            del self.graph.node[:]
            self.graph.node.extend(copies)
            self.graph_edited()

    # ------------------------------------------------------------------ shapes
    def infer_shapes(self, *, strict: bool = False, data_prop: bool = True, refresh: bool = False) -> "Model":
        """Run ONNX shape inference in place (value_info refreshed). Returns self.

        ``refresh``: forget the recorded value_info first, so that shapes made stale by an edit (a
        pruned weight, say) are recomputed from the inputs instead of being merged with the old ones.
        (Without it, non-strict inference silently keeps a stale shape that conflicts.)"""
        if self.byte_size() > _PROTOBUF_LIMIT:
            return self  # onnx's in-memory inference cannot take > 2 GiB; leave shapes as they are
        saved = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in self.graph.value_info] \
            if refresh else None
        if refresh:
            del self.graph.value_info[:]
            self.graph_edited(nodes=False)
        try:
            inferred = shape_inference.infer_shapes(self.proto, check_type=False, strict_mode=strict,
                                                    data_prop=data_prop)
        except Exception as e:  # onnx raises InferenceError, ValidationError, RuntimeError
            if saved is not None:
                self.graph.value_info.extend(saved)
                self.graph_edited(nodes=False)
            if strict:
                raise InvalidModelError(f"shape inference failed: {one_line(e)}") from None
            return self
        del self.graph.value_info[:]
        self.graph.value_info.extend(inferred.graph.value_info)
        # inference may also refine graph outputs
        for out, inf in zip(self.graph.output, inferred.graph.output):
            if out.name == inf.name:
                out.CopyFrom(inf)
        self.graph_edited(nodes=False)
        return self

    def drop_conflicting_shapes(self) -> list[str]:
        """Drop declared shapes that disagree with ONNX shape inference from the inputs. Returns self's
        dropped declarations, one description each (empty when the model is consistent).

        A runnable model may declare a graph output or a value_info whose rank, static dimension or
        element type is not what its nodes compute (onnxruntime only warns; onnx's full check fails).
        Such a value_info entry is removed; such an output keeps its name and takes the computed type
        (unknown dimensions stay unknown, for the next shape inference to fill in). One
        :class:`DeclaredShapeWarning` names them all."""
        declared = [vi for vi in self.graph.value_info] + [vi for vi in self.graph.output]
        if not any(vi.type.tensor_type.HasField("shape") for vi in declared) or self.byte_size() > _PROTOBUF_LIMIT:
            return []
        bare = onnx.ModelProto()
        bare.CopyFrom(self.proto)
        del bare.graph.value_info[:]
        for out in bare.graph.output:
            out.type.tensor_type.ClearField("shape")
            out.type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
        try:
            inferred = shape_inference.infer_shapes(bare, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # inference itself fails: nothing to compare with
            return []
        computed = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        dropped: list[str] = []
        for vi in list(self.graph.value_info):
            reason = _declaration_conflict(vi, computed.get(vi.name))
            if reason:
                self.graph.value_info.remove(vi)
                dropped.append(f"value_info '{vi.name}' {reason}")
        for out in self.graph.output:
            reason = _declaration_conflict(out, computed.get(out.name))
            if reason:  # onnx's checker wants an output's shape field: the computed one replaces it
                elem_type = out.type.tensor_type.elem_type
                out.type.CopyFrom(computed[out.name].type)
                if not out.type.tensor_type.elem_type:
                    out.type.tensor_type.elem_type = elem_type
                dropped.append(f"output '{out.name}' {reason}")
        if dropped:
            self.graph_edited(nodes=False)
            shown = "; ".join(dropped[:3]) + (f"; and {len(dropped) - 3} more" if len(dropped) > 3 else "")
            warnings.warn(DeclaredShapeWarning(f"{self.source_path or 'the model'}: dropped "
                                               f"{len(dropped)} declared shape(s) that disagree with what the "
                                               f"nodes compute: {shown}"), stacklevel=2)
        return dropped

    def fix_input_shapes(self, shapes: Mapping[str, Sequence[int | str]]) -> "Model":
        """Replace the (possibly dynamic) shapes of inputs by static ones. Returns self.

        Every name must be a real input; every given dimension must agree with a static one already
        present. A dimension given as a name (an identifier) is declared symbolic under that name
        instead: ``{"x": ["N", 3, 48, "W"]}`` fixes the height and names batch and width. Stale
        value_info is dropped so that shape inference recomputes it.
        """
        real = self.input_shapes()
        for name, shape in shapes.items():
            if name not in real:
                raise ShapeError(f"input shape given for '{name}', but the model's inputs are "
                                 f"{', '.join(real) or '(none)'}")
            try:
                if isinstance(shape, (str, bytes)):
                    raise TypeError
                shape = [_as_dim(d) for d in shape]
            except (TypeError, ValueError):
                raise ShapeError(f"input '{name}': the shape must be a list of integers (or names of symbolic "
                                 f"dimensions), got {shape!r}") from None
            for i, n in enumerate(shape):
                if not isinstance(n, str) and n <= 0:
                    raise ShapeError(f"input '{name}': dimension {i} must be positive, got {n}")
            old = real[name]
            if len(old) != len(shape) and old:
                raise ShapeError(f"input '{name}' has rank {len(old)}, but the shape given has rank "
                                 f"{len(shape)}: {shape}")
            for i, (o, n) in enumerate(zip(old, shape)):
                if isinstance(o, int) and o > 0 and o != n:
                    raise ShapeError(f"input '{name}': dimension {i} is fixed to {o} by the model, "
                                     f"the shape given says {n}")
            if int(np.prod([d for d in shape if not isinstance(d, str)], dtype=np.float64)) > MAX_TENSOR_ELEMENTS:
                raise ShapeError(f"input '{name}': shape {shape} is absurdly large")
            for vi in self.graph.input:
                if vi.name == name:
                    dims = vi.type.tensor_type.shape
                    del dims.dim[:]
                    for d in shape:
                        if isinstance(d, str):
                            dims.dim.add().dim_param = d
                        else:
                            dims.dim.add().dim_value = d
        # value_info computed with the old shapes is stale
        del self.graph.value_info[:]
        self.graph_edited(nodes=False)
        # symbolic or invalid (negative) output dimensions may now be known: make them unknown so that
        # shape inference fills them in; the rank and the static dimensions stay
        for out in self.graph.output:
            tt = out.type.tensor_type
            if tt.HasField("shape"):
                for d in tt.shape.dim:
                    if d.HasField("dim_param") or (d.HasField("dim_value") and d.dim_value < 0):
                        d.Clear()
        return self

    def declared_shapes(self) -> "DeclaredShapes":
        """A copy of the declared types of the real inputs and of the outputs, for
        :meth:`restore_declared_shapes` after work at fixed input shapes."""
        real = set(self.input_names)
        copy = onnx.TypeProto.FromString
        return DeclaredShapes({vi.name: copy(vi.type.SerializeToString()) for vi in self.graph.input if vi.name in real},
                              {vi.name: copy(vi.type.SerializeToString()) for vi in self.graph.output})

    def restore_declared_shapes(self, declared: "DeclaredShapes") -> "Model":
        """Declare again the (dynamic) input dimensions of ``declared`` (from :meth:`declared_shapes`,
        taken before :meth:`fix_input_shapes`), in place. Returns self.

        Inputs get their declared type back where the rank and the static dimensions still agree. An
        output dimension that was symbolic or unknown becomes so again (a static one the edits
        changed, a pruned channel count say, keeps its new value). value_info computed at the fixed
        shapes is dropped; run :meth:`infer_shapes` to recompute it."""
        for vi in self.graph.input:
            old = declared.inputs.get(vi.name)
            if old is not None and _same_static_dims(old, vi.type):
                vi.type.CopyFrom(old)
        for vi in self.graph.output:
            old = declared.outputs.get(vi.name)
            if old is None or not old.tensor_type.HasField("shape") or not vi.type.tensor_type.HasField("shape"):
                continue
            old_dims, new_dims = old.tensor_type.shape.dim, vi.type.tensor_type.shape.dim
            if len(old_dims) != len(new_dims):
                continue
            for o, n in zip(old_dims, new_dims):
                if not (o.HasField("dim_value") and o.dim_value > 0):
                    n.CopyFrom(o)
        del self.graph.value_info[:]
        self.graph_edited(nodes=False)
        return self

    def dynamic_inputs(self) -> dict[str, list]:
        """Real inputs with at least one dynamic (or unknown) dimension."""
        inits = {t.name for t in self.graph.initializer}
        out = {}
        for vi in self.graph.input:
            if vi.name in inits:
                continue
            s = value_info_dims(vi)
            has_shape = vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
            if not has_shape or any(not isinstance(d, int) or d <= 0 for d in s):
                out[vi.name] = s
        return out

    def require_named_dims(self, what: str = "this step") -> None:
        """Every dynamic input dimension must have a name (what a symbolic build keeps): else a
        ShapeError naming the input and the dimension to fix."""
        for name, dims in self.dynamic_inputs().items():
            if not dims:
                raise ShapeError(f"input '{name}' has no declared shape; {what} needs one: give --input-shape "
                                 f"{name}=...")
            for i, d in enumerate(dims):
                if not ((isinstance(d, int) and d > 0) or (isinstance(d, str) and d)):
                    shown = ",".join(str(x) if (isinstance(x, int) and x > 0) or (isinstance(x, str) and x)
                                     else ("<size>" if j == i else "?") for j, x in enumerate(dims))
                    raise ShapeError(f"input '{name}' dimension {i} is dynamic without a name; {what} keeps only "
                                     f"named dimensions symbolic: fix it, e.g. {name}=[{shown}]")

    def require_static_inputs(self, what: str = "this step") -> None:
        dyn = self.dynamic_inputs()
        if dyn:
            name, shape = next(iter(dyn.items()))
            shown = ",".join(str(d) if (isinstance(d, int) and d > 0) or (isinstance(d, str) and d) else "?"
                             for d in shape)
            raise ShapeError(f"input '{name}' has a dynamic shape [{shown}]; {what} needs a static one: "
                             f"give --input-shape {name}=...")

    # ------------------------------------------------------------------ checks
    def verify(self, *, full_check: bool = True) -> None:
        """onnx.checker (full check) plus sculpt's invariants: topological order, unique node and
        tensor names, no dangling tensors. Raises InvalidModelError naming the first problem."""
        check_invariants(self)
        try:
            if self.byte_size() > _PROTOBUF_LIMIT:
                with tempfile.TemporaryDirectory() as tmp:
                    p = os.path.join(tmp, "model.onnx")
                    self.save(p, external_data=True)
                    onnx.checker.check_model(p, full_check=full_check)
            else:
                onnx.checker.check_model(self.proto, full_check=full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise InvalidModelError(f"onnx checker: {one_line(e)}") from None

    def upgrade_opset(self, target: int) -> "Model":
        """Convert to opset ``target`` with onnx.version_converter (no-op if already there)."""
        if self.opset >= target:
            return self
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(self.proto, target)
        except Exception as e:
            raise InvalidModelError(f"cannot upgrade opset {self.opset} -> {target}: {one_line(e)}") from None
        _restore_model_info(converted, _model_info(self.proto))
        self.proto = converted
        self._ensure_node_names()
        self.graph_edited()
        return self

    # ------------------------------------------------------------------ internals
    def _ensure_node_names(self) -> None:
        # every name some node already has is reserved, so a generated name never takes the name of a
        # later node (which would then have to be renamed itself)
        taken = {node.name for node in self.graph.node if node.name}
        seen: set[str] = set()
        counters: dict[str, int] = defaultdict(int)
        for node in self.graph.node:
            name = node.name
            if not name or name in seen:
                base = name or node.op_type or "node"
                while True:
                    candidate = f"{base}_{counters[base]}"
                    counters[base] += 1
                    if candidate not in taken:
                        break
                node.name = candidate
                taken.add(candidate)
            seen.add(node.name)
        self.graph_edited()

    def __repr__(self) -> str:
        return (f"Model(opset={self.opset}, nodes={len(self.graph.node)}, "
                f"inputs={self.input_names}, outputs={self.output_names})")


# ---------------------------------------------------------------------------------------------
def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """Value of an ONNX Constant node (any of its attribute forms)."""
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise InvalidModelError(f"Constant node '{node.name}': unsupported attribute '{attr.name}'")


def _model_info(proto: onnx.ModelProto) -> dict:
    return {"metadata_props": [(p.key, p.value) for p in proto.metadata_props],
            "producer_name": proto.producer_name, "producer_version": proto.producer_version,
            "domain": proto.domain, "model_version": proto.model_version, "doc_string": proto.doc_string}


def _restore_model_info(proto: onnx.ModelProto, info: dict) -> None:
    if not proto.metadata_props and info["metadata_props"]:
        onnx.helper.set_model_props(proto, dict(info["metadata_props"]))
    for key in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if not getattr(proto, key) and info[key]:
            setattr(proto, key, info[key])


def check_invariants(model: Model) -> None:
    """sculpt's structural invariants; raises InvalidModelError naming the first violation."""
    graph = model.graph
    defined: set[str] = {""}
    for vi in graph.input:
        if vi.name in defined:
            raise InvalidModelError(f"duplicate graph input '{vi.name}'")
        defined.add(vi.name)
    graph_inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name in defined and t.name not in graph_inputs:
            raise InvalidModelError(f"duplicate initializer '{t.name}'")
        defined.add(t.name)

    def undefined(node: onnx.NodeProto, name: str):
        cycle = describe_cycle(model)
        if cycle:
            raise InvalidModelError(cycle)
        raise InvalidModelError(
            f"node '{node.name}' ({node.op_type}) reads '{name}', which is not produced before it "
            "(dangling tensor or nodes out of topological order)")

    node_names: set[str] = set()
    for node in graph.node:
        if node.name in node_names:
            raise InvalidModelError(f"duplicate node name '{node.name}'")
        node_names.add(node.name)
        for i in node.input:
            if i not in defined:
                undefined(node, i)
        if node.attribute:  # subgraphs read the enclosing scope too
            for i in subgraph_outer_inputs(node):
                if i not in defined:
                    undefined(node, i)
        for o in node.output:
            if o and o in defined:
                raise InvalidModelError(f"tensor '{o}' is produced twice (second time by node '{node.name}')")
            defined.add(o)
    for out in graph.output:
        if out.name not in defined:
            raise InvalidModelError(f"graph output '{out.name}' is not produced by any node")


def find_cycle(model: Model) -> list[str]:
    """Names of the nodes on one cycle of the node graph (tensor producer -> reader), or [] if none."""
    import networkx as nx

    producer = {o: k for k, n in enumerate(model.graph.node) for o in n.output if o}
    g = nx.DiGraph()
    for k, n in enumerate(model.graph.node):
        g.add_node(k)
        for i in list(n.input) + list(subgraph_outer_inputs(n)):
            if i in producer:
                g.add_edge(producer[i], k)
    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return []
    return [model.graph.node[a].name or f"#{a} ({model.graph.node[a].op_type})" for a, _ in edges]


def describe_cycle(model: Model) -> str | None:
    """'the graph has a cycle through nodes ...', or None when the node graph is acyclic."""
    cycle = find_cycle(model)
    if not cycle:
        return None
    return (f"the graph has a cycle through node{'s' if len(cycle) > 1 else ''} "
            + ", ".join(f"'{n}'" for n in cycle[:6]) + (" ..." if len(cycle) > 6 else ""))


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    if not data:
        raise ModelLoadError(f"{where}: the file is empty")
    try:
        proto.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise ModelLoadError(f"{where}: not an ONNX model (protobuf parse failed: {one_line(e)}); "
                             "truncated or another format?") from None
    _check_is_model(proto, where)
    return proto


def _check_is_model(proto: onnx.ModelProto, where: str) -> None:
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{where}: not an ONNX model (no IR version or no graph)")
    if not proto.graph.output:
        raise ModelLoadError(f"{where}: the ONNX graph has no outputs")
    for kind, t in _all_tensors(proto.graph):
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{where}: {kind} '{t.name}' has a negative dimension {list(t.dims)}")
        n = int(np.prod(t.dims, dtype=np.float64)) if t.dims else 1
        if n > MAX_TENSOR_ELEMENTS:
            raise ModelLoadError(f"{where}: {kind} '{t.name}' declares {n} elements (absurd shape {list(t.dims)})")
        held = _held_elements(t)
        if held is not None and held != n:
            raise ModelLoadError(f"{where}: {kind} '{t.name}' declares shape {list(t.dims)} ({n} elements) but "
                                 f"holds {held}")


# elements per stored value in raw_data, for the fixed-size types (4-bit and string types are not checked)
_RAW_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.UINT64: 8, onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16,
    onnx.TensorProto.BFLOAT16: 2,
}


def _held_elements(t: onnx.TensorProto) -> int | None:
    """How many elements a tensor's data holds, or None when that cannot be told cheaply."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _RAW_ITEMSIZE:
        return None
    if t.HasField("raw_data"):
        size = _RAW_ITEMSIZE[t.data_type]
        return len(t.raw_data) // size if len(t.raw_data) % size == 0 else -1
    if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return None
    return (len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data)
            + len(t.uint64_data))


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and Constant-node tensors of a graph and its subgraphs."""
    for t in graph.initializer:
        yield "initializer", t
    for node in graph.node:
        label = node.name or (f"{node.op_type} -> {node.output[0]}" if node.output else node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield f"tensor attribute of node '{label}'", attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield f"tensor attribute of node '{label}'", t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(True for _ in _external_tensors(proto))


def _external_tensors(proto: onnx.ModelProto):
    """(what, tensor) for every tensor of the model whose data lives in another file: initializers,
    sparse initializers, tensor and sparse-tensor attributes (Constant nodes), in the main graph, its
    subgraphs and the model's functions."""

    def sparse(kind, s):
        yield kind, s.values
        yield kind, s.indices

    def in_nodes(nodes):
        for node in nodes:
            label = node.name or (f"{node.op_type} -> {node.output[0]}" if node.output else node.op_type)
            kind = f"tensor attribute of node '{label}'"
            for a in node.attribute:
                if a.HasField("t"):
                    yield kind, a.t
                yield from ((kind, t) for t in a.tensors)
                if a.HasField("sparse_tensor"):
                    yield from sparse(kind, a.sparse_tensor)
                for s in a.sparse_tensors:
                    yield from sparse(kind, s)
                if a.HasField("g"):
                    yield from in_graph(a.g)
                for g in a.graphs:
                    yield from in_graph(g)

    def in_graph(graph):
        yield from (("initializer", t) for t in graph.initializer)
        for s in graph.sparse_initializer:
            yield from sparse("sparse initializer", s)
        yield from in_nodes(graph.node)

    def every():
        yield from in_graph(proto.graph)
        for f in proto.functions:
            yield from in_nodes(f.node)

    return ((kind, t) for kind, t in every() if t.data_location == onnx.TensorProto.EXTERNAL)


def _external_location(t: onnx.TensorProto) -> str:
    return next((e.value for e in t.external_data if e.key == "location"), "")


def _refuse_external_data(proto: onnx.ModelProto, where: str) -> None:
    """A model given as bytes has no folder its external data could be found in."""
    for kind, t in _external_tensors(proto):
        raise ModelLoadError(f"{where}: {kind} '{t.name}' keeps its data in an external file "
                             f"'{_external_location(t)}'; load the model from its file instead")


def _load_external_data(proto: onnx.ModelProto, path: str, *, read: bool = True) -> None:
    """Check that every external tensor's file lies inside the model's folder (no absolute path, no
    '..', no symlink out of it) and, with ``read``, read the data into the tensors."""
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    for kind, t in _external_tensors(proto):
        what = f"{path}: {kind} '{t.name}'"
        location = _external_location(t)
        if not location:
            raise ModelLoadError(f"{what} is stored externally but names no file")
        parts = location.replace("\\", "/").split("/")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
            raise ModelLoadError(f"{what} keeps its data in '{location}', outside the model's folder "
                                 "(external data must be a relative path inside it)")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.commonpath([real_folder, target]) != real_folder:
            raise ModelLoadError(f"{what} keeps its data in '{location}', a link that leads out of the "
                                 f"model's folder (to {target})")
        if not os.path.isfile(target):
            raise ModelLoadError(f"{what} keeps its data in '{location}', which is "
                                 f"{'not a regular file' if os.path.exists(target) else 'missing'}")
        if read:
            try:
                onnx.external_data_helper.load_external_data_for_tensor(t, folder)
            except Exception as e:  # OSError, ValueError, onnx's ValidationError (bad offset or length)
                raise ModelLoadError(f"{what}: cannot read its external data '{location}': {one_line(e)}") \
                    from None


def _as_dim(d) -> int | str:
    """A dimension given to fix_input_shapes: an int, or a name (an identifier: a symbolic dimension)."""
    import numbers

    if isinstance(d, str) and d.isidentifier():
        return d
    if isinstance(d, bool) or not isinstance(d, (numbers.Integral, str)):
        if isinstance(d, numbers.Real) and float(d).is_integer():
            return int(d)
        raise TypeError
    return int(d)


class DeclaredShapes(NamedTuple):
    """The declared types of a model's real inputs and outputs, by name (Model.declared_shapes)."""

    inputs: dict[str, onnx.TypeProto]
    outputs: dict[str, onnx.TypeProto]

    def dynamic_dims(self) -> dict[str, list[int]]:
        """The positions of the dynamic (symbolic, unknown or negative) dimensions of each input that has one."""
        out = {}
        for name, t in self.inputs.items():
            if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
                continue
            dims = [i for i, d in enumerate(t.tensor_type.shape.dim) if not (d.HasField("dim_value") and d.dim_value > 0)]
            if dims:
                out[name] = dims
        return out


def _same_static_dims(declared: onnx.TypeProto, now: onnx.TypeProto) -> bool:
    """Same element type and rank, and every static dimension of ``declared`` unchanged in ``now``."""
    if not declared.HasField("tensor_type") or not now.HasField("tensor_type"):
        return False
    if declared.tensor_type.elem_type != now.tensor_type.elem_type:
        return False
    if not declared.tensor_type.HasField("shape"):
        return True
    if not now.tensor_type.HasField("shape"):
        return False
    old, new = declared.tensor_type.shape.dim, now.tensor_type.shape.dim
    return len(old) == len(new) and all(
        not (o.HasField("dim_value") and o.dim_value > 0) or (n.HasField("dim_value") and n.dim_value == o.dim_value)
        for o, n in zip(old, new))


class DeclaredShapeWarning(SculptWarning):
    """A declared output or value_info shape disagreed with shape inference and was dropped."""


def _declaration_conflict(declared: onnx.ValueInfoProto, computed: onnx.ValueInfoProto | None) -> str | None:
    """Why ``declared`` contradicts ``computed`` (rank, a static dimension, the element type), or None."""
    if computed is None or not declared.type.HasField("tensor_type") or not computed.type.HasField("tensor_type"):
        return None
    d_type, c_type = declared.type.tensor_type.elem_type, computed.type.tensor_type.elem_type
    if d_type and c_type and d_type != c_type:
        return (f"declares element type {onnx.TensorProto.DataType.Name(d_type)}, the nodes compute "
                f"{onnx.TensorProto.DataType.Name(c_type)}")
    if not declared.type.tensor_type.HasField("shape") or not computed.type.tensor_type.HasField("shape"):
        return None
    d_dims, c_dims = value_info_dims(declared), value_info_dims(computed)

    def shown(dims):
        return "[" + ",".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims) + "]"

    if len(d_dims) != len(c_dims):
        return f"declares rank {len(d_dims)} {shown(d_dims)}, the nodes compute rank {len(c_dims)} {shown(c_dims)}"
    for a, b in zip(d_dims, c_dims):
        if isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b:
            return f"declares shape {shown(d_dims)}, the nodes compute {shown(c_dims)}"
    return None


def value_info_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """The dimensions of a tensor value info: ints, symbolic names (str), None where unknown; [] without a shape."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    for k, i in enumerate(node.input):
        if i == old:
            node.input[k] = new
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            # a subgraph that defines the name itself shadows the outer one
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            if old in local:
                continue
            for n in g.node:
                _rename_input(n, old, new)
            for o in g.output:
                if o.name == old:
                    o.name = new


_SIDE_EFFECT_OPS: set[str] = set()


def _has_side_effects(node: onnx.NodeProto) -> bool:
    return node.op_type in _SIDE_EFFECT_OPS


def iter_nodes(model: Model, op_types: Iterable[str] | None = None):
    ops = set(op_types) if op_types is not None else None
    for node in list(model.graph.node):
        if ops is None or node.op_type in ops:
            yield node
