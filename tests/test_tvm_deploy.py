"""ARM artifacts for real: PP-OCRv4 det/rec/cls cross-compiled for aarch64 (aarch64-linux-gnu-g++), run by the
C++ deploy runner built for aarch64 against the aarch64 TVM runtime from PyPI, under qemu-aarch64, and
compared with onnxruntime at 1e-4 relative.

Untuned TVM code under qemu is slow: in the default suite det runs at a reduced input of 1x3x96x96
(the model is fully convolutional; every layer still runs); the full 320x320 det is a slow test."""

import json
import subprocess

import numpy as np
import pytest

from sculpt.backends.tvm.artifact import load_artifact
from sculpt.backends.tvm.runner import runner_path
from sculpt.backends.tvm.runtime_libs import aarch64_runtime
from sculpt.cli import main
from sculpt.models import ppocr_model_path
from sculpt.textdata import text_input

RTOL = 1e-4


def _compile_and_verify(tmp_path, capsys, kind, shape, target="arm64", extra=()):
    """Compile with `sculpt compile`, verify with `sculpt verify` on rendered text (random noise drives
    det's probability map to ~0, where relative errors mean nothing)."""
    out = tmp_path / f"{kind}_{target}.so"
    model = str(ppocr_model_path(kind))
    assert main(["compile", model, "--target", target, "--input-shape", "x=" + ",".join(map(str, shape)),
                 "-o", str(out), *extra]) == 0
    capsys.readouterr()
    np.save(tmp_path / "x.npy", text_input(shape, seed=1))
    assert main(["verify", str(out), "--model", model, "--input", f"x={tmp_path / 'x.npy'}", "--rtol", str(RTOL),
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["emulated"] and data["kind"] == "run"
    assert data["max_rel"] <= RTOL and all(o["shape_match"] for o in data["outputs"])
    return out, data


def test_aarch64_runtime_and_runner_are_aarch64_builds():
    runtime = aarch64_runtime()
    for lib in ("libtvm_ffi.so", "libtvm_runtime.so"):
        header = (runtime.lib_dirs[0] / lib).read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    runner = runner_path("aarch64")
    assert int.from_bytes(runner.read_bytes()[18:20], "little") == 183
    assert runner_path("aarch64") == runner  # built once, then taken from the cache


def test_cls_arm64_under_qemu_matches_onnxruntime(tmp_path, capsys):
    out, _ = _compile_and_verify(tmp_path, capsys, "cls", [1, 3, 48, 192])
    assert int.from_bytes(out.read_bytes()[18:20], "little") == 183
    assert load_artifact(out).manifest["target"]["arch"] == "aarch64"
    needed = subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(out)], capture_output=True, text=True).stdout
    assert "libc.so" in needed  # an ordinary aarch64 Linux shared library


def test_rec_arm64_under_qemu_matches_onnxruntime_on_sculpts_pool(tmp_path, capsys):
    """rec compiled for sculpt's work-stealing pool: its loops run on the pool in the aarch64 runner."""
    from sculpt.backends.tvm import thread_policy
    from sculpt.backends.tvm.runner import run_runner

    out, _ = _compile_and_verify(tmp_path, capsys, "rec", [1, 3, 48, 320], extra=["--thread-policy", "stealing"])
    artifact = load_artifact(out)
    assert artifact.thread_policy == "stealing"
    result = run_runner(artifact.library, "aarch64", [tmp_path / "x.npy"], None, runs=1,
                        env=thread_policy.runtime_env("stealing", 2))
    assert result.thread_pool == "sculpt"


def test_det_arm64_reduced_input_under_qemu_matches_onnxruntime(tmp_path, capsys):
    _compile_and_verify(tmp_path, capsys, "det", [1, 3, 96, 96])


def test_cortex_a76_dotprod_build_runs_under_qemu(tmp_path, capsys):
    out, _ = _compile_and_verify(tmp_path, capsys, "cls", [1, 3, 48, 192], target="cortex-a76")
    assert load_artifact(out).manifest["target"]["tvm_target"]["mcpu"] == "cortex-a76"


@pytest.mark.slow
def test_det_arm64_full_size_under_qemu_matches_onnxruntime(tmp_path, capsys):
    _compile_and_verify(tmp_path, capsys, "det", [1, 3, 320, 320])


@pytest.mark.slow
@pytest.mark.parametrize("core", ["cortex-a53", "cortex-a72"])
def test_other_cores_run_under_qemu(tmp_path, capsys, core):
    _compile_and_verify(tmp_path, capsys, "rec", [1, 3, 48, 320], target=core)
