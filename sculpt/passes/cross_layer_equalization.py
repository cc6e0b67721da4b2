"""Cross-layer equalization (Nagel et al., data-free quantization): for two layers in a row, with
only a positively homogeneous activation between them (none, Relu, LeakyRelu), scale output channel
i of the first by 1/s_i and input channel i of the second by s_i, with s_i = sqrt(r1_i / r2_i) (r: the
channel's largest absolute weight), so that both channels end up with the same range. The function is
unchanged (exact: relu(x / s) = relu(x) / s for s > 0); per-tensor and per-channel weight quantization
then lose less. Chains are equalized pair by pair, ``rounds`` times over the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, allow_plain_initializers, option, register

HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu")
MIN_SCALE, MAX_SCALE = 1e-4, 1e4  # guard against channels that are (nearly) dead on one side


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_plain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _producer_ok(model: Model, node: onnx.NodeProto) -> bool:
    """A Conv with constant weights (and a constant bias, if any): any groups."""
    if not _is_plain(node) or node.op_type != "Conv" or len(node.input) < 2:
        return False
    if model.get_constant(node.input[1]) is None:
        return False
    return not (len(node.input) > 2 and node.input[2] and model.get_constant(node.input[2]) is None)


def _reader_axis(model: Model, node: onnx.NodeProto) -> int | None:
    """The input-channel axis of a reader's constant weights: Conv (one group) axis 1, MatMul axis 0,
    Gemm 0 (or 1 with transB); None when the reader cannot take the scaling."""
    if not _is_plain(node) or len(node.input) < 2 or model.get_constant(node.input[1]) is None:
        return None
    w = model.get_constant(node.input[1])
    if node.op_type == "Conv" and int(_attr(node, "group", 1)) == 1:
        return 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return 0
    if node.op_type == "Gemm" and w.ndim == 2 and not _attr(node, "transA", 0):
        return 1 if _attr(node, "transB", 0) else 0
    return None


def find_pairs(model: Model) -> list[tuple[onnx.NodeProto, onnx.NodeProto, int]]:
    """(producer Conv, reader, reader's input-channel axis) for every equalizable pair: the producer's
    output (through at most one homogeneous activation) is read by the reader alone, as its data input,
    and the reader's channel count matches (a Flatten/Reshape in between disqualifies the pair)."""
    consumers = model.consumers()
    outputs = set(model.output_names)
    pairs = []
    for node in model.graph.node:
        if not _producer_ok(model, node):
            continue
        tensor = node.output[0]
        readers = consumers.get(tensor, [])
        if tensor in outputs or len(readers) != 1:
            continue
        reader = readers[0]
        if _is_plain(reader) and reader.op_type in HOMOGENEOUS_ACTIVATIONS:
            tensor = reader.output[0]
            readers = consumers.get(tensor, [])
            if tensor in outputs or len(readers) != 1:
                continue
            reader = readers[0]
        if reader.input[0] != tensor or tensor in reader.input[1:]:
            continue
        axis = _reader_axis(model, reader)
        if axis is None:
            continue
        w1 = model.get_constant(node.input[1])
        w2 = model.get_constant(reader.input[1])
        if w2.shape[axis] != w1.shape[0]:
            continue
        pairs.append((node, reader, axis))
    return pairs


def equalize_pair(model: Model, producer: onnx.NodeProto, reader: onnx.NodeProto, axis: int) -> float:
    """Equalize one pair in place; returns the largest |log2 s| applied (0: nothing changed)."""
    w1 = model.get_constant(producer.input[1]).astype(np.float64)
    w2 = model.get_constant(reader.input[1]).astype(np.float64)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = np.abs(np.moveaxis(w2, axis, 0)).reshape(w2.shape[axis], -1).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.clip(np.sqrt(r1[ok] / r2[ok]), MIN_SCALE, MAX_SCALE)
    if np.allclose(s, 1.0):
        return 0.0
    dtype1 = model.get_constant(producer.input[1]).dtype
    dtype2 = model.get_constant(reader.input[1]).dtype
    model.replace_constant_input(producer, 1, (w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(dtype1),
                                 suffix="equalized")
    if len(producer.input) > 2 and producer.input[2]:
        b1 = model.get_constant(producer.input[2]).astype(np.float64)
        model.replace_constant_input(producer, 2, (b1 / s).astype(dtype1), suffix="equalized")
    shape = [1] * w2.ndim
    shape[axis] = -1
    model.replace_constant_input(reader, 1, (w2 * s.reshape(shape)).astype(dtype2), suffix="equalized")
    return float(np.max(np.abs(np.log2(s))))


def equalize_model(model: Model, rounds: int = 4) -> int:
    """Equalize every pair, ``rounds`` sweeps (chains converge over sweeps). Returns the number of
    distinct pairs changed."""
    changed: set[tuple[str, str]] = set()
    for _ in range(rounds):
        moved = 0.0
        for producer, reader, axis in find_pairs(model):
            step = equalize_pair(model, producer, reader, axis)
            if step > 1e-3:
                changed.add((producer.name, reader.name))
            moved = max(moved, step)
        if moved < 1e-3:
            break
    return len(changed)


@register
@dataclass
class CrossLayerEqualization(Pass):
    """Cross-layer equalization of consecutive Conv/Gemm/MatMul weights (exact)."""

    name = "cross-layer-equalization"
    exact = True
    rounds: int = option(4, help="sweeps over the graph (chains of layers converge over sweeps)")

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {self.rounds}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        pairs = equalize_model(model, self.rounds)
        return PassResult(model, pairs > 0, {"pairs": pairs, "candidates": len(find_pairs(model))})
