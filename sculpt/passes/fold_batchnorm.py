"""fold-batchnorm: fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm before it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, allow_plain_initializers, PassContext, PassResult, register
from sculpt.passes.channel_affine import absorb_channel_affine, absorb_node, output_channels


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@register
@dataclass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization (inference mode, constant statistics) into the weights and bias of
    the Conv, ConvTranspose or Gemm that feeds it, when that node's output has no other reader and
    is not a graph output. ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` becomes part of
    the producer: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps)."""

    name = "fold-batchnorm"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        folded, skipped = 0, []
        with model.indexed():  # the folds edit through the model, which keeps the index valid
            for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"
                       and n.domain in ("", "ai.onnx")]:
                reason = self._fold(model, bn)
                if reason is None:
                    folded += 1
                else:
                    skipped.append(f"{bn.name}: {reason}")
        if folded:
            model.remove_unused()
        return PassResult(model, folded > 0, {"folded": folded, "skipped": skipped})

    def _fold(self, model: Model, bn: onnx.NodeProto) -> str | None:
        if _attr(bn, "training_mode", 0) or (len(bn.output) > 1 and any(bn.output[1:])):
            return "training mode"
        if _attr(bn, "spatial", 1) != 1:
            return "spatial=0"
        params = [model.get_constant(n) for n in bn.input[1:5]]
        if len(params) != 4 or any(p is None for p in params):
            return "statistics are not constant"
        x = bn.input[0]
        producer = model.index.producer(x)
        if producer is None:
            return "input is not produced by a node"
        cout = output_channels(model, producer)
        if cout is None:
            return f"producer '{producer.name}' ({producer.op_type}) cannot absorb it"
        if model.index.is_output(x) or model.index.consumer_count(x) != 1:
            return f"output of '{producer.name}' has other readers"
        if producer.op_type == "Gemm" and model.static_shape(x) is not None and len(model.static_shape(x)) != 2:
            return "Gemm output is not 2-D"
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        if gamma.size != cout:
            return f"{gamma.size} statistics for {cout} channels"
        eps = float(_attr(bn, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        absorb_channel_affine(model, producer, scale, shift)
        absorb_node(model, producer, bn, via=x)
        return None
