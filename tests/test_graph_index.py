"""The graph index (sculpt.ir.graph_index): equal to a fresh scan after every kind of edit, never
stale, and linear on large graphs."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import sculpt.ir.graph_index as graph_index
from graphs import assert_exact, f32, make_model, op_counts
from sculpt.examples import tiny_convnet
from sculpt.ir.cost import cost_of
from sculpt.ir.graph_index import GraphIndex, StaleIndexError
from sculpt.ir.model import Model
from sculpt.passes import PassContext, create_pass


def _tensor_names(model: Model) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
    for n in g.node:
        names.update(i for i in n.input if i)
        names.update(o for o in n.output if o)
    return names | {"no-such-tensor"}


def assert_index_fresh(model: Model) -> None:
    """Every answer of the model's (cached) index equals a scan of the graph and a freshly built index."""
    ix = model.index
    ix.verify()
    fresh = GraphIndex(model)
    producers, consumers, value_infos = model.producers(), model.consumers(), model.value_infos()
    inits, all_names = model.initializer_map(), model._all_names()
    for name in _tensor_names(model):
        assert ix.producer(name) is producers.get(name) is fresh.producer(name)
        assert [id(n) for n in ix.consumers(name)] == [id(n) for n in consumers.get(name, [])]
        assert ix.consumer_count(name) == len(consumers.get(name, []))
        assert ix.value_info(name) is value_infos.get(name) is fresh.value_info(name)
        assert ix.initializer(name, last=True) is inits.get(name)
        assert ix.name_taken(name) == (name in all_names)
    for node in model.graph.node:
        assert ix.node(node.name) is node


def _mixed_model() -> Model:
    """Identity/Dropout (one feeding a graph output), BatchNorm after a bias-less Conv, a Conv feeding
    two readers, an If whose branch reads an outer tensor."""
    w = f32(4, 3, 1, 1)
    bn = [np.ones(4, np.float32) * 1.5, np.zeros(4, np.float32) + 0.1, np.zeros(4, np.float32), np.ones(4, np.float32)]
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["t_out"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 4, 5, 5])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [1, 4, 5, 5])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Identity", ["n"], ["a"], name="id1"),
        helper.make_node("Dropout", ["a"], ["d"], name="drop"),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id_out"),
        helper.make_node("Add", ["a", "r"], ["s"], name="add"),
        helper.make_node("ReduceMax", ["s"], ["cond_f"], name="rmax", keepdims=0),
        helper.make_node("Greater", ["cond_f", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    inits = {"w": w, "g": bn[0], "b": bn[1], "m": bn[2], "v": bn[3], "zero": np.zeros((), np.float32)}
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5]), ("z", [1, 4, 5, 5])], inits)
    m.infer_shapes()
    return m


PASSES = ["remove-identity", "fold-batchnorm", "fold-conv-affine", "constant-folding", "simplify-shapes",
          "freeze-initializers", "canonicalize", "dead-channel-elimination"]


@pytest.mark.parametrize("pass_name", PASSES)
def test_index_equals_a_fresh_scan_after_each_pass(pass_name):
    for model in (_mixed_model(), tiny_convnet(batch=1)):
        with model.indexed():
            assert_index_fresh(model)  # built before the pass ...
            before = len(model.graph.node)
            result = create_pass(pass_name)(model, PassContext(), copy=False)
            assert result.model is model
            if pass_name in ("remove-identity", "fold-batchnorm", "canonicalize"):
                assert len(model.graph.node) < before
            assert_index_fresh(model)  # ... and still right after it edited the graph


def test_passes_give_the_same_model_with_and_without_a_cached_index(tmp_path):
    """The passes edit through the index inside their scope; the same edits on a model without any
    index (the proto edited directly) give the same proto."""
    m = tiny_convnet(batch=1)
    res = create_pass("canonicalize")(m)
    assert_exact(m, res.model, tmp_path=tmp_path)
    assert op_counts(res.model).get("BatchNormalization", 0) == 0
    assert op_counts(res.model).get("Identity", 0) == 0


def test_each_edit_keeps_the_index_valid():
    m = _mixed_model()
    with m.indexed() as ix:
        assert_index_fresh(m)
        g = m.graph
        relu = m.node_by_name("relu")
        # rewire, rename, add and remove, each followed by a full comparison
        m.set_input(relu, 0, "a")
        assert_index_fresh(m)
        m.set_input(relu, 2, "n")  # pads input 1 with ""
        assert list(relu.input) == ["a", "", "n"]
        assert_index_fresh(m)
        m.set_input(relu, 0, "d")
        del relu.input[1:]
        m.graph_edited()
        assert_index_fresh(m)
        m.set_output(m.node_by_name("conv"), 0, "c2")
        m.replace_uses("c", "c2")
        assert ix.producer("c") is None and ix.consumers("c2") == [m.node_by_name("bn")]
        assert_index_fresh(m)
        m.replace_uses("a", "n")  # a direct reader and the If's subgraphs
        assert ix.consumer_count("a") == 0
        assert_index_fresh(m)
        added = m.append_node(helper.make_node("Neg", ["s"], ["neg_s"], name="neg"))
        assert ix.producer("neg_s") is added and ix.node("neg") is added
        assert_index_fresh(m)
        m.remove_node(m.node_by_name("drop"))
        m.replace_uses("d", "n")
        assert ix.node("drop") is None
        assert_index_fresh(m)
        t = m.append_initializer(numpy_helper.from_array(np.ones(3, np.float32), "extra"))
        assert m.get_constant("extra").tolist() == [1, 1, 1] and ix.initializer("extra") is t
        assert_index_fresh(m)
        name = m.add_initializer("extra", np.zeros(2, np.float32))
        assert name == "extra_1"
        assert m.unique_name("extra") == "extra_2"
        assert_index_fresh(m)
        g.value_info.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [3]))
        m.set_initializer("extra", np.zeros(5, np.float32))  # drops the stale value info
        assert m.static_shape("extra") == (5,)
        assert_index_fresh(m)
        assert m.remove_value_info("s") and not m.remove_value_info("no-such-tensor")
        assert_index_fresh(m)
        m.replace_constant_input(m.node_by_name("bn"), 1, np.full(4, 2.0, np.float32))
        assert_index_fresh(m)
        m.remove_unused()
        m.topological_sort()
        m.infer_shapes(refresh=True)
        assert_index_fresh(m)


def test_a_removed_node_is_found_without_scanning_and_the_rest_keep_their_order():
    nodes = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"], name=f"n{k}") for k in range(50)]
    m = make_model(nodes, [("t0", [2])], [("t50", [2])])
    with m.indexed() as ix:
        ix.producer("t1")
        for k in range(1, 50, 3):  # remove every third node, rewiring its reader
            node = m.node_by_name(f"n{k}")
            m.remove_node(node)
            m.replace_uses(f"t{k + 1}", f"t{k}")
        assert_index_fresh(m)
        with pytest.raises(ValueError):
            m.remove_node(node)  # already gone
    kept = [n.name for n in m.graph.node]
    assert kept == [f"n{k}" for k in range(50) if k % 3 != 1]


def test_an_edit_that_changes_a_count_behind_the_index_rebuilds_it():
    m = _mixed_model()
    with m.indexed() as ix:
        assert ix.producer("r").name == "relu"
        # direct proto edits (no editing method, no graph_edited): lengths change, the index rebuilds
        m.graph.node.append(helper.make_node("Neg", ["r"], ["q"], name="neg"))
        assert ix.producer("q").name == "neg"
        assert [n.name for n in ix.consumers("r")][-1] == "neg"
        m.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "k"))
        assert m.get_constant("k").tolist() == [1, 1]
        del m.graph.value_info[:]
        assert ix.value_info("c") is None
        m.proto = onnx.ModelProto.FromString(m.proto.SerializeToString())  # a new proto altogether
        assert ix.producer("q") is m.graph.node[len(m.graph.node) - 1]
        assert_index_fresh(m)


def test_checked_mode_catches_an_edit_that_bypasses_the_index(monkeypatch):
    monkeypatch.setattr(graph_index, "CHECK", True)
    m = _mixed_model()
    with m.indexed() as ix:
        assert ix.consumer_count("r") == 2
        m.node_by_name("add").input[1] = "a"  # same counts, different wiring: invisible to the detector
        with pytest.raises(StaleIndexError):
            ix.consumers("r")
        m.graph_edited()
        assert ix.consumer_count("r") == 1
    with pytest.raises(StaleIndexError):
        m2 = _mixed_model()
        with m2.indexed() as ix2:
            ix2.producer("r")
            m2.node_by_name("relu").output[0] = "r2"
            ix2.producer("r2")


def test_outside_a_scope_every_lookup_sees_direct_edits():
    m = _mixed_model()
    assert m.get_constant("w") is not None
    m.graph.initializer[0].name = "w_renamed"  # no count changes, no graph_edited: no cached index to go stale
    assert m.get_constant("w") is None and m.get_constant("w_renamed") is not None
    m.node_by_name("relu").name = "relu2"
    assert m.node_by_name("relu") is None and m.node_by_name("relu2") is not None
    assert m._index is None


def test_the_scope_is_reentrant_and_dropped_at_the_end():
    m = _mixed_model()
    with m.indexed() as outer:
        with m.indexed() as inner:
            assert inner is outer is m.index
        assert m.index is outer
    assert m._index is None and m.index is not m.index


# ------------------------------------------------------------------ a large graph
def _benchmark_builder():
    path = Path(__file__).resolve().parent.parent / "tools" / "large_graph_benchmark.py"
    spec = importlib.util.spec_from_file_location("large_graph_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def _evaluate(model: Model, x: np.ndarray) -> np.ndarray:
    """The benchmark graphs' ops in numpy (onnxruntime takes seconds to build a session this long)."""
    values = {"x": x.astype(np.float64)}
    values.update({t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer})
    for node in model.graph.node:
        ins = [values[i] for i in node.input]
        if node.op_type == "Conv":  # 1x1, no padding
            y = np.einsum("oc,nchw->nohw", ins[1][:, :, 0, 0], ins[0])
            y = y + ins[2].reshape(1, -1, 1, 1) if len(ins) > 2 else y
        elif node.op_type == "BatchNormalization":
            x_, g, b, mean, var = ins
            s = g / np.sqrt(var + 1e-5)
            y = (x_ - mean.reshape(1, -1, 1, 1)) * s.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
        elif node.op_type == "Relu":
            y = np.maximum(ins[0], 0)
        elif node.op_type == "Add":
            y = ins[0] + ins[1]
        else:
            assert node.op_type in ("Identity", "Dropout")
            y = ins[0]
        values[node.output[0]] = y
    return values[model.output_names[0]]


@pytest.mark.parametrize("kind", ["chain", "branchy"])
def test_canonicalize_and_cost_on_a_5000_node_graph(kind, monkeypatch):
    """Linear now, quadratic before (a scan per lookup: minutes at this size). Checked on correctness;
    the times are tools/large_graph_benchmark.py's business."""
    monkeypatch.setattr(graph_index, "CHECK", False)  # checked mode scans per lookup: quadratic by design
    proto = _benchmark_builder()(kind, 5000)
    model = Model.load(proto)
    n = len(model.graph.node)
    report = cost_of(model, runtime_shapes=False)
    assert len(report.layers) == n and not report.unknown_macs
    result = create_pass("canonicalize")(model)
    out = result.model
    ops = op_counts(out)
    blocks = n // (4 if kind == "chain" else 7)
    if kind == "chain":  # Conv → BN → Relu → Identity becomes Conv → Relu
        assert ops == {"Conv": blocks, "Relu": blocks}
    else:  # Conv → BN → Relu → Conv → Dropout → Add → Identity becomes Conv → Relu → Conv → Add
        assert ops == {"Conv": 2 * blocks, "Relu": blocks, "Add": blocks}
    assert result.stats["remove-identity"]["removed_nodes"] == (blocks if kind == "chain" else 2 * blocks)
    assert result.stats["fold-batchnorm"]["folded"] == blocks
    assert out.output_names == model.output_names
    with out.indexed():
        assert_index_fresh(out)
    # exact: the same numbers as the input model
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    ref, got = _evaluate(model, x), _evaluate(out, x)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
