"""The channel-dependency graph (sculpt.ir.channels) and its per-op handlers, on small graphs built here.

For each graph: the expected groups, units (element-level index maps) and frozen flags; then units are
removed with ``ChannelGraph.remove_units`` and the result is checked three ways (DESIGN.md): every
tensor shape shrank exactly where expected (shape inference *and* onnxruntime), the saved model passes
``onnx.checker.check_model(full_check=True)``, and — the consistency check of the mechanism — removing
units whose source weights were first set to zero leaves the outputs unchanged (1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import f32, make_model
from sculpt.runtime import compare_models, make_session, random_inputs
from sculpt.errors import InvalidModelError
from sculpt.ir.channel_handlers import attr
from sculpt.ir.channels import ChannelGraph, Dim
from sculpt.ir.model import Model


# ---------------------------------------------------------------------------------------------- helpers
def conv(name, x, y, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name, **attrs)


def node(op, inputs, outputs, name, **attrs):
    return helper.make_node(op, inputs, outputs, name=name, **attrs)


def build(model: Model) -> ChannelGraph:
    return ChannelGraph.build(model)


def unit(cg: ChannelGraph, tensor: str, axis: int, index: int) -> int:
    return int(cg.unit_labels(cg.dim(tensor, axis))[index])


def units_of(cg: ChannelGraph, tensor: str, axis: int) -> list[int]:
    return cg.unit_labels(cg.dim(tensor, axis)).tolist()


def group(cg: ChannelGraph, tensor: str, axis: int = 1):
    return cg.group_of(Dim(tensor, axis))


def frozen(cg: ChannelGraph, tensor: str, axis: int = 1) -> bool:
    """True when no channel of this dimension can be removed."""
    return all(u in cg._frozen_units for u in units_of(cg, tensor, axis))


def sources(g) -> set[str]:
    return {s.node for s in g.sources}


def consumers(g) -> set[str]:
    return {c.node for c in g.consumers}


def zero_units(model: Model, cg: ChannelGraph, units, *, channelwise: bool = True) -> Model:
    """A copy of ``model`` in which the given units are zero wherever they are produced: the source
    weights and biases of their channels, BatchNorm beta and mean, depthwise Conv biases and the
    channels of constants added to them (only the sources' when ``channelwise`` is false)."""
    units = set(units)
    out = model.clone()
    for s in cg.sources:
        chans = [i for i, u in enumerate(cg.unit_labels(s.dim).tolist()) if u in units]
        if not chans:
            continue
        n = out.node_by_name(s.node)
        w = out.get_constant(n.input[1]).copy()
        if n.op_type == "Conv" or (n.op_type == "Gemm" and attr(n, "transB", 0)):
            w[chans] = 0
        else:  # ConvTranspose [Cin, Cout, ...], Gemm [K, N], MatMul [K, N]
            w[:, chans] = 0
        out.replace_constant_input(n, 1, w, suffix="zeroed")
        if len(n.input) > 2 and n.input[2]:
            b = out.get_constant(n.input[2]).copy()
            if b.ndim and b.shape[-1] > 1:
                b[..., chans] = 0
                out.replace_constant_input(n, 2, b, suffix="zeroed")
    source_nodes = {s.node for s in cg.sources}
    for n in list(out.graph.node) if channelwise else []:
        d = Dim(n.output[0], 1)
        if d not in cg.sizes:
            continue
        chans = [i for i, u in enumerate(cg.unit_labels(d).tolist()) if u in units]
        if not chans:
            continue
        if n.op_type == "BatchNormalization":
            for i in (2, 3):  # beta, mean
                v = out.get_constant(n.input[i]).copy()
                v[chans] = 0
                out.replace_constant_input(n, i, v, suffix="zeroed")
        elif n.op_type == "Conv" and n.name not in source_nodes and len(n.input) > 2 and n.input[2]:
            v = out.get_constant(n.input[2]).copy()  # a depthwise Conv's bias
            v[chans] = 0
            out.replace_constant_input(n, 2, v, suffix="zeroed")
        elif n.op_type in ("Add", "Sub"):  # a per-channel constant added
            rank = len(cg.shapes[n.output[0]])
            for i, t in enumerate(n.input):
                v = out.get_constant(t) if t in cg.constants else None
                if v is not None and v.ndim >= rank - 1 and v.shape[1 - (rank - v.ndim)] > 1:
                    v = v.copy()
                    np.moveaxis(v, 1 - (rank - v.ndim), 0)[chans] = 0
                    out.replace_constant_input(n, i, v, suffix="zeroed")
    return out


def ort_shapes(model: Model, feeds) -> dict[str, tuple]:
    names = sorted({o for n in model.graph.node for o in n.output if o})
    sess = make_session(model, extra_outputs=names)
    return {k: v.shape for k, v in zip(names, sess.run(names, feeds))}


def check_removal(model: Model, remove: list[tuple[str, int, int]], tmp_path, *, expect: dict | None = None):
    """Remove the units holding the channels ``(tensor, axis, index)`` and check the mechanism.

    ``expect``: {tensor: shape} that must hold after removal (onnxruntime and shape inference); every
    other tensor must keep its shape unless its dimension was reported as changed."""
    cg = build(model.clone())
    units = sorted({unit(cg, t, a, i) for t, a, i in remove})
    zeroed = zero_units(model, cg, units)
    pruned = zeroed.clone()
    cg2 = build(pruned)
    units2 = sorted({unit(cg2, t, a, i) for t, a, i in remove})
    assert len(units2) == len(units)
    before_shapes = dict(cg2.shapes)
    kept = cg2.remove_units(units2)
    assert kept, "nothing changed"
    # every changed dimension: its new size, and the removed channels are exactly those of the units
    expected_shape = {}
    for t, shape in before_shapes.items():
        if t in pruned.constant_names() or t in zeroed.constant_names():
            continue
        new = list(shape)
        for ax in range(len(shape)):
            d = Dim(t, ax)
            if d in kept:
                new[ax] = len(kept[d])
                removed = set(np.setdiff1d(np.arange(shape[ax]), kept[d]).tolist())
                lab = cg.unit_labels(cg.dim(t, ax)).tolist()
                assert removed == {i for i, u in enumerate(lab) if u in units}, d
        expected_shape[t] = tuple(new)
    for t, shape in (expect or {}).items():
        assert expected_shape[t] == tuple(shape), (t, expected_shape[t], shape)
    # shapes by shape inference and by onnxruntime
    feeds = random_inputs(pruned, seed=0)
    got = ort_shapes(pruned, feeds)
    for t, shape in expected_shape.items():
        if t in got:
            assert got[t] == shape, (t, got[t], shape)
        s = pruned.static_shape(t)
        if s is not None:
            assert s == shape, (t, s, shape)
    # the full checker on the saved file
    path = tmp_path / "pruned.onnx"
    pruned.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    pruned.verify()
    # exactness: the removed channels were zero, so nothing changes
    cmp = compare_models(zeroed, pruned, [random_inputs(zeroed, seed=s) for s in range(3)])
    assert cmp.within(1e-5, 1e-6), cmp.as_dict()
    # and the zeroing was not a no-op: the original model differs (the units carried signal)
    return pruned, kept


# ---------------------------------------------------------------------------------------------- graphs
def residual_model():
    """x → conv1 → BN → Relu → Add ← conv2 ← x; Add → conv3 → y."""
    nodes = [
        conv("conv1", "x", "c1", "w1", "b1", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], "bn"),
        node("Relu", ["bn"], ["r"], "relu"),
        conv("conv2", "x", "c2", "w2", "b2"),
        node("Add", ["r", "c2"], ["s"], "add"),
        conv("conv3", "s", "y", "w3", "b3"),
    ]
    inits = {"w1": f32(8, 3, 3, 3), "b1": f32(8), "g": f32(8, low=0.5, high=1.5), "beta": f32(8), "mean": f32(8),
             "var": f32(8, low=0.5, high=2), "w2": f32(8, 3, 1, 1), "b2": f32(8), "w3": f32(4, 8, 1, 1),
             "b3": f32(4)}
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits)


def test_residual_add_is_one_group_with_both_convs_as_sources(tmp_path):
    m = residual_model()
    cg = build(m.clone())
    g = group(cg, "s")
    assert {str(d) for d in g.dims} >= {"c1[1]", "bn[1]", "r[1]", "c2[1]", "s[1]"}
    assert sources(g) == {"conv1", "conv2"}
    assert consumers(g) == {"conv3"}
    assert g.size == 8 and len(g.prunable_units) == 8 and not g.frozen_reasons
    for k in range(8):  # channel k is the same unit in every member
        assert len({unit(cg, t, 1, k) for t in ("c1", "bn", "r", "c2", "s")}) == 1
    assert len(set(units_of(cg, "s", 1))) == 8
    # the graph input's channels and the graph output's channels are frozen
    assert frozen(cg, "x") and frozen(cg, "y")
    assert group(cg, "y").frozen_reasons
    assert g in cg.prunable_groups() and group(cg, "y") not in cg.prunable_groups()
    pruned, kept = check_removal(m, [("c1", 1, 1), ("s", 1, 5)], tmp_path,
                                 expect={"c1": (1, 6, 6, 6), "c2": (1, 6, 6, 6), "s": (1, 6, 6, 6),
                                         "y": (1, 4, 6, 6)})
    assert pruned.get_constant(pruned.node_by_name("conv3").input[1]).shape == (4, 6, 1, 1)
    bn = pruned.node_by_name("bn")
    assert all(pruned.get_constant(t).shape == (6,) for t in bn.input[1:])


def test_removal_of_live_channels_changes_outputs():
    """The exactness check can fail: removing channels that are not zero changes the outputs."""
    m = residual_model()
    pruned = m.clone()
    cg = build(pruned)
    cg.remove_units([unit(cg, "s", 1, 2)])
    cmp = compare_models(m, pruned, [random_inputs(m, seed=0)])
    assert not cmp.within(1e-3, 1e-4)


def test_frozen_units_and_emptying_a_dimension_are_refused():
    m = residual_model()
    cg = build(m.clone())
    with pytest.raises(InvalidModelError, match="frozen"):
        cg.remove_units([unit(cg, "y", 1, 0)])
    with pytest.raises(InvalidModelError, match="none"):
        cg.remove_units(sorted(set(units_of(cg, "s", 1))))


def concat_model():
    nodes = [conv("ca", "x", "a", "wa", "ba"), conv("cb", "x", "b", "wb", "bb", pads=[1, 1, 1, 1]),
             node("Concat", ["a", "b"], ["c"], "cat", axis=1), node("Relu", ["c"], ["r"], "relu"),
             conv("cc", "r", "y", "wc")]
    inits = {"wa": f32(4, 3, 1, 1), "ba": f32(4), "wb": f32(6, 3, 3, 3), "bb": f32(6), "wc": f32(5, 10, 1, 1)}
    return make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 5, 5, 5])], inits)


def test_concat_offsets(tmp_path):
    m = concat_model()
    cg = build(m.clone())
    g = group(cg, "c")
    assert sources(g) == {"ca", "cb"} and consumers(g) == {"cc"}
    assert g.size == 10 and len(g.prunable_units) == 10
    for k in range(4):
        assert unit(cg, "a", 1, k) == unit(cg, "c", 1, k) == unit(cg, "r", 1, k)
    for k in range(6):  # input 2, channel k is output channel 4 + k
        assert unit(cg, "b", 1, k) == unit(cg, "c", 1, 4 + k)
    assert len(set(units_of(cg, "c", 1))) == 10
    check_removal(m, [("a", 1, 0), ("b", 1, 2), ("b", 1, 5)], tmp_path,
                  expect={"a": (1, 3, 5, 5), "b": (1, 4, 5, 5), "c": (1, 7, 5, 5), "y": (1, 5, 5, 5)})


def test_concat_on_spatial_axis_ties_channels(tmp_path):
    nodes = [conv("ca", "x", "a", "wa"), conv("cb", "x", "b", "wb"),
             node("Concat", ["a", "b"], ["c"], "cat", axis=2), conv("cc", "c", "y", "wc")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 8, 4])],
                   {"wa": f32(5, 3, 1, 1), "wb": f32(5, 3, 1, 1), "wc": f32(2, 5, 1, 1)})
    cg = build(m.clone())
    g = group(cg, "c")
    assert sources(g) == {"ca", "cb"} and g.size == 5
    assert units_of(cg, "a", 1) == units_of(cg, "b", 1) == units_of(cg, "c", 1)
    check_removal(m, [("c", 1, 3)], tmp_path, expect={"c": (1, 4, 8, 4), "a": (1, 4, 4, 4)})


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_offsets(opset, tmp_path):
    if opset >= 13:
        split = node("Split", ["t", "sizes"], ["s1", "s2"], "split", axis=1)
        extra = {"sizes": np.array([4, 6], dtype=np.int64)}
    else:
        split = node("Split", ["t"], ["s1", "s2"], "split", axis=1, split=[4, 6])
        extra = {}
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             split, conv("c1", "s1", "y1", "w1"), conv("c2", "s2", "y2", "w2")]
    nodes[2].input[0] = "r"
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y1", [1, 2, 4, 4]), ("y2", [1, 3, 4, 4])],
                   {"w0": f32(10, 3, 1, 1), "b0": f32(10), "w1": f32(2, 4, 1, 1), "w2": f32(3, 6, 1, 1), **extra},
                   opset=opset)
    cg = build(m.clone())
    g = group(cg, "t")
    assert sources(g) == {"c0"} and consumers(g) == {"c1", "c2"} and g.size == 10
    for k in range(6):
        assert unit(cg, "s2", 1, k) == unit(cg, "t", 1, 4 + k)
    for k in range(4):
        assert unit(cg, "s1", 1, k) == unit(cg, "t", 1, k)
    pruned, _ = check_removal(m, [("t", 1, 1), ("t", 1, 6), ("t", 1, 7)], tmp_path,
                              expect={"t": (1, 7, 4, 4), "s1": (1, 3, 4, 4), "s2": (1, 4, 4, 4)})
    sp = pruned.node_by_name("split")
    sizes = attr(sp, "split") if opset < 13 else pruned.get_constant(sp.input[1]).tolist()
    assert list(sizes) == [3, 4]


def test_split_evenly_opset18_num_outputs(tmp_path):
    nodes = [conv("c0", "x", "t", "w0"), node("Split", ["t"], ["s1", "s2"], "split", axis=1, num_outputs=2),
             node("Add", ["s1", "s2"], ["a"], "add"), conv("c1", "a", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])],
                   {"w0": f32(8, 3, 1, 1), "w1": f32(2, 4, 1, 1)}, opset=18)
    cg = build(m.clone())
    # s1[k] + s2[k]: channel k and channel 4 + k of t are the same unit
    for k in range(4):
        assert unit(cg, "t", 1, k) == unit(cg, "t", 1, 4 + k)
    assert group(cg, "t").size == 4
    pruned, _ = check_removal(m, [("a", 1, 1)], tmp_path, expect={"t": (1, 6, 4, 4), "a": (1, 3, 4, 4)})
    assert pruned.get_constant(pruned.node_by_name("split").input[1]).tolist() == [3, 3]


@pytest.mark.parametrize("opset,index_type", [(9, None), (13, np.int64), (13, np.int32)])
def test_slice_on_channel_axis(opset, index_type, tmp_path):
    if opset < 10:
        sl = node("Slice", ["t"], ["s"], "slice", starts=[2], ends=[7], axes=[1])
        extra = {}
    else:
        sl = node("Slice", ["t", "st", "en", "ax"], ["s"], "slice")
        extra = {"st": np.array([2], index_type), "en": np.array([7], index_type), "ax": np.array([1], index_type)}
    nodes = [conv("c0", "x", "t", "w0", "b0"), sl, conv("c1", "s", "y1", "w1"), conv("c2", "t", "y2", "w2")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y1", [1, 2, 4, 4]), ("y2", [1, 2, 4, 4])],
                   {"w0": f32(10, 3, 1, 1), "b0": f32(10), "w1": f32(2, 5, 1, 1), "w2": f32(2, 10, 1, 1), **extra},
                   opset=opset, ir_version=8 if opset >= 13 else 4)
    cg = build(m.clone())
    for k in range(5):
        assert unit(cg, "s", 1, k) == unit(cg, "t", 1, 2 + k)
    g = group(cg, "t")
    assert g.size == 10 and consumers(g) == {"c1", "c2"}
    # channels 0, 3 and 8 go: the slice [2, 7) loses only channel 3
    pruned, _ = check_removal(m, [("t", 1, 0), ("t", 1, 3), ("t", 1, 8)], tmp_path,
                              expect={"t": (1, 7, 4, 4), "s": (1, 4, 4, 4)})


def test_slice_with_step_freezes_channel_axis():
    nodes = [conv("c0", "x", "t", "w0"),
             node("Slice", ["t", "st", "en", "ax", "sp"], ["s"], "slice"), conv("c1", "s", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])],
                   {"w0": f32(8, 3, 1, 1), "w1": f32(2, 4, 1, 1), "st": np.array([0], np.int64),
                    "en": np.array([8], np.int64), "ax": np.array([1], np.int64), "sp": np.array([2], np.int64)})
    cg = build(m.clone())
    assert frozen(cg, "t") and frozen(cg, "s")
    assert any("step" in r for r in group(cg, "t").frozen_reasons)


def test_depthwise_conv_ties_input_and_output(tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             conv("dw", "r", "d", "wd", "bd", group=8, pads=[1, 1, 1, 1]), node("Relu", ["d"], ["e"], "relu2"),
             conv("c1", "e", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5])],
                   {"w0": f32(8, 3, 1, 1), "b0": f32(8), "wd": f32(8, 1, 3, 3), "bd": np.zeros(8, np.float32),
                    "w1": f32(4, 8, 1, 1)})
    cg = build(m.clone())
    g = group(cg, "t")
    assert {str(d) for d in g.dims} >= {"t[1]", "r[1]", "d[1]", "e[1]"}
    assert sources(g) == {"c0"} and consumers(g) == {"c1"}  # the depthwise conv is neither
    assert units_of(cg, "t", 1) == units_of(cg, "d", 1)
    pruned, _ = check_removal(m, [("d", 1, 0), ("d", 1, 6)], tmp_path, expect={"d": (1, 6, 5, 5)})
    dw = pruned.node_by_name("dw")
    assert attr(dw, "group") == 6 and pruned.get_constant(dw.input[1]).shape == (6, 1, 3, 3)
    assert pruned.get_constant(dw.input[2]).shape == (6,)


def test_conv_with_dynamic_weights_freezes():
    nodes = [conv("c0", "x", "t", "w0"), node("Relu", ["x2"], ["w"], "wrelu"), conv("c1", "t", "y", "w")]
    m = make_model(nodes, [("x", [1, 3, 4, 4]), ("x2", [2, 4, 1, 1])], [("y", [1, 2, 4, 4])], {"w0": f32(4, 3, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t")
    assert any("non-constant weights" in r for r in group(cg, "t").frozen_reasons)


@pytest.mark.parametrize("op,target", [("Flatten", None), ("Reshape", [1, 36]), ("Reshape", [1, -1]),
                                       ("Reshape", [0, -1])])
def test_flatten_or_reshape_into_gemm_repeats_channels(op, target, tmp_path):
    extra = {}
    if op == "Flatten":
        fl = node("Flatten", ["r"], ["f"], "flat", axis=1)
    else:
        fl = node("Reshape", ["r", "shape"], ["f"], "flat")
        extra = {"shape": np.array(target, np.int64)}
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"), fl,
             node("Gemm", ["f", "wg", "bg"], ["y"], "fc", transB=1)]
    m = make_model(nodes, [("x", [1, 3, 3, 3])], [("y", [1, 5])],
                   {"w0": f32(4, 3, 1, 1), "b0": f32(4), "wg": f32(5, 36), "bg": f32(5), **extra})
    cg = build(m.clone())
    g = group(cg, "t")
    assert sources(g) == {"c0"} and consumers(g) == {"fc"} and g.size == 4
    for j in range(36):  # flat index j belongs to channel j // (H*W)
        assert unit(cg, "f", 1, j) == unit(cg, "t", 1, j // 9)
    edges = cg.edges_of("flat")
    assert any(kind == "repeat" and args == (9,) for _, _, kind, args in edges)
    pruned, _ = check_removal(m, [("t", 1, 2)], tmp_path, expect={"f": (1, 27), "t": (1, 3, 3, 3)})
    fc = pruned.node_by_name("fc")
    assert pruned.get_constant(fc.input[1]).shape == (5, 27)


def test_gemm_without_transb_and_a_second_gemm(tmp_path):
    nodes = [node("Gemm", ["x", "w1", "b1"], ["h"], "fc1"), node("Relu", ["h"], ["r"], "relu"),
             node("Gemm", ["r", "w2", "b2"], ["y"], "fc2", transB=1)]
    m = make_model(nodes, [("x", [2, 6])], [("y", [2, 3])],
                   {"w1": f32(6, 8), "b1": f32(8), "w2": f32(3, 8), "b2": f32(3)})
    cg = build(m.clone())
    g = group(cg, "h")
    assert sources(g) == {"fc1"} and consumers(g) == {"fc2"} and g.size == 8
    pruned, _ = check_removal(m, [("h", 1, 0), ("h", 1, 7)], tmp_path, expect={"h": (2, 6)})
    assert pruned.get_constant(pruned.node_by_name("fc1").input[1]).shape == (6, 6)
    assert pruned.get_constant(pruned.node_by_name("fc2").input[1]).shape == (3, 6)


def test_reshape_that_splits_an_axis_keeps_the_prefix(tmp_path):
    """(1, 4, 3, 3) → (1, 4, 9): the channel axis is a common prefix and ties; spatial axes merge."""
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Reshape", ["t", "shape"], ["f"], "reshape"),
             node("Transpose", ["f"], ["ft"], "tr", perm=[0, 2, 1]), node("MatMul", ["ft", "wm"], ["y"], "mm")]
    m = make_model(nodes, [("x", [1, 3, 3, 3])], [("y", [1, 9, 2])],
                   {"w0": f32(4, 3, 1, 1), "b0": f32(4), "shape": np.array([1, 4, 9], np.int64), "wm": f32(4, 2)})
    cg = build(m.clone())
    g = group(cg, "t")
    assert sources(g) == {"c0"} and consumers(g) == {"mm"}
    assert units_of(cg, "t", 1) == units_of(cg, "f", 1) == units_of(cg, "ft", 2)
    pruned, _ = check_removal(m, [("t", 1, 1)], tmp_path, expect={"f": (1, 3, 9), "ft": (1, 9, 3)})
    assert pruned.get_constant(pruned.node_by_name("reshape").input[1]).tolist() == [1, 3, 9]


def test_reshape_with_computed_shape_freezes():
    nodes = [conv("c0", "x", "t", "w0"), node("Shape", ["t"], ["sh"], "shape"),
             node("Reshape", ["t", "sh"], ["f"], "reshape"), conv("c1", "f", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 3, 3])], [("y", [1, 2, 3, 3])], {"w0": f32(4, 3, 1, 1), "w1": f32(2, 4, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t")


def test_transpose_then_matmul(tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Transpose", ["t"], ["tt"], "tr", perm=[0, 2, 3, 1]),
             node("MatMul", ["tt", "wm"], ["mm"], "mm"), node("Relu", ["mm"], ["r"], "relu"),
             node("MatMul", ["r", "wm2"], ["m2"], "mm2"), node("Transpose", ["m2"], ["y"], "tr2", perm=[0, 3, 1, 2])]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])],
                   {"w0": f32(6, 3, 1, 1), "b0": f32(6), "wm": f32(6, 5), "wm2": f32(5, 3)})
    cg = build(m.clone())
    g = group(cg, "t")
    assert units_of(cg, "t", 1) == units_of(cg, "tt", 3)
    assert sources(g) == {"c0"} and consumers(g) == {"mm"}
    g2 = group(cg, "mm", 3)
    assert sources(g2) == {"mm"} and consumers(g2) == {"mm2"} and g2.size == 5 and g2.prunable
    assert frozen(cg, "m2", 3)  # reaches the graph output through the Transpose
    pruned, _ = check_removal(m, [("t", 1, 4), ("mm", 3, 0)], tmp_path,
                              expect={"t": (1, 5, 4, 4), "tt": (1, 4, 4, 5), "mm": (1, 4, 4, 4)})
    assert pruned.get_constant(pruned.node_by_name("mm").input[1]).shape == (5, 4)
    assert pruned.get_constant(pruned.node_by_name("mm2").input[1]).shape == (4, 3)


def se_model():
    """conv0 → Relu → [GlobalAveragePool → conv1 → Relu → conv2 → HardSigmoid] → Mul → conv3."""
    nodes = [conv("conv0", "x", "a", "w0", "b0", pads=[1, 1, 1, 1]), node("Relu", ["a"], ["r"], "relu"),
             node("GlobalAveragePool", ["r"], ["p"], "gap"), conv("se1", "p", "q", "w1", "b1"),
             node("Relu", ["q"], ["qr"], "se_relu"), conv("se2", "qr", "s", "w2", "b2"),
             node("HardSigmoid", ["s"], ["h"], "hsig", alpha=0.2, beta=0.5), node("Mul", ["r", "h"], ["m"], "mul"),
             conv("conv3", "m", "y", "w3", "b3")]
    inits = {"w0": f32(8, 3, 3, 3), "b0": f32(8), "w1": f32(3, 8, 1, 1), "b1": f32(3), "w2": f32(8, 3, 1, 1),
             "b2": f32(8), "w3": f32(4, 8, 1, 1), "b3": f32(4)}
    return make_model(nodes, [("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])], inits)


def test_squeeze_and_excitation(tmp_path):
    m = se_model()
    cg = build(m.clone())
    g = group(cg, "a")
    assert {str(d) for d in g.dims} >= {"a[1]", "r[1]", "p[1]", "s[1]", "h[1]", "m[1]"}
    assert sources(g) == {"conv0", "se2"} and consumers(g) == {"se1", "conv3"}
    assert g.size == 8 and len(g.prunable_units) == 8
    for k in range(8):
        assert len({unit(cg, t, 1, k) for t in ("a", "p", "s", "h", "m")}) == 1
    inner = group(cg, "q")
    assert sources(inner) == {"se1"} and consumers(inner) == {"se2"} and inner.size == 3
    assert inner.id != g.id
    pruned, _ = check_removal(m, [("m", 1, 2), ("m", 1, 3), ("q", 1, 1)], tmp_path,
                              expect={"a": (1, 6, 6, 6), "p": (1, 6, 1, 1), "q": (1, 2, 1, 1), "m": (1, 6, 6, 6)})
    assert pruned.get_constant(pruned.node_by_name("se1").input[1]).shape == (2, 6, 1, 1)
    assert pruned.get_constant(pruned.node_by_name("se2").input[1]).shape == (6, 2, 1, 1)


@pytest.mark.parametrize("mode", ["scales", "sizes"])
def test_resize(mode, tmp_path):
    if mode == "scales":
        rs = node("Resize", ["t", "", "scales"], ["u"], "resize", mode="nearest")
        extra = {"scales": np.array([1, 1, 2, 2], np.float32)}
    else:
        rs = node("Resize", ["t", "", "", "sizes"], ["u"], "resize", mode="nearest")
        extra = {"sizes": np.array([1, 6, 8, 8], np.int64)}
    nodes = [conv("c0", "x", "t", "w0", "b0"), rs, conv("c1", "u", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 8, 8])],
                   {"w0": f32(6, 3, 1, 1), "b0": f32(6), "w1": f32(2, 6, 1, 1), **extra})
    cg = build(m.clone())
    assert units_of(cg, "t", 1) == units_of(cg, "u", 1)
    assert group(cg, "u").prunable
    pruned, _ = check_removal(m, [("u", 1, 5)], tmp_path, expect={"u": (1, 5, 8, 8)})
    if mode == "sizes":
        assert pruned.get_constant(pruned.node_by_name("resize").input[3]).tolist() == [1, 5, 8, 8]


def test_pad_spatial_ties_channels_and_pad_on_channels_freezes(tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Pad", ["t", "pads"], ["p"], "pad"), conv("c1", "p", "y", "w1")]
    inits = {"w0": f32(6, 3, 1, 1), "b0": f32(6), "w1": f32(2, 6, 1, 1),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 6, 6])], inits)
    cg = build(m.clone())
    assert units_of(cg, "t", 1) == units_of(cg, "p", 1) and group(cg, "t").prunable
    check_removal(m, [("p", 1, 0)], tmp_path, expect={"p": (1, 5, 6, 6)})
    inits2 = dict(inits, pads=np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), w1=f32(2, 8, 1, 1))
    m2 = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], inits2)
    cg2 = build(m2.clone())
    assert frozen(cg2, "t") and frozen(cg2, "p")
    # pads +1 / -1 on the channel axis: same size, but channel k of p is channel k - 1 of t
    inits3 = dict(inits, pads=np.array([0, 1, 0, 0, 0, -1, 0, 0], np.int64))
    m3 = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])], inits3)
    cg3 = build(m3.clone())
    assert frozen(cg3, "t") and frozen(cg3, "p")


def test_matmul_constant_weight_vs_two_dynamic_operands(tmp_path):
    nodes = [node("MatMul", ["x", "w1"], ["a"], "mm1"), node("Relu", ["a"], ["r"], "relu"),
             node("MatMul", ["r", "w2"], ["y"], "mm2")]
    m = make_model(nodes, [("x", [1, 5, 6])], [("y", [1, 5, 3])], {"w1": f32(6, 8), "w2": f32(8, 3)})
    cg = build(m.clone())
    g = group(cg, "a", 2)
    assert sources(g) == {"mm1"} and consumers(g) == {"mm2"} and g.size == 8 and g.prunable
    pruned, _ = check_removal(m, [("a", 2, 3)], tmp_path, expect={"a": (1, 5, 7)})
    assert pruned.get_constant(pruned.node_by_name("mm1").input[1]).shape == (6, 7)
    # attention-like: both operands dynamic → frozen
    nodes = [node("MatMul", ["x", "w1"], ["a"], "mm1"), node("Transpose", ["a"], ["at"], "tr", perm=[0, 2, 1]),
             node("MatMul", ["a", "at"], ["s"], "att"), node("MatMul", ["s", "a"], ["y"], "mix")]
    m2 = make_model(nodes, [("x", [1, 5, 6])], [("y", [1, 5, 8])], {"w1": f32(6, 8)})
    cg2 = build(m2.clone())
    assert frozen(cg2, "a", 2)
    assert any("two dynamic operands" in r for r in group(cg2, "a", 2).frozen_reasons)


@pytest.mark.parametrize("kind", ["custom", "topk"])
def test_unknown_op_freezes_its_groups(kind):
    if kind == "custom":
        mid = helper.make_node("Mystery", ["r"], ["u"], name="mystery", domain="com.example")
    else:
        mid = node("TopK", ["r", "k"], ["u", "idx"], "topk", axis=1)
    nodes = [conv("c0", "x", "t", "w0"), node("Relu", ["t"], ["r"], "relu"), mid,
             conv("c1", "t", "y", "w1"), conv("c2", "x", "t2", "w2"), node("Relu", ["t2"], ["r2"], "relu2"),
             conv("c3", "r2", "y2", "w3")]
    inits = {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1), "w2": f32(4, 3, 1, 1), "w3": f32(2, 4, 1, 1),
             "k": np.array([3], np.int64)}
    outs = [("y", [1, 2, 4, 4]), ("y2", [1, 2, 4, 4])]
    if kind == "custom":
        outs.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, None))
    else:
        outs.append(("u", [1, 3, 4, 4]))
    m = make_model(nodes, [("x", [1, 3, 4, 4])], outs, inits)
    if kind == "custom":
        m.proto.opset_import.append(helper.make_opsetid("com.example", 1))
    cg = build(m.clone())
    # the op's input group is frozen, with the op named in the reason; the untouched group is not
    assert frozen(cg, "t")
    g = group(cg, "t")
    assert g.frozen_reasons and not g.prunable
    if kind == "topk":
        assert cg.unknown_ops == {"topk": "TopK"}
        assert any("TopK" in r for r in g.frozen_reasons)
    g2 = group(cg, "t2")
    assert g2.prunable and not g2.frozen_reasons
    with pytest.raises(InvalidModelError):
        cg.remove_units([unit(cg, "t", 1, 0)])


def test_graph_output_on_a_pruned_tensor_is_frozen():
    nodes = [conv("c0", "x", "t", "w0"), node("Relu", ["t"], ["r"], "relu"), conv("c1", "r", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4]), ("r", [1, 6, 4, 4])],
                   {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t") and not group(cg, "t").prunable
    assert any("graph output" in r for r in group(cg, "t").frozen_reasons)
    assert cg.prunable_groups() == []


def test_graph_input_feeding_an_add_freezes_the_group():
    nodes = [conv("c0", "x", "t", "w0"), node("Add", ["t", "z"], ["s"], "add"), conv("c1", "s", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4]), ("z", [1, 6, 4, 4])], [("y", [1, 2, 4, 4])],
                   {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t")
    assert any("graph input" in r for r in group(cg, "t").frozen_reasons)


def test_broadcast_constant_in_elementwise_is_sliced(tmp_path):
    nodes = [conv("c0", "x", "t", "w0"), node("Mul", ["t", "scale"], ["s"], "mul"),
             node("Add", ["s", "shift"], ["a"], "add"), conv("c1", "a", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])],
                   {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1), "scale": f32(1, 6, 1, 1),
                    "shift": np.zeros((6, 1, 1), np.float32)})
    cg = build(m.clone())
    assert group(cg, "t").prunable and units_of(cg, "t", 1) == units_of(cg, "a", 1)
    pruned, _ = check_removal(m, [("a", 1, 4)], tmp_path, expect={"a": (1, 5, 4, 4)})
    assert pruned.get_constant(pruned.node_by_name("mul").input[1]).shape == (1, 5, 1, 1)
    assert pruned.get_constant(pruned.node_by_name("add").input[1]).shape == (5, 1, 1)


def test_conv_transpose_source_and_consumer(tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             node("ConvTranspose", ["r", "wt", "bt"], ["u"], "up", strides=[2, 2]),
             node("Relu", ["u"], ["ur"], "relu2"), conv("c1", "ur", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 9, 9])],
                   {"w0": f32(6, 3, 1, 1), "b0": f32(6), "wt": f32(6, 5, 3, 3), "bt": f32(5), "w1": f32(2, 5, 1, 1)})
    cg = build(m.clone())
    assert sources(group(cg, "t")) == {"c0"} and consumers(group(cg, "t")) == {"up"}
    assert sources(group(cg, "u")) == {"up"} and consumers(group(cg, "u")) == {"c1"}
    pruned, _ = check_removal(m, [("t", 1, 0), ("u", 1, 2)], tmp_path, expect={"t": (1, 5, 4, 4), "u": (1, 4, 9, 9)})
    assert pruned.get_constant(pruned.node_by_name("up").input[1]).shape == (5, 4, 3, 3)


def test_summary_lists_groups_with_sources():
    cg = build(se_model())
    rows = cg.summary()
    by_src = {tuple(r["sources"]): r for r in rows}
    assert by_src[("conv0", "se2")]["channels"] == 8 and by_src[("conv0", "se2")]["prunable_channels"] == 8
    assert by_src[("se1",)]["channels"] == 3
    assert by_src[("conv3",)]["prunable_channels"] == 0 and by_src[("conv3",)]["frozen"]


# ---------------------------------------------------------------------------------------------- grouped convs
def test_grouped_conv_ties_channel_i_of_every_group(tmp_path):
    """group=2, 8 → 6 channels: input channel i and 4 + i are one unit, output channel j and 3 + j
    too, so that both groups lose the same channels and the Conv stays valid."""
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Relu", ["t"], ["r"], "relu"),
             conv("gc", "r", "g", "wg", "bg", group=2, pads=[1] * 4), node("Relu", ["g"], ["gr"], "relu2"),
             conv("c1", "gr", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])],
                   {"w0": f32(8, 3, 1, 1), "b0": f32(8), "wg": f32(6, 4, 3, 3), "bg": f32(6), "w1": f32(2, 6, 1, 1)})
    cg = build(m.clone())
    g_in, g_out = group(cg, "r"), group(cg, "g")
    assert g_in.size == 4 and len(g_in.prunable_units) == 4
    assert units_of(cg, "r", 1)[:4] == units_of(cg, "r", 1)[4:]
    assert units_of(cg, "g", 1)[:3] == units_of(cg, "g", 1)[3:]
    assert {c.node for c in g_in.partial_consumers} == {"gc"} and "gc" not in consumers(g_in)
    assert sources(g_out) == {"gc"} and consumers(g_out) == {"c1"} and g_out.size == 3
    assert any(kind == "period" and args == (4,) for _, _, kind, args in cg.edges_of("gc"))
    pruned, _ = check_removal(m, [("r", 1, 1), ("g", 1, 2)], tmp_path,
                              expect={"r": (1, 6, 5, 5), "g": (1, 4, 5, 5)})
    gc = pruned.node_by_name("gc")
    assert attr(gc, "group") == 2 and pruned.get_constant(gc.input[1]).shape == (4, 3, 3, 3)
    w = pruned.get_constant(gc.input[1])
    w0 = m.get_constant("wg")
    assert np.array_equal(w, w0[[0, 1, 3, 4]][:, [0, 2, 3]])  # input index 1 left both groups


def test_depthwise_with_channel_multiplier_repeats(tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), conv("dw", "t", "d", "wd", "bd", group=4, pads=[1] * 4),
             node("Relu", ["d"], ["e"], "relu"), conv("c1", "e", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])],
                   {"w0": f32(4, 3, 1, 1), "b0": f32(4), "wd": f32(8, 1, 3, 3), "bd": np.zeros(8, np.float32),
                    "w1": f32(2, 8, 1, 1)})
    cg = build(m.clone())
    for j in range(8):  # output channel j comes from input channel j // 2
        assert unit(cg, "d", 1, j) == unit(cg, "t", 1, j // 2)
    assert group(cg, "t").size == 4 and sources(group(cg, "t")) == {"c0"}
    pruned, _ = check_removal(m, [("t", 1, 2)], tmp_path, expect={"t": (1, 3, 5, 5), "d": (1, 6, 5, 5)})
    dw = pruned.node_by_name("dw")
    assert attr(dw, "group") == 3 and pruned.get_constant(dw.input[1]).shape == (6, 1, 3, 3)


def test_grouped_conv_transpose_freezes():
    nodes = [conv("c0", "x", "t", "w0"), node("ConvTranspose", ["t", "wt"], ["u"], "up", group=2, strides=[2, 2]),
             conv("c1", "u", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 9, 9])],
                   {"w0": f32(4, 3, 1, 1), "wt": f32(4, 3, 3, 3), "w1": f32(2, 6, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t") and frozen(cg, "u")
    assert any("ConvTranspose" in r for r in group(cg, "t").frozen_reasons)


def shuffle_model(groups=2, per=3):
    """ShuffleNet: grouped 1×1 → channel shuffle (Reshape, Transpose, Reshape) → depthwise → grouped 1×1."""
    c = groups * per
    nodes = [conv("g1", "x", "a", "w1", "b1", group=groups), node("Relu", ["a"], ["r"], "relu"),
             node("Reshape", ["r", "s5"], ["r5"], "split_groups"), node("Transpose", ["r5"], ["t5"], "swap",
                                                                        perm=[0, 2, 1, 3, 4]),
             node("Reshape", ["t5", "s4"], ["sh"], "merge_groups"),
             conv("dw", "sh", "d", "wd", "bd", group=c, pads=[1] * 4),
             conv("g2", "d", "y", "w2", "b2", group=groups)]
    inits = {"w1": f32(c, 4 // groups, 1, 1), "b1": f32(c), "s5": np.array([1, groups, per, 5, 5], np.int64),
             "s4": np.array([1, c, 5, 5], np.int64), "wd": f32(c, 1, 3, 3), "bd": np.zeros(c, np.float32),
             "w2": f32(4, c // groups, 1, 1), "b2": f32(4)}
    return make_model(nodes, [("x", [1, 4, 5, 5])], [("y", [1, 4, 5, 5])], inits)


def test_channel_shuffle(tmp_path):
    m = shuffle_model(groups=2, per=4)
    cg = build(m.clone())
    # a[g*4 + j] is r5[g, j] is t5[j, g] is sh[j*2 + g]; the group axis of size 2 is frozen
    for g in range(2):
        for j in range(4):
            assert unit(cg, "a", 1, g * 4 + j) == unit(cg, "r5", 2, j) == unit(cg, "t5", 1, j) \
                == unit(cg, "sh", 1, j * 2 + g)
    assert frozen(cg, "r5", 1) and frozen(cg, "t5", 2)
    # sh feeds g2 (2 groups of 4): sh[i] ≡ sh[i + 4], which with the shuffle ties j to j + 2: two
    # units of four channels of a each: {0, 2, 4, 6} and {1, 3, 5, 7}
    g = group(cg, "a")
    assert sources(g) == {"g1"} and g.prunable and g.size == 2
    assert units_of(cg, "a", 1) == [unit(cg, "a", 1, 0), unit(cg, "a", 1, 1)] * 4
    n_keep = 4
    pruned, _ = check_removal(m, [("a", 1, 0)], tmp_path,
                              expect={"a": (1, n_keep, 5, 5), "r5": (1, 2, n_keep // 2, 5, 5),
                                      "sh": (1, n_keep, 5, 5)})
    assert pruned.get_constant(pruned.node_by_name("split_groups").input[1]).tolist() == [1, 2, n_keep // 2, 5, 5]
    assert pruned.get_constant(pruned.node_by_name("merge_groups").input[1]).tolist() == [1, n_keep, 5, 5]


def test_reshape_split_of_a_dense_channel_axis(tmp_path):
    """(1, 8, 4) → (1, 2, 4, 4) → Transpose → MatMul over the split axis: the larger part carries."""
    nodes = [node("MatMul", ["x", "w1"], ["h"], "mm1"), node("Transpose", ["h"], ["ht"], "tr", perm=[0, 2, 1]),
             node("Reshape", ["ht", "shape"], ["hr"], "heads"), node("Relu", ["hr"], ["rr"], "relu"),
             node("Reshape", ["rr", "back"], ["hb"], "merge"), node("Transpose", ["hb"], ["hbt"], "tr2", perm=[0, 2, 1]),
             node("MatMul", ["hbt", "w2"], ["y"], "mm2")]
    m = make_model(nodes, [("x", [1, 4, 6])], [("y", [1, 4, 3])],
                   {"w1": f32(6, 8), "w2": f32(8, 3), "shape": np.array([1, 2, 4, 4], np.int64),
                    "back": np.array([1, 8, 4], np.int64)})
    cg = build(m.clone())
    # ht[1] (8) splits into hr[1] (2, frozen) and hr[2] (4, carries): h channel k ≡ hr[2][k % 4]
    for k in range(8):
        assert unit(cg, "h", 2, k) == unit(cg, "hr", 2, k % 4)
    assert frozen(cg, "hr", 1)
    assert group(cg, "h", 2).size == 4
    check_removal(m, [("h", 2, 1)], tmp_path, expect={"h": (1, 4, 6), "hr": (1, 2, 3, 4), "hb": (1, 6, 4)})


@pytest.mark.parametrize("padded_axis", [2, 1])
def test_pad_opset18_with_axes_input(padded_axis, tmp_path):
    nodes = [conv("c0", "x", "t", "w0", "b0"), node("Pad", ["t", "pads", "", "axes"], ["p"], "pad"),
             conv("c1", "p", "y", "w1")]
    cin = 6 + 2 * (padded_axis == 1)
    hw = 4 + 2 * (padded_axis == 2)
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, hw, 4])],
                   {"w0": f32(6, 3, 1, 1), "b0": f32(6), "w1": f32(2, cin, 1, 1), "pads": np.array([1, 1], np.int64),
                    "axes": np.array([padded_axis], np.int64)}, opset=18)
    cg = build(m.clone())
    if padded_axis == 1:
        assert frozen(cg, "t") and frozen(cg, "p")
    else:
        assert units_of(cg, "t", 1) == units_of(cg, "p", 1) and group(cg, "t").prunable
        check_removal(m, [("t", 1, 3)], tmp_path, expect={"p": (1, 5, 6, 4)})


def test_resize_scaling_the_channel_axis_freezes():
    nodes = [conv("c0", "x", "t", "w0"), node("Resize", ["t", "", "scales"], ["u"], "resize", mode="nearest"),
             conv("c1", "u", "y", "w1")]
    m = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", [1, 2, 4, 4])],
                   {"w0": f32(3, 3, 1, 1), "w1": f32(2, 6, 1, 1), "scales": np.array([1, 2, 1, 1], np.float32)})
    cg = build(m.clone())
    assert frozen(cg, "t") and frozen(cg, "u")


# ---------------------------------------------------------------------------------------------- feasible()
def test_feasible_keeps_every_concat_input_alive():
    m = concat_model()
    cg = build(m.clone())
    a_units = units_of(cg, "a", 1)
    b_units = units_of(cg, "b", 1)
    wanted = a_units + b_units[:2]  # all of input a first: the last one of a must stay
    ok = cg.feasible(wanted, min_keep=1)
    assert ok == a_units[:3] + b_units[:2]
    assert cg.feasible(wanted, min_keep=2) == a_units[:2] + b_units[:2]
    cg.remove_units(ok)  # and the mechanism accepts it
    assert cg.model.static_shape("a")[1] == 1 and cg.model.static_shape("c")[1] == 5


# ---------------------------------------------------------------------------------------------- negative cases
def test_dynamic_shapes_freeze_everything():
    nodes = [conv("c0", "x", "t", "w0"), node("Relu", ["t"], ["r"], "relu"), conv("c1", "r", "y", "w1")]
    m = make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", ["N", 2, "H", "W"])],
                   {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1)})
    cg = build(m.clone())
    assert cg.prunable_groups() == []
    assert Dim("t", 1) not in cg.sizes  # no shape, no dimension to prune


def test_subgraph_reading_a_tensor_freezes_it(tmp_path):
    then_g = helper.make_graph([node("Relu", ["t"], ["o1"], "inner_relu")], "then", [],
                               [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [1, 6, 4, 4])])
    else_g = helper.make_graph([node("Neg", ["t"], ["o2"], "inner_neg")], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1, 6, 4, 4])])
    nodes = [conv("c0", "x", "t", "w0"), node("Relu", ["t"], ["r"], "relu"), conv("c1", "r", "y", "w1"),
             conv("c2", "x", "t2", "w2"), node("Relu", ["t2"], ["r2"], "relu2"), conv("c3", "r2", "y2", "w3"),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [("x", [1, 3, 4, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [("y", [1, 2, 4, 4]), ("y2", [1, 2, 4, 4]), ("z", [1, 6, 4, 4])],
                   {"w0": f32(6, 3, 1, 1), "w1": f32(2, 6, 1, 1), "w2": f32(5, 3, 1, 1), "w3": f32(2, 5, 1, 1)})
    cg = build(m.clone())
    assert frozen(cg, "t") and not group(cg, "t").prunable
    assert group(cg, "t2").prunable
    check_removal(m, [("t2", 1, 0)], tmp_path, expect={"t2": (1, 4, 4, 4)})


def test_external_data_model_round_trip(tmp_path):
    """A model whose weights live in an external file: channels removed, saved with external data,
    loaded back, checked and run."""
    nodes = [conv("c0", "x", "t", "w0", "b0", pads=[1] * 4), node("Relu", ["t"], ["r"], "relu"),
             conv("c1", "r", "y", "w1", pads=[1] * 4)]
    m = make_model(nodes, [("x", [1, 8, 6, 6])], [("y", [1, 4, 6, 6])],
                   {"w0": f32(16, 8, 3, 3), "b0": f32(16), "w1": f32(4, 16, 3, 3)})  # > 1 kB: stored outside
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    m.save(src, external_data=True)
    assert (src.parent / "model.onnx.data").exists()
    loaded = Model.load(src)
    cg = build(loaded)
    cg.remove_units([unit(cg, "t", 1, 3)])
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    loaded.save(out, external_data=True)
    onnx.checker.check_model(str(out), full_check=True)
    back = Model.load(out)
    assert (out.parent / "pruned.onnx.data").exists()
    assert back.get_constant(back.node_by_name("c1").input[1]).shape == (4, 15, 3, 3)
    sess = make_session(back)
    assert sess.run(None, random_inputs(back, seed=0))[0].shape == (1, 4, 6, 6)
