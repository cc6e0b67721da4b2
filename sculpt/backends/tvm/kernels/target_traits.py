"""What the tiling heuristics need to know about a CPU target: vector width, register file, caches.

The values come from the TVM target (``mtriple``, ``mcpu``, ``mattr``); a host target without
``mcpu``/``mattr`` is completed with the CPU LLVM detects on this machine (``host_target``), because
TVM's bare ``llvm`` target compiles for generic x86-64 (SSE2, 4 lanes)."""

from __future__ import annotations

from dataclasses import dataclass

# x86 CPUs LLVM knows by name that have AVX-512F / AVX2 (prefixes are enough for the families).
_AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake", "tigerlake",
                "sapphirerapids", "graniterapids", "emeraldrapids", "rocketlake", "znver4", "znver5",
                "x86-64-v4", "knl", "knm")
_AVX2_CPUS = ("haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake", "arrowlake",
              "lunarlake", "znver1", "znver2", "znver3", "x86-64-v3", "gracemont", "core-avx2")
_DOTPROD_ARM_CPUS = ("cortex-a55", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78", "cortex-x1",
                     "cortex-x2", "cortex-a510", "cortex-a710", "neoverse-n1", "neoverse-n2",
                     "neoverse-v1", "apple-a13", "apple-m1")


@dataclass(frozen=True)
class TargetTraits:
    """Per-target numbers the kernel heuristics use (float32)."""

    isa: str                 # "avx512", "avx2", "sse", "neon"
    vector_lanes: int        # float32 lanes in one vector register
    vector_registers: int    # architectural vector registers
    l1_bytes: int
    l2_bytes: int
    dotprod: bool = False    # aarch64 SDOT/UDOT (int8 kernels)

    @property
    def accumulator_registers(self) -> int:
        """Vector registers a register tile may use for accumulators (the rest hold inputs)."""
        return self.vector_registers - (8 if self.vector_registers >= 32 else 4)

    @property
    def key(self) -> str:
        return f"{self.isa}{'+dotprod' if self.dotprod else ''}-v{self.vector_lanes}-r{self.vector_registers}"


def _target_dict(target) -> dict:
    import tvm

    if isinstance(target, str):
        target = {"kind": target}
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    attrs = dict(target.attrs)
    out = {"kind": target.kind.name}
    for key in ("mtriple", "mcpu"):
        if key in attrs and attrs[key]:
            out[key] = str(attrs[key])
    if "mattr" in attrs and attrs["mattr"]:
        out["mattr"] = [str(a) for a in attrs["mattr"]]
    return out


def is_aarch64(target) -> bool:
    d = _target_dict(target)
    return "aarch64" in d.get("mtriple", "") or "arm64" in d.get("mtriple", "")


def host_target(target) -> dict:
    """The target as a dict; a host llvm target without mcpu/mattr gets the host CPU as mcpu."""
    import tvm

    d = _target_dict(target)
    if d["kind"] != "llvm" or "mcpu" in d or "mattr" in d:
        return d
    triple = d.get("mtriple", "")
    host_triple = str(tvm.target.codegen.llvm_get_system_triple())
    if triple and triple.split("-")[0] != host_triple.split("-")[0]:
        return d
    cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    if cpu and cpu != "generic":
        d["mcpu"] = cpu
    return d


def traits_of(target) -> TargetTraits:
    """Heuristic inputs for a TVM llvm target (dict, Target or kind name)."""
    d = _target_dict(target)
    cpu = d.get("mcpu", "").lower()
    mattr = [a.lower() for a in d.get("mattr", [])]
    if is_aarch64(target):
        dot = "+dotprod" in mattr or any(cpu.startswith(c) for c in _DOTPROD_ARM_CPUS)
        big_core = any(c in cpu for c in ("a72", "a73", "a75", "a76", "a77", "a78", "x1", "neoverse"))
        return TargetTraits("neon", 4, 32, 32 * 1024 if not big_core else 64 * 1024,
                            512 * 1024 if big_core else 256 * 1024, dot)
    if "+avx512f" in mattr or any(cpu.startswith(c) for c in _AVX512_CPUS):
        return TargetTraits("avx512", 16, 32, 32 * 1024, 1024 * 1024)
    if "+avx2" in mattr or any(cpu.startswith(c) for c in _AVX2_CPUS):
        return TargetTraits("avx2", 8, 16, 32 * 1024, 512 * 1024)
    return TargetTraits("sse", 4, 16, 32 * 1024, 256 * 1024)
