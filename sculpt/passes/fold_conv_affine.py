"""fold-conv-affine: fold a constant per-channel Mul/Div/Add/Sub that follows a Conv into it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, allow_plain_initializers, PassContext, PassResult, register
from sculpt.passes.channel_affine import absorb_channel_affine, absorb_node, output_channels, per_channel_vector


@register
@dataclass
class FoldConvAffine(Pass):
    """Fold ``Conv → Mul/Div/Add/Sub(constant)`` into the Conv (also ConvTranspose and Gemm) when
    the constant is a scalar or varies only along the channel axis, the Conv output has no other
    reader, and the result keeps the Conv's shape and dtype. ``x * c`` scales W and b; ``x + c``
    adds to b; ``x / c`` and ``x - c`` are the same with 1/c and -c (constant on the right only)."""

    name = "fold-conv-affine"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        allow_plain_initializers(model)
        folded = 0
        changed = True
        with model.indexed():  # the folds edit through the model, which keeps the index valid
            while changed:  # a chain Conv → Mul → Add folds one node per sweep
                changed = False
                for node in list(model.graph.node):
                    if self._fold(model, node):
                        folded += 1
                        changed = True
        if folded:
            model.remove_unused()
        return PassResult(model, folded > 0, {"folded": folded})

    def _fold(self, model: Model, node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div", "Add", "Sub") \
                or len(node.input) != 2:
            return False
        index = model.index
        for data_idx in (0, 1):
            if node.op_type in ("Div", "Sub") and data_idx == 1:
                break  # c / x and c - x are not affine in x
            x, c_name = node.input[data_idx], node.input[1 - data_idx]
            const = model.get_constant(c_name)
            producer = index.producer(x)
            if const is None or producer is None or const.dtype.kind != "f":
                continue
            cout = output_channels(model, producer)
            if cout is None:
                continue
            if index.is_output(x) or index.consumer_count(x) != 1:
                continue
            out_shape = model.static_shape(x)
            rank = len(out_shape) if out_shape is not None else None
            if rank is None:
                w = model.get_constant(producer.input[1])
                rank = w.ndim if producer.op_type != "Gemm" else 2
            w = model.get_constant(producer.input[1])
            if const.dtype != w.dtype:
                continue
            vec = per_channel_vector(const, rank, cout)
            if vec is None:
                continue
            if node.op_type == "Mul":
                absorb_channel_affine(model, producer, vec, None)
            elif node.op_type == "Div":
                if np.any(vec == 0):
                    continue
                absorb_channel_affine(model, producer, 1.0 / vec, None)
            elif node.op_type == "Add":
                absorb_channel_affine(model, producer, None, vec)
            else:
                absorb_channel_affine(model, producer, None, -vec)
            absorb_node(model, producer, node, via=x)
            return True
        return False
