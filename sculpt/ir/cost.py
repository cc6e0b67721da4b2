"""Cost model: parameters, multiply-accumulates and weight bytes per node, and totals.

MACs count one multiply-accumulate per weight tap for Conv, ConvTranspose, Gemm and MatMul (and their
integer forms); one operation per window element for pooling; one per output element for elementwise
ops, BatchNorm, Resize and normalizations; one per input element for reductions and Softmax. Data
movement (Reshape, Transpose, Concat, Slice, ...) costs no MACs, and neither do the conversions of a
quantized model (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear: onnxruntime folds them into
its int8 kernels); their elements are counted apart (``conversions``). ``int8_macs`` are the MACs of
the layers that run in int8 (a Conv/Gemm/MatMul whose data and weight both come out of a
DequantizeLinear, or an integer op), ``quantized_weight_bytes`` the bytes of the 8-bit (or narrower)
weights a DequantizeLinear reads.

With ``sparsity=True`` the weights' values are read too: ``nonzero_params`` counts the nonzero
parameters, and ``sparse_weight_bytes`` is the weight size with every block-sparse weight (a
Conv/Gemm/MatMul weight with at least :data:`SPARSE_MIN_BLOCK_ZEROS` of its R×1 blocks zero) stored
as the block-sparse kernels store it (BSR: the nonzero blocks, an int32 column index per block, an
int32 offset per block row). Shapes come from ONNX shape inference on
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

from sculpt.ir.blocks import blocks_of, block_zero_fraction, detect_block_rows
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
    "LRN", "Cast", "Mod", "BitShift", "IsNaN", "IsInf",
}
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}  # counted apart, not as MACs
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"}
FLOAT_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # int8 when data and weight are dequantized
# a weight counts as block-sparse from this fraction of zero R×1 blocks on: the sparse kernels' own
# threshold (min_sparsity of sculpt.backends.tvm.sparse.apply_sparse_kernels)
SPARSE_MIN_BLOCK_ZEROS = 0.3
BSR_INDEX_BYTES = 4  # int32 column indices and block-row offsets
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
    int8_macs: int = 0  # MACs of the layers that run in int8
    conversions: int = 0  # elements quantized or dequantized (not in ``macs``)
    quantized_params: int = 0  # 8-bit (or narrower) weights a DequantizeLinear reads
    quantized_weight_bytes: int = 0
    nonzero_params: int | None = None  # with sparsity=True
    sparse_weight_bytes: int | None = None  # with sparsity=True: block-sparse weights as BSR
    sparse_weights: int | None = None  # with sparsity=True: how many weights are block-sparse

    def as_dict(self) -> dict:
        out = {
            "totals": {"params": self.params, "macs": self.macs, "weight_bytes": self.weight_bytes,
                       "model_bytes": self.model_bytes, "nodes": len(self.layers),
                       "unknown_macs_layers": len(self.unknown_macs)},
            "quantized": self.quantized_totals(),
            "macs_by_op": dict(sorted(self.macs_by_op.items(), key=lambda kv: -kv[1])),
            "unknown_macs": self.unknown_macs,
            "layers": [layer.as_dict() for layer in self.layers],
        }
        if self.nonzero_params is not None:
            out["sparsity"] = self.sparsity_totals()
        return out

    def quantized_totals(self) -> dict:
        return {"int8_macs": self.int8_macs, "conversions": self.conversions,
                "quantized_params": self.quantized_params, "quantized_weight_bytes": self.quantized_weight_bytes}

    def sparsity_totals(self) -> dict | None:
        """None unless counted (``cost_of(..., sparsity=True)``)."""
        if self.nonzero_params is None:
            return None
        return {"nonzero_params": self.nonzero_params, "sparse_weight_bytes": self.sparse_weight_bytes,
                "sparse_weights": self.sparse_weights}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _numel(shape: Sequence[int] | None) -> int | None:
    if shape is None:
        return None
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_macs(node: onnx.NodeProto, shape_of) -> int | None:
    """MACs of an LSTM/GRU/RNN node: per step, direction and sequence, one per weight tap of W and R
    (gates × hidden × (input + hidden)) and one per gate element (its activation and state update)."""
    x, w = shape_of(node.input[0]), shape_of(node.input[1]) if len(node.input) > 1 else None
    if x is None or w is None or len(x) != 3 or len(w) != 3:
        return None
    steps, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
    directions, gate_rows, inputs = w
    hidden = gate_rows // RECURRENT_GATES[node.op_type]
    return steps * batch * directions * gate_rows * (inputs + hidden + 1)


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
    if op in ("ConvInteger", "QLinearConv"):
        weight_index = 1 if op == "ConvInteger" else 3  # QLinearConv: x, x_scale, x_zero_point, w, ...
        w = shape_of(node.input[weight_index]) if len(node.input) > weight_index else None
        if out is None or w is None:
            return None
        return _numel(out) * _numel(w[1:])
    if op == "MatMulNBits":  # com.microsoft: x [.., K] by a packed low-bit [K, N] weight (attributes K, N)
        k = _attr(node, "K", None)
        return _numel(out) * k if out is not None and k else None
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape_of(node.input[0])
        if out is None or a is None:
            return None
        return _numel(out) * (a[-1] if a else 1)
    if op in RECURRENT_GATES:
        return recurrent_macs(node, shape_of)
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


_FOUR_BIT_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_TWO_BIT_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


def _element_bits(data_type: int) -> tuple[int, bool]:
    """(bits per element as stored, floating point?) of an ONNX tensor type: int4/uint4 pack two per
    byte, int2/uint2 four."""
    if data_type == onnx.TensorProto.STRING:
        return 0, False
    dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    bits = 4 if data_type in _FOUR_BIT_TYPES else 2 if data_type in _TWO_BIT_TYPES else 8 * dtype.itemsize
    return bits, dtype.kind == "f"


def _bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def cost_of(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
            model_bytes: int | None = None, *, runtime_shapes: bool = True, sparsity: bool = False) -> CostReport:
    """Per-node and total cost. ``input_shapes`` fixes dynamic inputs (on a copy).

    ``runtime_shapes``: measure the shapes ONNX shape inference leaves unknown with one onnxruntime
    run (only when all input shapes are static). ``sparsity``: read the weights' values and count
    nonzero parameters and the block-sparse size (see the module's docstring)."""
    work = model.clone()
    if input_shapes:
        work.fix_input_shapes(input_shapes)
    # recompute every shape from the inputs: value_info left behind by an edit may be stale
    work.infer_shapes(refresh=True)
    # nothing below edits the graph: one index answers every shape lookup
    with work.indexed():
        report = _cost(model, work, model_bytes, runtime_shapes)
        if sparsity:
            _count_sparsity(work, report)
        return report


def _cost(model: Model, work: Model, model_bytes: int | None, runtime_shapes: bool) -> CostReport:
    # constants are counted as parameters only if floating point (shape tensors and indices are not),
    # or if they are the quantized values a DequantizeLinear reads
    init = work.initializer_map()
    graph_inputs = {i.name for i in work.graph.input}
    constants: dict[str, tuple[tuple[int, ...], int, bool]] = {}  # name -> (dims, bits per element, float)
    for name, t in init.items():
        if name in graph_inputs:
            continue
        constants[name] = (tuple(t.dims), *_element_bits(t.data_type))
    for node in work.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            constants[node.output[0]] = (tuple(t.dims), *_element_bits(t.data_type))

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
    quantized: set[str] = set()

    def dequantized(name: str) -> bool:
        producer = work.index.producer(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    for node in work.graph.node:
        if node.op_type == "Constant":
            continue
        params = 0
        wbytes = 0
        for k, i in enumerate(node.input):
            # quantized weights (the integer input of a DequantizeLinear, MatMulNBits' packed weight) are
            # parameters too
            packed = node.op_type == "MatMulNBits" and k == 1
            if i in constants and (constants[i][2] or (node.op_type == "DequantizeLinear" and k == 0) or packed):
                dims, bits, _ = constants[i]
                n = _numel(dims)
                if packed:  # uint8 bytes holding K x N weights of ``bits`` bits each
                    n, bits = _attr(node, "K", 0) * _attr(node, "N", 0), _attr(node, "bits", 4)
                    if i not in quantized:
                        quantized.add(i)
                        report.quantized_params += n
                        report.quantized_weight_bytes += _bytes(n, bits)
                params += n
                wbytes += _bytes(n, bits)
                if i not in counted:
                    counted.add(i)
                    report.params += n
                    report.weight_bytes += _bytes(n, bits)
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in constants:
            dims, bits, is_float = constants[node.input[0]]
            if not is_float and bits <= 8 and node.input[0] not in quantized:
                quantized.add(node.input[0])
                report.quantized_params += _numel(dims)
                report.quantized_weight_bytes += _bytes(_numel(dims), bits)
        if node.op_type in CONVERSIONS:
            macs = 0
            converted = shape_of(node.input[0]) if node.input else None
            report.conversions += _numel(converted) or 0
        else:
            macs = node_macs(work, node, shape_of)
        if macs and (node.op_type in INTEGER_OPS or (
                node.op_type in FLOAT_WEIGHTED_OPS and len(node.input) > 1
                and all(dequantized(i) for i in node.input[:2]))):
            report.int8_macs += macs
        out_shape = shape_of(node.output[0]) if node.output and node.output[0] else None
        report.layers.append(LayerCost(node.name, node.op_type, list(out_shape) if out_shape is not None else None,
                                       params, macs, wbytes))
        if macs is None:
            report.unknown_macs.append(node.name)
        elif macs:
            report.macs += macs
            report.macs_by_op[node.op_type] = report.macs_by_op.get(node.op_type, 0) + macs
    return report


def _weight_matrix(work: Model, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """The constant float weight of a Conv (one group), Gemm or MatMul as the [outputs, inputs]
    matrix the block-sparse kernels tile in R×1 blocks, with its name; None for other nodes."""
    op = node.op_type
    if op not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return None
    w = work.get_constant(node.input[1])
    if w is None or w.dtype.kind != "f" or w.size == 0:
        return None
    if op == "Conv":
        if w.ndim < 3 or _attr(node, "group", 1) != 1:
            return None
        return node.input[1], w.reshape(w.shape[0], -1)
    if w.ndim != 2:
        return None
    if op == "Gemm":
        return node.input[1], (w if _attr(node, "transB", 0) else w.T)
    return node.input[1], w.T


def bsr_bytes(matrix: np.ndarray, block_rows: int) -> int:
    """Bytes of a 2-D matrix stored as BSR with R×1 blocks: the nonzero blocks (R values each), an
    int32 column index per block and an int32 offset per block row (one more than there are)."""
    blocks = blocks_of(matrix, block_rows)  # [block rows, columns, R]
    stored = int(np.any(blocks != 0, axis=2).sum())
    return stored * block_rows * matrix.dtype.itemsize + stored * BSR_INDEX_BYTES + \
        (blocks.shape[0] + 1) * BSR_INDEX_BYTES


def _count_sparsity(work: Model, report: CostReport) -> None:
    """Nonzero parameters, and the weight bytes with block-sparse weights stored as BSR."""
    counted: set[str] = set()
    nonzero = 0
    dense_bytes_of_sparse = 0
    sparse_bytes = 0
    sparse_weights = 0
    for node in work.graph.node:
        if node.op_type == "Constant":
            continue
        pair = _weight_matrix(work, node)
        if pair is not None and pair[0] not in counted:
            name, matrix = pair
            rows = detect_block_rows(matrix)
            if block_zero_fraction(matrix, rows) >= SPARSE_MIN_BLOCK_ZEROS:
                counted.add(name)
                sparse_weights += 1
                dense_bytes_of_sparse += matrix.size * matrix.dtype.itemsize
                sparse_bytes += bsr_bytes(matrix, rows)
    seen: set[str] = set()
    graph_inputs = {i.name for i in work.graph.input}
    for node in work.graph.node:
        for k, name in enumerate(node.input):
            if not name or name in seen or name in graph_inputs:
                continue
            value = work.get_constant(name)
            if value is None:
                continue
            seen.add(name)
            if value.dtype.kind == "f" or (node.op_type == "DequantizeLinear" and k == 0):
                nonzero += int(np.count_nonzero(value))
    report.nonzero_params = nonzero
    report.sparse_weights = sparse_weights
    report.sparse_weight_bytes = report.weight_bytes - dense_bytes_of_sparse + sparse_bytes
