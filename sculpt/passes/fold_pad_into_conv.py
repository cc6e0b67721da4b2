"""fold-pad: a constant zero Pad of a Conv's input becomes the Conv's own padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from sculpt.ir.channel_handlers import attr as attribute
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register


def _zero_pads(model: Model, pad: onnx.NodeProto) -> list[int] | None:
    """The Pad's widths over all axes ([begin..., end...]) when it is a constant pad by zero with
    constant non-negative widths, else None."""
    mode = attribute(pad, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if len(pad.input) > 3 and pad.input[3]:  # opset 18's axes: not taken
        return None
    if len(pad.input) >= 2:  # opset 11+: pads and constant_value are inputs
        widths = model.get_constant(pad.input[1])
        value = model.get_constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    else:
        widths, value = attribute(pad, "pads"), np.asarray(attribute(pad, "value", 0.0))
    if widths is None or value is None or np.asarray(value).size != 1 or float(np.asarray(value).reshape(())) != 0:
        return None
    widths = [int(w) for w in np.asarray(widths).reshape(-1)]
    return widths if all(w >= 0 for w in widths) else None


def _reads_as_data(node: onnx.NodeProto, name: str) -> bool:
    """Whether ``node`` is a Conv reading ``name`` as its data input only, with explicit pads."""
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and list(node.input).count(name) == 1 \
        and node.input[0] == name and attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


@register
@dataclass
class FoldPadIntoConv(Pass):
    """Fold a Pad (mode constant, value 0, constant widths on the spatial axes only) into the Conv
    nodes that read it: their ``pads`` grow by the Pad's widths and they read the Pad's input. Exact:
    a Conv pads with zeros too. Taken only when every reader of the Pad is such a Conv (input 0, no
    ``auto_pad``) and the Pad's output is not a graph output. Exporters write such Pads for
    asymmetric padding (TensorFlow's SAME, PP-HGNet's stem): a Pad of its own is one more pass over
    the tensor and, in a QDQ model, keeps the Conv from being an int8 unit (DequantizeLinear -> Pad ->
    Conv)."""

    name = "fold-pad"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        folded = 0
        with model.indexed() as index:
            for pad in list(model.graph.node):
                if pad.domain not in ("", "ai.onnx") or pad.op_type != "Pad" or index.is_output(pad.output[0]):
                    continue
                widths = _zero_pads(model, pad)
                readers = index.consumers(pad.output[0])
                if widths is None or len(widths) < 6 or len(widths) % 2 or not readers:
                    continue
                rank = len(widths) // 2
                if any(widths[a] or widths[rank + a] for a in (0, 1)):  # batch or channels padded
                    continue
                if not all(_reads_as_data(r, pad.output[0]) for r in readers):
                    continue
                spatial = rank - 2
                for conv in readers:
                    pads = list(attribute(conv, "pads", [0] * (2 * spatial)))
                    grown = [pads[i] + widths[2 + i] for i in range(spatial)] + \
                        [pads[spatial + i] + widths[rank + 2 + i] for i in range(spatial)]
                    kept = [a for a in conv.attribute if a.name != "pads"]
                    del conv.attribute[:]
                    conv.attribute.extend(kept + [onnx.helper.make_attribute("pads", grown)])
                    model.set_input(conv, 0, pad.input[0])
                model.remove_node(pad)
                folded += 1
        if folded:
            model.remove_unused()
        return PassResult(model, folded > 0, {"folded": folded})
