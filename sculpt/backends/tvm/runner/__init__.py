"""The C++ deploy runner (deploy_runner.cc): built on demand for the host or for aarch64 into the
sculpt cache, and run (natively, or under qemu-aarch64 for aarch64).

The runner loads an artifact with the TVM runtime, reads .npy inputs, writes .npy outputs and
prints one JSON line with the median latency of N runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sculpt.backends.tvm.runtime_libs import (ToolchainError, RuntimeLibraries, aarch64_runtime, build_into_cache,
                                              cache_dir, host_runtime, qemu_command, require_tool)

SOURCE = Path(__file__).with_name("deploy_runner.cc")
POOL_SOURCE = Path(__file__).with_name("work_pool.cc")  # sculpt's thread pool, linked in
_COMPILERS = {"aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}


def runtime_for(arch: str, progress: Callable[[str], None] | None = None) -> RuntimeLibraries:
    if arch == platform.machine():
        return host_runtime()
    if arch == "aarch64":
        return aarch64_runtime(progress)
    raise ToolchainError(f"no TVM runtime for {arch} (sculpt runs host and aarch64 artifacts)")


def _compiler(arch: str) -> str:
    if arch == platform.machine():
        return require_tool("g++", "g++")
    if arch not in _COMPILERS:
        raise ToolchainError(f"no C++ cross compiler known for {arch}")
    return require_tool(*_COMPILERS[arch])


def runner_path(arch: str | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The deploy runner built for ``arch`` (default: this machine); built once per source and runtime."""
    arch = arch or platform.machine()
    runtime = runtime_for(arch, progress)
    cxx = _compiler(arch)
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), POOL_SOURCE.read_bytes(), cxx.encode(), *(str(d).encode() for d in runtime.lib_dirs),
                                     str(runtime.include_dir).encode(), " ".join(runtime.versions).encode()]))
    binary = cache_dir() / "runner" / f"sculpt_deploy_runner-{arch}-{key.hexdigest()[:16]}"
    if binary.is_file():
        return binary
    if progress:
        progress(f"building the deploy runner for {arch}")
    lib_flags = [f"-L{d}" for d in runtime.lib_dirs]
    rpath = ":".join(str(d) for d in runtime.lib_dirs)

    def command(output: str) -> list[str]:
        return [cxx, "-std=c++17", "-O2", str(SOURCE), str(POOL_SOURCE), f"-I{runtime.include_dir}", "-o", output,
                *lib_flags, "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime", "-lpthread", "-ldl",
                f"-Wl,-rpath,{rpath}"]

    return build_into_cache(binary, command, f"the deploy runner for {arch}", executable=True)


@dataclass
class RunnerResult:
    output_files: list[Path]
    median_ms: float
    times_ms: list[float]
    thread_pool: str = "tvm"  # whose pool ran the parallel loops: "sculpt" (policy stealing) or "tvm"


class DeployRunFailed(ToolchainError):
    """The deploy runner could not load or run the artifact."""


def run_runner(library: Path, arch: str, input_files: Sequence[Path], output_dir: Path | None, *,
               runs: int = 1, warmup: int = 0, timeout: float | None = None, env: dict | None = None,
               progress: Callable[[str], None] | None = None) -> RunnerResult:
    """Run the deploy runner for ``arch`` on ``library`` (under qemu when ``arch`` is not this machine's)."""
    binary = runner_path(arch, progress)
    command = [*qemu_command(arch), str(binary), str(Path(library).resolve())]
    for f in input_files:
        command += ["--input", str(f)]
    if output_dir is not None:
        command += ["--output-dir", str(output_dir)]
    command += ["--runs", str(runs), "--warmup", str(warmup)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise DeployRunFailed(f"{library}: the deploy runner did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [l for l in done.stderr.splitlines() if l.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise DeployRunFailed(f"{library}: {why.removeprefix('deploy_runner: error: ')}")
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeployRunFailed(f"{library}: the deploy runner printed no result ({done.stdout[-200:]!r})") from None
    return RunnerResult([Path(p) for p in report["outputs"]], float(report["median_ms"]),
                        [float(t) for t in report["times_ms"]], str(report.get("thread_pool", "tvm")))
