"""flush-subnormals: float constants below the smallest normal number of their type become zero."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, register

FLOAT_TYPES = (np.float16, np.float32, np.float64)


def subnormal_mask(value: np.ndarray) -> np.ndarray:
    """Where ``value`` (a float array) holds a subnormal number: nonzero and below its type's smallest
    normal magnitude."""
    return (value != 0) & (np.abs(value) < np.finfo(value.dtype).tiny)


@register
@dataclass
class FlushSubnormals(Pass):
    """Set the subnormal values of float initializers to zero. A subnormal weight (below 1.2e-38 in
    float32) changes no sum of normal magnitude, but every multiply-add that reads one takes a
    microcode assist on Intel cores, about a hundred cycles: PP-OCRv6 det's 768->384 1x1 conv, whose
    weights are 63% subnormal, took 70% of the model's time in both onnxruntime and TVM on an Intel
    Xeon (500 ms for a model of 200 on an AMD EPYC, which handles them in hardware). Exact wherever a
    sum stays above the subnormal range; the pipeline checks its outputs like any exact pass."""

    name = "flush-subnormals"
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graph_inputs = {i.name for i in model.graph.input}
        flushed = tensors = 0
        for tensor in list(model.graph.initializer):
            if tensor.name in graph_inputs:  # overridable at run time: not a constant
                continue
            value = model.get_constant(tensor.name)
            if value is None or value.dtype.type not in FLOAT_TYPES:
                continue
            mask = subnormal_mask(value)
            count = int(mask.sum())
            if not count:
                continue
            value = value.copy()
            value[mask] = 0
            model.set_initializer(tensor.name, value)
            flushed += count
            tensors += 1
        return PassResult(model, flushed > 0, {"values": flushed, "tensors": tensors})
