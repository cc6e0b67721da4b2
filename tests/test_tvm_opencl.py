"""Mobile GPU builds (Mali, Adreno: OpenCL with aarch64 host code): every OpenCL kernel TVM generates for
the PP-OCRv4 det/rec/cls models is compiled by a real OpenCL implementation (PoCL, through pyopencl);
`sculpt verify` also runs them there (more in test_tvm_opencl_run.py).

The default suite builds det at a reduced input of 1x3x96x96 (the same layers, fewer work-items);
the full-size det builds are slow tests."""

import json

import numpy as np
import pytest

from sculpt.backends.tvm.artifact import compile_model
from sculpt.backends.tvm.opencl import OpenCLError, check_kernels, kernel_definitions
from sculpt.cli import main
from sculpt.models import ppocr_model, ppocr_model_path
from sculpt.textdata import text_input

SHAPES = {"cls": [1, 3, 48, 192], "rec": [1, 3, 48, 320], "det": [1, 3, 96, 96]}


def _check_build(kind, target, shape):
    compiled = compile_model(ppocr_model(kind), target, input_shapes={"x": shape})
    source = compiled.opencl_source()
    defined = kernel_definitions(source)
    check = check_kernels(source)
    assert check.platform == "Portable Computing Language"
    assert len(defined) >= 20  # every conv/pool/elementwise stage is a kernel
    assert check.kernels == defined  # each one compiled, with the parameters of its definition
    return compiled, check


@pytest.mark.parametrize("kind, target", [("cls", "adreno"), ("rec", "mali"), ("rec", "adreno"), ("det", "mali"),
                                          ("det", "adreno")])  # cls on mali: through the CLI below
def test_every_opencl_kernel_compiles_on_pocl(kind, target):
    compiled, _ = _check_build(kind, target, SHAPES[kind])
    assert compiled.target.tvm_target().attrs["device"] == target


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_full_size_det_kernels_compile_on_pocl(target):
    _check_build("det", target, [1, 3, 320, 320])


def test_sculpt_compile_mali_writes_the_kernels_and_verify_runs_them_on_pocl(tmp_path, capsys):
    """cls for mali end to end: compile, compile the kernels on PoCL, run them there in TVM's launch order
    on rendered text and compare with onnxruntime (1e-4 relative); ``--compile-only`` stops after compiling."""
    out = tmp_path / "cls_mali.so"
    assert main(["compile", str(ppocr_model_path("cls")), "--target", "mali", "--input-shape", "x=1,3,48,192",
                 "-o", str(out)]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["opencl_source"] == "cls_mali.cl" and manifest["target"]["opencl"]
    assert int.from_bytes(out.read_bytes()[18:20], "little") == 183  # the host side is aarch64
    kernels = len(kernel_definitions(out.with_suffix(".cl").read_text()))
    np.save(tmp_path / "x.npy", text_input(SHAPES["cls"], 1))
    capsys.readouterr()
    assert main(["verify", str(out), "--model", str(ppocr_model_path("cls")), "--input", f"x={tmp_path / 'x.npy'}",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["kind"] == "opencl-run" and data["max_rel"] <= 1e-4
    assert data["opencl"]["kernels"] == kernels
    assert main(["verify", str(out), "--model", str(ppocr_model_path("cls")), "--compile-only", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["kind"] == "opencl-compile" and "max_rel" not in data
    assert data["opencl"]["kernels"] == kernels


def test_a_kernel_that_does_not_compile_is_named():
    good = "__kernel void add_one(__global float* restrict a) { a[get_global_id(0)] += 1.0f; }\n"
    bad = "__kernel void broken_kernel(__global float* restrict a) { a[0] = undefined_value; }\n"
    assert check_kernels(good).kernels == {"add_one": 1}
    with pytest.raises(OpenCLError) as e:
        check_kernels(good + bad)
    assert "broken_kernel" in str(e.value) and "add_one" not in str(e.value).split(":")[0]


def test_bench_of_a_gpu_target_needs_a_device(capsys):
    assert main(["bench", str(ppocr_model_path("cls")), "--target", "mali", "--input-shape", "x=1,3,48,192"]) == 2
    assert "--rpc" in capsys.readouterr().err
