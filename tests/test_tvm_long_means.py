"""Means over many terms are summed in float64 (long_means): a squeeze-and-excitation mean over a
large map of values of both signs keeps its accuracy (PP-OCRv6 det small's verify error)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper

from sculpt.backends.tvm.kernels import host_target
from sculpt.backends.tvm.kernels.long_means import MIN_TERMS
from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels
from sculpt.backends.tvm.relax_import import import_to_relax, run_relax
from sculpt.ir.model import Model


def _mean_model(shape, axes, keepdims):
    out = [1 if a in axes else d for a, d in enumerate(shape)] if keepdims else \
        [d for a, d in enumerate(shape) if a not in axes]
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=int(keepdims))], "mean",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.wrap(proto)


@pytest.mark.parametrize("shape, axes, keepdims", [((1, 16, 184, 184), [2, 3], True), ((2, 8, 96, 128), [2, 3], False),
                                                   ((1, 70000), [1], True)])
def test_a_mean_over_many_terms_of_both_signs_is_as_accurate_as_float64_allows(shape, axes, keepdims):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 100 + 0.01).astype(np.float32)  # large terms, a tiny mean
    decisions = []
    exe = compile_with_kernels(import_to_relax(_mean_model(shape, axes, keepdims)), tvm.target.Target(host_target("llvm")),
                               decisions=decisions)
    got = run_relax(exe, {"x": x}, ["x"])[0]
    exact = x.astype(np.float64).mean(axis=tuple(axes), keepdims=keepdims)
    assert got.shape == exact.shape
    # float32 rounding of the result alone (the mean is ~0.5 here); summed in float32 one term at a
    # time, 33856 terms of magnitude 100 were off by ~1e-3
    assert float(np.abs(got - exact).max()) <= 1e-6 * float(np.abs(exact).max()) + 1e-6
    assert any(d.func.startswith("sculpt_long_mean") for d in decisions), [d.func for d in decisions]


def test_a_short_mean_keeps_float32_accumulation():
    shape = (1, 32, 8, 8)
    assert 64 < MIN_TERMS
    decisions = []
    exe = compile_with_kernels(import_to_relax(_mean_model(shape, [2, 3], True)), tvm.target.Target(host_target("llvm")),
                               decisions=decisions)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = run_relax(exe, {"x": x}, ["x"])[0]
    assert float(np.abs(got - x.mean(axis=(2, 3), keepdims=True)).max()) <= 1e-6
    assert not any(d.func.startswith("sculpt_long_mean") for d in decisions)
