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


def _fast_math_model():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("LRN", ["x"], ["lrn"], size=5, alpha=1e-4, beta=0.75, bias=1.0),
             helper.make_node("Sigmoid", ["x"], ["sigmoid"]), helper.make_node("Softmax", ["x"], ["softmax"], axis=-1)]
    shape = [1, 8, 9, 27]
    graph = helper.make_graph(nodes, "fast_math", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, shape) for n in nodes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, shape


def test_grouped_convs_and_a_channel_shuffle_run_on_arm64_under_qemu(tmp_path):
    """ShuffleNet's unit on NEON: grouped 1x1 convs of 34 channels a group as one blocked kernel each
    (each group's output padded to whole 4-lane blocks, then dropped), the channel shuffle, a
    depthwise conv and the residual add; the same unit at 14x16, its grouped convs as matmuls over
    planes of whole vectors (grouped_pointwise_matmul); and a residual stage read by an NCHW transpose (blocked,
    the last sum copied to NCHW)."""
    rng = np.random.default_rng(9)
    for name, model, shape in (("shuffle", cases.shuffle_unit_model(), (1, 136, 14, 15)),
                               ("shuffle_matmuls", cases.shuffle_unit_model(136, 4, (14, 16)), (1, 136, 14, 16)),
                               ("sequence", cases.residual_stage_to_sequence_model(), (1, 8, 6, 10))):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        _verify_on_arm64(path, tmp_path, {"x": rng.standard_normal(shape).astype(np.float32)})


def test_layout_and_math_rewrites_run_on_arm64_under_qemu(tmp_path):
    """What the zoo work added, on NEON: depthwise and pools padded per plane (60x60), strided windows
    over odd widths (27), a depthwise width computed in whole vectors (27 -> 28), channel counts padded to
    whole blocks (34, 68), a matrix-vector product of whole rows, LRN's power as roots, the fast
    sigmoid and softmax."""
    rng = np.random.default_rng(8)
    models = [
        (cases.conv_model([cases.ConvCase("dw3_big", 8, 8, (3, 3), pads=(1, 1, 1, 1), group=8, epilogue="relu"),
                           cases.ConvCase("c34", 8, 34, (1, 1), epilogue="relu"),
                           cases.ConvCase("c68_s2", 8, 68, (3, 3), stride=(2, 2), pads=(1, 1, 1, 1))], (1, 8, 60, 60)),
         (1, 8, 60, 60)),
        (cases.conv_model([cases.ConvCase("dw3_s2_odd", 8, 8, (3, 3), stride=(2, 2), group=8),
                           cases.ConvCase("dw5_p2", 8, 8, (5, 5), pads=(2, 2, 2, 2), group=8, epilogue="hardswish")],
                          (1, 8, 14, 27)), (1, 8, 14, 27)),
        (cases.pool_model([cases.PoolCase("max3_s2", "MaxPool", (3, 3), (2, 2)),
                           cases.PoolCase("max3_s2_big", "MaxPool", (3, 3), (2, 2), (1, 1, 1, 1))], (1, 8, 61, 61)),
         (1, 8, 61, 61)),
        _fast_math_model(),
    ]
    for i, (model, shape) in enumerate(models):
        path = tmp_path / f"m{i}.onnx"
        onnx.save(model, path)
        folder = tmp_path / f"build{i}"
        folder.mkdir()
        _verify_on_arm64(path, folder, {"x": (rng.standard_normal(shape) * 3).astype(np.float32)})
    path = tmp_path / "gemv.onnx"
    onnx.save(cases.matmul_model(1, 512, 1000), path)
    folder = tmp_path / "build_gemv"
    folder.mkdir()
    _verify_on_arm64(path, folder, {"a": rng.standard_normal((1, 1, 512)).astype(np.float32)})


def test_blocked_layout_chains_run_on_arm64_under_qemu(tmp_path):
    """Activations in NCHW4c on NEON: a residual chain (clip, per-channel scale, concat, strides)
    and a mobile block (depthwise convs, squeeze-and-excitation, pools, resize)."""
    rng = np.random.default_rng(9)
    for i, (model, shape) in enumerate([(cases.residual_chain_model(), (1, 8, 20, 19)),
                                        (cases.mobile_block_model(), (1, 8, 14, 21))]):
        path = tmp_path / f"chain{i}.onnx"
        onnx.save(model, path)
        folder = tmp_path / f"chain_build{i}"
        folder.mkdir()
        _verify_on_arm64(path, folder, {"x": rng.standard_normal(shape).astype(np.float32)})


def test_winograd_convs_run_on_arm64_under_qemu(tmp_path, winograd_rewrites):
    """3x3 convs by F(2x2, 3x3) in NCHW4c (every 3x3 conv of the chain, whatever its size), and
    convs reading the graph's NCHW input and writing its NCHW output."""
    rng = np.random.default_rng(11)
    for i, model in enumerate([cases.winograd_chain_model(), cases.winograd_edges_model()]):
        path = tmp_path / f"winograd{i}.onnx"
        onnx.save(model, path)
        folder = tmp_path / f"winograd_build{i}"
        folder.mkdir()
        _verify_on_arm64(path, folder, {"x": rng.standard_normal((1, 16, 13, 11)).astype(np.float32)})
    # the chain's five, the edges model's two (NCHW in, NCHW out)
    assert len(winograd_rewrites) == 5 + 2, winograd_rewrites
