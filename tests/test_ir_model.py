"""Tests of sculpt.ir.model (the Model wrapper) and sculpt.runtime (the onnxruntime reference).

Everything runs for real: models are written to disk, read back, and executed in onnxruntime.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.runtime import (compare_models, make_session, output_error, random_inputs, run)
from sculpt.errors import InvalidModelError, ModelLoadError, SculptError, ShapeError
from sculpt.examples import tiny_convnet
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, ppocr_model, ppocr_model_path

CLS_SHAPE = {"x": PPOCR_SHAPES["cls"]}


# ------------------------------------------------------------------------------------------- helpers
def make_model(nodes, inputs, outputs, initializers=(), opset=13, value_info=(), **kw) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers),
                              value_info=list(value_info))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    proto.ir_version = 8
    return proto


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def chain_model() -> Model:
    """x -> Add(w) -> a -> Relu -> b -> Mul(w) -> y, with w an initializer read twice."""
    w = numpy_helper.from_array(np.array([1.0, -2.0, 3.0, 0.5], dtype=np.float32), "w")
    nodes = [
        helper.make_node("Add", ["x", "w"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Mul", ["b", "w"], ["y"], name="mul"),
    ]
    return Model(make_model(nodes, [f32("x", [1, 4])], [f32("y", [1, 4])], [w]))


def ort_run(proto: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def cls_input(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(CLS_SHAPE["x"]).astype(np.float32)}


def one_line_naming(err: BaseException, what: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    assert what in text, f"{what!r} not in {text!r}"


# ------------------------------------------------------------------------------------------- loading
def test_load_from_path_bytes_proto_and_model_agree():
    path = ppocr_model_path("cls")
    from_path = Model.load(path)
    from_str = Model.load(str(path))
    from_bytes = Model.load(path.read_bytes())
    from_proto = Model.load(onnx.load(str(path)))
    from_model = Model.load(from_path)
    assert from_path.source_path == os.path.realpath(path)
    assert from_bytes.source_path is None and from_proto.source_path is None
    digests = {m.sha256() for m in (from_path, from_str, from_bytes, from_proto, from_model)}
    assert len(digests) == 1
    assert from_path.input_names == ["x"]
    assert from_path.output_names == ["save_infer_model/scale_0.tmp_1"]
    assert from_path.opset == 11
    assert all(n.name for n in from_path.graph.node)


def test_load_from_proto_and_model_are_independent_copies():
    proto = chain_model().proto
    m = Model.load(proto)
    m.set_initializer("w", np.zeros(4, np.float32))
    m.graph.node[0].name = "changed"
    assert numpy_helper.to_array(proto.graph.initializer[0]).tolist() == [1.0, -2.0, 3.0, 0.5]
    assert proto.graph.node[0].name == "add"

    clone = Model.load(m)
    clone.set_initializer("w", np.ones(4, np.float32))
    del clone.graph.node[1:]
    assert m.get_constant("w").tolist() == [0, 0, 0, 0]
    assert len(m.graph.node) == 3
    assert clone is not m and clone.proto is not m.proto


def test_load_rejects_other_python_types():
    with pytest.raises(ModelLoadError, match="int"):
        Model.load(42)
    with pytest.raises(TypeError):
        Model(onnx.GraphProto())


def _bad_files(tmp_path):
    real = ppocr_model_path("cls").read_bytes()
    tensor = numpy_helper.from_array(np.arange(12, dtype=np.int64).reshape(3, 4), "t")
    return {
        "empty.onnx": b"",
        "truncated.onnx": real[: len(real) // 2],
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "text.onnx": b"this is not a model\n" * 20,
        "tensor.onnx": tensor.SerializeToString(),
        "graph.onnx": onnx.load_from_string(real).graph.SerializeToString(),
    }


@pytest.mark.parametrize("name", ["empty.onnx", "truncated.onnx", "random.onnx", "text.onnx", "tensor.onnx",
                                  "graph.onnx"])
def test_load_errors_name_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_bad_files(tmp_path)[name])
    with pytest.raises(ModelLoadError) as info:
        Model.load(path)
    one_line_naming(info.value, str(path))
    # the same bytes given directly fail the same way
    with pytest.raises(ModelLoadError) as info:
        Model.load(path.read_bytes())
    assert "\n" not in str(info.value)


def test_load_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError) as info:
        Model.load(missing)
    one_line_naming(info.value, str(missing))
    with pytest.raises(ModelLoadError) as info:
        Model.load(tmp_path)
    one_line_naming(info.value, str(tmp_path))


def _absurd_initializer_model() -> onnx.ModelProto:
    big = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[2**20, 2**20])  # 2^40 elements, no data
    nodes = [helper.make_node("Add", ["x", "huge"], ["y"], name="add")]
    return make_model(nodes, [f32("x", [1])], [f32("y", None)], [big])


def test_absurd_initializer_shape_is_rejected_without_allocating(tmp_path):
    proto = _absurd_initializer_model()
    path = tmp_path / "huge.onnx"
    path.write_bytes(proto.SerializeToString())
    tracemalloc.start()
    try:
        for source in (path, path.read_bytes(), proto):
            with pytest.raises(ModelLoadError) as info:
                Model.load(source)
            assert "huge" in str(info.value) and "\n" not in str(info.value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"loading a hostile model allocated {peak} bytes"
    with pytest.raises(ModelLoadError) as info:
        Model.load(path)
    assert str(path) in str(info.value)


def test_absurd_constant_node_shape_is_rejected():
    big = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[2**30, 2**12])
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=big),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    with pytest.raises(ModelLoadError, match="const"):
        Model.load(make_model(nodes, [f32("x", [1])], [f32("y", None)]).SerializeToString())


def test_initializer_whose_data_does_not_match_its_shape_is_rejected():
    bad = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[10], raw_data=b"\0" * 8)
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    with pytest.raises(ModelLoadError, match="'w'.*10 elements"):
        Model.load(make_model(nodes, [f32("x", [10])], [f32("y", [10])], [bad]))
    empty = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3])  # dims without any data
    with pytest.raises(ModelLoadError, match="'w'"):
        Model.load(make_model(nodes, [f32("x", [3])], [f32("y", [3])], [empty]))
    # typed-field data of the right length is fine
    ok = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    assert Model.load(make_model(nodes, [f32("x", [3])], [f32("y", [3])], [ok])).get_constant("w").tolist() == [1, 2, 3]


def test_unique_node_names_assigned_on_load():
    nodes = [
        helper.make_node("Relu", ["x"], ["t0"], name=""),
        helper.make_node("Relu", ["t0"], ["t1"], name="a"),
        helper.make_node("Relu", ["t1"], ["t2"], name="a"),
        helper.make_node("Relu", ["t2"], ["t3"], name="a_0"),
        helper.make_node("Relu", ["t3"], ["t4"], name=""),
        helper.make_node("Relu", ["t4"], ["y"], name="Relu_0"),
    ]
    m = Model.load(make_model(nodes, [f32("x", [2])], [f32("y", [2])]).SerializeToString())
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and all(names)
    # nodes that had a unique name keep it; only the empty and the second 'a' are renamed
    assert names[1] == "a" and names[3] == "a_0" and names[5] == "Relu_0"
    assert names[2] not in ("a", "a_0") and names[2].startswith("a_")
    assert names[0].startswith("Relu") and names[4].startswith("Relu")
    m.verify()


# ------------------------------------------------------------------------------------------- saving
def test_save_is_atomic_and_round_trips(tmp_path):
    m = tiny_convnet()
    out = m.save(tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert Model.load(out).sha256() == m.sha256()
    onnx.checker.check_model(str(out), full_check=True)


def test_save_into_missing_folder_fails_cleanly(tmp_path):
    m = chain_model()
    with pytest.raises(SculptError) as info:
        m.save(tmp_path / "missing" / "out.onnx")
    assert "missing" in str(info.value)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SculptError):
        m.save(tmp_path / "missing" / "out.onnx", external_data=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("external", [False, True])
def test_save_failure_midway_leaves_no_temp_files_and_keeps_old_file(tmp_path, monkeypatch, external):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if external:
        monkeypatch.setattr(onnx, "save_model", boom)
    else:
        monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(ModelLoadError, match="No space left"):
        tiny_convnet().save(target, external_data=external)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert target.read_bytes() == b"old contents"


def test_save_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "model.onnx"
    shutil.copy(ppocr_model_path("cls"), src)
    before = src.read_bytes()
    m = Model.load(src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    for spelling in (src, str(src), tmp_path / "." / "model.onnx", link):
        with pytest.raises(ModelLoadError, match="overwrite"):
            m.save(spelling)
    with pytest.raises(ModelLoadError):
        m.clone().save(src)  # a clone remembers where it came from
    assert src.read_bytes() == before
    m.graph.doc_string = "edited"
    m.save(src, overwrite_input=True)
    assert Model.load(src).graph.doc_string == "edited"
    # another path is fine, and a model built in memory has no input to protect
    m.save(tmp_path / "other.onnx")
    Model.load(src.read_bytes()).save(src)
    assert sorted(os.listdir(tmp_path)) == ["link.onnx", "model.onnx", "other.onnx"]


def test_save_with_external_data_round_trips(tmp_path):
    m = tiny_convnet()
    path = m.save(tmp_path / "m.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert os.path.getsize(path) < m.byte_size() / 2  # the weights went to the data file
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    back = Model.load(path)
    a, b = m.initializer_map(), back.initializer_map()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(numpy_helper.to_array(a[name]), numpy_helper.to_array(b[name]))
    x = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    np.testing.assert_array_equal(run(m, x)["probs"], run(back, x)["probs"])
    onnx.checker.check_model(str(path), full_check=True)
    # a model whose tensors are all small needs no data file, and saving still works
    small = chain_model()
    small.save(tmp_path / "small.onnx", external_data=True)
    assert Model.load(tmp_path / "small.onnx").sha256() == small.sha256()
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_missing_external_data_file_is_a_load_error(tmp_path):
    path = tiny_convnet().save(tmp_path / "m.onnx", external_data=True)
    os.unlink(tmp_path / "m.onnx.data")
    with pytest.raises(ModelLoadError) as info:
        Model.load(path)
    one_line_naming(info.value, str(path))


# ------------------------------------------------------------------------------------------- graphsurgeon
def test_graphsurgeon_round_trip_keeps_outputs():
    m = ppocr_model("cls")
    back = Model.from_graphsurgeon(m.to_graphsurgeon())
    back.verify()
    feeds = cls_input()
    ref, got = ort_run(m.proto, feeds), ort_run(back.proto, feeds)
    assert len(ref) == len(got) == 1 and ref[0].shape == (1, 2)
    np.testing.assert_array_equal(ref[0], got[0])
    assert back.opset == m.opset


def test_graphsurgeon_round_trip_keeps_model_metadata_and_custom_domains():
    rec = ppocr_model("rec")
    characters = {p.key: p.value for p in rec.proto.metadata_props}["character"]
    back = Model.from_graphsurgeon(rec.to_graphsurgeon())
    assert {p.key: p.value for p in back.proto.metadata_props}.get("character") == characters

    proto = chain_model().proto
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    graph = Model(proto).to_graphsurgeon()
    graph.nodes.append(__import__("onnx_graphsurgeon").Node(op="Custom", domain="com.example",
                                                              inputs=[graph.outputs[0]], outputs=[]))
    m = Model.from_graphsurgeon(graph, opset=14)
    domains = {o.domain: o.version for o in m.proto.opset_import}
    assert domains[""] == 14 and domains["com.example"] == 1


# ------------------------------------------------------------------------------------------- shapes
def test_fix_input_shapes_makes_the_model_static():
    m = ppocr_model("cls")
    assert set(m.dynamic_inputs()) == {"x"}
    m.fix_input_shapes(CLS_SHAPE)
    assert m.input_shapes() == {"x": [1, 3, 48, 192]}
    assert m.dynamic_inputs() == {}
    m.require_static_inputs()
    # the output declared [-1, 2]: the invalid -1 becomes unknown, the rank and the 2 stay
    assert m.tensor_shape("save_infer_model/scale_0.tmp_1") == [None, 2]
    m.infer_shapes()
    assert m.tensor_shape("save_infer_model/scale_0.tmp_1")[1] == 2
    m.verify()
    assert run(m, cls_input())["save_infer_model/scale_0.tmp_1"].shape == (1, 2)


@pytest.mark.parametrize("shapes, words", [
    ({"y": [1, 3, 48, 192]}, ["'y'", "x"]),          # unknown input
    ({"x": [1, 3, 48]}, ["'x'", "rank 4"]),           # wrong rank
    ({"x": [1, 4, 48, 192]}, ["'x'", "fixed to 3"]),  # conflicts with the model's static dim
    ({"x": [1, 3, 0, 192]}, ["'x'", "positive"]),     # zero
    ({"x": [1, 3, -48, 192]}, ["'x'", "positive"]),   # negative
    ({"x": ["?", 3, 48, 192]}, ["'x'", "integers"]),  # neither a number nor a name
    ({"x": "1,3,48,192"}, ["'x'", "integers"]),       # a string, not a list
    ({"x": [1, 3, 2**20, 2**20]}, ["'x'", "large"]),  # absurd
])
def test_fix_input_shapes_errors_name_the_input(shapes, words):
    m = ppocr_model("cls")
    with pytest.raises(ShapeError) as info:
        m.fix_input_shapes(shapes)
    for w in words:
        assert w in str(info.value)
    assert "\n" not in str(info.value)


def test_fix_input_shapes_checks_dims_of_inputs_without_shape_info():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [f32("y", None)])
    m = Model(proto)
    assert "x" in m.dynamic_inputs()
    with pytest.raises(ShapeError, match="'x'.*positive"):
        m.fix_input_shapes({"x": [2, 0]})
    m.fix_input_shapes({"x": [2, 5]})
    assert m.input_shapes() == {"x": [2, 5]} and m.dynamic_inputs() == {}


def test_dynamic_inputs_and_require_static_inputs_name_the_input():
    m = ppocr_model("det")
    assert list(m.dynamic_inputs()) == ["x"]
    with pytest.raises(ShapeError) as info:
        m.require_static_inputs("the TVM import")
    one_line_naming(info.value, "'x'")
    assert "the TVM import" in str(info.value) and "--input-shape x=" in str(info.value)


def test_scalar_input_is_static():
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"], name="mul")]
    m = Model(make_model(nodes, [f32("x", [2, 3]), f32("s", [])], [f32("y", [2, 3])]))
    assert m.dynamic_inputs() == {}
    m.require_static_inputs()
    feeds = random_inputs(m, seed=0)
    assert feeds["s"].shape == () and feeds["x"].shape == (2, 3)


# ------------------------------------------------------------------------------------------- verify
@pytest.mark.parametrize("kind", ["det", "rec", "cls"])
def test_verify_passes_on_real_models(kind):
    ppocr_model(kind).verify()


def test_verify_passes_on_the_example():
    tiny_convnet().verify()


def _broken(edit):
    m = chain_model()
    m.verify()
    edit(m)
    return m


@pytest.mark.parametrize("edit, words", [
    (lambda m: setattr(m.graph.node[1], "name", "add"), ["duplicate node name", "'add'"]),
    (lambda m: m.graph.node[1].input.__setitem__(0, "ghost"), ["'relu'", "'ghost'"]),
    (lambda m: _swap(m, 0, 1), ["'relu'", "'a'"]),
    (lambda m: m.graph.node[1].output.__setitem__(0, "a"), ["'a'", "produced twice"]),
    (lambda m: m.graph.output.append(f32("nowhere", [1])), ["'nowhere'", "not produced"]),
])
def test_verify_detects_broken_invariants(edit, words):
    m = _broken(edit)
    with pytest.raises(InvalidModelError) as info:
        m.verify()
    for w in words:
        assert w in str(info.value)
    assert "\n" not in str(info.value)


def _swap(m: Model, i: int, j: int) -> None:
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in m.graph.node]
    nodes[i], nodes[j] = nodes[j], nodes[i]
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def test_verify_reports_checker_failures():
    m = chain_model()
    m.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(InvalidModelError, match="NoSuchOp"):
        m.verify()


# ------------------------------------------------------------------------------------------- topological order
def test_topological_sort_repairs_a_shuffled_real_graph():
    m = ppocr_model("cls")
    ref = ort_run(m.proto, cls_input())[0]
    order = list(np.random.default_rng(1).permutation(len(m.graph.node)))
    shuffled = [onnx.NodeProto.FromString(m.graph.node[int(i)].SerializeToString()) for i in order]
    del m.graph.node[:]
    m.graph.node.extend(shuffled)
    with pytest.raises(InvalidModelError, match="topological order"):
        m.verify()
    m.topological_sort()
    m.verify()
    np.testing.assert_array_equal(ort_run(m.proto, cls_input())[0], ref)


def test_topological_sort_keeps_a_valid_order():
    m = ppocr_model("cls")
    before = [n.name for n in m.graph.node]
    nodes_before = list(m.graph.node)
    m.topological_sort()
    assert [n.name for n in m.graph.node] == before
    assert all(a is b for a, b in zip(nodes_before, m.graph.node))  # untouched, not rebuilt


def test_topological_sort_detects_a_cycle_and_a_missing_tensor():
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="n1"),
             helper.make_node("Relu", ["a"], ["c"], name="n2"),
             helper.make_node("Relu", ["a"], ["y"], name="n3")]
    m = Model(make_model(nodes, [f32("x", [1])], [f32("y", [1])]))
    with pytest.raises(InvalidModelError, match="cycle"):
        m.topological_sort()
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="reader")]
    m = Model(make_model(nodes, [f32("x", [1])], [f32("y", [1])]))
    with pytest.raises(InvalidModelError, match="'reader'.*'ghost'"):
        m.topological_sort()


def _if_model(outer_name: str) -> Model:
    """An If node whose branches read ``outer_name`` from the enclosing graph."""
    then_g = helper.make_graph([helper.make_node("Identity", [outer_name], ["t"], name="then_id")], "then", [],
                               [f32("t", [1])])
    else_g = helper.make_graph([helper.make_node("Neg", [outer_name], ["e"], name="else_neg")], "else", [],
                               [f32("e", [1])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["x"], ["r"], name="relu")]
    return Model(make_model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), f32("x", [1])],
                            [f32("y", [1])]))


def test_topological_sort_follows_subgraph_reads():
    m = _if_model("r")  # the If (first) reads r inside its branches, produced by the Relu after it
    with pytest.raises(InvalidModelError):
        m.verify()
    m.topological_sort()
    assert [n.name for n in m.graph.node] == ["relu", "if"]
    m.verify()
    out = run(m, {"cond": np.array(False), "x": np.array([2.0], np.float32)})
    assert out["y"].tolist() == [-2.0]
    missing = _if_model("ghost")
    with pytest.raises(InvalidModelError, match="'if'.*'ghost'.*nothing produces"):
        missing.topological_sort()


# ------------------------------------------------------------------------------------------- opset
def test_upgrade_opset_keeps_cls_outputs():
    m = ppocr_model("cls")
    assert m.opset == 11
    up = m.clone().upgrade_opset(13)
    assert up.opset == 13
    up.verify()
    names = [n.name for n in up.graph.node]
    assert len(set(names)) == len(names) and all(names)
    for seed in range(2):
        feeds = cls_input(seed)
        np.testing.assert_allclose(ort_run(up.proto, feeds)[0], ort_run(m.proto, feeds)[0], rtol=1e-6, atol=1e-7)
    assert up.clone().upgrade_opset(12).opset == 13  # never downgrades


def test_upgrade_opset_keeps_metadata():
    rec = ppocr_model("rec")
    up = rec.clone().upgrade_opset(13)
    assert {p.key for p in up.proto.metadata_props} == {"character"}
    assert up.proto.producer_name == rec.proto.producer_name


# ------------------------------------------------------------------------------------------- edits
def test_remove_unused():
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    dead_w = numpy_helper.from_array(np.ones(2, np.float32), "dead_w")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"], name="live"),
             helper.make_node("Mul", ["x", "dead_w"], ["d1"], name="dead1"),
             helper.make_node("Relu", ["d1"], ["d2"], name="dead2"),
             helper.make_node("Relu", ["a"], ["y"], name="out")]
    vi = [f32("d1", [2]), f32("a", [2])]
    m = Model(make_model(nodes, [f32("x", [2])], [f32("y", [2])], [w, dead_w], value_info=vi))
    assert m.remove_unused() == 2
    assert [n.name for n in m.graph.node] == ["live", "out"]
    assert [t.name for t in m.graph.initializer] == ["w"]
    assert [v.name for v in m.graph.value_info] == ["a"]
    assert m.remove_unused() == 0
    m.verify()
    assert run(m, {"x": np.array([1.0, -3.0], np.float32)})["y"].tolist() == [2.0, 0.0]


def test_remove_unused_keeps_what_subgraphs_read():
    m = _if_model("r")
    m.topological_sort()
    assert m.remove_unused() == 0
    assert [n.name for n in m.graph.node] == ["relu", "if"]


def test_replace_uses_reaches_subgraphs_but_respects_shadowing():
    m = _if_model("r")
    m.topological_sort()
    m.graph.node.insert(1, helper.make_node("Abs", ["x"], ["r2"], name="abs"))
    m.replace_uses("r", "r2")
    assert m.graph.node[2].attribute[0].g.node[0].input[0] == "r2"
    assert m.graph.node[2].attribute[1].g.node[0].input[0] == "r2"
    m.remove_unused()
    assert [n.name for n in m.graph.node] == ["abs", "if"]
    assert run(m, {"cond": np.array(True), "x": np.array([-2.0], np.float32)})["y"].tolist() == [2.0]

    # a subgraph input with the same name shadows the outer tensor
    body = helper.make_graph([helper.make_node("Identity", ["a"], ["o"], name="inner")], "body",
                             [f32("a", [1])], [f32("o", [1])])
    node = helper.make_node("Scan", ["x"], ["y"], name="scan", num_scan_inputs=1, body=body)
    outer = helper.make_node("Relu", ["a"], ["b"], name="outer")
    m2 = Model(make_model([outer, node], [f32("a", [1]), f32("x", [3, 1])], [f32("y", None)]))
    m2.replace_uses("a", "z")
    assert m2.graph.node[0].input[0] == "z"
    assert m2.graph.node[1].attribute[0].g.node[0].input[0] == "a"


def test_get_constant_from_initializer_and_constant_nodes():
    nodes = [
        helper.make_node("Constant", [], ["ct"], name="c1",
                         value=numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3))),
        helper.make_node("Constant", [], ["cf"], name="c2", value_float=2.5),
        helper.make_node("Constant", [], ["ci"], name="c3", value_ints=[3, -1]),
        helper.make_node("Add", ["x", "ct"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "cf"], ["b"], name="mul"),
        helper.make_node("Mul", ["b", "defaulted"], ["y"], name="mul2"),
    ]
    inits = [numpy_helper.from_array(np.array([7], np.int64), "init"),
             numpy_helper.from_array(np.ones(3, np.float32), "defaulted")]
    inputs = [f32("x", [2, 3]), f32("defaulted", [3])]  # an initializer that is also an input: overridable
    m = Model(make_model(nodes, inputs, [f32("y", [2, 3])], inits))
    np.testing.assert_array_equal(m.get_constant("ct"), np.arange(6).reshape(2, 3))
    assert m.get_constant("ct").dtype == np.float32
    assert m.get_constant("cf") == np.float32(2.5) and m.get_constant("cf").dtype == np.float32
    assert m.get_constant("ci").tolist() == [3, -1] and m.get_constant("ci").dtype == np.int64
    assert m.get_constant("init").tolist() == [7]
    assert m.get_constant("defaulted") is None
    assert m.get_constant("x") is None and m.get_constant("a") is None and m.get_constant("nothing") is None
    assert m.constant_names() == {"ct", "cf", "ci", "init"}


def test_replace_constant_input_shared_initializer_gets_a_new_name():
    m = chain_model()  # w is read by 'add' and 'mul'
    x = {"x": np.array([[1.0, 2.0, -5.0, 4.0]], np.float32)}
    new = m.replace_constant_input(m.node_by_name("mul"), 1, np.full(4, 2.0, np.float32))
    assert new != "w" and new in m.initializer_map()
    assert m.node_by_name("mul").input[1] == new and m.node_by_name("add").input[1] == "w"
    assert m.get_constant("w").tolist() == [1.0, -2.0, 3.0, 0.5]
    m.verify()
    # y = relu(x + w) * 2
    assert run(m, x)["y"].tolist() == [[4.0, 0.0, 0.0, 9.0]]


def test_replace_constant_input_sole_reader_edits_in_place():
    m = chain_model()
    m.node_by_name("mul").input[1] = m.add_initializer("scale", np.full(4, 3.0, np.float32))
    count = len(m.graph.initializer)
    name = m.replace_constant_input(m.node_by_name("mul"), 1, np.full(4, 0.5, np.float32))
    assert name == "scale" and len(m.graph.initializer) == count
    assert m.get_constant("scale").tolist() == [0.5] * 4
    # an initializer that is also a graph output must keep its value: a new one is made
    m.graph.output.append(f32("scale", [4]))
    other = m.replace_constant_input(m.node_by_name("mul"), 1, np.zeros(4, np.float32))
    assert other != "scale" and m.get_constant("scale").tolist() == [0.5] * 4
    # a missing optional input is appended
    clip = helper.make_node("Clip", ["y"], ["z"], name="clip")
    m.graph.node.append(clip)
    lo = m.replace_constant_input(m.node_by_name("clip"), 1, np.array(0.0, np.float32))
    assert list(m.node_by_name("clip").input) == ["y", lo]


def test_unique_name():
    m = chain_model()
    assert m.unique_name("fresh") == "fresh"
    assert m.unique_name("w") == "w_1"
    m.add_initializer("w_1", np.zeros(1, np.float32))
    assert m.unique_name("w") == "w_2"
    assert m.unique_name("add") == "add_1"  # node names are taken too


# ------------------------------------------------------------------------------------------- onnxruntime reference
def linear_model(weight: np.ndarray) -> Model:
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return Model(make_model(nodes, [f32("x", [2, weight.shape[0]])], [f32("y", [2, weight.shape[1]])], [w]))


def test_compare_identical_models_is_exact():
    m = ppocr_model("cls")
    cmp = compare_models(m, m.clone(), count=2, shapes=CLS_SHAPE)
    assert cmp.samples == 2 and cmp.max_abs == 0.0 and cmp.max_rel == 0.0
    assert [o.name for o in cmp.outputs] == ["save_infer_model/scale_0.tmp_1"]
    assert cmp.within(0.0)


def test_compare_perturbed_weight_gives_the_expected_error():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    w2 = w.copy()
    w2[2, 1] += 0.25
    x = rng.standard_normal((2, 5)).astype(np.float32)
    cmp = compare_models(linear_model(w), linear_model(w2), [{"x": x}])
    ref = x.astype(np.float64) @ w
    expected_abs = np.max(np.abs(x.astype(np.float64) @ w2 - ref))
    assert expected_abs == pytest.approx(0.25 * np.max(np.abs(x[:, 2])), rel=1e-5)
    assert cmp.max_abs == pytest.approx(expected_abs, rel=1e-4)
    assert cmp.max_rel == pytest.approx(expected_abs / np.max(np.abs(ref)), rel=1e-4)
    assert cmp.samples == 1
    assert not cmp.within(1e-6)
    assert cmp.within(cmp.max_rel * 1.01)
    assert cmp.within(0.0, atol=cmp.max_abs)
    d = cmp.as_dict()
    assert d["outputs"][0]["output"] == "y" and d["max_abs"] == cmp.max_abs


def test_compare_random_inputs_are_deterministic_and_accumulate_the_worst_sample():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w2 = w + np.float32(0.01)
    a = compare_models(linear_model(w), linear_model(w2), count=3, seed=5)
    b = compare_models(linear_model(w), linear_model(w2), count=3, seed=5)
    assert a.samples == 3 and a.max_abs == b.max_abs > 0
    worst = max(compare_models(linear_model(w), linear_model(w2), count=1, seed=5 + k).max_abs for k in range(3))
    assert a.max_abs == worst


def test_output_error_nan_and_inf_handling():
    ref = np.array([1.0, np.nan, np.inf, -np.inf, 4.0], np.float32)
    same = output_error("o", ref.copy(), ref)
    assert same.max_abs == 0.0 and same.max_rel == 0.0 and same.shape_match
    nan_new = ref.copy()
    nan_new[0] = np.nan
    e = output_error("o", nan_new, ref)
    assert e.max_abs == np.inf and e.max_rel == np.inf
    nan_gone = ref.copy()
    nan_gone[1] = 0.0
    assert output_error("o", nan_gone, ref).max_abs == np.inf
    inf_flip = ref.copy()
    inf_flip[2] = -np.inf
    assert output_error("o", inf_flip, ref).max_abs == np.inf
    inf_finite = ref.copy()
    inf_finite[3] = 1e30
    assert output_error("o", inf_finite, ref).max_abs == np.inf
    off = ref.copy()
    off[4] = 5.0
    e = output_error("o", off, ref)
    assert e.max_abs == 1.0 and e.max_rel == pytest.approx(1.0 / 4.0)  # scale: largest finite |ref|


def test_output_error_shape_mismatch_and_other_dtypes():
    e = output_error("o", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not e.shape_match and e.max_abs == np.inf
    e = output_error("o", np.array([1, 5, 3], np.int64), np.array([1, 2, 3], np.int64))
    assert e.max_abs == 3.0 and e.max_rel == pytest.approx(1.0)
    e = output_error("o", np.array([True, False]), np.array([True, True]))
    assert e.max_abs == 1.0
    assert output_error("o", np.array([True]), np.array([True])).max_abs == 0.0
    assert output_error("o", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)).max_abs == 0.0
    e = output_error("o", np.array([1e-6], np.float32), np.array([0.0], np.float32))
    assert e.max_abs == pytest.approx(1e-6) and e.max_rel > 1e6  # relative to a zero output: huge


def test_compare_models_reports_shape_mismatch_and_missing_outputs():
    w = np.ones((4, 3), np.float32)
    ref = linear_model(w)
    cand = linear_model(w)
    shape = numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    cand.graph.initializer.append(shape)
    cand.graph.node[0].output[0] = "y0"
    cand.graph.node.append(helper.make_node("Reshape", ["y0", "shape"], ["y"], name="reshape"))
    cand.graph.output[0].CopyFrom(f32("y", [3, 2]))
    cmp = compare_models(ref, cand, count=1)
    assert not cmp.outputs[0].shape_match and not cmp.within(1.0, atol=1e9)

    renamed = linear_model(w)
    renamed.graph.node[0].output[0] = "out"
    renamed.graph.output[0].name = "out"
    cmp = compare_models(ref, renamed, count=1)
    assert not cmp.outputs[0].shape_match
    cmp = compare_models(ref, renamed, count=1, output_map={"y": "out"})
    assert cmp.outputs[0].shape_match and cmp.max_abs == 0.0


def test_random_inputs_need_no_session_and_match_the_session_path():
    m = ppocr_model("cls")
    a = random_inputs(m, seed=7, shapes=CLS_SHAPE)
    b = random_inputs(m, seed=7, shapes=CLS_SHAPE, session=make_session(m))
    assert a.keys() == b.keys() == {"x"}
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["x"].dtype == np.float32 and a["x"].shape == (1, 3, 48, 192)
    with pytest.raises(ShapeError, match="'x'"):
        random_inputs(m, seed=0)
    np_shapes = {"x": [np.int64(d) for d in CLS_SHAPE["x"]]}
    assert random_inputs(m, seed=7, shapes=np_shapes)["x"].shape == (1, 3, 48, 192)
    ints = Model(make_model([helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT, name="c")],
                            [helper.make_tensor_value_info("i", TensorProto.INT64, [3, 4])], [f32("y", [3, 4])]))
    v = random_inputs(ints, seed=0)["i"]
    assert v.dtype == np.int64 and v.min() >= 0 and v.max() < 4


def test_run_with_an_empty_output_list_returns_nothing():
    m = chain_model()
    assert run(m, {"x": np.zeros((1, 4), np.float32)}, outputs=[]) == {}
    assert list(run(m, {"x": np.zeros((1, 4), np.float32)})) == ["y"]


def test_set_initializer_keeps_declarations_consistent():
    m = chain_model()
    m.graph.value_info.append(f32("w", [4]))
    m.graph.input.append(f32("w", [4]))  # an overridable initializer (declared as an input too)
    m.set_initializer("w", np.ones((1, 2), np.float64))
    assert [v.name for v in m.graph.value_info] == []
    assert m.value_infos()["w"].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert m.tensor_shape("w") == [1, 2] and m.get_constant("w") is None  # still overridable
    assert m.initializer_map()["w"].data_type == TensorProto.DOUBLE


def test_infer_shapes_refresh_replaces_stale_shapes():
    m = chain_model()
    m.graph.value_info.append(f32("a", [1, 7]))  # wrong: a is [1, 4]
    m.infer_shapes()
    assert m.tensor_shape("a") == [1, 7]  # plain inference keeps what is recorded
    with pytest.raises(InvalidModelError, match="shape inference"):
        m.infer_shapes(strict=True)
    assert m.tensor_shape("a") == [1, 7]  # a failed inference changes nothing
    m.infer_shapes(refresh=True)
    assert m.tensor_shape("a") == [1, 4] and m.tensor_shape("b") == [1, 4]


def test_load_special_files_and_save_onto_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="regular file"):
        Model.load("/dev/zero")  # would never finish reading
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(ModelLoadError, match="out.onnx"):
        chain_model().save(tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_models_over_the_protobuf_limit_take_the_external_data_paths(tmp_path, monkeypatch):
    """Pretend protobuf's 2 GiB limit is 10 kB so that the >2 GiB code paths run on a small model."""
    import sculpt.ir.model as model_mod

    m = tiny_convnet(batch=1)
    assert m.byte_size() > 10_000
    monkeypatch.setattr(model_mod, "_PROTOBUF_LIMIT", 10_000)
    path = m.save(tmp_path / "big.onnx")  # external data chosen automatically
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    m.verify()
    outputs_before = list(m.output_names)
    digest = m.sha256()
    sess = make_session(m, extra_outputs=["relu1", "probs"])
    assert m.output_names == outputs_before and m.sha256() == digest  # the model was not touched
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    out = run(m, x, session=sess, outputs=["relu1", "probs"])
    assert out["relu1"].shape == (1, 16, 16, 16) and out["probs"].shape == (1, 10)
    monkeypatch.undo()
    back = Model.load(path)
    np.testing.assert_allclose(run(back, x)["probs"], out["probs"], rtol=1e-6)


def test_hostile_tensor_in_an_unnamed_constant_node_is_named_by_its_output():
    big = TensorProto(name="", data_type=TensorProto.FLOAT, dims=[2**40])
    nodes = [helper.make_node("Constant", [], ["big_const"], value=big),
             helper.make_node("Add", ["x", "big_const"], ["y"])]
    with pytest.raises(ModelLoadError, match="big_const"):
        Model.load(make_model(nodes, [f32("x", [1])], [f32("y", None)]))
    neg = TensorProto(name="neg", data_type=TensorProto.FLOAT, dims=[-4])
    with pytest.raises(ModelLoadError, match="'neg'.*negative"):
        Model.load(make_model([helper.make_node("Add", ["x", "neg"], ["y"])], [f32("x", [1])], [f32("y", None)],
                              [neg]))


@pytest.mark.slow
def test_a_real_model_over_2_gib_is_saved_with_external_data_and_runs(tmp_path):
    """No monkeypatching: two 1.1 GB embedding tables (2.2 GB in all, over protobuf's 2 GiB limit).
    save() must choose external data by itself, the file must pass the full checker, load back and
    run in onnxruntime with the same outputs, and a pass must carry it through."""
    from sculpt.passes import create_pass

    rows, width = 1100 * 1000 * 1000 // 4 // 64, 64  # 1.1 GB of float32 per table
    rng = np.random.default_rng(0)
    tables = []
    for k in range(2):
        t = np.empty((rows, width), dtype=np.float32)
        t[:] = np.float32(k + 1)
        t[:1000] = rng.standard_normal((1000, width)).astype(np.float32)
        tables.append(numpy_helper.from_array(t, f"table{k}"))
        del t
    nodes = [helper.make_node("Gather", ["table0", "ids"], ["a"], name="gather0"),
             helper.make_node("Gather", ["table1", "ids"], ["b"], name="gather1"),
             helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
             helper.make_node("Identity", ["sum"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, width])], tables)
    model = Model.wrap(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    del tables, graph
    assert model.byte_size() > 2**31
    ids = {"ids": np.array([0, 3, 999, rows - 1, 17], dtype=np.int64)}
    want = run(model, ids)["y"]
    assert np.allclose(want[3], 3.0) and not np.allclose(want[0], 3.0)
    path = model.save(tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert os.path.getsize(tmp_path / "big.onnx") < 1 << 20
    assert os.path.getsize(tmp_path / "big.onnx.data") > 2**31
    onnx.checker.check_model(str(path), full_check=True)
    del model
    back = Model.load(path)
    np.testing.assert_array_equal(run(back, ids)["y"], want)
    # an exact pass over the >2 GiB model (Identity removed), saved again beside it
    result = create_pass("remove-identity")(back)
    assert result.modified
    (tmp_path / "out").mkdir()
    out = result.model.save(tmp_path / "out" / "big.onnx")
    np.testing.assert_array_equal(run(Model.load(out), ids)["y"], want)


def test_the_former_onnxruntime_module_name_still_works():
    """``sculpt.backends.ort`` (the name README used to show) is the runtime layer under another name."""
    import sculpt.backends.ort as former
    import sculpt.runtime

    for name in former.__all__:
        assert getattr(former, name) is getattr(sculpt.runtime, name)
