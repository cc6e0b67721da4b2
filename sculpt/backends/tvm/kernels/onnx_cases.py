"""Small ONNX models that exercise the kernels: a grid of convolutions / poolings side by side (one
branch per case, one graph output each, so one TVM compile checks the whole grid), matmuls, and
chains of layers for the blocked layout. Used
by the tests and tools/kernel_benchmark.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


@dataclass(frozen=True)
class ConvCase:
    name: str
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    group: int = 1
    epilogue: str = ""  # "", "relu", "hardswish", "residual"


def _conv_nodes(case: ConvCase, x: str, rng: np.random.Generator, inits: list) -> tuple[list, str]:
    kh, kw = case.kernel
    w = rng.standard_normal((case.cout, case.cin // case.group, kh, kw)).astype(np.float32)
    w /= np.sqrt(w[0].size)
    b = rng.standard_normal(case.cout).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"{case.name}_w"), numpy_helper.from_array(b, f"{case.name}_b")]
    pt, pl, pb, pr = case.pads
    out = f"{case.name}_conv"
    nodes = [helper.make_node("Conv", [x, f"{case.name}_w", f"{case.name}_b"], [out], name=case.name,
                              kernel_shape=[kh, kw], strides=list(case.stride), pads=[pt, pl, pb, pr],
                              dilations=list(case.dilation), group=case.group)]
    if case.epilogue == "relu":
        nodes.append(helper.make_node("Relu", [out], [f"{case.name}_out"]))
        out = f"{case.name}_out"
    elif case.epilogue == "hardswish":
        nodes.append(helper.make_node("HardSigmoid", [out], [f"{case.name}_hs"], alpha=1 / 6, beta=0.5))
        nodes.append(helper.make_node("Mul", [out, f"{case.name}_hs"], [f"{case.name}_out"]))
        out = f"{case.name}_out"
    elif case.epilogue == "residual":
        nodes.append(helper.make_node("Relu", [out], [f"{case.name}_relu"]))
        nodes.append(helper.make_node("Add", [f"{case.name}_relu", x], [f"{case.name}_out"]))
        out = f"{case.name}_out"
    return nodes, out


def conv_model(cases: list[ConvCase], input_shape: tuple[int, int, int, int], seed: int = 0) -> onnx.ModelProto:
    """All ``cases`` read the same input ``x`` (their ``cin`` must match it)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for case in cases:
        assert case.cin == input_shape[1], case
        made, out = _conv_nodes(case, "x", rng, inits)
        nodes += made
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "conv_grid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              outputs, inits)
    return _finish(graph)


def matmul_model(m: int, k: int, n: int, batch: tuple[int, ...] = (1,), *, weight: bool = True, bias: bool = True,
                 seed: int = 0) -> onnx.ModelProto:
    """``a @ w (+ b)`` with a constant weight, or ``a @ b`` of two inputs (attention-style)."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*batch, m, k])]
    inits, nodes = [], []
    if weight:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w"))
        nodes.append(helper.make_node("MatMul", ["a", "w"], ["mm"]))
        out = "mm"
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
            nodes.append(helper.make_node("Add", ["mm", "bias"], ["y"]))
            out = "y"
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [*batch, k, n]))
        nodes.append(helper.make_node("MatMul", ["a", "b"], ["y"]))
        out = "y"
    graph = helper.make_graph(nodes, "matmul", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              inits)
    return _finish(graph)


@dataclass(frozen=True)
class PoolCase:
    name: str
    op: str  # MaxPool, AveragePool, GlobalAveragePool
    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)


def pool_model(cases: list[PoolCase], input_shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    nodes, outputs = [], []
    for case in cases:
        attrs = {} if case.op == "GlobalAveragePool" else {
            "kernel_shape": list(case.kernel), "strides": list(case.stride), "pads": list(case.pads)}
        nodes.append(helper.make_node(case.op, ["x"], [case.name], name=case.name, **attrs))
        outputs.append(helper.make_tensor_value_info(case.name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              outputs)
    return _finish(graph)


def _finish(graph, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sculpt-tests")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


# The grid: odd sizes, strides, padding, dilation, groups, depthwise, asymmetric kernels, epilogues.
CONV_GRID_INPUT = (1, 8, 13, 19)
CONV_GRID = [
    ConvCase("pw", 8, 16, (1, 1)),
    ConvCase("pw_relu", 8, 24, (1, 1), epilogue="relu"),
    ConvCase("pw_residual", 8, 8, (1, 1), epilogue="residual"),
    ConvCase("k3", 8, 12, (3, 3), pads=(1, 1, 1, 1), epilogue="hardswish"),
    ConvCase("k3_nopad", 8, 10, (3, 3)),
    ConvCase("k3_s2", 8, 16, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
    ConvCase("k3_s21", 8, 16, (3, 3), stride=(2, 1), pads=(1, 1, 1, 1)),
    ConvCase("k3_s12", 8, 16, (3, 3), stride=(1, 2), pads=(1, 1, 1, 1)),
    ConvCase("k3_d2", 8, 8, (3, 3), pads=(2, 2, 2, 2), dilation=(2, 2)),
    ConvCase("k5_asym_pad", 8, 8, (5, 5), pads=(2, 1, 2, 3)),
    ConvCase("k13", 8, 6, (1, 3), pads=(0, 1, 0, 1)),
    ConvCase("grouped", 8, 12, (3, 3), pads=(1, 1, 1, 1), group=2),
    ConvCase("dw3", 8, 8, (3, 3), pads=(1, 1, 1, 1), group=8, epilogue="relu"),
    ConvCase("dw3_s2", 8, 8, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1), group=8),
    ConvCase("dw5", 8, 8, (5, 5), pads=(2, 2, 2, 2), group=8, epilogue="hardswish"),
    ConvCase("dw5_s21", 8, 8, (5, 5), stride=(2, 1), pads=(2, 2, 2, 2), group=8),
    ConvCase("dw3_d2", 8, 8, (3, 3), pads=(2, 2, 2, 2), dilation=(2, 2), group=8),
    ConvCase("k3_c3", 8, 3, (3, 3), pads=(1, 1, 1, 1), epilogue="hardswish"),  # too few channels to block
]
POOL_GRID_INPUT = (1, 6, 11, 20)
POOL_GRID = [
    PoolCase("max2", "MaxPool"),
    PoolCase("max3_s2_pad", "MaxPool", (3, 3), (2, 2), (1, 1, 1, 1)),
    PoolCase("avg32", "AveragePool", (3, 2), (3, 2)),
    PoolCase("avg3_s1", "AveragePool", (3, 3), (1, 1)),
    PoolCase("gap", "GlobalAveragePool"),
]


def conv_transpose_model(cin: int, cout: int, kernel: int, stride: int, pads: int, input_shape, *,
                         seed: int = 0) -> onnx.ModelProto:
    """ConvTranspose + bias + Relu (a detection head's upsampling)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cin, cout, kernel, kernel)) / np.sqrt(cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], kernel_shape=[kernel, kernel],
                              strides=[stride, stride], pads=[pads] * 4),
             helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "conv_transpose", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return _finish(graph)


# chains for the blocked layout (blocked_layout): the input is x [1, 8, 20, 19] / [1, 8, 14, 21]
class _ChainGraph:
    """A graph built node by node (random weights from ``seed``)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, out, x, cin, cout, k, stride=1, group=1, pads=None):
        w = self.const(out + "_w", self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k))
        b = self.const(out + "_b", self.rng.standard_normal(cout))
        self.nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], strides=[stride] * 2,
                                           pads=[k // 2] * 4 if pads is None else list(pads), group=group))
        return out

    def op(self, kind, ins, out, **attrs):
        self.nodes.append(helper.make_node(kind, ins, [out], **attrs))
        return out

    def model(self, cin, hw, outputs):
        graph = helper.make_graph(self.nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       [1, cin, *hw])],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.inits)
        return _finish(graph, opset=14)  # HardSwish


def residual_chain_model(nchw_branch: bool = False) -> onnx.ModelProto:
    """conv -> relu -> conv + residual -> clip -> (1x1 stride 2 * per-channel scale ++ 3x3 stride 2)
    -> conv 48->40 -> sigmoid -> 1x1 40->24; with ``nchw_branch`` the first relu also feeds a max
    pool and a flatten (which needs NCHW)."""
    g = _ChainGraph(7)
    g.op("Relu", [g.conv("a", "x", 8, 16, 3)], "ra")
    g.op("Clip", [g.op("Add", [g.conv("b", "ra", 16, 16, 3), "ra"], "s"), g.const("lo", 0.0), g.const("hi", 6.0)],
         "c1")
    scale = g.const("scale", g.rng.uniform(0.5, 1.5, (1, 32, 1, 1)))
    g.op("Mul", [g.conv("c", "c1", 16, 32, 1, stride=2), scale], "m")
    g.op("Concat", ["m", g.conv("d", "c1", 16, 16, 3, stride=2)], "k", axis=1)
    g.op("Sigmoid", [g.conv("e", "k", 48, 40, 3)], "se")
    outputs = [g.conv("y", "se", 40, 24, 1)]
    if nchw_branch:  # the first relu is also pooled and flattened
        g.op("MaxPool", ["ra"], "pooled", kernel_shape=[2, 2], strides=[2, 2])
        outputs.append(g.op("Flatten", ["pooled"], "flat", axis=1))
    return g.model(8, (20, 19), outputs)


def winograd_chain_model() -> onnx.ModelProto:
    """3x3 stride-1 convs between blocked tensors (winograd_conv's case), on an odd map (13x11):
    1x1 16->32 -> ReLU -> 3x3 32->48 -> SiLU -> 3x3 48->48 + residual -> 3x3 48->32 with no padding
    (11x9) -> clip -> two 3x3 convs padded only bottom and right (12x10), 32->32 each ->
    concat -> 1x1 64->16 (the output)."""
    g = _ChainGraph(19)
    g.op("Relu", [g.conv("p1", "x", 16, 32, 1)], "r1")
    g.op("Mul", [g.conv("w1", "r1", 32, 48, 3), g.op("Sigmoid", ["w1"], "sg")], "r2")  # SiLU: reads w1 twice
    g.op("Add", [g.conv("w2", "r2", 48, 48, 3), "r2"], "s")
    g.op("Clip", [g.conv("w3", "s", 48, 32, 3, pads=(0, 0, 0, 0)), g.const("lo", 0.0), g.const("hi", 6.0)], "c")
    g.conv("w4", "c", 32, 32, 3, pads=(0, 0, 3, 3))
    # DenseNet's: each conv's only reader is the concat, which FuseOps fuses with the output transform
    g.op("Concat", ["w4", g.conv("w5", "c", 32, 32, 3, pads=(0, 0, 3, 3))], "k", axis=1)
    return g.model(16, (13, 11), [g.conv("y", "k", 64, 16, 1)])


def winograd_edges_model() -> onnx.ModelProto:
    """3x3 convs at the graph's edges, whose own input or output stays NCHW: x (NCHW) -> 3x3 16->32
    -> ReLU -> 3x3 32->32 + bias -> the output (NCHW), on a 13x11 map."""
    g = _ChainGraph(23)
    g.op("Relu", [g.conv("w1", "x", 16, 32, 3)], "r1")
    return g.model(16, (13, 11), [g.conv("w2", "r1", 32, 32, 3)])


def mobile_block_model() -> onnx.ModelProto:
    """pointwise -> depthwise 3x3 -> ReLU6 -> pointwise + residual -> depthwise 5x5 stride 2 over an
    odd width -> HardSwish -> squeeze-and-excitation (mean, 1x1 convs, HardSigmoid gate) -> max pool
    3x3 stride 2 -> average pool 2x2 -> nearest resize x2 -> pointwise (the graph's output)."""
    g = _ChainGraph(11)
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
    g.const("scales", [1.0, 1.0, 2.0, 2.0])
    g.op("Resize", ["pooled3", "", "scales"], "up", mode="nearest")
    return g.model(8, (14, 21), [g.conv("y", "up", 16, 24, 1)])


def dense_block_model() -> onnx.ModelProto:
    """DenseNet's pre-activation: two convs -> concat -> BatchNormalization -> ReLU -> conv (the
    normalization follows a concat, so no conv absorbs it)."""
    g = _ChainGraph(13)
    g.op("Concat", [g.conv("a", "x", 8, 16, 3), g.conv("b", "x", 8, 8, 1)], "k", axis=1)
    stats = [g.const(f"bn_{n}", v) for n, v in (("gamma", g.rng.uniform(0.5, 2, 24)), ("beta", g.rng.standard_normal(24)),
                                                ("mean", g.rng.standard_normal(24)), ("var", g.rng.uniform(0.1, 3, 24)))]
    g.op("Relu", [g.op("BatchNormalization", ["k", *stats], "bn", epsilon=1e-3)], "r")
    return g.model(8, (12, 13), [g.conv("y", "r", 24, 16, 3)])


def shuffle_unit_model(channels: int = 136, groups: int = 4, hw: tuple[int, int] = (14, 15)) -> onnx.ModelProto:
    """ShuffleNet's unit: grouped 1x1 conv -> ReLU -> channel shuffle (Reshape, Transpose, Reshape)
    -> depthwise 3x3 -> grouped 1x1 conv + the input -> ReLU. ShuffleNet's 136 channels in 4 groups
    are 34 a group: no whole number of vectors."""
    g = _ChainGraph(17)
    shuffled = [1, groups, channels // groups, *hw]
    g.inits += [numpy_helper.from_array(np.array(shuffled, np.int64), "split_shape"),
                numpy_helper.from_array(np.array([1, channels, *hw], np.int64), "joined_shape")]
    g.op("Relu", [g.conv("g1", "x", channels, channels, 1, group=groups)], "r1")
    g.op("Transpose", [g.op("Reshape", ["r1", "split_shape"], "split")], "swapped", perm=[0, 2, 1, 3, 4])
    g.op("Reshape", ["swapped", "joined_shape"], "shuffled")
    g.conv("dw", "shuffled", channels, channels, 3, group=channels)
    g.op("Add", [g.conv("g2", "dw", channels, channels, 1, group=groups), "x"], "s")
    return g.model(channels, hw, [g.op("Relu", ["s"], "y")])


def residual_stage_to_sequence_model() -> onnx.ModelProto:
    """A CRNN's last conv stage: conv -> two residual blocks (conv, SiLU, conv + residual) -> the map
    transposed into a sequence (an NCHW op reading the last residual add)."""
    g = _ChainGraph(19)
    g.op("Relu", [g.conv("a", "x", 8, 16, 3)], "r0")
    x = "r0"
    for i in range(2):
        c = g.conv(f"b{i}", x, 16, 16, 3)
        g.op("Mul", [c, g.op("Sigmoid", [c], f"sig{i}")], f"silu{i}")
        x = g.op("Add", [g.conv(f"p{i}", f"silu{i}", 16, 16, 1), x], f"s{i}")
    return g.model(8, (6, 10), [g.op("Transpose", [x], "seq", perm=[0, 3, 1, 2])])
