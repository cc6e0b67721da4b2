"""Built-in example models, made in code so that the package needs no data files.

``tiny_convnet`` is a small CNN written the way exporters write them: BatchNormalization after
convolutions, Identity and Dropout nodes, a per-channel Mul/Add after a Conv, Constant nodes, a
residual Add, and a Reshape whose target shape is computed from ``Shape`` at run time. Every
canonicalization pass has something to do on it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sculpt.ir.model import Model


def tiny_convnet(seed: int = 0, batch: int | str = "N", size: int = 32, classes: int = 10) -> Model:
    rng = np.random.default_rng(seed)
    inits = []
    nodes = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32) if np.asarray(arr).dtype.kind == "f"
                                             else np.asarray(arr), name))
        return name

    def conv_bn_relu(idx, x, cin, cout, k=3, stride=1, groups=1):
        w = const(f"conv{idx}.weight", rng.normal(0, (2.0 / (cin // groups * k * k)) ** 0.5,
                                                  (cout, cin // groups, k, k)))
        nodes.append(helper.make_node("Conv", [x, w], [f"conv{idx}"], name=f"conv{idx}", kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride, stride], group=groups))
        g = const(f"bn{idx}.gamma", rng.uniform(0.5, 1.5, cout))
        b = const(f"bn{idx}.beta", rng.normal(0, 0.1, cout))
        m = const(f"bn{idx}.mean", rng.normal(0, 0.1, cout))
        v = const(f"bn{idx}.var", rng.uniform(0.5, 1.5, cout))
        nodes.append(helper.make_node("BatchNormalization", [f"conv{idx}", g, b, m, v], [f"bn{idx}"],
                                      name=f"bn{idx}", epsilon=1e-5))
        nodes.append(helper.make_node("Relu", [f"bn{idx}"], [f"relu{idx}"], name=f"relu{idx}"))
        return f"relu{idx}"

    x = conv_bn_relu(1, "input", 3, 16, stride=2)
    nodes.append(helper.make_node("Identity", [x], ["id1"], name="identity1"))
    x = conv_bn_relu(2, "id1", 16, 16, groups=16)  # depthwise
    y = conv_bn_relu(3, x, 16, 16, k=1)
    nodes.append(helper.make_node("Add", [y, "id1"], ["res"], name="residual_add"))
    # a per-channel scale and shift written as Constant nodes after a bias-free conv
    w4 = const("conv4.weight", rng.normal(0, 0.25, (32, 16, 3, 3)))
    nodes.append(helper.make_node("Conv", ["res", w4], ["conv4"], name="conv4", kernel_shape=[3, 3], pads=[1] * 4,
                                  strides=[2, 2]))
    nodes.append(helper.make_node("Constant", [], ["scale4"], name="scale4",
                                  value=numpy_helper.from_array(rng.uniform(0.5, 2.0, (1, 32, 1, 1)).astype(np.float32))))
    nodes.append(helper.make_node("Mul", ["conv4", "scale4"], ["scaled4"], name="mul4"))
    nodes.append(helper.make_node("Constant", [], ["shift4"], name="shift4",
                                  value=numpy_helper.from_array(rng.normal(0, 0.1, (32, 1, 1)).astype(np.float32))))
    nodes.append(helper.make_node("Add", ["scaled4", "shift4"], ["shifted4"], name="add4"))
    nodes.append(helper.make_node("Relu", ["shifted4"], ["relu4"], name="relu4"))
    nodes.append(helper.make_node("Dropout", ["relu4"], ["drop4"], name="dropout4"))
    nodes.append(helper.make_node("GlobalAveragePool", ["drop4"], ["gap"], name="gap"))
    # Reshape to (batch, -1) with the batch taken from Shape(input) at run time
    nodes.append(helper.make_node("Shape", ["gap"], ["gap_shape"], name="gap_shape"))
    const("zero", np.array([0], dtype=np.int64))
    const("one", np.array([1], dtype=np.int64))
    const("minus_one", np.array([-1], dtype=np.int64))
    nodes.append(helper.make_node("Slice", ["gap_shape", "zero", "one"], ["batch_dim"], name="batch_dim"))
    nodes.append(helper.make_node("Concat", ["batch_dim", "minus_one"], ["flat_shape"], name="flat_shape", axis=0))
    nodes.append(helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten"))
    fw = const("fc.weight", rng.normal(0, 0.2, (classes, 32)))
    fb = const("fc.bias", rng.normal(0, 0.1, classes))
    nodes.append(helper.make_node("Gemm", ["flat", fw, fb], ["logits"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1))
    graph = helper.make_graph(
        nodes, "tiny_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="sculpt.examples")
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return Model(proto)
