"""Cost model: parameters, multiply-accumulates and weight bytes per node, and totals.

MACs count one multiply-accumulate per weight tap for Conv, ConvTranspose, Gemm and MatMul; one
operation per window element for pooling; one per output element for elementwise ops, BatchNorm,
Resize and normalizations; one per input element for reductions and Softmax. Data movement
(Reshape, Transpose, Concat, Slice, ...) costs no MACs. Shapes come from ONNX shape inference on
a copy of the model with the given input shapes; when that leaves tensors without a static shape
(exporters often compute Reshape targets at run time, which ONNX inference cannot follow) and every
input shape is static, the missing shapes are measured by one onnxruntime run on random inputs.

The IR does not run models itself: the runtime layer (``sculpt.runtime``, which ``import sculpt``
loads) installs that measurement with :func:`set_shape_measurer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from sculpt.ir.model import Model

# (model with static inputs, tensor names) -> {name: shape} of those it could measure
ShapeMeasurer = Callable[[Model, Sequence[str]], dict[str, tuple[int, ...]]]
_shape_measurer: ShapeMeasurer | None = None


def set_shape_measurer(measure: ShapeMeasurer | None) -> ShapeMeasurer | None:
    """Install how :func:`cost_of` measures the shapes ONNX shape inference leaves unknown (None: they
    stay unknown); returns the one installed before."""
    global _shape_measurer
    previous, _shape_measurer = _shape_measurer, measure
    return previous

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Relu", "LeakyRelu",
    "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Softplus",
    "Softsign", "Erf", "Gelu", "Mish", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "And", "Or", "Not", "Xor", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Shrink",
    "BatchNormalization", "Resize", "Upsample", "InstanceNormalization", "LayerNormalization",
    "LRN", "QuantizeLinear", "DequantizeLinear", "Cast", "Mod", "BitShift", "IsNaN", "IsInf",
}
REDUCTIONS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Softmax", "LogSoftmax", "Hardmax",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ArgMax", "ArgMin",
}
POOLING = {"MaxPool", "AveragePool", "LpPool"}


@dataclass
class LayerCost:
    name: str
    op_type: str
    output_shape: list | None
    params: int
    macs: int | None  # None: shape unknown
    weight_bytes: int

    def as_dict(self) -> dict:
        # what dataclasses.asdict gives, without its recursive deep copy (seconds on 50,000 layers)
        return {"name": self.name, "op_type": self.op_type,
                "output_shape": list(self.output_shape) if self.output_shape is not None else None,
                "params": self.params, "macs": self.macs, "weight_bytes": self.weight_bytes}


@dataclass
class CostReport:
    layers: list[LayerCost] = field(default_factory=list)
    params: int = 0
    macs: int = 0
    weight_bytes: int = 0
    model_bytes: int = 0
    unknown_macs: list[str] = field(default_factory=list)  # layers whose shapes were not inferred
    macs_by_op: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "totals": {"params": self.params, "macs": self.macs, "weight_bytes": self.weight_bytes,
                       "model_bytes": self.model_bytes, "nodes": len(self.layers),
                       "unknown_macs_layers": len(self.unknown_macs)},
            "macs_by_op": dict(sorted(self.macs_by_op.items(), key=lambda kv: -kv[1])),
            "unknown_macs": self.unknown_macs,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _numel(shape: Sequence[int] | None) -> int | None:
    if shape is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def node_macs(model: Model, node: onnx.NodeProto, shape_of) -> int | None:
    """MACs of one node; ``shape_of(name)`` returns a static shape tuple or None."""
    op = node.op_type
    out = shape_of(node.output[0]) if node.output and node.output[0] else None
    if op == "Conv":
        w = shape_of(node.input[1])
        if out is None or w is None:
            return None
        return _numel(out) * _numel(w[1:])
    if op == "ConvTranspose":
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        if x is None or w is None:
            return None
        return _numel(x) * _numel(w[1:])
    if op == "Gemm":
        a = shape_of(node.input[0])
        if out is None or a is None or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _numel(out) * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape_of(node.input[0])
        if out is None or a is None:
            return None
        return _numel(out) * (a[-1] if a else 1)
    if op in POOLING:
        kernel = _attr(node, "kernel_shape", None)
        if out is None or kernel is None:
            return None
        return _numel(out) * _numel(kernel)
    if op in REDUCTIONS:
        x = shape_of(node.input[0])
        return _numel(x)
    if op in ELEMENTWISE:
        return _numel(out)
    return 0


def cost_of(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
            model_bytes: int | None = None, *, runtime_shapes: bool = True) -> CostReport:
    """Per-node and total cost. ``input_shapes`` fixes dynamic inputs (on a copy).

    ``runtime_shapes``: measure the shapes ONNX shape inference leaves unknown with one onnxruntime
    run (only when all input shapes are static)."""
    work = model.clone()
    if input_shapes:
        work.fix_input_shapes(input_shapes)
    # recompute every shape from the inputs: value_info left behind by an edit may be stale
    work.infer_shapes(refresh=True)
    # nothing below edits the graph: one index answers every shape lookup
    with work.indexed():
        return _cost(model, work, model_bytes, runtime_shapes)


def _cost(model: Model, work: Model, model_bytes: int | None, runtime_shapes: bool) -> CostReport:
    # constants are counted as parameters only if floating point (shape tensors and indices are not),
    # or if they are the quantized values a DequantizeLinear reads
    init = work.initializer_map()
    graph_inputs = {i.name for i in work.graph.input}
    constants: dict[str, tuple[tuple[int, ...], int, bool]] = {}
    for name, t in init.items():
        if name in graph_inputs:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type != onnx.TensorProto.STRING \
            else np.dtype(object)
        constants[name] = (tuple(t.dims), dtype.itemsize if dtype != object else 0, dtype.kind == "f")
    for node in work.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type != onnx.TensorProto.STRING \
                else np.dtype(object)
            constants[node.output[0]] = (tuple(t.dims), dtype.itemsize if dtype != object else 0, dtype.kind == "f")

    measured: dict[str, tuple[int, ...]] = {}
    if runtime_shapes and _shape_measurer is not None:
        unknown = [o for node in work.graph.node if node.op_type != "Constant" for o in node.output
                   if o and o not in constants and work.static_shape(o) is None]
        measured = _shape_measurer(work, unknown)

    def shape_of(name: str):
        if name in constants:
            return constants[name][0]
        shape = work.static_shape(name)
        return shape if shape is not None else measured.get(name)

    report = CostReport(model_bytes=model_bytes if model_bytes is not None else model.byte_size())
    counted: set[str] = set()
    for node in work.graph.node:
        if node.op_type == "Constant":
            continue
        params = 0
        wbytes = 0
        for k, i in enumerate(node.input):
            # quantized weights (the integer input of a DequantizeLinear) are parameters too
            if i in constants and (constants[i][2] or (node.op_type == "DequantizeLinear" and k == 0)):
                dims, itemsize, _ = constants[i]
                n = _numel(dims)
                params += n
                wbytes += n * itemsize
                if i not in counted:
                    counted.add(i)
                    report.params += n
                    report.weight_bytes += n * itemsize
        macs = node_macs(work, node, shape_of)
        out_shape = shape_of(node.output[0]) if node.output and node.output[0] else None
        report.layers.append(LayerCost(node.name, node.op_type, list(out_shape) if out_shape is not None else None,
                                       params, macs, wbytes))
        if macs is None:
            report.unknown_macs.append(node.name)
        elif macs:
            report.macs += macs
            report.macs_by_op[node.op_type] = report.macs_by_op.get(node.op_type, 0) + macs
    return report
