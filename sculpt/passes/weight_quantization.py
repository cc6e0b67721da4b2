"""Weight-only quantization: the constant weights of Conv, Gemm and MatMul stored as 4- or 8-bit
integers behind a DequantizeLinear, activations left in float (no calibration data needed).

What it is for: file size (a 4-bit weight takes an eighth of a float32's bytes), and runtimes that
compute with low-bit weights directly. Numerics: each weight is replaced by its symmetric rounding
``scale * clip(round(w / scale), -qmax, qmax)`` with ``qmax`` 7 (4 bits) or 127 (8 bits) and one
scale per output channel, or per group of ``group_size`` consecutive input elements of an output
column or conv filter tap (opset 21's blocked quantization; depthwise convs stay per channel). The model computes exactly
what the float model computes with those rounded weights: the pass's error is the weights' rounding
alone, measured by the pipeline on held-out samples like every lossy pass.

Layout: one DequantizeLinear per weight initializer (shared by all its readers), int4 or int8 values
with no zero point (symmetric), per-axis (``axis``) or blocked (``axis`` + ``block_size``) float32
scales. 4-bit and blocked weights need opset 21; the model is converted to it (onnx's version
converter), or the pass stops with one line naming the reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sculpt.errors import PassError
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, option, register

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
INT4_OPSET = 21  # int4 tensors and blocked quantization in DequantizeLinear
PER_AXIS_OPSET = 13
QMAX = {4: 7, 8: 127}


# clipping ratios tried for each scale (of the largest magnitude): the one with the least squared
# rounding error is kept. On PP-OCRv4 rec's 4-bit weights the error-minimizing clip is what keeps
# the model usable; for 8 bits it rarely moves off 1.0
CLIP_RATIOS = np.linspace(0.5, 1.0, 11)


def _best_scales(rows: np.ndarray, qmax: int, search: bool) -> np.ndarray:
    """One scale per row of ``rows`` (2-D: scale groups x their elements), the clip ratio of
    CLIP_RATIOS with the least squared error (``search``), else the largest magnitude / qmax."""
    amax = np.abs(rows).max(axis=1)
    best = np.where(amax > 0, amax / qmax, 1.0)
    if not search:
        return best.astype(np.float32)
    best_err = np.full(len(rows), np.inf)
    for ratio in CLIP_RATIOS:
        scale = np.where(amax > 0, amax * ratio / qmax, 1.0)
        err = ((np.clip(np.round(rows / scale[:, None]), -qmax, qmax) * scale[:, None] - rows) ** 2).sum(axis=1)
        better = err < best_err
        best = np.where(better, scale, best)
        best_err = np.where(better, err, best_err)
    return best.astype(np.float32)


def quantize_symmetric(w: np.ndarray, axis: int, qmax: int, group_size: int = 0,
                       group_axis: int | None = None, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(integer values, float32 scales) of ``w``: one scale per index of ``axis``, or (``group_size``
    > 0) per ``group_size`` consecutive elements along ``group_axis`` (the scales then have ``w``'s
    shape with that axis divided, rounded up; ``w`` 2-D). ``search``: each scale clips at the ratio
    of CLIP_RATIOS with the least squared rounding error. A group of zeros gets scale 1."""
    w = np.asarray(w, np.float32)
    if group_size:
        moved = np.moveaxis(w, group_axis, 0)  # (input, the other axes)
        rest = moved.shape[1:]
        flat = moved.reshape(moved.shape[0], -1)
        groups = -(-flat.shape[0] // group_size)
        padded = np.zeros((groups * group_size, flat.shape[1]), np.float32)
        padded[:flat.shape[0]] = flat
        blocks = padded.reshape(groups, group_size, -1).transpose(0, 2, 1).reshape(-1, group_size)
        scale = _best_scales(blocks, qmax, search).reshape(groups, -1)
        expanded = np.repeat(scale, group_size, axis=0)[:flat.shape[0]]
        q = np.clip(np.round(flat / expanded), -qmax, qmax).reshape(moved.shape)
        return np.moveaxis(q, 0, group_axis), np.moveaxis(scale.reshape((groups,) + rest), 0, group_axis)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = _best_scales(rows, qmax, search)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax)
    return q, scale


def dequantized(q: np.ndarray, scale: np.ndarray, axis: int, group_size: int = 0) -> np.ndarray:
    """What DequantizeLinear computes from ``quantize_symmetric``'s output (float32)."""
    if group_size:
        full = np.repeat(scale, group_size, axis=axis)
        full = np.take(full, np.arange(q.shape[axis]), axis=axis)
        return (q * full).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q * scale.reshape(shape)).astype(np.float32)


def int_tensor(name: str, values: np.ndarray, bits: int) -> onnx.TensorProto:
    """An INT4 (packed two per byte) or INT8 initializer."""
    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    return helper.make_tensor(name, onnx.TensorProto.INT4, values.shape, values.astype(np.int8).ravel().tolist())


@register
@dataclass
class WeightQuantization(Pass):
    """Weight-only int4/int8 quantization of Conv/Gemm/MatMul weights (lossy; no calibration)."""

    name = "weight-quant"
    exact = False
    needs_calibration = False

    bits: int = option(4, help="4 (int4, opset 21) or 8 (int8) weights, symmetric")
    group_size: int = option(0, help="0: one scale per output channel; > 0: one per this many consecutive "
                                     "input channels (per output channel and kernel position of a conv), a "
                                     "power of two >= 16; depthwise convs stay per channel")
    ops: list[str] = option(default_factory=lambda: list(WEIGHT_OPS), help="op types: " + ", ".join(WEIGHT_OPS))
    skip: list[str] = option(default_factory=list, help="fnmatch patterns of node names whose weights stay float")
    conv_bits: int = option(0, help="bits of the other conv weights: 0 (as bits), 4 or 8. PP-OCRv4 rec kept "
                                    "its accuracy with 4-bit Gemm/MatMul weights, not with 4-bit convs")
    depthwise_bits: int = option(8, help="bits of depthwise conv weights (few weights per scale: 4 bits "
                                         "broke PP-OCRv4 rec), 4 or 8")
    clip_search: bool = option(True, help="each scale clips where the squared rounding error is least "
                                          "(ratios 0.5-1.0 of the largest magnitude), not at the largest")
    min_elements: int = option(1024, help="weights with fewer elements stay float (scales would cost more than "
                                          "they save)")

    def __post_init__(self):
        if self.bits not in QMAX or self.depthwise_bits not in QMAX or self.conv_bits not in (0, *QMAX):
            raise ValueError(f"bits and depthwise_bits must be 4 or 8, conv_bits 0, 4 or 8; got {self.bits}, "
                             f"{self.depthwise_bits}, {self.conv_bits}")
        if self.group_size and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be 0 or a power of two >= 16, got {self.group_size}")
        unknown = [o for o in self.ops if o not in WEIGHT_OPS]
        if unknown:
            raise ValueError(f"cannot quantize the weights of op '{unknown[0]}' (known: {', '.join(WEIGHT_OPS)})")
        if self.min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {self.min_elements}")

    def requires(self, model: Model, ctx: PassContext) -> None:
        super().requires(model, ctx)
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                                "MatMulNBits", "MatMulInteger", "ConvInteger"):
                raise PassError(self.name, "the model is already quantized", node.name)

    def _weights(self, model: Model) -> dict[str, list[tuple[onnx.NodeProto, int, int]]]:
        """Initializer name -> [(node, output-channel axis, input axis[, "depthwise"])] of the weights to
        quantize."""
        inits = model.initializer_map()
        graph_inputs = set(model.input_names)
        found: dict[str, list] = {}
        refused: set[str] = set()
        for node in model.graph.node:
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
                continue
            name = node.input[1]
            if name not in inits or name in graph_inputs:
                continue
            if node.op_type not in self.ops or any(fnmatch.fnmatchcase(node.name, p) for p in self.skip):
                refused.add(name)
                continue
            t = inits[name]
            dims = list(t.dims)
            if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(dims)) < self.min_elements:
                refused.add(name)
                continue
            if node.op_type == "Conv":
                axes = (0, 1)
                if dims[1] == 1 and next((a.i for a in node.attribute if a.name == "group"), 1) > 1:
                    axes = (0, 1, "depthwise")
            elif node.op_type == "MatMul":
                if len(dims) != 2:
                    refused.add(name)
                    continue
                axes = (1, 0)
            else:  # Gemm: B is [K, N], or [N, K] with transB
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axes = (0, 1) if trans_b else (1, 0)
            found.setdefault(name, []).append((node, *axes))
        for name in refused:  # a weight some reader needs in float stays float for all
            found.pop(name, None)
        return {n: uses for n, uses in found.items() if len({tuple(u[1:]) for u in uses}) == 1}

    def _bits(self, use: tuple) -> int:
        if len(use) > 3:
            return self.depthwise_bits
        if use[0].op_type == "Conv":
            return self.conv_bits or self.bits
        return self.bits

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        weights = self._weights(model)
        if not weights:
            return PassResult(model, False, {"quantized": 0})
        allow_plain_initializers(model)
        stats: dict[str, Any] = {}
        lowest = min(self._bits(uses[0]) for uses in weights.values())
        need = INT4_OPSET if lowest == 4 or self.group_size else PER_AXIS_OPSET
        if model.opset < need:
            try:
                model.upgrade_opset(need)
            except Exception as e:  # noqa: BLE001 - one line naming why
                raise PassError(self.name, f"{self.bits}-bit weights need opset {need}: {e}") from None
            stats["opset"] = f"-> {need}"
            weights = self._weights(model)  # the converter rebuilds the graph
        inits = model.initializer_map()
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | \
            {n.name for n in model.graph.node}

        def fresh(prefix: str) -> str:
            name, i = prefix, 0
            while name in taken:
                i += 1
                name = f"{prefix}_{i}"
            taken.add(name)
            return name

        float_bytes = packed_bytes = 0
        by_op: dict[str, int] = {}
        for name, uses in weights.items():
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            axis, in_axis = uses[0][1], uses[0][2]
            bits = self._bits(uses[0])
            # groups along the input axis; a depthwise conv has one input per group: per channel
            group = self.group_size if self.group_size and w.shape[in_axis] > 1 and len(uses[0]) == 3 else 0
            q, scale = quantize_symmetric(w, axis, QMAX[bits], group, in_axis, self.clip_search)
            qname, sname, out = fresh(f"{name}_int{bits}"), fresh(f"{name}_scale"), fresh(f"{name}_dequantized")
            model.append_initializer(int_tensor(qname, q, bits))
            model.append_initializer(numpy_helper.from_array(scale.astype(np.float32), sname))
            attrs = {"axis": in_axis, "block_size": group} if group else {"axis": axis}
            model.append_node(helper.make_node("DequantizeLinear", [qname, sname], [out],
                                               name=fresh(f"{name}_DequantizeLinear"), **attrs))
            for use in uses:
                model.set_input(use[0], 1, out)
                by_op[use[0].op_type] = by_op.get(use[0].op_type, 0) + 1
            float_bytes += 4 * w.size
            packed_bytes += (w.size * bits + 7) // 8 + 4 * scale.size
        model.topological_sort()
        model.remove_unused()
        model.infer_shapes(refresh=True)
        stats.update({"quantized": len(weights), "quantized_by_op": by_op, "bits": self.bits,
                      "conv_bits": self.conv_bits or self.bits, "depthwise_bits": self.depthwise_bits,
                      "group_size": self.group_size, "weight_bytes": f"{float_bytes} -> {packed_bytes}"})
        return PassResult(model, True, stats)
