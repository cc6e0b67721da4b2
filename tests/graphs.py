"""Small ONNX graphs built in tests, and the three checks of DESIGN.md for a pass's output."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sculpt.runtime import compare_models, random_inputs, run
from sculpt.ir.model import Model

RNG = np.random.default_rng(1234)


def f32(*shape, scale=1.0, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, shape).astype(np.float32)
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make_model(nodes, inputs, outputs, initializers=None, opset=13, ir_version=8) -> Model:
    """inputs/outputs: lists of (name, shape) (float32) or ValueInfoProtos; initializers: {name: array}."""
    def vi(x):
        if isinstance(x, onnx.ValueInfoProto):
            return x
        name, shape = x
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", [vi(i) for i in inputs], [vi(o) for o in outputs], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version
    return Model(proto)


def op_counts(model: Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def assert_exact(before: Model, after: Model, *, rtol=1e-5, atol=1e-6, samples=3, shapes=None, tmp_path=None):
    """Numerical (onnxruntime, random inputs) and checker (full check on the saved file) checks."""
    feeds = [random_inputs(before, seed=s, shapes=shapes) for s in range(samples)]
    cmp = compare_models(before, after, feeds)
    assert cmp.within(rtol, atol), cmp.as_dict()
    if tmp_path is not None:
        path = tmp_path / "after.onnx"
        after.save(path)
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(after.proto, full_check=True)
    after.verify()
    return cmp


def rms_error(reference, model, feeds, output: str = "y") -> float:
    """‖y − y_ref‖ / ‖y_ref‖ of one output over all the feeds (steadier than the max error)."""
    num = den = 0.0
    for f in feeds:
        ref, got = run(reference, f)[output].astype(np.float64), run(model, f)[output].astype(np.float64)
        num += float(((got - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return float(np.sqrt(num / den))


def conv_matmul_net(seed=4) -> Model:
    """Conv 8->32 3x3, depthwise 3x3, Conv 1x1 32->16, global pool, flatten, MatMul 16x64, Gemm
    (transB) 64->40."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((32, 8, 3, 3)).astype(np.float32) * 0.2,
             "wd": rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3,
             "w2": rng.standard_normal((16, 32, 1, 1)).astype(np.float32) * 0.2,
             "wm": rng.standard_normal((16, 64)).astype(np.float32) * 0.3,
             "wg": rng.standard_normal((40, 64)).astype(np.float32) * 0.2,
             "bg": rng.standard_normal(40).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "wd"], ["cd"], name="dw", group=32, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["cd", "w2"], ["c2"], name="pw"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="linear"),
             helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="head", transB=1)]
    return make_model(nodes, [("x", [1, 8, 12, 12])], [("y", [1, 40])], inits)


def with_weights(model: Model, weights: dict[str, np.ndarray]) -> Model:
    """A copy of ``model`` with the named initializers replaced (float32)."""
    out = model.clone()
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return out
