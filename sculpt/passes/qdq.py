"""QDQ int8 quantization: QuantizeLinear/DequantizeLinear pairs calibrated on data, in the layout that
onnxruntime's QDQ fusions turn into int8 kernels (QLinearConv, QLinearMatMul, QGemm, QLinearAdd ...)
and that :mod:`sculpt.backends.tvm.int8` lowers to int8 compute in TVM.

Layout, for each quantized node (the ops of ``ops``, minus ``skip`` and the layers kept in float by
sensitivity):

- every float activation input reads ``DequantizeLinear(QuantizeLinear(t))`` (per tensor, uint8
  asymmetric or int8 symmetric), one pair per tensor shared by all its readers;
- constant weights become int8 initializers behind a DequantizeLinear, symmetric, per output channel
  (``axis``) — the opset is raised to 13 where that needs it; with ``weight_bits=4`` int4 (W4A8,
  opset 21), each channel's scale clipped where its squared rounding error is least. onnxruntime
  1.32 has no int8 kernel for int4 weights: those convs and MatMuls run in float on weights
  dequantized at every run (``conv_weight_bits=8`` keeps the convs in QLinearConv);
- a constant bias of Conv/ConvTranspose/Gemm becomes int32 with scale input_scale × weight_scale;
- the output is quantized too (so that the runtime can fuse the whole unit); a Relu, or a Clip whose
  lower bound is 0, that is the output's only reader is folded into that output's QuantizeLinear
  (uint8 with zero point 0 clamps exactly as the activation does);
- MaxPool and Resize outputs reuse their input's parameters (the runtimes then drop the pair).

Accuracy aids: ``equalize`` (cross-layer equalization, exact, before calibration), ``bias_correction``
(each layer's bias shifted by the mean output error its quantization causes on calibration data) and
sensitivity (per-layer quantization error on calibration data; ``keep_float`` worst layers stay float,
or the fewest worst ones that bring the quantized model's own output error on the calibration
samples within ``error_budget``, found by a binary search over the count).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sculpt.errors import PassError
from sculpt.ir import quantization as qz
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, check_range, option, register

MAX_BINS = 2**16  # histogram bins per sign: 2^16 already resolves ranges far finer than int8 can use
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool",
                   "MaxPool", "Concat", "Resize")
DEFAULT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SAME_PARAMS_OPS = ("MaxPool", "Resize")  # output reuses the input's scale and zero point
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
PER_CHANNEL_OPSET = 13
INT4_OPSET = 21  # int4 weights behind DequantizeLinear (W4A8)
WEIGHT_BITS = (4, 7, 8)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class Weight:
    input_index: int
    value: np.ndarray
    axis: int | None  # per-channel axis, None: per tensor


@dataclass
class Layer:
    """One node to quantize and how."""

    node: onnx.NodeProto
    activations: list[int]  # input indices that read activation tensors
    weight: Weight | None = None
    bias_index: int | None = None  # input index of a constant bias that becomes int32
    output: str | None = None  # the tensor whose QDQ follows the node (after a folded activation)
    folded: onnx.NodeProto | None = None  # Relu/Clip folded into the output's quantization
    constants: list[int] = field(default_factory=list)  # constant inputs quantized per tensor (Add/Mul)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def channel_axis(self) -> int:
        return 1 if self.node.op_type in ("Conv", "ConvTranspose") else -1


@register
@dataclass
class QDQ(Pass):
    """Int8 QuantizeLinear/DequantizeLinear insertion, calibrated (lossy; needs calibration data)."""

    name = "qdq"
    exact = False
    needs_calibration = True

    calibration: str = option("mse", help="activation ranges: minmax | percentile | entropy | mse")
    percentile: float = option(99.999, help="calibration=percentile: the percentile of the values kept")
    activations: str = option("uint8", help="activation type: uint8 (asymmetric) | int8 (symmetric)")
    weight_bits: int = option(8, help="8: weights in [-127, 127]; 7: in [-63, 63], for onnxruntime on x86 CPUs "
                                      "without VNNI, whose QLinearConv/MatMul saturate the int16 sums of "
                                      "uint8 x 8-bit weight pairs; 4: int4 in [-7, 7] (W4A8, opset 21), each "
                                      "channel's scale clipped where its squared rounding error is least")
    conv_weight_bits: int = option(0, help="bits of Conv/ConvTranspose weights: 0 (as weight_bits), 4, 7 or 8 "
                                           "(weight_bits=4,conv_weight_bits=8: 4-bit MatMul/Gemm weights, convs "
                                           "in onnxruntime's int8 QLinearConv)")
    per_channel: bool = option(True, help="per-output-channel weight scales (raises the opset to 13)")
    ops: list[str] = option(default_factory=lambda: list(DEFAULT_OPS),
                            help="op types to quantize: " + ", ".join(QUANTIZABLE_OPS))
    skip: list[str] = option(default_factory=list, help="fnmatch patterns of node names kept in float")
    min_macs: int = option(0, help="Conv/Gemm/MatMul layers with fewer MACs stay float (their Q/DQ would "
                                   "cost more than int8 saves)")
    keep_float: int = option(0, help="keep this many of the most sensitive layers in float")
    error_budget: float = option(0.0, help="if > 0: keep the fewest most sensitive layers in float for the "
                                           "quantized model's output error on the calibration samples (max |a-b| "
                                           "/ max |b|) to be at most this")
    equalize: bool = option(False, help="cross-layer equalization before calibration (exact)")
    bias_correction: bool = option(False, help="shift each layer's bias by its mean output error on calibration data")
    fold_activations: bool = option(True, help="fold a Relu/Clip(0, x) into the preceding output's quantization")
    samples: int = option(32, help="calibration samples")
    bins: int = option(2048, help="histogram bins per sign (percentile, entropy, mse)")

    def __post_init__(self):
        if self.calibration not in qz.RANGE_METHODS:
            raise ValueError(f"calibration must be one of {', '.join(qz.RANGE_METHODS)}, got '{self.calibration}'")
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be 4, 7 or 8, got {self.weight_bits}")
        if self.conv_weight_bits not in (0, *WEIGHT_BITS):
            raise ValueError(f"conv_weight_bits must be 0, 4, 7 or 8, got {self.conv_weight_bits}")
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"activations must be uint8 or int8, got '{self.activations}'")
        unknown = [o for o in self.ops if o not in QUANTIZABLE_OPS]
        if unknown:
            raise ValueError(f"cannot quantize op '{unknown[0]}' (known: {', '.join(QUANTIZABLE_OPS)})")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1 or self.bins < 16 or self.keep_float < 0 or self.error_budget < 0 or self.min_macs < 0:
            raise ValueError("samples must be ≥ 1, bins ≥ 16, keep_float, error_budget and min_macs ≥ 0")
        check_range("error_budget", self.error_budget, 0)
        check_range("bins", self.bins, 16, MAX_BINS)

    # ------------------------------------------------------------------ run
    def requires(self, model: Model, ctx: PassContext) -> None:
        super().requires(model, ctx)
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"):
                raise PassError(self.name, "the model is already quantized", node.name)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # nothing to quantize: the model goes back exactly as it came (no opset upgrade, no equalization)
        four_bit = 4 in (self.weight_bits, self.conv_weight_bits)
        need = INT4_OPSET if four_bit else PER_CHANNEL_OPSET
        untouched = model.clone() if self.equalize or model.opset < need or model.proto.ir_version < 4 else model
        allow_plain_initializers(model)
        stats: dict[str, Any] = {}
        if (self.per_channel or four_bit) and model.opset < need:
            stats["opset"] = f"{model.opset} -> {need}"
            what = "int4 weights" if four_bit else "per-channel weights"
            try:
                model.upgrade_opset(need)
            except Exception as e:
                raise PassError(self.name, f"{what} need opset {need}: {e}") from None
        elif model.opset < 10:
            raise PassError(self.name, f"QuantizeLinear needs opset ≥ 10, the model has {model.opset}")
        if self.equalize:
            from sculpt.passes.cross_layer_equalization import equalize_model

            stats["equalized_pairs"] = equalize_model(model)
        model.infer_shapes(refresh=True)
        calibration = ctx.calibration.take(self.samples)
        calibration.check(model)

        layers, skipped = self._plan(model, set())
        tensor_stats = self._calibrate(model, layers, calibration)
        params = self._params(model, layers, tensor_stats)

        errors: dict[str, qz.LayerError] = {}
        if self.keep_float or self.error_budget or self.bias_correction:
            errors = measure_layer_errors(model, layers, params, calibration, per_channel=self.per_channel,
                                          weight_bits=self.weight_bits, conv_weight_bits=self.conv_weight_bits)
            stats["layer_errors"] = {k: round(float(e.relative_error), 6) for k, e in
                                     sorted(errors.items(), key=lambda kv: -kv[1].relative_error)}
        sensitive = []
        if self.keep_float or self.error_budget:
            sensitive = qz.select_sensitive({k: e.relative_error for k, e in errors.items()},
                                            count=self.keep_float, budget=self.error_budget or None)
            if sensitive:
                layers, skipped = self._plan(model, set(sensitive))
                missing = {t for layer in layers for t in self._layer_tensors(model, layer)} - set(tensor_stats)
                if missing:
                    tensor_stats.update(self._calibrate_tensors(model, sorted(missing), calibration))
                params = self._params(model, layers, tensor_stats)
        if self.error_budget and errors:
            sensitive, model_error, trials = self._meet_model_budget(model, errors, sensitive, tensor_stats,
                                                                     calibration)
            layers, skipped = self._plan(model, set(sensitive))
            params = self._params(model, layers, tensor_stats)
            stats["model_error_on_calibration"] = round(model_error, 6)
            stats["budget_trials"] = trials
        stats["kept_float_by_sensitivity"] = sensitive
        if self.bias_correction:
            stats["bias_corrected"] = self._correct_biases(model, layers, errors)
        if not layers:
            stats.update({"quantized": 0, "skipped": skipped})
            stats.pop("opset", None)
            stats.pop("equalized_pairs", None)
            return PassResult(untouched, False, stats)
        self._apply(model, layers, params)
        model.topological_sort()  # the new nodes were appended; remove_unused needs the order
        model.remove_unused()
        model.infer_shapes(refresh=True)
        counts: dict[str, int] = {}
        for layer in layers:
            counts[layer.node.op_type] = counts.get(layer.node.op_type, 0) + 1
        stats.update({"quantized": len(layers), "quantized_by_op": counts, "skipped": skipped,
                      "folded_activations": sum(1 for layer in layers if layer.folded is not None),
                      "calibration": self.calibration, "activation_type": self.activations,
                      "tensors": len(params)})
        return PassResult(model, True, stats)

    # ------------------------------------------------------------------ planning
    def _plan(self, model: Model, keep_float: set[str]) -> tuple[list[Layer], list[dict]]:
        consts = model.constant_names()
        consumers = model.consumers()
        outputs = set(model.output_names)
        graph_inputs = {i.name for i in model.graph.input} - consts
        elem = _elem_types(model)
        macs = {}
        if self.min_macs:
            from sculpt.ir.cost import cost_of

            macs = {c.name: c.macs for c in cost_of(model).layers}
        layers, skipped = [], []
        claimed_activations: set[str] = set()
        for node in model.graph.node:
            if node.op_type not in self.ops or node.domain not in ("", "ai.onnx"):
                continue
            why = None
            if any(fnmatch.fnmatchcase(node.name, p) for p in self.skip):
                why = "skipped by name"
            elif node.name in keep_float:
                why = "kept in float by sensitivity"
            elif node.op_type in WEIGHTED_OPS and macs.get(node.name) is not None and macs[node.name] < self.min_macs:
                why = f"{macs[node.name]} MACs < min_macs"
            else:
                layer_or_reason = self._layer(model, node, consts, elem, graph_inputs)
                if isinstance(layer_or_reason, str):
                    why = layer_or_reason
            if why:
                skipped.append({"layer": node.name, "op": node.op_type, "reason": why})
                continue
            layer = layer_or_reason
            out = node.output[0]
            layer.output = out
            if out in outputs:
                layer.output = None  # graph outputs stay float
            elif self.fold_activations and self.activations == "uint8" and node.op_type not in SAME_PARAMS_OPS:
                readers = consumers.get(out, [])
                if len(readers) == 1 and _foldable(model, readers[0]) and readers[0].output[0] not in outputs \
                        and readers[0].name not in claimed_activations:
                    layer.folded = readers[0]
                    layer.output = readers[0].output[0]
                    claimed_activations.add(readers[0].name)
            layers.append(layer)
        return layers, skipped

    def _layer(self, model: Model, node, consts, elem, graph_inputs) -> Layer | str:
        op = node.op_type
        ins = list(node.input)

        def is_float(name):
            return elem.get(name) == onnx.TensorProto.FLOAT

        if not node.output or not is_float(node.output[0]):
            return "output is not float32 (or its type is unknown)"
        if op in ("Conv", "ConvTranspose"):
            if len(ins) < 2 or ins[1] not in consts:
                return "weights are not constant"
            w = model.get_constant(ins[1])
            axis = 0 if op == "Conv" else (1 if int(_attr(node, "group", 1)) == 1 else None)
            layer = Layer(node, [0], Weight(1, w, axis if self.per_channel else None))
            if len(ins) > 2 and ins[2]:
                if ins[2] not in consts:
                    return "bias is not constant"
                layer.bias_index = 2
            return layer
        if op == "Gemm":
            if len(ins) < 2 or ins[1] not in consts or _attr(node, "transA", 0):
                return "B is not constant (or transA is set)"
            w = model.get_constant(ins[1])
            axis = 0 if _attr(node, "transB", 0) else 1
            layer = Layer(node, [0], Weight(1, w, axis if self.per_channel else None))
            if len(ins) > 2 and ins[2]:
                c = model.get_constant(ins[2])
                n_out = w.shape[axis]
                if c is None or c.size != n_out or c.ndim != 1 or _attr(node, "alpha", 1.0) != 1.0 \
                        or _attr(node, "beta", 1.0) != 1.0:
                    return "C is not a constant bias vector (or alpha/beta are not 1)"
                layer.bias_index = 2
            return layer
        if op == "MatMul":
            a_const, b_const = ins[0] in consts, ins[1] in consts
            if a_const and b_const:
                return "both inputs are constant"
            if b_const:
                w = model.get_constant(ins[1])
                axis = w.ndim - 1 if w.ndim == 2 and self.per_channel else None
                return Layer(node, [0], Weight(1, w, axis))
            if a_const:
                return Layer(node, [1], Weight(0, model.get_constant(ins[0]), None))
            return Layer(node, [0, 1])
        if op in ("Add", "Mul"):
            acts = [i for i, t in enumerate(ins) if t not in consts]
            const_idx = [i for i, t in enumerate(ins) if t in consts]
            if not acts:
                return "both inputs are constant"
            if any(not is_float(ins[i]) for i in acts):
                return "an input is not float32"
            return Layer(node, acts, constants=const_idx)
        if op == "Concat":
            if any(t in consts for t in ins):
                return "a constant input"
            return Layer(node, list(range(len(ins))))
        # pooling, Resize: the data input only
        if ins[0] in consts:
            return "the data input is constant"
        return Layer(node, [0])

    def _quantized_copy(self, model: Model, keep_float: set[str], tensor_stats: dict, calibration) -> Model:
        """A copy of ``model`` quantized with the layers of ``keep_float`` left in float (no bias correction)."""
        out = model.clone()
        layers, _ = self._plan(out, keep_float)  # the clone's own nodes
        missing = {t for layer in layers for t in self._layer_tensors(out, layer)} - set(tensor_stats)
        if missing:
            tensor_stats.update(self._calibrate_tensors(model, sorted(missing), calibration))
        if layers:
            self._apply(out, layers, self._params(out, layers, tensor_stats))
            out.topological_sort()
            out.remove_unused()
        return out

    def _meet_model_budget(self, model: Model, errors: dict, sensitive: list[str], tensor_stats: dict,
                           calibration) -> tuple[list[str], float, int]:
        """The fewest most-sensitive layers kept float so that the quantized MODEL's output error on the
        calibration samples (max |a - b| / max |b| over outputs, what the pipeline reports) is within
        ``error_budget``: the summed per-layer errors that picked ``sensitive`` under-count it (0.02
        asked, 0.056-0.09 got on a MobileNetV3-style classifier). A binary search over the count from
        ``sensitive`` up, in sensitivity order; returns (layers kept float, model error, trials)."""
        from sculpt.runtime import compare_models

        order = sorted(errors, key=lambda k: -errors[k].relative_error)
        feeds = list(calibration)
        cache: dict[int, float] = {}

        def error_with(count: int) -> float:
            if count not in cache:
                candidate = self._quantized_copy(model, set(order[:count]), tensor_stats, calibration)
                cache[count] = compare_models(model, candidate, feeds).max_rel
            return cache[count]

        low, high = len(sensitive), len(order)
        if error_with(low) > self.error_budget:
            low += 1
            while low < high:  # the smallest count within the budget lies in [low, high]
                mid = (low + high) // 2
                if error_with(mid) <= self.error_budget:
                    high = mid
                else:
                    low = mid + 1
            chosen = high
        else:
            chosen = low
        return order[:chosen], error_with(chosen) if chosen < len(order) else 0.0, len(cache)

    def _layer_tensors(self, model: Model, layer: Layer) -> list[str]:
        """Activation tensors whose ranges this layer needs."""
        names = [layer.node.input[i] for i in layer.activations]
        if layer.output and layer.node.op_type not in SAME_PARAMS_OPS:
            names.append(layer.output)
        return names

    # ------------------------------------------------------------------ calibration
    def _calibrate(self, model: Model, layers: list[Layer], calibration) -> dict[str, qz.TensorStats]:
        tensors = sorted({t for layer in layers for t in self._layer_tensors(model, layer)})
        return self._calibrate_tensors(model, tensors, calibration)

    def _calibrate_tensors(self, model: Model, tensors: list[str], calibration) -> dict[str, qz.TensorStats]:
        from sculpt.runtime import iter_activations

        def sweep():
            return iter_activations(model, tensors, calibration)

        return qz.collect_stats(sweep(), tensors, histogram=self.calibration != "minmax", rerun=sweep, bins=self.bins)

    def _params(self, model: Model, layers: list[Layer], stats: dict[str, qz.TensorStats]) -> dict[str, qz.QuantParams]:
        params: dict[str, qz.QuantParams] = {}
        for t, s in stats.items():
            lo, hi = qz.choose_range(s, self.calibration, self.activations, percentile=self.percentile)
            params[t] = qz.activation_params(lo, hi, self.activations)
        # in topological order, so that a chain of MaxPool/Resize inherits from its source
        for layer in layers:
            src = layer.node.input[0]
            if layer.node.op_type in SAME_PARAMS_OPS and layer.output:
                params[layer.output] = params[src]
        needed = {t for layer in layers for t in self._layer_tensors(model, layer)}
        needed |= {layer.output for layer in layers if layer.output}
        return {t: p for t, p in params.items() if t in needed}

    # ------------------------------------------------------------------ bias correction
    def _correct_biases(self, model: Model, layers: list[Layer], errors: dict[str, qz.LayerError]) -> int:
        corrected = 0
        for layer in layers:
            err = errors.get(layer.name)
            shift = err.mean_shift() if err is not None else None
            if shift is None or layer.weight is None or layer.node.op_type == "MatMul":
                continue
            node = layer.node
            if layer.bias_index is None:
                if node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0):
                    continue
                model.set_input(node, 2, model.add_initializer(f"{node.name}_bias", np.zeros(shift.shape, np.float32)))
                layer.bias_index = 2
            bias = model.get_constant(node.input[2]).astype(np.float64)
            model.replace_constant_input(node, 2, (bias + shift).astype(np.float32), suffix="bias_corrected")
            corrected += 1
        return corrected

    # ------------------------------------------------------------------ rewriting
    def _apply(self, model: Model, layers: list[Layer], params: dict[str, qz.QuantParams]) -> None:
        # weights, biases and constant operands behind DequantizeLinear
        const_operands: dict[str, str] = {}
        names = _Names(model)
        for layer in layers:
            node = layer.node
            if layer.weight is not None:
                bits = layer_weight_bits(node, self.weight_bits, self.conv_weight_bits)
                wq = quantize_layer_weight(layer.weight.value, layer.weight.axis, bits)
                name = node.input[layer.weight.input_index]
                model.set_input(node, layer.weight.input_index, _dq_constant(
                    names, f"{name}_{node.name}", wq.values, wq.scale, np.zeros(wq.scale.shape, np.int8), wq.axis,
                    bits=4 if bits == 4 else 8))
                if layer.bias_index is not None:
                    x_scale = params[node.input[layer.activations[0]]].scale
                    b = model.get_constant(node.input[layer.bias_index])
                    bq, bscale = qz.quantize_bias(b, x_scale, wq.scale)
                    model.set_input(node, layer.bias_index, _dq_constant(
                        names, f"{node.input[layer.bias_index]}_{node.name}", bq, bscale,
                        np.zeros(bscale.shape, np.int32), 0 if bscale.ndim else None))
            for i in layer.constants:
                name = node.input[i]
                if name not in const_operands:
                    value = model.get_constant(name).astype(np.float32)
                    p = qz.activation_params(float(value.min()), float(value.max()), self.activations)
                    q = qz.quantize(value, p.scale, p.zero_point, p.dtype)
                    const_operands[name] = _dq_constant(names, name, q, p.scale_array(), p.zero_point_array(), None)
                model.set_input(node, i, const_operands[name])
        # folded activations: the node writes the activation's output (the activation goes below)
        folded = {layer.folded.name for layer in layers if layer.folded is not None}
        for layer in layers:
            if layer.folded is not None:
                model.set_output(layer.node, 0, layer.folded.output[0])

        # activations: one Q/DQ pair per tensor, read by every consumer
        outputs = set(model.output_names)
        shared: dict[qz.QuantParams, tuple[str, str]] = {}  # equal parameters share initializers
        for tensor, p in params.items():
            if tensor in outputs:
                continue
            if p not in shared:
                shared[p] = (names.initializer(f"{tensor}_scale", p.scale_array()),
                             names.initializer(f"{tensor}_zero_point", p.zero_point_array()))
            scale, zp = shared[p]
            q_out = names.fresh(f"{tensor}_quantized")
            dq_out = names.fresh(f"{tensor}_dequantized")
            model.replace_uses(tensor, dq_out)
            model.append_node(helper.make_node("QuantizeLinear", [tensor, scale, zp], [q_out],
                                               name=names.fresh(f"{tensor}_QuantizeLinear")))
            model.append_node(helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out],
                                               name=names.fresh(f"{tensor}_DequantizeLinear")))
        if folded:
            keep = [n for n in model.graph.node if n.name not in folded]
            del model.graph.node[:]
            model.graph.node.extend(keep)
            model.graph_edited()

# ---------------------------------------------------------------------------------------- helpers
class _Names:
    """Fresh tensor and node names for many additions (Model.unique_name rescans the graph per call)."""

    def __init__(self, model: Model):
        self.model = model
        g = model.graph
        self.taken = {t.name for t in g.initializer} | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
        for node in g.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def fresh(self, prefix: str) -> str:
        name, i = prefix, 0
        while name in self.taken:
            i += 1
            name = f"{prefix}_{i}"
        self.taken.add(name)
        return name

    def initializer(self, prefix: str, value: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.model.append_initializer(numpy_helper.from_array(np.asarray(value), name))
        return name


def _dq_constant(names: _Names, base: str, values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 axis: int | None, bits: int = 8) -> str:
    """A constant stored quantized: initializers for values, scale and zero point, and the
    DequantizeLinear that reads them. Returns the dequantized tensor's name. ``bits`` 4: values and
    zero point are int4 (packed two per byte)."""
    if bits == 4:
        from sculpt.passes.weight_quantization import int_tensor

        q, z = names.fresh(f"{base}_quantized"), names.fresh(f"{base}_zero_point")
        names.model.append_initializer(int_tensor(q, values, 4))
        names.model.append_initializer(int_tensor(z, zero_point, 4))
    else:
        q = names.initializer(f"{base}_quantized", values)
        z = names.initializer(f"{base}_zero_point", zero_point)
    s = names.initializer(f"{base}_scale", np.asarray(scale, np.float32))
    out = names.fresh(f"{base}_dequantized")
    kwargs = {"axis": axis} if axis is not None and np.ndim(scale) == 1 else {}
    names.model.append_node(helper.make_node("DequantizeLinear", [q, s, z], [out],
                                             name=names.fresh(f"{base}_DequantizeLinear"), **kwargs))
    return out


def layer_weight_bits(node: onnx.NodeProto, weight_bits: int, conv_weight_bits: int) -> int:
    """The bits of ``node``'s weight: ``conv_weight_bits`` for Conv/ConvTranspose when set."""
    return conv_weight_bits if conv_weight_bits and node.op_type in ("Conv", "ConvTranspose") else weight_bits


def quantize_layer_weight(w: np.ndarray, axis: int | None, bits: int) -> qz.QuantizedWeight:
    """A layer's weight at ``bits``: 8 or 7 as :func:`qz.quantize_weight` (scale = largest magnitude /
    qmax); 4 per channel with each scale clipped where the squared rounding error is least (at 4 bits
    the largest magnitude wastes most of the 15 levels on a few outliers), per tensor as 8 and 7."""
    if bits != 4:
        return qz.quantize_weight(w, axis, qz.weight_qmax(bits))
    if axis is None:
        return qz.quantize_weight(w, None, 7)
    from sculpt.passes.weight_quantization import quantize_symmetric

    axis = axis % np.ndim(w)
    values, scale = quantize_symmetric(w, axis, 7)
    return qz.QuantizedWeight(values.astype(np.int8), scale.astype(np.float32), axis)


def _elem_types(model: Model) -> dict[str, int]:
    types = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def _foldable(model: Model, node: onnx.NodeProto) -> bool:
    """A Relu, or a Clip with a constant lower bound of 0: Q(act(x)) == Q(x) when the quantized range
    starts at 0 (uint8, zero point 0) and ends inside the activation's upper bound."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in FOLDABLE_ACTIVATIONS:
        return False
    if node.op_type == "Relu":
        return True
    if len(node.input) > 1 and node.input[1]:
        lo = model.get_constant(node.input[1])
    else:
        lo = _attr(node, "min", None)
    return lo is not None and float(np.asarray(lo)) == 0.0


def measure_layer_errors(model: Model, layers: list[Layer], params: dict[str, qz.QuantParams], calibration, *,
                         per_channel: bool = True, weight_bits: int = 8,
                         conv_weight_bits: int = 0) -> dict[str, qz.LayerError]:
    """Per-layer quantization error on calibration data, each layer alone: a shadow copy of every
    weighted layer reads fake-quantized inputs and dequantized int8 weights beside the float layer, in
    one onnxruntime session; the shadow's output is quantized (after its folded activation) in numpy and
    compared with the float layer's (activated) output."""
    from sculpt.runtime import iter_activations

    shadow = model.clone()
    names = _Names(shadow)
    pairs: dict[str, tuple[Layer, str, str]] = {}
    for layer in layers:
        if layer.weight is None or any(layer.node.input[i] not in params for i in layer.activations):
            continue
        node = layer.node
        inputs = list(node.input)
        for i in layer.activations:
            p = params[inputs[i]]
            inputs[i] = _fake_quant_nodes(names, inputs[i], p, f"{node.name}_shadow_in{i}")
        wq = quantize_layer_weight(layer.weight.value, layer.weight.axis,
                                   layer_weight_bits(node, weight_bits, conv_weight_bits))
        inputs[layer.weight.input_index] = names.initializer(f"{node.name}_shadow_weight", wq.dequantized())
        out = names.fresh(f"{node.name}_shadow_out")
        copy = helper.make_node(node.op_type, inputs, [out], name=names.fresh(f"{node.name}_shadow"))
        copy.attribute.extend(node.attribute)
        shadow.graph.node.append(copy)
        pairs[node.name] = (layer, node.output[0], out)
    if not pairs:
        return {}
    shadow.topological_sort()
    names = [t for _, a, b in pairs.values() for t in (a, b)]
    errors = {name: qz.LayerError(name) for name in pairs}
    for acts in iter_activations(shadow, names, calibration):
        for name, (layer, ref_name, q_name) in pairs.items():
            y, yq = acts[ref_name], acts[q_name]
            y_ref, y_out = y, yq
            if layer.folded is not None:
                y_ref = _apply_activation(model, layer.folded, y)
            if layer.output and layer.output in params:
                y_out = qz.fake_quantize(yq, params[layer.output])
            elif layer.folded is not None:
                y_out = _apply_activation(model, layer.folded, yq)
            # the mean shift is measured before the activation and the output's rounding
            axis = layer.channel_axis % y.ndim
            errors[name].observe(y_ref, y_out, axis)
            errors[name].observe_shift(y, yq, axis)
    return errors


def _fake_quant_nodes(names: _Names, tensor: str, p: qz.QuantParams, base: str) -> str:
    """A QuantizeLinear → DequantizeLinear pair on ``tensor``; returns the dequantized name."""
    scale = names.initializer(f"{base}_scale", p.scale_array())
    zp = names.initializer(f"{base}_zero_point", p.zero_point_array())
    q, dq = names.fresh(f"{base}_q"), names.fresh(f"{base}_dq")
    graph = names.model.graph
    graph.node.append(helper.make_node("QuantizeLinear", [tensor, scale, zp], [q], name=names.fresh(f"{base}_Q")))
    graph.node.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=names.fresh(f"{base}_DQ")))
    return dq


def _apply_activation(model: Model, node: onnx.NodeProto, y: np.ndarray) -> np.ndarray:
    if node.op_type == "Relu":
        return np.maximum(y, 0)
    hi = model.get_constant(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max", None)
    return np.clip(y, 0, float(np.asarray(hi)) if hi is not None else np.inf)
