"""Helpers of the TVM kernel tests: a model built by sculpt's kernels for this host, run beside
onnxruntime on the same random input."""

from __future__ import annotations

import numpy as np


def host_build_and_reference(model, x_shape, seed: int = 1):
    """(sculpt's output, onnxruntime's output, the kernels' decisions) for a one-input model whose
    input is named ``x``, on a standard-normal input."""
    import tvm

    from sculpt.backends.tvm.kernels import host_target
    from sculpt.backends.tvm.kernels.pipeline import compile_with_kernels
    from sculpt.backends.tvm.relax_import import import_to_relax, run_relax
    from sculpt.runtime import make_session

    decisions = []
    exe = compile_with_kernels(import_to_relax(model), tvm.target.Target(host_target("llvm")), decisions=decisions)
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    got = run_relax(exe, {"x": x}, ["x"])[0]
    ref = make_session(model).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    return got, ref, decisions
