"""`--gpu-memory texture` (adreno): TVM 0.27's Adreno texture lowering, made to build and to compute
(sculpt.backends.tvm.adreno_texture); its OpenCL C compiled by PoCL and launched there with images laid
out as TVM's OpenCL runtime allocates them, compared with onnxruntime (1e-4 relative to each output's
scale). PP-OCR cls through `sculpt compile` + `sculpt verify` is the slow test."""

import json
import re
import warnings

import numpy as np
import pytest
from onnx import helper

from graphs import f32, make_model
from sculpt import runtime as ort
from sculpt.backends.tvm.adreno_texture import (TextureMiscompileWarning, image_kernels, narrow_texture_stores,
                                                texture_geometry, texture_target, tir_pipeline)
from sculpt.backends.tvm.artifact import prepare_model
from sculpt.backends.tvm.gpu_schedule import fail_safe_gpu_pipeline
from sculpt.backends.tvm.opencl import check_kernels
from sculpt.backends.tvm.opencl_run import OpenCLRunner, plan_model
from sculpt.backends.tvm.relax_import import import_to_relax
from sculpt.backends.tvm.targets import get_target
from sculpt.cli import main
from sculpt.errors import OptionError
from sculpt.models import ppocr_model_path
from sculpt.runtime import Comparison, output_error
from sculpt.textdata import text_input

RTOL = 1e-4


def _conv_relu():
    """One 3x3 conv (8 -> 16 channels, bias) and a ReLU: NCHW -> NCHW4c image -> conv -> NCHW."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [("x", [1, 8, 12, 20])], [("y", [1, 16, 12, 20])],
                      {"w": f32(16, 8, 3, 3), "b": f32(16)})


def _conv_pool_depthwise():
    """conv -> c1 (an output, and the input of a conv: held in an image, copied out) -> conv -> depthwise conv
    (stays NCHW) -> 1x1 conv -> max pool."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c2", "dw", "bdw"], ["c3"], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Conv", ["c3", "w4", "b4"], ["c4"]),
             helper.make_node("MaxPool", ["c4"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    return make_model(nodes, [("x", [1, 8, 12, 20])], [("y", [1, 16, 6, 10]), ("c1", [1, 16, 12, 20])],
                      {"w1": f32(16, 8, 3, 3), "b1": f32(16), "w2": f32(16, 16, 3, 3), "b2": f32(16),
                       "dw": f32(16, 1, 3, 3), "bdw": f32(16), "w4": f32(16, 16, 1, 1), "b4": f32(16)})


def _plan(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_model(model, texture_target(get_target("adreno")))
    return plan, [w.message for w in caught if isinstance(w.message, TextureMiscompileWarning)]


def _compare(model, plan) -> Comparison:
    feeds = {"x": f32(1, 8, 12, 20)}
    outputs = OpenCLRunner(plan).run(feeds).outputs
    ref = ort.run(model, feeds)
    return Comparison([output_error(name, got, np.asarray(ref[name])) for name, got in zip(ref, outputs)], 1)


@pytest.fixture(scope="module")
def conv_texture():
    model = _conv_relu()
    return (model, *_plan(model))


def test_texture_is_a_variant_of_the_adreno_target_only():
    adreno = get_target("adreno")
    assert texture_target(adreno, "buffer") is adreno and "keys" not in adreno.spec  # the default stays buffers
    texture = texture_target(adreno)
    assert texture.spec["keys"] == ["adreno", "opencl", "gpu", "texture"]  # TVM's qcom/adreno-opencl-texture
    assert "texture" in texture.tvm_target().keys and texture.arch == "aarch64"
    for name in ("mali", "host", "arm64"):
        with pytest.raises(OptionError, match="is for --target adreno"):
            texture_target(get_target(name))


def test_texture_geometry_is_tvms_opencl_runtime_layout():
    # texture.h: the last axis is the RGBA pixel, the others split at the scope's separator
    assert texture_geometry([1, 2, 12, 20, 4], "global.texture-weight") == (480, 1, 1)
    assert texture_geometry([1, 2, 12, 20, 4], "global.texture") == (20, 12, 2)
    assert texture_geometry([1, 12, 20, 2, 4], "global.texture-nhwc") == (40, 12, 1)
    with pytest.raises(ValueError):
        texture_geometry([1, 2, 4], "shared")


def test_the_build_keeps_tensors_and_constants_in_textures(conv_texture):
    _, plan, _ = conv_texture
    scopes = {s.scope for s in plan.steps if s.op == "tensor"}
    assert any(s.startswith("global.texture") for s in scopes) and "global" in scopes
    assert any(s.startswith("global.texture") for s in plan.constant_scopes)  # the bias
    assert any(step.function.startswith("fused_conv2d_NCHWc_OIHWo") for step in plan.calls)


def test_the_kernels_read_and_write_images_and_compile_on_pocl(conv_texture):
    _, plan, warned = conv_texture
    images = image_kernels(plan.source)
    assert images["reads"] >= 2 and images["writes"] >= 1 and not warned
    assert any(k.startswith("fused_conv2d_NCHWc_OIHWo") for k in images["kernels"])
    assert re.search(r"__kernel void \w+\([^)]*image2d_array_t", plan.source)
    assert "sculpt_texel" in plan.source  # the store TVM scalarized, as one pixel store again
    check = check_kernels(plan.source)
    assert set(images["kernels"]) <= set(check.kernels)


def test_the_texture_conv_matches_onnxruntime_on_pocl(conv_texture):
    model, plan, _ = conv_texture
    cmp = _compare(model, plan)
    assert cmp.within(RTOL), cmp.as_dict()


def test_an_output_in_an_image_depthwise_convs_and_pooling_match_onnxruntime():
    model = _conv_pool_depthwise()
    plan, warned = _plan(model)
    assert not warned and any(s.op == "copy" for s in plan.steps)  # c1: vm.builtin.to_device out of an image
    cmp = _compare(model, plan)
    assert cmp.within(RTOL) and len(cmp.outputs) == 2, cmp.as_dict()


def test_a_transposed_conv_after_an_nchw4c_conv_builds_and_matches():
    """conv2d_transpose cannot follow an NCHW4c input in TVM's layout inference (PP-OCR det's head):
    it reads NCHW."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c1", "wt", "bt"], ["y"], strides=[2, 2], kernel_shape=[2, 2])]
    model = make_model(nodes, [("x", [1, 8, 12, 20])], [("y", [1, 4, 24, 40])],
                       {"w1": f32(16, 8, 3, 3), "b1": f32(16), "wt": f32(16, 4, 2, 2), "bt": f32(4)})
    plan, warned = _plan(model)
    assert not warned and image_kernels(plan.source)["writes"] >= 1
    cmp = _compare(model, plan)
    assert cmp.within(RTOL), cmp.as_dict()


def test_tvms_own_texture_lowering_stores_scalars_into_pixels():
    """Without sculpt's repair (vector_texture_stores), TVM 0.27's code writes one channel's value into
    the whole pixel: when this test fails, TVM's VectorizeLoop handles texture2d_store again."""
    import tvm

    target = texture_target(get_target("adreno")).tvm_target()
    work, _ = prepare_model(_conv_relu())
    lowered = {}

    @tvm.instrument.pass_instrument
    class Capture:
        def run_before_pass(self, module, info):
            if info.name == "tirx.SplitHostDevice":
                lowered["tir"] = module

    with tvm.transform.PassContext(opt_level=3, instruments=[Capture()]):
        tvm.compile(import_to_relax(work, canonicalized=True), target=target,
                    relax_pipeline=fail_safe_gpu_pipeline(target, []), tir_pipeline=tir_pipeline(repair=False))
    assert narrow_texture_stores(lowered["tir"]) == {"te_layout_transform_kernel": 1}


def test_a_pool_and_a_reduction_that_feed_nchw4c_convs_match_onnxruntime():
    """A max pool and a mean whose results NCHW4c convs read: TVM would write them into textures one channel
    per thread; they write buffers, copied into the textures."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c2"], ["m"], axes=[2], keepdims=1),
             helper.make_node("Conv", ["m", "w3", "b3"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 8, 12, 20])], [("y", [1, 16, 1, 10])],
                       {"w1": f32(16, 8, 3, 3), "b1": f32(16), "w2": f32(16, 16, 3, 3), "b2": f32(16),
                        "w3": f32(16, 16, 3, 3), "b3": f32(16)})
    plan, warned = _plan(model)
    assert not warned and sum(s.op == "copy" for s in plan.steps) >= 2
    cmp = _compare(model, plan)
    assert cmp.within(RTOL), cmp.as_dict()


def test_gpu_memory_texture_on_another_target_is_one_line_error(tmp_path, capsys):
    model_path = tmp_path / "conv.onnx"
    _conv_relu().save(model_path)
    for target in ("mali", "host"):
        out = tmp_path / f"conv_{target}.so"
        assert main(["compile", str(model_path), "--target", target, "--gpu-memory", "texture", "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sculpt: error: --gpu-memory texture is for --target adreno (TVM's texture lowering is "
                       f"Adreno's), not '{target}'"]
        assert not list(tmp_path.glob("conv_*"))


@pytest.mark.slow
def test_ppocr_cls_texture_build_matches_onnxruntime_on_pocl(tmp_path, capsys):
    """PP-OCR cls (depthwise convs: left in NCHW buffers) compiled with --gpu-memory texture: the artifact
    records it, its kernels use images and compile on PoCL, and `sculpt verify` runs them there and
    matches onnxruntime."""
    cls = str(ppocr_model_path("cls"))
    out = tmp_path / "cls_texture.so"
    x = tmp_path / "x.npy"
    np.save(x, text_input((1, 3, 48, 192), 1))
    assert main(["compile", cls, "--target", "adreno", "--gpu-memory", "texture", "--input-shape", "x=1,3,48,192",
                 "-o", str(out)]) == 0
    assert "image writes" not in capsys.readouterr().err
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["options"]["gpu_memory"] == "texture"
    assert "texture" in manifest["target"]["tvm_target"]["keys"]
    images = image_kernels(out.with_suffix(".cl").read_text())
    assert len(images["kernels"]) >= 40 and images["writes"] >= 40
    assert main(["verify", str(out), "--model", cls, "--compile-only"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--model", cls, "--input", f"x={x}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "opencl-run" and result["ok"] and result["max_rel"] <= RTOL
