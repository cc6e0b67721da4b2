"""The OpenCL side of mali/adreno builds: get the generated OpenCL C out of a build and have a real
OpenCL compiler (PoCL, through pyopencl) compile every kernel.

There is no Mali or Adreno GPU here; PoCL's compiler (clang + LLVM) checks the kernels the way a
device driver's compiler would front-end them: syntax, types, address spaces, built-ins, and that
each kernel's arguments are what TVM's host code will pass.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from sculpt.common import one_line
from sculpt.errors import SculptError

_KERNEL_DEF = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{")


class OpenCLError(SculptError):
    """No OpenCL implementation to compile with, or a kernel that does not compile."""


def opencl_source(executable) -> str:
    """The OpenCL C source of a build for an OpenCL target (all kernels in one program)."""
    modules = []

    def walk(mod):
        if mod.kind == "opencl":
            modules.append(mod)
        for sub in mod.imports:
            walk(sub)

    walk(executable.mod)
    if not modules:
        raise OpenCLError("the build has no OpenCL module (was it built for an OpenCL target?)")
    return "\n".join(m.inspect_source() for m in modules)


def kernel_definitions(source: str) -> dict[str, int]:
    """Kernel name -> number of parameters, for every kernel *defined* (not just declared) in ``source``."""
    kernels = {}
    for name, params in _KERNEL_DEF.findall(source):
        kernels[name] = len([p for p in params.split(",") if p.strip()])
    return kernels


@dataclass
class KernelCheck:
    """The result of compiling a build's OpenCL C with a real OpenCL implementation."""

    platform: str
    device: str
    kernels: dict[str, int] = field(default_factory=dict)  # compiled kernel -> parameters
    build_seconds: float = 0.0
    source_bytes: int = 0

    def as_dict(self) -> dict:
        return {"platform": self.platform, "device": self.device, "kernels": len(self.kernels),
                "build_seconds": round(self.build_seconds, 3), "source_bytes": self.source_bytes}


def opencl_device(prefer: str = "Portable Computing Language"):
    """(context, device) of the first OpenCL device, PoCL's if present."""
    import os

    # compile for real every time: PoCL's kernel cache would otherwise answer for a previous build
    os.environ.setdefault("POCL_KERNEL_CACHE", "0")
    try:
        import pyopencl as cl
    except ImportError:
        raise OpenCLError("checking OpenCL kernels needs pyopencl (pip install pyopencl) and an OpenCL "
                          "implementation (Debian: apt-get install pocl-opencl-icd)") from None
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    platforms = sorted(platforms, key=lambda p: p.name != prefer)
    for platform in platforms:
        devices = platform.get_devices()
        if devices:
            return cl.Context([devices[0]]), devices[0]
    raise OpenCLError("no OpenCL device found (Debian: apt-get install pocl-opencl-icd)")


def check_kernels(source: str) -> KernelCheck:
    """Compile ``source`` with the OpenCL implementation and check that every kernel defined in it
    came out of the compiler with its parameters. Raises OpenCLError naming the failing kernels."""
    import pyopencl as cl

    context, device = opencl_device()
    expected = kernel_definitions(source)
    if not expected:
        raise OpenCLError("the OpenCL source defines no kernel")
    start = time.perf_counter()
    try:
        program = cl.Program(context, source).build()
    except cl.Error as e:
        failing = _failing_kernels(context, source, expected)
        log = one_line(e, 400)
        raise OpenCLError(f"{device.platform.name} could not compile the OpenCL kernels"
                          + (f" {', '.join(failing)}" if failing else "") + f": {log}") from None
    seconds = time.perf_counter() - start
    compiled = {k.function_name: k.num_args for k in program.all_kernels()}
    missing = sorted(set(expected) - set(compiled))
    if missing:
        raise OpenCLError(f"kernels missing from the compiled program: {', '.join(missing)}")
    wrong = sorted(n for n, args in expected.items() if compiled[n] != args)
    if wrong:
        raise OpenCLError(f"kernels whose compiled parameter count differs from the source: {', '.join(wrong)}")
    return KernelCheck(device.platform.name, device.name, {n: compiled[n] for n in expected}, seconds,
                       len(source.encode()))


def _failing_kernels(context, source: str, expected: dict[str, int]) -> list[str]:
    """Which kernels fail on their own (each definition compiled in a program of its own)."""
    import pyopencl as cl

    failing = []
    for match in _KERNEL_DEF.finditer(source):
        body_start = match.start()
        depth, i = 0, match.end() - 1
        while i < len(source):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
            if depth == 0:
                break
        preamble = source[: source.find("__kernel")] if "__kernel" in source else ""
        try:
            cl.Program(context, preamble + source[body_start:i]).build()
        except cl.Error:
            failing.append(match.group(1))
    return failing
