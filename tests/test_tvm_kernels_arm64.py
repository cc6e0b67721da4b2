"""sculpt's kernels cross-compiled for arm64 (NEON) and run under qemu-aarch64 with the deploy runner,
compared with onnxruntime: the kernel grid and the canonicalized PP-OCR models. Slow (qemu)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from sculpt.backends.tvm.kernels import onnx_cases as cases  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                       reason="needs qemu-user-static and g++-aarch64-linux-gnu"),
]


def _verify_on_arm64(model_path, tmp_path, feeds=None, input_shapes=None):
    from sculpt.backends.tvm.artifact import compile_artifact, load_artifact
    from sculpt.backends.tvm.deploy import verify_artifact

    library = tmp_path / "model.so"
    compile_artifact(model_path, "arm64", library, input_shapes=input_shapes, build_options={"kernels": "sculpt"})
    artifact = load_artifact(library)
    assert artifact.arch == "aarch64"
    result = verify_artifact(artifact, model_path, feeds, rtol=1e-4, timeout=900)
    assert result.emulated
    # relative 1e-4 of each output's scale, or 1e-6 absolute (det's probability map is ~1e-5 on
    # random inputs, where float rounding alone is ~1e-7)
    assert result.ok, result.comparison.outputs
    for err in result.comparison.outputs:
        assert err.shape_match and (err.max_rel <= 1e-4 or err.max_abs <= 1e-6), err
    return result


def test_kernel_grid_runs_on_arm64_under_qemu(tmp_path):
    shape = (1, 8, 12, 16)  # widths that vectorize on NEON (4 lanes)
    grid = [c for c in cases.CONV_GRID if c.name != "pw_residual"] + \
        [cases.ConvCase("pw_residual", 8, 8, (1, 1), epilogue="residual")]
    path = tmp_path / "grid.onnx"
    onnx.save(cases.conv_model(grid, shape), path)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    _verify_on_arm64(path, tmp_path, {"x": x})


@pytest.mark.parametrize("kind", ["cls", "rec", "det"])
def test_ppocr_runs_on_arm64_under_qemu(kind, tmp_path):
    from sculpt.models import PPOCR_SHAPES, ppocr_model_path

    _verify_on_arm64(ppocr_model_path(kind), tmp_path, input_shapes={"x": PPOCR_SHAPES[kind]})
