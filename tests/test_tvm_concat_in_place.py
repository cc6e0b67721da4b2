"""Concats whose inputs' kernels write their ranges of the output (sculpt.backends.tvm.kernels.
concat_in_place): which concats are placed, and every model matches onnxruntime whether or not."""

from __future__ import annotations

import numpy as np
import pytest

from sculpt.runtime import make_session
from sculpt.backends.tvm import import_to_relax, run_relax
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target
from sculpt.backends.tvm.kernels.concat_in_place import concat_axis, place_concats
from sculpt.backends.tvm.kernels.onnx_cases import _ChainGraph
from sculpt.ir.model import Model


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


def _lowered(proto):
    """The module as memory planning would receive it, without and with the concats placed."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from sculpt.backends.tvm.kernels.pipeline import legalized_and_fused

    target = tvm.target.Target(host_target("llvm"))
    mod = legalized_and_fused(import_to_relax(Model.wrap(proto)), target)
    with target:
        mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target))(mod)
    return mod


def _concat_calls_and_views(mod) -> tuple[int, int]:
    """(kernel calls of a concat, R.memory.view calls) in ``mod``'s main."""
    from tvm import relax, tirx

    concats = views = 0
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call):
                continue
            if getattr(v.op, "name", "") == "relax.memory.view":
                views += 1
            elif isinstance(v.op, relax.GlobalVar) and isinstance(mod[v.op], tirx.PrimFunc) \
                    and concat_axis(mod[v.op]) is not None:
                concats += 1
    return concats, views


def _matches_onnxruntime(proto, cin, hw, seed=1):
    import tvm

    model = Model.wrap(proto)
    x = np.random.default_rng(seed).standard_normal((1, cin, *hw)).astype(np.float32)
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")))
    names = [o.name for o in proto.graph.output]
    got = run_relax(executable, {"x": x}, ["x"])
    ref = make_session(model).run(names, {"x": x})
    assert len(got) == len(ref)
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape, name
        assert float(np.abs(g - r).max()) <= 2e-5 * float(np.abs(r).max()), name


def _fire_model(hw=(27, 27), also_output: bool = False):
    """SqueezeNet's fire module twice: squeeze 1x1 -> (expand 1x1 ++ expand 3x3) -> ..., then a 1x1
    conv reading the second concat (the first feeds the second fire module)."""
    g = _ChainGraph(3)
    x = "x"
    for i in range(2):
        s = g.op("Relu", [g.conv(f"s{i}", x, 32 if i else 16, 16, 1)], f"rs{i}")
        e1 = g.op("Relu", [g.conv(f"e1_{i}", s, 16, 16, 1)], f"re1_{i}")
        e3 = g.op("Relu", [g.conv(f"e3_{i}", s, 16, 16, 3)], f"re3_{i}")
        x = g.op("Concat", [e1, e3], f"fire{i}", axis=1)
    outputs = [g.conv("y", x, 32, 8, 1)] + (["re1_1"] if also_output else [])
    return g.model(16, hw, outputs)


def test_fire_modules_concats_are_written_in_place_and_match_onnxruntime():
    proto = _fire_model()
    before = _concat_calls_and_views(_lowered(proto))
    after = _concat_calls_and_views(place_concats(_lowered(proto)))
    assert before == (2, 0)
    assert after == (0, 4)  # one view per concat input
    _matches_onnxruntime(proto, 16, (27, 27))


def test_a_placed_input_that_is_also_a_graph_output_matches():
    proto = _fire_model(also_output=True)
    assert _concat_calls_and_views(place_concats(_lowered(proto)))[0] == 0
    _matches_onnxruntime(proto, 16, (27, 27))


def _concat_graph(build, cin=16, hw=(9, 10)):
    g = _ChainGraph(5)
    outputs = build(g)
    return g.model(cin, hw, outputs)


def test_a_concat_of_the_graph_input_stays_a_copy_and_matches():
    proto = _concat_graph(lambda g: [g.conv("y", g.op("Concat", ["x", g.conv("a", "x", 16, 16, 3)], "k", axis=1),
                                            32, 8, 1)])
    assert _concat_calls_and_views(place_concats(_lowered(proto))) == (1, 0)
    _matches_onnxruntime(proto, 16, (9, 10))


def test_a_tensor_concatenated_twice_stays_a_copy_and_matches():
    def build(g):
        a = g.op("Relu", [g.conv("a", "x", 16, 16, 3)], "ra")
        return [g.conv("y", g.op("Concat", [a, a], "k", axis=1), 32, 8, 1)]

    proto = _concat_graph(build)
    assert _concat_calls_and_views(place_concats(_lowered(proto))) == (1, 0)
    _matches_onnxruntime(proto, 16, (9, 10))


def test_a_tensor_in_two_concats_is_placed_in_one_and_both_match():
    def build(g):
        a = g.op("Relu", [g.conv("a", "x", 16, 16, 3)], "ra")
        b = g.op("Relu", [g.conv("b", "x", 16, 16, 1)], "rb")
        c = g.op("Relu", [g.conv("c", "x", 16, 16, 1)], "rc")
        k1 = g.op("Concat", [a, b], "k1", axis=1)
        k2 = g.op("Concat", [a, c], "k2", axis=1)
        return [g.conv("y1", k1, 32, 8, 1), g.conv("y2", k2, 32, 8, 1)]

    proto = _concat_graph(build)
    concats, views = _concat_calls_and_views(place_concats(_lowered(proto)))
    assert (concats, views) == (1, 2)
    _matches_onnxruntime(proto, 16, (9, 10))


def test_nested_concats_place_the_inner_one_and_match():
    """DenseNet's growth: each concat reads the previous one, whose storage is already another's."""
    def build(g):
        k = g.op("Concat", [g.conv("a", "x", 16, 16, 3), g.conv("b", "x", 16, 16, 1)], "k1", axis=1)
        k = g.op("Concat", [k, g.op("Relu", [g.conv("c", k, 32, 16, 3)], "rc")], "k2", axis=1)
        return [g.conv("y", k, 48, 8, 1)]

    proto = _concat_graph(build)
    assert _concat_calls_and_views(place_concats(_lowered(proto))) == (1, 2)
    _matches_onnxruntime(proto, 16, (9, 10))


def test_unaligned_and_strided_concats_stay_copies_and_match():
    """NCHW tensors of 3 and 5 channels at 7x7 (the second input would start at byte 588) and a concat
    along the height of 16 channels (each input is 16 separate ranges): no view can hold them."""
    def build(g):
        a = g.op("Relu", [g.conv("a", "x", 3, 3, 3)], "ra")
        b = g.op("Relu", [g.conv("b", "x", 3, 5, 3)], "rb")
        h = g.op("Concat", [g.op("Relu", [g.conv("c", "x", 3, 16, 3)], "rc"),
                            g.op("Relu", [g.conv("d", "x", 3, 16, 1)], "rd")], "kh", axis=2)
        return [g.op("Concat", [a, b], "k", axis=1), h]

    proto = _concat_graph(build, cin=3, hw=(7, 7))
    concats, views = _concat_calls_and_views(place_concats(_lowered(proto)))
    assert views == 0 and concats == 2
    _matches_onnxruntime(proto, 3, (7, 7))


def test_concat_axis_recognizes_only_concats():
    proto = _fire_model()
    mod = _lowered(proto)
    from tvm import tirx

    kinds = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            kinds[gv.name_hint] = concat_axis(func)
    concat_axes = [a for n, a in kinds.items() if "concat" in n]
    assert concat_axes and all(a == 1 for a in concat_axes)
    assert all(a is None for n, a in kinds.items() if "concat" not in n)
