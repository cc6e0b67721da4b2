"""Named compilation targets: this machine, ARM CPUs (aarch64 + NEON) and mobile GPUs (OpenCL).

A target is a TVM target JSON dict (TVM 0.27 rejects the old "llvm -mtriple=..." strings) plus what
sculpt needs to know to export and run it: which architecture the exported library is for and
which C++ compiler links it. Importing this module does not load TVM.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field

from sculpt.common import one_line
from sculpt.errors import OptionError

AARCH64_TRIPLE = "aarch64-linux-gnu"
AARCH64_CXX = "aarch64-linux-gnu-g++"


@dataclass(frozen=True)
class NamedTarget:
    """A compilation target: ``spec`` is the TVM target JSON dict."""

    name: str
    description: str
    spec: dict = field(hash=False)

    @property
    def is_opencl(self) -> bool:
        return self.spec.get("kind") == "opencl"

    @property
    def host_spec(self) -> dict:
        """The target of the CPU code (the whole target for a CPU, the "host" of an OpenCL target)."""
        return self.spec.get("host", {"kind": "llvm"}) if self.is_opencl else self.spec

    @property
    def arch(self) -> str:
        """The machine the exported library runs on: "aarch64", or the host's own ("x86_64", ...)."""
        triple = str(self.host_spec.get("mtriple", ""))
        if triple:
            return triple.split("-")[0]
        return platform.machine()

    @property
    def is_cross(self) -> bool:
        return self.arch != platform.machine()

    @property
    def cross_compiler(self) -> str | None:
        """The C++ compiler that links the exported library (None: TVM's default, the host's)."""
        if not self.is_cross:
            return None
        if self.arch == "aarch64":
            return AARCH64_CXX
        raise OptionError(f"target '{self.name}': no cross compiler known for {self.arch}")

    def tvm_target(self):
        import tvm

        try:
            return tvm.target.Target(self.spec)
        except Exception as e:
            raise OptionError(f"target '{self.name}': TVM rejects {json.dumps(self.spec)}: "
                              f"{one_line(e, 300)}") from None

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "arch": self.arch,
                "opencl": self.is_opencl, "tvm_target": self.spec}


_ARM64 = {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon"]}


def _arm_core(mcpu: str, extra_attrs: tuple[str, ...] = ()) -> dict:
    return {**_ARM64, "mcpu": mcpu, "mattr": ["+neon", *extra_attrs]}


def _mobile_gpu(device: str) -> dict:
    return {"kind": "opencl", "device": device, "host": dict(_ARM64)}


TARGETS: dict[str, NamedTarget] = {t.name: t for t in (
    NamedTarget("host", "this machine's CPU (LLVM, native triple)", {"kind": "llvm"}),
    NamedTarget("arm64", "generic 64-bit ARM CPU, aarch64 Linux with NEON", _ARM64),
    NamedTarget("cortex-a53", "ARM Cortex-A53 (in-order; Raspberry Pi 3, many low-end phones)", _arm_core("cortex-a53")),
    NamedTarget("cortex-a72", "ARM Cortex-A72 (Raspberry Pi 4, RK3399 big cores)", _arm_core("cortex-a72")),
    NamedTarget("cortex-a76", "ARM Cortex-A76 with dot-product instructions (Raspberry Pi 5, phones)",
                _arm_core("cortex-a76", ("+dotprod",))),
    NamedTarget("mali", "ARM Mali GPU through OpenCL; host code for aarch64", _mobile_gpu("mali")),
    NamedTarget("adreno", "Qualcomm Adreno GPU through OpenCL; host code for aarch64", _mobile_gpu("adreno")),
)}


def get_target(name_or_json: str | dict | NamedTarget) -> NamedTarget:
    """A named target, or a custom one from a TVM target JSON dict (or its text)."""
    if isinstance(name_or_json, NamedTarget):
        return name_or_json
    if isinstance(name_or_json, dict):
        return _custom(name_or_json, json.dumps(name_or_json))
    text = str(name_or_json).strip()
    if text in TARGETS:
        return TARGETS[text]
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise OptionError(f"--target '{text}': not valid JSON ({e.msg} at column {e.colno})") from None
        return _custom(spec, text)
    raise OptionError(f"unknown target '{text}'; the named targets are {', '.join(TARGETS)} "
                      "(or give a TVM target JSON dict, like '{\"kind\": \"llvm\"}')")


def _custom(spec, text: str) -> NamedTarget:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise OptionError(f"--target '{text}': a TVM target JSON dict needs a 'kind', like {{\"kind\": \"llvm\"}}")
    if spec["kind"] not in ("llvm", "opencl"):
        raise OptionError(f"--target '{text}': sculpt exports 'llvm' and 'opencl' targets, not '{spec['kind']}'")
    target = NamedTarget("custom", "a TVM target JSON dict given on the command line", spec)
    target.tvm_target()  # rejects what TVM rejects, now
    return target
