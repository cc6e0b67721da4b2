"""Dynamic int8 quantization: int8 weights stored in the model, activations quantized at run time
from their own range; no calibration data.

Layout, the standard ONNX form onnxruntime runs (and fuses where it can):

- each float activation read by a quantized node goes through one ``DynamicQuantizeLinear`` (uint8,
  asymmetric, range taken from the tensor itself at every run), shared by all its quantized readers;
- MatMul (constant right operand) and Gemm → ``MatMulInteger(x_q, w_q, x_zero_point, 0)`` →
  ``Cast(float)`` → ``Mul(x_scale · w_scale)`` (→ ``Add`` bias): onnxruntime fuses this chain into
  its ``DynamicQuantizeMatMul`` kernel; Gemm's ``transB`` and ``alpha`` are folded into the stored
  weight and its scale, ``beta · C`` becomes the added bias;
- Conv → ``ConvInteger`` with the Conv's attributes → ``Cast`` → ``Mul(x_scale · w_scale)`` →
  ``Add`` bias (reshaped to [1, C, 1, 1]); or, with ``convs=weight-only``, the Conv stays float and
  reads its int8 weights through a ``DequantizeLinear`` (onnxruntime's ConvInteger is several times
  slower than its float Conv);
- LSTM/GRU/RNN stay float (listed in the report): standard ONNX has no integer recurrent op;
- with ``activation_matmuls``, a MatMul of two activations (attention scores and their weighted
  sum) quantizes both operands at run time;
- weights are int8, symmetric (zero point 0, range [-127, 127], or [-63, 63] with ``weight_bits=7``),
  per output channel (a vector of scales in the float rescale) or per tensor.

The opset is raised to 11 (``DynamicQuantizeLinear``) where it is lower, to 13 for weight-only
Convs per channel (``DequantizeLinear`` with an axis). Exactly what the integer
kernels compute can be reproduced in numpy (``reference_matmul``), which the tests do.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from sculpt.errors import PassError
from sculpt.ir import quantization as qz
from sculpt.ir.channel_handlers import attr
from sculpt.ir.model import Model
from sculpt.ir.substitution import NameAllocator, splice
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, check_range, option, register

DYNAMIC_QUANT_OPSET = 11  # DynamicQuantizeLinear
PER_CHANNEL_DEQUANTIZE_OPSET = 13  # DequantizeLinear with an axis (weight-only Convs per channel)
CONV_MODES = ("integer", "weight-only")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
RECURRENT_REASON = ("standard ONNX has no integer recurrent op (onnxruntime's DynamicQuantizeLSTM is a contrib op); "
                    "its MatMuls stay float")
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear", "DequantizeLinear",
               "QLinearConv", "QLinearMatMul")
FLOAT = onnx.TensorProto.FLOAT


@dataclass
class _Layer:
    """One node to quantize: its activation inputs and, for a constant-weight op, the weight in the
    orientation the integer op reads it, the axis of its output channels and the float bias added after."""

    node: onnx.NodeProto
    activations: list[str]
    weight: np.ndarray | None = None  # MatMul/Gemm: [K, N] (or [..., K, N]); Conv: [O, C/g, k...]
    weight_scale_factor: float = 1.0  # Gemm's alpha
    bias: np.ndarray | None = None  # already shaped to broadcast over the output


@register
@dataclass
class DynamicQuantization(Pass):
    """Int8 weights, activations quantized at run time (DynamicQuantizeLinear + MatMulInteger /
    ConvInteger + float rescale); lossy, needs no calibration data."""

    name = "dynamic-quant"
    exact = False

    ops: list[str] = option(default_factory=lambda: list(QUANTIZABLE_OPS),
                            help="op types to quantize: " + ", ".join(QUANTIZABLE_OPS))
    per_channel: bool = option(True, help="one weight scale per output channel (false: one per tensor)")
    weight_bits: int = option(8, help="8: weights in [-127, 127]; 7: in [-63, 63], for x86 CPUs without VNNI, "
                                      "whose u8 x s8 kernels saturate int16 sums of product pairs")
    activation_matmuls: bool = option(False, help="also MatMuls of two activations (attention's scores and "
                                                  "weighted sums), both operands quantized at run time")
    convs: str = option("integer", help="integer: ConvInteger on run-time quantized activations; weight-only: "
                                         "int8 weights behind a DequantizeLinear, the Conv itself in float "
                                         "(onnxruntime's ConvInteger is slower than its float Conv)")
    grouped_convs: bool = option(True, help="also grouped and depthwise Convs")
    skip: list[str] = option(default_factory=list, help="fnmatch patterns of node names kept in float")
    min_macs: int = option(0, help="layers with fewer MACs stay float")

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in QUANTIZABLE_OPS]
        if unknown:
            raise ValueError(f"cannot quantize op '{unknown[0]}' dynamically (known: {', '.join(QUANTIZABLE_OPS)})")
        if self.convs not in CONV_MODES:
            raise ValueError(f"convs must be one of {', '.join(CONV_MODES)}, got '{self.convs}'")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")
        check_range("min_macs", self.min_macs, 0)

    def requires(self, model: Model, ctx: PassContext) -> None:
        super().requires(model, ctx)
        for node in model.graph.node:
            if node.op_type in INTEGER_OPS and node.domain in ("", "ai.onnx"):
                raise PassError(self.name, "the model is already quantized", node.name)

    # ------------------------------------------------------------------ run
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # nothing to quantize: the model goes back exactly as it came (no opset upgrade)
        untouched = model.clone() if model.opset < PER_CHANNEL_DEQUANTIZE_OPSET or model.proto.ir_version < 4 else model
        stats: dict[str, Any] = {}
        allow_plain_initializers(model)
        opset = PER_CHANNEL_DEQUANTIZE_OPSET if self.weight_only_convs and self.per_channel else DYNAMIC_QUANT_OPSET
        if model.opset < opset:
            stats["opset"] = f"{model.opset} -> {opset}"
            try:
                model.upgrade_opset(opset)
            except Exception as e:
                raise PassError(self.name, f"the quantized layout needs opset {opset}: {e}") from None
        model.infer_shapes(refresh=True)
        layers, skipped = self._plan(model)
        if not layers:
            return PassResult(untouched, False, {"quantized": 0, "skipped": skipped})
        replacements = self._rewrite(model, layers)
        splice(model, replacements)
        counts: dict[str, int] = {}
        for layer in layers:
            kind = layer.node.op_type if layer.weight is not None else "MatMul (two activations)"
            kind += " (weight-only)" if kind == "Conv" and self.weight_only_convs else ""
            counts[kind] = counts.get(kind, 0) + 1
        stats.update({"quantized": len(layers), "quantized_by_op": counts, "skipped": skipped,
                      "runtime_quantizers": sum(1 for nodes in replacements.values() for n in nodes
                                                if n.op_type == "DynamicQuantizeLinear"),
                      "weights": "per channel" if self.per_channel else "per tensor",
                      "weight_bits": self.weight_bits})
        return PassResult(model, True, stats)

    @property
    def weight_only_convs(self) -> bool:
        return self.convs == "weight-only" and "Conv" in self.ops

    # ------------------------------------------------------------------ planning
    def _plan(self, model: Model) -> tuple[list[_Layer], list[dict]]:
        consts = model.constant_names()
        types = _elem_types(model)
        macs: dict[str, int] = {}
        if self.min_macs:
            from sculpt.ir.cost import cost_of

            macs = {c.name: c.macs for c in cost_of(model).layers}
        layers, skipped = [], []
        for node in model.graph.node:
            if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
                skipped.append({"layer": node.name, "op": node.op_type, "reason": RECURRENT_REASON})
                continue
            if node.op_type not in self.ops or node.domain not in ("", "ai.onnx"):
                continue
            if any(fnmatch.fnmatchcase(node.name, p) for p in self.skip):
                why: str | _Layer = "skipped by name"
            elif node.name in macs and macs[node.name] < self.min_macs:
                why = f"{macs[node.name]} MACs < min_macs"
            else:
                why = self._layer(model, node, consts, types)
            if isinstance(why, str):
                skipped.append({"layer": node.name, "op": node.op_type, "reason": why})
            else:
                layers.append(why)
        return layers, skipped

    def _layer(self, model: Model, node: onnx.NodeProto, consts: set[str], types: dict[str, int]) -> _Layer | str:
        ins = [i for i in node.input]
        if not node.output or types.get(node.output[0]) != FLOAT:
            return "output is not float32 (or its type is unknown)"
        op = node.op_type
        if op == "MatMul":
            a_const, b_const = ins[0] in consts, ins[1] in consts
            if a_const:
                return "the left operand is constant"
            if types.get(ins[0]) != FLOAT:
                return "input is not float32"
            if not b_const:
                if not self.activation_matmuls:
                    return "both operands are activations (see activation_matmuls)"
                if types.get(ins[1]) != FLOAT:
                    return "input is not float32"
                return _Layer(node, [ins[0], ins[1]])
            w = model.get_constant(ins[1])
            if w.dtype != np.float32 or w.ndim < 2:
                return "weight is not a float32 matrix"
            return _Layer(node, [ins[0]], w)
        if types.get(ins[0]) != FLOAT:
            return "input is not float32"
        if op == "Gemm":
            if ins[1] not in consts:
                return "B is not constant"
            if attr(node, "transA", 0):
                return "transA is set"
            w = model.get_constant(ins[1])
            if w.dtype != np.float32:
                return "B is not float32"
            w = w.T if attr(node, "transB", 0) else w
            bias = None
            if len(ins) > 2 and ins[2]:
                c = model.get_constant(ins[2])
                if c is None:
                    return "C is not constant"
                bias = (np.float32(attr(node, "beta", 1.0)) * c.astype(np.float32)).astype(np.float32)
            return _Layer(node, [ins[0]], w, float(attr(node, "alpha", 1.0)), bias)
        # Conv
        if ins[1] not in consts:
            return "weights are not constant"
        w = model.get_constant(ins[1])
        if w.dtype != np.float32:
            return "weights are not float32"
        if int(attr(node, "group", 1)) != 1 and not self.grouped_convs:
            return "grouped Conv (see grouped_convs)"
        bias = None
        if len(ins) > 2 and ins[2]:
            b = model.get_constant(ins[2])
            if b is None:
                return "bias is not constant"
            bias = b.astype(np.float32).reshape((1, -1) + (1,) * (w.ndim - 2))
        return _Layer(node, [ins[0]], w, 1.0, bias)

    # ------------------------------------------------------------------ rewriting
    def _rewrite(self, model: Model, layers: list[_Layer]) -> dict[str, list[onnx.NodeProto]]:
        """The nodes standing in each quantized node's place (its output keeps its name); a tensor's
        DynamicQuantizeLinear goes in front of its first quantized reader."""
        names = NameAllocator(model)
        quantized: dict[str, tuple[str, str, str]] = {}  # activation → (q, scale, zero point)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        qmax = qz.weight_qmax(self.weight_bits)
        for layer in layers:
            node = layer.node
            if node.op_type == "Conv" and self.weight_only_convs:
                replacements[node.name] = self._weight_only(node, layer, names, qmax)
                continue
            nodes: list[onnx.NodeProto] = []
            operands = []
            for tensor in layer.activations:
                if tensor not in quantized:
                    outs = tuple(names.fresh(f"{tensor}_{s}") for s in ("quantized", "scale", "zero_point"))
                    nodes.append(helper.make_node("DynamicQuantizeLinear", [tensor], list(outs),
                                                  name=names.fresh(f"{tensor}_DynamicQuantizeLinear")))
                    quantized[tensor] = outs
                operands.append(quantized[tensor])
            base = node.name or node.output[0]
            if layer.weight is None:  # two activations
                (a, a_scale, a_zp), (b, b_scale, b_zp) = operands
                integer = helper.make_node("MatMulInteger", [a, b, a_zp, b_zp], [names.fresh(f"{base}_int32")],
                                           name=names.fresh(f"{base}_MatMulInteger"))
                scale_inputs = [a_scale, b_scale]
            else:
                x, x_scale, x_zp = operands[0]
                is_conv = node.op_type == "Conv"
                axis = (0 if is_conv else -1) if self.per_channel else None
                wq = qz.quantize_weight(layer.weight, axis, qmax)
                w_scale = (wq.scale * np.float32(layer.weight_scale_factor)).astype(np.float32)
                if is_conv and w_scale.ndim:
                    w_scale = w_scale.reshape((1, -1) + (1,) * (layer.weight.ndim - 2))
                w_name = names.initializer(f"{node.input[1]}_quantized", wq.values, np.int8)
                w_zp = names.initializer(f"{node.input[1]}_zero_point", np.zeros((), np.int8), np.int8)
                op = "ConvInteger" if is_conv else "MatMulInteger"
                integer = helper.make_node(op, [x, w_name, x_zp, w_zp], [names.fresh(f"{base}_int32")],
                                           name=names.fresh(f"{base}_{op}"))
                if is_conv:
                    integer.attribute.extend(node.attribute)
                scale_inputs = [x_scale, names.initializer(f"{node.input[1]}_scale", w_scale, np.float32)]
            cast = helper.make_node("Cast", integer.output, [names.fresh(f"{base}_int32_float")], to=FLOAT,
                                    name=names.fresh(f"{base}_Cast"))
            scale = helper.make_node("Mul", scale_inputs, [names.fresh(f"{base}_rescale")],
                                     name=names.fresh(f"{base}_rescale_Mul"))
            out = node.output[0]
            has_bias = layer.bias is not None
            rescaled = helper.make_node("Mul", [cast.output[0], scale.output[0]],
                                        [names.fresh(f"{base}_unbiased") if has_bias else out],
                                        name=names.fresh(f"{base}_Mul"))
            nodes += [integer, cast, scale, rescaled]
            if has_bias:
                bias = names.initializer(f"{base}_bias", layer.bias, np.float32)
                nodes.append(helper.make_node("Add", [rescaled.output[0], bias], [out], name=names.fresh(f"{base}_Add")))
            replacements[node.name] = nodes
        return replacements

    def _weight_only(self, node: onnx.NodeProto, layer: _Layer, names: NameAllocator, qmax: int) -> list[onnx.NodeProto]:
        """int8 weights behind a DequantizeLinear (per output channel: axis 0), read by the float Conv."""
        wq = qz.quantize_weight(layer.weight, 0 if self.per_channel else None, qmax)
        q = names.initializer(f"{node.input[1]}_quantized", wq.values, np.int8)
        scale = names.initializer(f"{node.input[1]}_scale", wq.scale, np.float32)
        zp = names.initializer(f"{node.input[1]}_zero_point", np.zeros(wq.scale.shape, np.int8), np.int8)
        dequantized = names.fresh(f"{node.input[1]}_dequantized")
        kwargs = {"axis": 0} if wq.scale.ndim else {}
        dq = helper.make_node("DequantizeLinear", [q, scale, zp], [dequantized],
                              name=names.fresh(f"{node.input[1]}_DequantizeLinear"), **kwargs)
        conv = onnx.NodeProto()
        conv.CopyFrom(node)
        conv.input[1] = dequantized
        return [dq, conv]


def _elem_types(model: Model) -> dict[str, int]:
    """Element type of every tensor whose type is known: declared, inferred, or a constant's."""
    types = {name: vi.type.tensor_type.elem_type for name, vi in model.value_infos().items()
             if vi.type.HasField("tensor_type")}
    types.update((t.name, t.data_type) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = model.get_constant(node.output[0])
            if value is not None and value.dtype == np.float32:
                types[node.output[0]] = FLOAT
    return types


# ------------------------------------------------------------------ reference arithmetic
def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX DynamicQuantizeLinear in numpy: uint8, the range [min(x, 0), max(x, 0)] over 255 steps."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(0.0)
    if scale == 0:
        return np.zeros(x.shape, np.uint8), scale, np.uint8(0)
    zp = np.uint8(np.clip(np.rint(np.float32(0.0 - lo) / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + int(zp), 0, 255).astype(np.uint8)
    return q, scale, zp


def reference_matmul(x: np.ndarray, w: np.ndarray, *, per_channel: bool = True, weight_bits: int = 8) -> np.ndarray:
    """What the dynamic-quant layout of ``x @ w`` computes (constant ``w``, no integer saturation)."""
    q, scale, zp = dynamic_quantize(x)
    wq = qz.quantize_weight(w, -1 if per_channel else None, qz.weight_qmax(weight_bits))
    acc = (q.astype(np.int64) - int(zp)) @ wq.values.astype(np.int64)
    return acc.astype(np.float32) * (scale * wq.scale).astype(np.float32)
