"""Mali/Adreno builds run for real on PoCL: the OpenCL kernels TVM generated, launched in the order and
with the work sizes TVM's host code uses, compute the model (compared with onnxruntime, 1e-4 relative to
each output's scale). cls on mali runs through `sculpt verify` in test_tvm_opencl.py."""

import dataclasses
import json
import re

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphs import f32, make_model
from sculpt import runtime as ort
from sculpt.runtime import Comparison, output_error
from sculpt.backends.tvm.opencl import kernel_definitions
from sculpt.backends.tvm.opencl_run import OpenCLRunError, OpenCLRunner, plan_model
from sculpt.cli import main
from sculpt.models import ppocr_model
from sculpt.textdata import text_input

RTOL = 1e-4
SHAPES = {"cls": [1, 3, 48, 192], "rec": [1, 3, 48, 320], "det": [1, 3, 96, 96]}


def _tiny_net():
    """Conv -> Relu (an output) -> GlobalAveragePool -> Flatten -> Gemm -> Softmax (an output)."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    return make_model(nodes, [("x", [1, 3, 16, 16])], [("features", [1, 8, 16, 16]), ("probs", [1, 5])],
                      {"w": f32(8, 3, 3, 3), "b": f32(8), "fc_w": f32(5, 8), "fc_b": f32(5)})


def _compare(model, outputs, feeds) -> Comparison:
    ref = ort.run(model, feeds)
    return Comparison([output_error(name, got, np.asarray(ref[name])) for name, got in zip(ref, outputs)], 1)


def _run_and_compare(model, target, shape=None):
    shapes = {"x": shape} if shape else None
    plan = plan_model(model, target, input_shapes=shapes)
    feeds = {"x": text_input(shape, 1)} if shape else {"x": f32(*model.input_shapes()["x"])}
    run = OpenCLRunner(plan).run(feeds)
    work = model.clone()
    if shapes:
        work.fix_input_shapes(shapes)
    return plan, run, _compare(work, run.outputs, feeds)


def _every_kernel_launched(plan) -> bool:
    """Every kernel of the source is launched, except those of TIR functions ``main`` never calls (TVM keeps
    e.g. a reshape's function after the VM's own reshape replaced the call)."""
    launched, defined = plan.kernels_launched(), set(kernel_definitions(plan.source))
    called = {s.function for s in plan.calls}
    unused = {k for k in defined - launched if re.sub(r"_kernel(_\d+)?$", "", k) not in called}
    return launched <= defined and launched == defined - unused


def test_tiny_net_with_two_outputs_matches_onnxruntime_on_pocl():
    plan, run, cmp = _run_and_compare(_tiny_net(), "mali")
    assert run.platform == "Portable Computing Language"
    assert [o.shape for o in run.outputs] == [(1, 8, 16, 16), (1, 5)]
    assert cmp.within(RTOL), cmp.as_dict()
    assert _every_kernel_launched(plan) and run.launches == plan.launches >= 3


def test_host_code_with_loops_and_workspaces_runs_on_pocl():
    """TopK lowers to a GPU sort: one TIR function whose host code allocates workspaces and launches
    several kernels; values and indices match onnxruntime exactly."""
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)]
    model = make_model(nodes, [("x", [1, 64, 300])],
                       [("values", [1, 64, 5]), helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 64, 5])],
                       {"k": np.array([5], np.int64)})
    plan = plan_model(model, "mali", canonicalize=False)
    sort = max(plan.calls, key=lambda s: len(s.launches))
    assert len(sort.launches) >= 3 and sort.workspaces
    feeds = {"x": f32(1, 64, 300)}
    run = OpenCLRunner(plan).run(feeds)
    assert _compare(model, run.outputs, feeds).max_abs == 0.0


@pytest.fixture(scope="module")
def cls_adreno():
    model = ppocr_model("cls")
    plan = plan_model(model, "adreno", input_shapes={"x": SHAPES["cls"]})
    runner = OpenCLRunner(plan)
    feeds = {"x": text_input(SHAPES["cls"], 1)}
    work = model.clone()
    work.fix_input_shapes({"x": SHAPES["cls"]})
    return plan, runner, feeds, work


def test_cls_adreno_kernels_on_pocl_match_onnxruntime(cls_adreno):
    plan, runner, feeds, work = cls_adreno
    run = runner.run(feeds)
    cmp = _compare(work, run.outputs, feeds)
    assert cmp.within(RTOL), cmp.as_dict()
    assert _every_kernel_launched(plan)
    assert run.launches == plan.launches >= 50  # every conv/pool/elementwise stage of MobileNet


def test_a_corrupted_launch_is_detected(cls_adreno):
    """Halve the grid of the first kernel launch: part of the first feature map is never computed."""
    plan, runner, feeds, work = cls_adreno
    first = plan.steps.index(plan.calls[0])
    step = plan.steps[first]
    launch = step.launches[0]
    assert launch.global_size[0] >= 2 * launch.local_size[0]
    half = (launch.global_size[0] // 2 // launch.local_size[0] * launch.local_size[0],) + launch.global_size[1:]
    broken = dataclasses.replace(step, launches=(dataclasses.replace(launch, global_size=half), *step.launches[1:]))
    runner.plan = dataclasses.replace(plan, steps=[*plan.steps[:first], broken, *plan.steps[first + 1:]])
    try:
        run = runner.run(feeds)
    finally:
        runner.plan = plan
    cmp = _compare(work, run.outputs, feeds)
    assert not cmp.within(RTOL), cmp.as_dict()
    assert _compare(work, runner.run(feeds).outputs, feeds).within(RTOL)  # the intact plan still matches


def test_a_wrong_input_shape_and_a_cpu_target_are_refused():
    plan = plan_model(_tiny_net(), "adreno")
    with pytest.raises(Exception, match="input 'x'"):
        OpenCLRunner(plan).run({"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(OpenCLRunError, match="not an OpenCL target"):
        plan_model(_tiny_net(), "host")


def test_verify_refuses_an_artifact_whose_kernels_are_not_the_models(tmp_path, capsys):
    model_path = tmp_path / "tiny.onnx"
    _tiny_net().save(model_path)
    out = tmp_path / "tiny_mali.so"
    assert main(["compile", str(model_path), "--target", "mali", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--model", str(model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["kind"] == "opencl-run" and data["max_rel"] <= RTOL
    source = out.with_suffix(".cl")
    text = source.read_text()
    assert "max(" in text
    source.write_text(text.replace("max(", "min(", 1))  # still compiles, computes something else
    assert main(["verify", str(out), "--model", str(model_path)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("sculpt: warning:")]  # a schedule fallback of the rebuild is a warning line
    assert len(err) == 1 and err[0].startswith("sculpt: error:") and "tiny_mali.cl" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind, target", [("rec", "mali"), ("rec", "adreno"), ("det", "mali"), ("det", "adreno")])
def test_ppocr_kernels_on_pocl_match_onnxruntime(kind, target):
    plan, run, cmp = _run_and_compare(ppocr_model(kind), target, SHAPES[kind])
    assert cmp.within(RTOL), cmp.as_dict()
    assert _every_kernel_launched(plan)
