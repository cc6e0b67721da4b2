"""Activations in NCHW<lanes>c between the blocked convs (sculpt.backends.tvm.kernels.blocked_layout):
the plan keeps a tensor blocked only where no layout transform is needed, and whole chains (residual
adds, clips, per-channel constants, channel concats, strides, padded widths and channels) match
onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.runtime import make_session
from sculpt.backends.tvm import import_to_relax, run_relax
from sculpt.backends.tvm.kernels import compile_with_kernels, host_target, traits_of
from sculpt.backends.tvm.kernels.blocked_layout import blocked_constant
from sculpt.ir.model import Model


@pytest.fixture(autouse=True)
def _private_tile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCULPT_CACHE_DIR", str(tmp_path / "cache"))


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, out, x, cin, cout, k, stride=1, group=1):
        w = self.const(out + "_w", self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k))
        b = self.const(out + "_b", self.rng.standard_normal(cout))
        self.nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], strides=[stride] * 2,
                                           pads=[k // 2] * 4, group=group))
        return out

    def op(self, kind, ins, out, **attrs):
        self.nodes.append(helper.make_node(kind, ins, [out], **attrs))
        return out

    def model(self, cin, hw, outputs):
        graph = helper.make_graph(self.nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       [1, cin, *hw])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        model.ir_version = 8
        return model


def _residual_chain(pool_branch: bool):
    """conv -> relu -> conv + residual -> clip -> (1x1 stride 2 * per-channel scale ++ 3x3 stride 2)
    -> conv 48->40 -> sigmoid -> 1x1 40->24; with ``pool_branch`` the first relu also feeds a max
    pool (a consumer that needs NCHW)."""
    g = _Graph(7)
    g.op("Relu", [g.conv("a", "x", 8, 16, 3)], "ra")
    g.op("Clip", [g.op("Add", [g.conv("b", "ra", 16, 16, 3), "ra"], "s"), g.const("lo", 0.0), g.const("hi", 6.0)],
         "c1")
    scale = g.const("scale", g.rng.uniform(0.5, 1.5, (1, 32, 1, 1)))
    g.op("Mul", [g.conv("c", "c1", 16, 32, 1, stride=2), scale], "m")
    g.op("Concat", ["m", g.conv("d", "c1", 16, 16, 3, stride=2)], "k", axis=1)
    g.op("Sigmoid", [g.conv("e", "k", 48, 40, 3)], "se")
    outputs = [g.conv("y", "se", 40, 24, 1)]
    if pool_branch:  # a resize reads the first relu too
        g.const("scales", [1.0, 1.0, 2.0, 2.0])
        outputs.append(g.op("Resize", ["ra", "", "scales"], "up", mode="nearest"))
    return g.model(8, (20, 19), outputs)


def _mobile_chain():
    """pointwise -> depthwise 3x3 -> ReLU6 -> pointwise + residual -> depthwise 5x5 stride 2 over an
    odd width -> HardSwish -> squeeze-and-excitation (mean, 1x1 convs, HardSigmoid gate) -> max pool
    3x3 stride 2 -> average pool 2x2 -> pointwise (the graph's output)."""
    g = _Graph(11)
    g.op("Relu", [g.conv("p1", "x", 8, 16, 1)], "r1")
    g.op("Clip", [g.conv("d1", "r1", 16, 16, 3, group=16), g.const("lo", 0.0), g.const("hi", 6.0)], "c1")
    g.op("Add", [g.conv("p2", "c1", 16, 16, 1), "r1"], "s")
    g.op("HardSwish", [g.conv("d2", "s", 16, 16, 5, stride=2, group=16)], "h")
    g.op("ReduceMean", ["h"], "pooled", axes=[2, 3], keepdims=1)
    g.op("Relu", [g.conv("e1", "pooled", 16, 8, 1)], "re")
    g.op("HardSigmoid", [g.conv("e2", "re", 8, 16, 1)], "gate", alpha=0.2, beta=0.5)
    g.op("Mul", ["h", "gate"], "excited")
    g.op("MaxPool", ["excited"], "pooled2", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    g.op("AveragePool", ["pooled2"], "pooled3", kernel_shape=[2, 2], strides=[1, 1])
    return g.model(8, (14, 21), [g.conv("y", "pooled3", 16, 24, 1)])


def _compile_and_compare(proto, cin, hw, all_decisions: list | None = None):
    import tvm

    model = Model.wrap(proto)
    x = np.random.default_rng(1).standard_normal((1, cin, *hw)).astype(np.float32)
    decisions = []
    executable = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")),
                                      decisions=decisions)
    if all_decisions is not None:
        all_decisions.extend(decisions)
    names = [o.name for o in proto.graph.output]
    got = run_relax(executable, {"x": x}, ["x"])
    ref = make_session(model).run(names, {"x": x})
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert float(np.abs(g - r).max()) <= 2e-5 * float(np.abs(r).max())
    return [d.tile for d in decisions if d.kind == "conv2d_blocked"]


def test_a_residual_chain_stays_blocked_between_convs_and_matches_onnxruntime():
    tiles = _compile_and_compare(_residual_chain(pool_branch=False), 8, (20, 19))
    lanes = traits_of(host_target("llvm")).vector_lanes
    assert len(tiles) == 6
    # (ob, th, tw, rc, rows_outer, in_block, out_block): the graph's input and output stay NCHW
    assert sum(1 for t in tiles if t[5] == lanes) == 5  # every conv but the first reads blocked input
    assert sum(1 for t in tiles if t[6] == lanes) == 5  # every conv but the last writes blocked output


def test_a_consumer_that_needs_nchw_keeps_its_tensor_nchw_and_matches():
    tiles = _compile_and_compare(_residual_chain(pool_branch=True), 8, (20, 19))
    # the first relu feeds the resize: conv a writes NCHW, and so do b and the residual add
    assert sum(1 for t in tiles if t[6]) == 3  # c, d (into the concat) and e
    assert sum(1 for t in tiles if t[5]) == 2  # e and y read blocked input; b, c and d the NCHW clip


def test_rows_outer_with_blocked_input_pads_one_band_at_a_time(monkeypatch):
    from sculpt.backends.tvm.kernels import tiling

    monkeypatch.setattr(tiling, "_rows_outer", lambda *a: True)
    tiles = _compile_and_compare(_residual_chain(pool_branch=False), 8, (20, 19))
    assert all(t[4] == 1 for t in tiles) and any(t[5] for t in tiles)


def test_a_mobile_block_stays_blocked_through_depthwise_convs_squeeze_and_excitation_and_pools():
    decisions = []
    tiles = _compile_and_compare(_mobile_chain(), 8, (14, 21), decisions)
    kinds = [d.kind for d in decisions]
    assert kinds.count("depthwise_blocked") == 2, kinds
    assert sum(1 for d in decisions if d.kind == "pool" and len(d.shape) == 5) == 3  # both pools and the mean
    assert sum(1 for t in tiles if t[5]) == 4  # p2, e1 (the mean), e2 and y read blocked input
    assert sum(1 for t in tiles if t[6]) == 4  # p1, p2, e1 and e2 write it; y is the output


def test_blocked_constants():
    per_channel = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)
    blocked = blocked_constant(per_channel, 8, 16)
    assert blocked.shape == (1, 2, 1, 1, 8)
    assert blocked[0, 1, 0, 0, 3] == 11
    full = np.arange(2 * 16 * 3 * 4, dtype=np.float32).reshape(2, 16, 3, 4)
    blocked = blocked_constant(full, 8, 16)
    assert blocked.shape == (2, 2, 3, 4, 8)
    assert blocked[1, 1, 2, 3, 5] == full[1, 13, 2, 3]
    assert blocked_constant(np.float32(2.0), 8, 16) == 2.0
    assert blocked_constant(np.ones((1, 1, 3, 4), np.float32), 8, 16) is None  # not per channel
