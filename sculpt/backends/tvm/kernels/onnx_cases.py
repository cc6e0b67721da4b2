"""Small ONNX models that exercise the kernels: a grid of convolutions / poolings side by side (one
branch per case, one graph output each, so one TVM compile checks the whole grid) and matmuls. Used
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


def _finish(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sculpt-tests")
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
