"""Mechanism shared by the folding passes: absorb a per-output-channel affine map ``y*scale + shift``
into the weights and bias of the Conv, ConvTranspose or Gemm that produces ``y``."""

from __future__ import annotations

import numpy as np
import onnx

from sculpt.ir.model import Model

AFFINE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def output_channels(model: Model, node: onnx.NodeProto) -> int | None:
    """Number of output channels of a foldable producer, or None if it cannot absorb an affine map."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in AFFINE_PRODUCERS or len(node.input) < 2:
        return None
    w = model.get_constant(node.input[1])
    if w is None or w.dtype.kind != "f":
        return None
    if len(node.input) > 2 and node.input[2] and model.get_constant(node.input[2]) is None:
        return None
    if node.op_type == "Conv":
        return int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * int(_attr(node, "group", 1))
    # Gemm: Y = alpha * A' @ B' + beta * C, output features along B's N axis
    if w.ndim != 2:
        return None
    return int(w.shape[0] if _attr(node, "transB", 0) else w.shape[1])


def absorb_channel_affine(model: Model, node: onnx.NodeProto, scale: np.ndarray | None,
                          shift: np.ndarray | None) -> None:
    """Rewrite ``node`` so that it computes ``y * scale + shift`` per output channel.

    ``scale`` and ``shift`` are vectors of the node's output-channel count (or None). The caller has
    checked ``output_channels``. Arithmetic is in float64, stored back in the weight's dtype."""
    w = model.get_constant(node.input[1])
    cout = output_channels(model, node)
    dtype = w.dtype
    scale64 = np.ones(cout) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), (cout,))
    shift64 = np.zeros(cout) if shift is None else np.broadcast_to(np.asarray(shift, np.float64), (cout,))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    w64 = w.astype(np.float64)
    if node.op_type == "Conv":
        bias = model.get_constant(node.input[2]).astype(np.float64) if has_bias else np.zeros(cout)
        new_w = w64 * scale64.reshape((-1,) + (1,) * (w.ndim - 1))
        new_b = bias * scale64 + shift64
    elif node.op_type == "ConvTranspose":
        group = int(_attr(node, "group", 1))
        cin = w.shape[0]
        per = w.shape[1]
        bias = model.get_constant(node.input[2]).astype(np.float64) if has_bias else np.zeros(cout)
        grouped = w64.reshape((group, cin // group, per) + w.shape[2:])
        s = scale64.reshape((group, 1, per) + (1,) * (w.ndim - 2))
        new_w = (grouped * s).reshape(w.shape)
        new_b = bias * scale64 + shift64
    else:  # Gemm
        beta = float(_attr(node, "beta", 1.0))
        trans_b = int(_attr(node, "transB", 0))
        new_w = w64 * (scale64[:, None] if trans_b else scale64[None, :])
        if has_bias:
            c = model.get_constant(node.input[2]).astype(np.float64)
            c = beta * c
        else:
            c = np.zeros(cout)
        # C broadcasts to [M, N]: scale along N keeps its broadcast shape unless it is per-row
        if c.ndim == 2 and c.shape[0] != 1:
            new_b = c * scale64[None, :] + shift64[None, :]
        else:
            new_b = (np.broadcast_to(c, (cout,)) if c.ndim <= 1 else c.reshape(-1)) * scale64 + shift64
            if c.ndim == 2:
                new_b = new_b.reshape(1, cout)
        # alpha stays on the product; the new C already carries beta
        _set_attr(node, "beta", 1.0)
    model.replace_constant_input(node, 1, new_w.astype(dtype))
    if has_bias:
        model.replace_constant_input(node, 2, new_b.astype(dtype))
    else:
        name = model.add_initializer(f"{node.name}_bias", new_b.astype(dtype))
        model.set_input(node, 2, name)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def per_channel_vector(value: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """If ``value`` broadcast against a rank-``rank`` tensor varies only along ``axis`` (channels),
    return it as a vector of length ``channels``; else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    for i, d in enumerate(shape):
        if i != axis and d != 1:
            return None
    if shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def absorb_node(model: Model, producer: onnx.NodeProto, folded: onnx.NodeProto, via: str) -> None:
    """After folding ``folded`` into ``producer``: the producer writes the folded node's output
    (so graph output names and readers stay) and the folded node goes."""
    for k, o in enumerate(producer.output):
        if o == via:
            model.set_output(producer, k, folded.output[0])
    model.remove_node(folded)
