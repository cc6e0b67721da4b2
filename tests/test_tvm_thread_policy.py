"""The CPU thread-pool policy (sculpt.backends.tvm.thread_policy) and the host target's features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sculpt.backends.tvm import thread_policy  # noqa: E402
from sculpt.backends.tvm.kernels.target_traits import hidden_host_features, traits_of  # noqa: E402
from sculpt.errors import OptionError  # noqa: E402


def test_shared_policy_neither_pins_nor_spins_and_dedicated_is_tvms_own():
    assert thread_policy.runtime_env("shared") == {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0",
                                                   "SCULPT_THREAD_POOL": "tvm"}
    assert thread_policy.runtime_env("dedicated", 2) == {
        "TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000", "SCULPT_THREAD_POOL": "tvm",
        "TVM_NUM_THREADS": "2"}
    assert thread_policy.DEFAULT_POLICY == "stealing"  # sculpt's pool
    with pytest.raises(OptionError, match="unknown thread policy 'busy'"):
        thread_policy.runtime_env("busy")
    with pytest.raises(OptionError, match="threads must be >= 1"):
        thread_policy.runtime_env("shared", 0)


def test_apply_keeps_what_the_user_set_unless_told_to_override():
    env = {"TVM_THREAD_POOL_SPIN_COUNT": "1000"}
    now = thread_policy.apply("shared", environ=env, override=False)
    assert now == {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "1000", "SCULPT_THREAD_POOL": "tvm"}
    thread_policy.apply("shared", 3, environ=env)
    assert env == {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0", "SCULPT_THREAD_POOL": "tvm",
                   "TVM_NUM_THREADS": "3"}


def test_importing_the_backend_gives_the_process_the_default_policy():
    import os

    import sculpt.backends.tvm  # noqa: F401

    for key in ("TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT"):
        assert key in os.environ


def test_the_manifest_records_the_policy_and_the_artifact_reads_it(tmp_path, capsys):
    from onnx import TensorProto, helper

    from sculpt.backends.tvm.artifact import ArtifactError, load_artifact
    from sculpt.backends.tvm.deploy import run_artifact
    from sculpt.cli import main

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "relu.so"
    assert main(["compile", str(path), "-o", str(out), "--thread-policy", "dedicated", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["runtime"] == {"thread_policy": "dedicated",
                                   "env": {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000",
                                           "SCULPT_THREAD_POOL": "tvm"}}
    artifact = load_artifact(out)
    assert artifact.thread_policy == "dedicated"
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    run = run_artifact(artifact, {"x": x}, runs=2, threads=1)  # the deploy runner, under that policy
    np.testing.assert_array_equal(run.outputs["y"], np.maximum(x, 0))
    artifact.manifest["runtime"] = {"thread_policy": "spinning"}
    with pytest.raises(ArtifactError, match="unknown thread_policy 'spinning'"):
        _ = artifact.thread_policy
    del artifact.manifest["runtime"]  # a manifest from before the policy: the default
    assert artifact.thread_policy == "stealing"


def test_vector_features_a_virtual_machine_hides_are_turned_off():
    # an AVX-512 Zen 4 reported by the hypervisor with AVX2 only
    hidden = hidden_host_features("znver4", flags={"avx", "avx2", "fma", "f16c"})
    assert "-avx512f" in hidden and "-avx2" not in hidden
    traits = traits_of({"kind": "llvm", "mcpu": "znver4", "mattr": hidden})
    assert traits.isa == "avx2" and traits.vector_lanes == 8
    assert hidden_host_features("znver4", flags={"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                                 "avx512_bf16"}) == []
    assert traits_of({"kind": "llvm", "mcpu": "znver4"}).isa == "avx512"


def test_bench_layers_times_every_kernel_and_names_it(tmp_path, capsys):
    """`sculpt bench --layers`: per TIR function, the kernel sculpt gave it, calls, time and share."""
    import onnx

    from sculpt.backends.tvm.kernels import onnx_cases as cases
    from sculpt.cli import main

    path = tmp_path / "grid.onnx"
    grid = [*cases.CONV_GRID[:6], cases.CONV_GRID[-1]]  # the last: 3 channels, the width-vectorized conv
    onnx.save(cases.conv_model(grid, cases.CONV_GRID_INPUT), str(path))
    assert main(["bench", str(path), "--layers", "--runs", "3", "--rounds", "1", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["layers"]["tvm_ms"]
    assert result["thread_policy"] == "stealing"
    kinds = {r["kernel"] for r in rows}
    assert {"conv2d_blocked", "conv2d"} <= kinds, kinds
    assert all(r["calls"] >= 1 and r["ms"] >= 0 for r in rows)
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-6
    assert sum(r["calls"] for r in rows if r["func"] != "(runtime)") == 7  # one fused kernel per conv
    assert rows == sorted(rows, key=lambda r: -r["ms"])
    assert main(["bench", str(path), "--layers"]) == 0  # the table
    out = capsys.readouterr().out
    assert "time per kernel" in out and "conv2d_blocked" in out
    with pytest.raises(OptionError, match="--layers times each kernel on this machine"):
        from sculpt.backends.tvm.bench import benchmark

        benchmark(path, "arm64", layers=True)
