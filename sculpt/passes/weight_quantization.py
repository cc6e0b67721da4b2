"""Weight-only quantization: the constant weights of Conv, Gemm and MatMul stored as 4- or 8-bit
integers behind a DequantizeLinear, activations left in float (no calibration data needed).

What it is for: file size (a 4-bit weight takes an eighth of a float32's bytes), and runtimes that
compute with low-bit weights directly. Numerics: each weight is replaced by its symmetric rounding
``scale * clip(round(w / scale), -qmax, qmax)`` with ``qmax`` 7 (4 bits) or 127 (8 bits) and one
scale per output channel, or per group of ``group_size`` consecutive input elements of an output
column or conv filter tap (opset 21's blocked quantization; depthwise convs stay per channel). The model computes exactly
what the float model computes with those rounded weights: the pass's error is the weights' rounding
alone, measured by the pipeline on held-out samples like every lossy pass.

Ternary and binary weights (``bits`` 2 and 1): codes in {-1, 0, +1} times a scale, the threshold
and scale that minimise the squared error of each channel or group (TWN), or {-1, +1} times the
mean magnitude (BWN / XNOR-Net). Without training they break what they touch in PP-OCRv4 rec's
convs and head; its SVTR MatMuls alone hold (see README).

Layout: one DequantizeLinear per weight initializer (shared by all its readers), int8, int4 or
int2 values (packed in raw_data) with no zero point (symmetric), per-axis (``axis``) or blocked
(``axis`` + ``block_size``) float32 scales. 4-bit and blocked weights need opset 21, int2 opset 25
(onnxruntime 1.32 runs DequantizeLinear on int2); the model is converted (onnx's version
converter), or the pass stops with one line naming the reason. ``layout=matmulnbits`` writes MatMul
weights as com.microsoft MatMulNBits instead (B packed [N, blocks, block bytes] as code + 2^(bits-1),
float32 scales [N, blocks]): the same numbers at ``accuracy_level=0``. onnxruntime at its default
optimization level fuses DequantizeLinear + MatMul into MatMulNBits itself (accuracy_level 4), so
the standard-ONNX layout is the default.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from sculpt.errors import PassError
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, option, register

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
MS_DOMAIN = "com.microsoft"
INT4_OPSET = 21  # int4 tensors and blocked quantization in DequantizeLinear
PER_AXIS_OPSET = 13
QMAX = {1: 1, 2: 1, 4: 7, 8: 127}  # 2 bits: ternary {-1, 0, +1}; 1 bit: binary {-1, +1}
INT2_OPSET = 25  # int2 tensors in DequantizeLinear
LOW_BIT_TYPES = ("int2", "int4")
LAYOUTS = ("dequantize", "matmulnbits")
MATMULNBITS_BLOCKS = (16, 32, 64, 128)  # block sizes onnxruntime's CPU MatMulNBits kernels take
MATMULNBITS_PER_CHANNEL_BLOCK = 128  # per-channel scales repeated over blocks of this size (at most)


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


def ternary_rows(rows: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TWN-style ternary codes of each row of ``rows`` (2-D): values in {-1, 0, +1} times one scale per
    row, the threshold and scale that minimise the squared error exactly. For a threshold keeping the
    k largest magnitudes, the best scale is their mean and the error is ||w||^2 - S_k^2 / k (S_k their
    sum), so the k maximising S_k^2 / k over all k is the optimum. ``counts`` is ignored (padding
    zeros never join the kept set). A row of zeros gets scale 1 and codes 0."""
    rows = np.asarray(rows, np.float64)
    mags = np.abs(rows)
    order = np.argsort(-mags, axis=1, kind="stable")
    sums = np.cumsum(np.take_along_axis(mags, order, axis=1), axis=1)
    kept = np.arange(1, rows.shape[1] + 1)
    best_k = np.argmax(sums ** 2 / kept, axis=1) + 1  # ties: the fewest kept
    scale = sums[np.arange(len(rows)), best_k - 1] / best_k
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(rows.shape[1]), rows.shape), axis=1)
    codes = np.where(rank < best_k[:, None], np.sign(rows), 0.0)
    zero = scale <= 0
    return np.where(zero[:, None], 0.0, codes), np.where(zero, 1.0, scale).astype(np.float32)


def binary_rows(rows: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net/BWN-style binary codes of each row: sign(w) in {-1, +1} (0 -> +1) times the mean
    magnitude of the row (the least-squares scale for those signs), over the first ``counts[i]``
    elements of row i (the rest are padding). A row of zeros gets scale 0 (binary has no zero code;
    DequantizeLinear and MatMulNBits multiply by the scale, never divide)."""
    rows = np.asarray(rows, np.float64)
    n = np.full(len(rows), rows.shape[1]) if counts is None else np.asarray(counts)
    scale = np.abs(rows).sum(axis=1) / np.maximum(n, 1)
    codes = np.where(rows < 0, -1.0, 1.0)
    return codes, scale.astype(np.float32)


def _row_codes(rows: np.ndarray, qmax: int, bits: int, search: bool,
               counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes, one float32 scale per row) of ``rows`` at ``bits``: binary, ternary or symmetric
    rounding to [-qmax, qmax]."""
    if bits == 1:
        return binary_rows(rows, counts)
    if bits == 2:
        return ternary_rows(rows, counts)
    scale = _best_scales(rows, qmax, search)
    return np.clip(np.round(rows / scale[:, None]), -qmax, qmax), scale


def quantize_symmetric(w: np.ndarray, axis: int, qmax: int, group_size: int = 0,
                       group_axis: int | None = None, search: bool = True,
                       bits: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(integer values, float32 scales) of ``w``: one scale per index of ``axis``, or (``group_size``
    > 0) per ``group_size`` consecutive elements along ``group_axis`` (the scales then have ``w``'s
    shape with that axis divided, rounded up; ``w`` 2-D). ``search``: each scale clips at the ratio
    of CLIP_RATIOS with the least squared rounding error. A group of zeros gets scale 1.
    ``bits`` 2: ternary values (:func:`ternary_rows`), 1: binary (:func:`binary_rows`), otherwise
    rounding to [-qmax, qmax]."""
    w = np.asarray(w, np.float32)
    if group_size:
        moved = np.moveaxis(w, group_axis, 0)  # (input, the other axes)
        rest = moved.shape[1:]
        flat = moved.reshape(moved.shape[0], -1)
        groups = -(-flat.shape[0] // group_size)
        padded = np.zeros((groups * group_size, flat.shape[1]), np.float32)
        padded[:flat.shape[0]] = flat
        blocks = padded.reshape(groups, group_size, -1).transpose(0, 2, 1).reshape(-1, group_size)
        counts = np.repeat(np.minimum(group_size, flat.shape[0] - np.arange(groups) * group_size), flat.shape[1])
        codes, scale = _row_codes(blocks, qmax, bits, search, counts)
        codes = codes.reshape(groups, -1, group_size).transpose(0, 2, 1).reshape(groups * group_size, -1)
        q = codes[:flat.shape[0]].reshape(moved.shape)
        scale = scale.reshape(groups, -1)
        return np.moveaxis(q, 0, group_axis), np.moveaxis(scale.reshape((groups,) + rest), 0, group_axis)
    moved = np.moveaxis(w, axis, 0)
    codes, scale = _row_codes(moved.reshape(w.shape[axis], -1), qmax, bits, search)
    return np.moveaxis(codes.reshape(moved.shape), 0, axis), scale


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
    """An INT8, INT4 (two per byte) or INT2 (four per byte) initializer, packed in raw_data: one byte
    per stored byte (``helper.make_tensor``'s int32_data spends a varint of 1-2 bytes on each packed
    byte: PP-OCRv4 rec's 4-bit weights took 1.64x their packed size)."""
    dtype = {8: np.int8, 4: ml_dtypes.int4, 2: ml_dtypes.int2}[bits]
    return numpy_helper.from_array(np.asarray(values).astype(np.int8).astype(dtype), name)


def pack_matmulnbits(q: np.ndarray, scale: np.ndarray, bits: int, block_size: int,
                     group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """com.microsoft MatMulNBits' B and scales for a MatMul weight of codes ``q`` [K, N] with the
    scales of :func:`quantize_symmetric` (per column, [N], or per ``group_size`` rows, [K/group, N]):
    B is uint8 [N, blocks, block_size * bits / 8], each code stored as ``code + 2^(bits-1)`` (the
    default zero point), the first element in the lowest bits of its byte, K padded with codes 0 to
    whole blocks; scales are float32 [N, blocks] (a per-column scale repeated over its blocks)."""
    k, n = q.shape
    blocks = -(-k // block_size)
    codes = np.zeros((blocks * block_size, n), np.int64)
    codes[:k] = q
    stored = (codes + (1 << (bits - 1))).T.reshape(n, blocks, block_size // (8 // bits), 8 // bits)
    packed = np.zeros(stored.shape[:3], np.int64)
    for i in range(8 // bits):
        packed |= stored[..., i] << (i * bits)
    if group_size:
        scales = np.asarray(scale, np.float32).T  # [N, groups]
    else:
        scales = np.repeat(np.asarray(scale, np.float32)[:, None], blocks, axis=1)
    return packed.astype(np.uint8), np.ascontiguousarray(scales)


@register
@dataclass
class WeightQuantization(Pass):
    """Weight-only int8/int4/ternary/binary quantization of Conv/Gemm/MatMul weights (lossy; no
    calibration)."""

    name = "weight-quant"
    exact = False
    needs_calibration = False

    bits: int = option(4, help="8 (int8), 4 (int4, opset 21), 2 (ternary: {-1, 0, +1} x scale, the threshold "
                               "with the least squared error) or 1 (binary: {-1, +1} x mean |w|) weights, "
                               "symmetric")
    group_size: int = option(0, help="0: one scale per output channel; > 0: one per this many consecutive "
                                     "input channels (per output channel and kernel position of a conv), a "
                                     "power of two >= 16; depthwise convs stay per channel")
    ops: list[str] = option(default_factory=lambda: list(WEIGHT_OPS), help="op types: " + ", ".join(WEIGHT_OPS))
    skip: list[str] = option(default_factory=list, help="fnmatch patterns of node names whose weights stay float")
    conv_bits: int = option(0, help="bits of the other conv weights: 0 (as bits), 1, 2, 4 or 8. PP-OCRv4 rec "
                                    "kept its accuracy with 4-bit Gemm/MatMul weights, not with 4-bit convs")
    depthwise_bits: int = option(8, help="bits of depthwise conv weights (few weights per scale: 4 bits "
                                         "broke PP-OCRv4 rec): 1, 2, 4 or 8")
    clip_search: bool = option(True, help="each scale clips where the squared rounding error is least "
                                          "(ratios 0.5-1.0 of the largest magnitude), not at the largest")
    min_elements: int = option(1024, help="weights with fewer elements stay float (scales would cost more than "
                                          "they save)")
    low_bit_type: str = option("int2", help="how 1- and 2-bit codes are stored: int2 (four per byte, "
                                            "DequantizeLinear at opset 25) or int4 (two per byte, opset 21)")
    layout: str = option("dequantize", help="MatMul weights [K, N]: dequantize (DequantizeLinear -> MatMul) or "
                                            "matmulnbits (com.microsoft MatMulNBits, onnxruntime only; block "
                                            "size group_size, or per-channel scales repeated over blocks of "
                                            "<= 128); Conv and Gemm weights always dequantize")
    accuracy_level: int = option(0, help="layout=matmulnbits: onnxruntime's accuracy_level, 0 (float compute, "
                                         "the DequantizeLinear graph's result) to 4 (activations quantized to "
                                         "int8 at run time, what onnxruntime's own DequantizeLinear+MatMul "
                                         "fusion picks)")

    def __post_init__(self):
        if self.bits not in QMAX or self.depthwise_bits not in QMAX or self.conv_bits not in (0, *QMAX):
            raise ValueError(f"bits and depthwise_bits must be 1, 2, 4 or 8, conv_bits 0, 1, 2, 4 or 8; got "
                             f"{self.bits}, {self.depthwise_bits}, {self.conv_bits}")
        if self.group_size and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be 0 or a power of two >= 16, got {self.group_size}")
        unknown = [o for o in self.ops if o not in WEIGHT_OPS]
        if unknown:
            raise ValueError(f"cannot quantize the weights of op '{unknown[0]}' (known: {', '.join(WEIGHT_OPS)})")
        if self.min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {self.min_elements}")
        if self.low_bit_type not in LOW_BIT_TYPES:
            raise ValueError(f"low_bit_type must be int2 or int4, got '{self.low_bit_type}'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be dequantize or matmulnbits, got '{self.layout}'")
        if self.layout == "matmulnbits" and self.group_size and self.group_size not in MATMULNBITS_BLOCKS:
            raise ValueError(f"layout=matmulnbits takes group_size 0 or {', '.join(map(str, MATMULNBITS_BLOCKS))} "
                             f"(onnxruntime's block sizes), got {self.group_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy_level must be 0 to 4, got {self.accuracy_level}")

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

    def _stored_bits(self, bits: int) -> int:
        """Bits per stored code: 1- and 2-bit codes take int2 or int4."""
        return bits if bits >= 4 else (2 if self.low_bit_type == "int2" else 4)

    def _as_matmulnbits(self, uses: list[tuple]) -> bool:
        """layout=matmulnbits takes a weight whose readers are all MatMuls reading it as B."""
        return self.layout == "matmulnbits" and all(u[0].op_type == "MatMul" and u[0].input[1] != u[0].input[0]
                                                    for u in uses)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        weights = self._weights(model)
        if not weights:
            return PassResult(model, False, {"quantized": 0})
        allow_plain_initializers(model)
        stats: dict[str, Any] = {}
        dequantized_bits = {self._stored_bits(self._bits(uses[0])) for uses in weights.values()
                            if not self._as_matmulnbits(uses)}
        need = PER_AXIS_OPSET
        if dequantized_bits and (min(dequantized_bits) < 8 or self.group_size):
            need = INT2_OPSET if min(dequantized_bits) == 2 else INT4_OPSET
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
        as_matmulnbits = 0
        for name, uses in weights.items():
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            axis, in_axis = uses[0][1], uses[0][2]
            bits = self._bits(uses[0])
            # groups along the input axis; a depthwise conv has one input per group: per channel
            group = self.group_size if self.group_size and w.shape[in_axis] > 1 and len(uses[0]) == 3 else 0
            q, scale = quantize_symmetric(w, axis, QMAX[bits], group, in_axis, self.clip_search, bits)
            for use in uses:
                by_op[use[0].op_type] = by_op.get(use[0].op_type, 0) + 1
            float_bytes += 4 * w.size
            if self._as_matmulnbits(uses):
                packed_bytes += self._write_matmulnbits(model, name, uses, q, scale, bits, group, fresh)
                as_matmulnbits += len(uses)
                continue
            stored = self._stored_bits(bits)
            qname, sname, out = fresh(f"{name}_int{stored}"), fresh(f"{name}_scale"), fresh(f"{name}_dequantized")
            model.append_initializer(int_tensor(qname, q, stored))
            model.append_initializer(numpy_helper.from_array(scale.astype(np.float32), sname))
            attrs = {"axis": in_axis, "block_size": group} if group else {"axis": axis}
            model.append_node(helper.make_node("DequantizeLinear", [qname, sname], [out],
                                               name=fresh(f"{name}_DequantizeLinear"), **attrs))
            for use in uses:
                model.set_input(use[0], 1, out)
            packed_bytes += (w.size * stored + 7) // 8 + 4 * scale.size
        if as_matmulnbits:
            if not any(o.domain == MS_DOMAIN for o in model.proto.opset_import):
                model.proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
            model.graph_edited()
            stats["matmulnbits"] = as_matmulnbits
        model.topological_sort()
        model.remove_unused()
        model.infer_shapes(refresh=True)
        stats.update({"quantized": len(weights), "quantized_by_op": by_op, "bits": self.bits,
                      "conv_bits": self.conv_bits or self.bits, "depthwise_bits": self.depthwise_bits,
                      "group_size": self.group_size, "weight_bytes": f"{float_bytes} -> {packed_bytes}"})
        return PassResult(model, True, stats)

    def _write_matmulnbits(self, model: Model, name: str, uses: list[tuple], q: np.ndarray, scale: np.ndarray,
                           bits: int, group: int, fresh) -> int:
        """Each MatMul reading ``name`` becomes a MatMulNBits reading the packed codes; returns the bytes
        stored. 1-bit codes go in 2 bits (MatMulNBits takes 2 to 8)."""
        k, n = q.shape
        block = group or max(16, min(MATMULNBITS_PER_CHANNEL_BLOCK, 1 << (k - 1).bit_length()))
        stored = max(bits, 2)
        packed, scales = pack_matmulnbits(q, scale, stored, block, group)
        bname, sname = fresh(f"{name}_MatMulNBits_{stored}bit"), fresh(f"{name}_MatMulNBits_scale")
        model.append_initializer(numpy_helper.from_array(packed, bname))
        model.append_initializer(numpy_helper.from_array(scales, sname))
        for use in uses:
            node = use[0]
            replacement = helper.make_node("MatMulNBits", [node.input[0], bname, sname], list(node.output),
                                           name=node.name, domain=MS_DOMAIN, K=k, N=n, bits=stored,
                                           block_size=block, accuracy_level=self.accuracy_level)
            node.CopyFrom(replacement)
        return packed.size + 4 * scales.size
