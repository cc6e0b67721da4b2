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
