"""The two adreno cells of the coverage table (tools/coverage_table.py) that were red, each reduced to a
small model that reproduces it, built for adreno and run on PoCL against onnxruntime:

- light-shufflenet: its input is named ``gpu_0/data_0``. TVM's ONNX importer only replaces dots in input
  names, the TIR function legalized from the first conv names its buffer after the input, and the OpenCL
  C kernel parameter ``gpu_0/data_0_ptr`` does not compile ("expected ')'"). The GPU pipeline now renames
  such parameters to C identifiers (sculpt.backends.tvm.gpu_schedule); feeds keep the model's names.
- ppocrv6-det-small: a 2x2 conv whose output is padded at the end (the next conv's SAME_UPPER padding,
  fused into it). dlight's GeneralReduction keeps the whole conv output in shared memory, one work-group
  for the whole tensor (6.5 MB there; PoCL's CPU device gives 1 MiB and aborts the process, Adreno and Mali
  16-32 KiB). A schedule over the target's max_shared_memory_per_block is now refused and the next rule,
  down to the plain thread-bound loop nest, schedules the function.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from graphs import make_model
from sculpt import runtime
from sculpt.backends.tvm.gpu_schedule import c_identifier
from sculpt.backends.tvm.opencl_run import OpenCLRunner, plan_model
from sculpt.backends.tvm.relax_import import GPUScheduleFallbackWarning
from sculpt.backends.tvm.targets import get_target
from sculpt.runtime import output_error

RTOL = 1e-4
RNG = np.random.default_rng(16)
_LOCAL_ARRAY = re.compile(r"__local\s+(\w+)\s+\w+\[(\d+)\]")
_BYTES = {"float": 4, "int": 4, "uint": 4, "half": 2, "char": 1, "uchar": 1, "short": 2, "long": 8, "double": 8}


def _weights(*shape) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


def _local_bytes_per_kernel(source: str) -> dict[str, int]:
    """Bytes of the __local arrays each kernel of the OpenCL C source declares."""
    sizes: dict[str, int] = {}
    for chunk in re.split(r"(?=__kernel\s+void\s+\w+\s*\([^)]*\)\s*\{)", source)[1:]:
        name = re.match(r"__kernel\s+void\s+(\w+)", chunk).group(1)
        sizes[name] = sum(_BYTES[t] * int(n) for t, n in _LOCAL_ARRAY.findall(chunk))
    return sizes


def _run_on_pocl_and_compare(model, feeds: dict[str, np.ndarray], target: str = "adreno"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_model(model, target)
    run = OpenCLRunner(plan).run(feeds)
    assert run.platform == "Portable Computing Language"
    reference = runtime.run(model, feeds)
    for name, got in zip(reference, run.outputs):
        err = output_error(name, got, np.asarray(reference[name]))
        assert err.shape_match and err.max_rel <= RTOL, err
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, GPUScheduleFallbackWarning)]
    return plan, fallbacks


# ------------------------------------------------------------------ light-shufflenet: input names
def _slash_named_inputs():
    """Two inputs, ``gpu_0/data_0`` (shufflenet's) and ``gpu_0_data_0`` (what the first becomes with its
    slash replaced), added, then a grouped conv + bias + relu as shufflenet's first layers."""
    nodes = [helper.make_node("Add", ["gpu_0/data_0", "gpu_0_data_0"], ["sum"]),
             helper.make_node("Conv", ["sum", "w", "b"], ["conv"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["gpu_0/softmax_1"])]
    return make_model(nodes, [("gpu_0/data_0", [1, 4, 12, 12]), ("gpu_0_data_0", [1, 4, 12, 12])],
                      [("gpu_0/softmax_1", [1, 6, 12, 12])], {"w": _weights(6, 2, 3, 3), "b": _weights(6)})


def test_c_identifier():
    assert c_identifier("gpu_0/data_0") == "gpu_0_data_0"
    assert c_identifier("0:input.1") == "_0_input_1"
    assert c_identifier("x") == "x"


def test_inputs_named_with_a_slash_build_for_adreno_and_run_on_pocl():
    model = _slash_named_inputs()
    feeds = {"gpu_0/data_0": RNG.standard_normal((1, 4, 12, 12)).astype(np.float32),
             "gpu_0_data_0": RNG.standard_normal((1, 4, 12, 12)).astype(np.float32)}
    plan, _ = _run_on_pocl_and_compare(model, feeds)
    assert [name for name, _, _ in plan.inputs] == ["gpu_0/data_0", "gpu_0_data_0"]  # the model's names
    assert "gpu_0/" not in plan.source
    assert "gpu_0_data_0_1_ptr" in plan.source  # the renamed one did not take the other's name


# ------------------------------------------------------------------ ppocrv6-det-small: shared memory
SAME_SHAPE = [1, 24, 48, 48]


def _same_upper_convs():
    """Conv 2x2 SAME_UPPER + bias -> Relu -> Conv 2x2 SAME_UPPER + bias -> Relu: PP-HGNet's stem in
    PP-OCRv6 det small; the second conv's padding fuses into the first conv's function (end padding)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c2"], ["y"])]
    return make_model(nodes, [("x", SAME_SHAPE)], [("y", [1, 8, 48, 48])],
                      {"w1": _weights(12, 24, 2, 2), "b1": _weights(12), "w2": _weights(8, 12, 2, 2), "b2": _weights(8)})


def test_tvm_alone_puts_the_whole_conv_output_in_shared_memory():
    """The reproducer of TVM's schedule (if dlight starts to respect the limit, this test says so)."""
    import tvm

    from sculpt.backends.tvm.opencl import opencl_source
    from sculpt.backends.tvm.relax_import import import_to_relax

    target = get_target("adreno").tvm_target()
    executable = tvm.compile(import_to_relax(_same_upper_convs()), target=target)
    local = _local_bytes_per_kernel(opencl_source(executable))
    limit = int(target.attrs["max_shared_memory_per_block"])
    over = {k: v for k, v in local.items() if v > limit}
    assert any(k.startswith("fused_conv2d_add_relu_pad") for k in over), local
    assert max(over.values()) >= 12 * 48 * 48 * 4  # the whole output of the first conv


def test_a_schedule_over_the_shared_memory_limit_falls_back_and_runs_on_pocl():
    feeds = {"x": RNG.standard_normal(SAME_SHAPE).astype(np.float32)}
    plan, fallbacks = _run_on_pocl_and_compare(_same_upper_convs(), feeds)
    limit = int(get_target("adreno").tvm_target().attrs["max_shared_memory_per_block"])
    local = _local_bytes_per_kernel(plan.source)
    assert local and max(local.values()) <= limit, local
    assert len(fallbacks) == 1 and "\n" not in fallbacks[0]
    # canonicalize makes SAME_UPPER explicit conv pads (explicit-pads): no separate pad in the function name
    assert re.search(r"fused_conv2d\w*_add\w*_relu\w* \(GeneralReduction failed: \d+ bytes of shared memory per "
                     r"block, over the target's max_shared_memory_per_block 16384; scheduled by Fallback\)",
                     fallbacks[0]), fallbacks[0]


# ------------------------------------------------------------------ the real models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["light-shufflenet", "ppocrv6-det-small"])
def test_the_coverage_cell_passes(name, tmp_path):
    """The cell's own commands (sculpt compile --target adreno, then sculpt verify: the kernels on PoCL
    against onnxruntime at rtol 1e-4)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import coverage_table

    model = {m.name: m for m in coverage_table.all_models()}[name]
    cell = coverage_table.run_compile_cell(model, "adreno", model.path(tmp_path), tmp_path, timeout=1800)
    assert cell["ok"], cell
    assert cell["max_rel"] is not None and cell["max_rel"] <= RTOL
