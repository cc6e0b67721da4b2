"""Grouped 1x1 convs as one matmul per group over the planes (grouped_pointwise_matmul): the same
results as onnxruntime, the bias, residual add and ReLU after the conv fused into the matmul, and
the policy that picks them (tiling.grouped_pointwise_as_matmul)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sculpt.backends.tvm.kernels.blocked_conv import ConvShape
from sculpt.backends.tvm.kernels.grouped_pointwise_matmul import rewrite_grouped_pointwise_matmuls
from sculpt.backends.tvm.kernels.target_traits import TargetTraits
from sculpt.backends.tvm.kernels.tiling import grouped_pointwise_as_matmul
from sculpt.backends.tvm.relax_import import import_to_relax
from sculpt.ir.model import Model
from tvm_checks import host_build_and_reference


def _shufflenet_unit(channels: int, groups: int, size: int, seed: int = 0):
    """x -> grouped 1x1 conv + bias -> ReLU -> channel shuffle -> grouped 1x1 conv + bias -> + x -> ReLU
    (ShuffleNet's stride-1 unit without its depthwise conv)."""
    rng = np.random.default_rng(seed)
    per = channels // groups

    def weights(name):
        return [numpy_helper.from_array((rng.standard_normal((channels, per, 1, 1)) / np.sqrt(per)).astype(np.float32), f"{name}_w"),
                numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{name}_b")]

    shape = [1, channels, size, size]
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], group=groups),
        helper.make_node("Relu", ["a"], ["a_relu"]),
        helper.make_node("Reshape", ["a_relu", "split"], ["a_split"]),
        helper.make_node("Transpose", ["a_split"], ["a_t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["a_t", "whole"], ["shuffled"]),
        helper.make_node("Conv", ["shuffled", "b_w", "b_b"], ["b"], group=groups),
        helper.make_node("Add", ["b", "x"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["y"]),
    ]
    inits = weights("a") + weights("b") + [
        numpy_helper.from_array(np.array([1, groups, per, size, size], np.int64), "split"),
        numpy_helper.from_array(np.array(shape, np.int64), "whole")]
    graph = helper.make_graph(nodes, "unit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto), shape


def _compile_and_compare(model, shape):
    got, ref, decisions = host_build_and_reference(model, shape)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    return decisions


def test_shufflenet_groups_run_as_matmuls_with_bias_residual_and_relu_fused():
    """ShuffleNet's 34-channel groups at 28x28: two matmul kernels, the first with its bias and ReLU,
    the second with its bias, the residual add and the ReLU; no conv kernel is left."""
    model, shape = _shufflenet_unit(136, 4, 28)
    decisions = _compile_and_compare(model, shape)
    matmuls = sorted(d.func for d in decisions if d.kind == "matmul")
    assert len(matmuls) == 2, [(d.func, d.kind) for d in decisions]
    # the fused functions' names list their ops: matmul, the adds (bias; bias and residual), relu
    assert sorted((f.count("_add"), f.endswith("relu")) for f in matmuls) == [(1, True), (2, True)], matmuls
    assert all(tuple(d.shape) == (1, 4, 34, 784) for d in decisions if d.kind == "matmul")
    assert not [d for d in decisions if d.kind in ("conv2d", "depthwise")]


def test_groups_of_whole_vectors_or_planes_of_partial_vectors_keep_the_conv_kernel():
    """68-channel groups at 14x14 (196 pixels a plane: no whole vectors) stay convs."""
    model, shape = _shufflenet_unit(272, 4, 14)
    decisions = _compile_and_compare(model, shape)
    assert not [d for d in decisions if d.kind == "matmul"], [(d.func, d.kind) for d in decisions]


def _traits(lanes: int) -> TargetTraits:
    return TargetTraits("avx512" if lanes == 16 else "avx2", lanes, 32 if lanes == 16 else 16, 48 << 10, 2 << 20)


@pytest.mark.parametrize("channels, size, conv_lanes, matmul_lanes, expected", [
    (34, 28, 16, 16, True),    # 34 channels pad to 48; 784 pixels = 49 vectors
    (34, 28, 8, 8, True),      # pads to 40
    (32, 28, 16, 16, False),   # whole channel blocks: the blocked kernel wastes nothing
    (68, 14, 16, 16, False),   # 196 pixels: 12.25 vectors of 16
    (68, 14, 8, 4, True),      # NEON-width matmuls: 49 vectors of 4
    (28, 56, 16, 16, True),
])
def test_policy(channels, size, conv_lanes, matmul_lanes, expected):
    shape = ConvShape(1, channels, size, size, channels, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 4)
    assert grouped_pointwise_as_matmul(shape, _traits(conv_lanes), _traits(matmul_lanes)) is expected


def test_ops_that_are_not_elementwise_after_the_conv_see_it_in_nchw():
    """A max pool after the conv reads the NCHW view; the rewrite leaves it and the result matches."""
    from tvm import relax

    model, shape = _shufflenet_unit(136, 4, 28)
    proto = model.proto
    proto.graph.node.append(helper.make_node("MaxPool", ["y"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 136, 14, 14]))
    model = Model.wrap(proto)
    mod = rewrite_grouped_pointwise_matmuls(import_to_relax(model), lambda s: True)
    ops = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: ops.append(str(e.op.name)) if isinstance(e, relax.Call) and hasattr(e.op, "name") else None)
    assert "relax.nn.conv2d" not in ops and ops.count("relax.matmul") == 2
    _compile_and_compare(model, [1, 136, 28, 28])


def test_a_constant_broadcast_along_rows_stays_after_the_reshape():
    """An Add of a [28, 1] constant (one value per row of the 28x28 map, not per channel) cannot move
    into the [G, Co, H*W] matmul: the result still matches."""
    model, shape = _shufflenet_unit(136, 4, 28)
    proto = model.proto
    proto.graph.node.append(helper.make_node("Add", ["y", "rows"], ["z"]))
    proto.graph.initializer.append(numpy_helper.from_array(np.linspace(-3, 3, 28).astype(np.float32).reshape(28, 1), "rows"))
    proto.graph.output[0].name = "z"
    decisions = _compile_and_compare(Model.wrap(proto), shape)
    assert len([d for d in decisions if d.kind == "matmul"]) == 2
