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
# x86 CPUs LLVM knows by name with vpdpbusd: AVX-512 VNNI (with VL) or AVX-VNNI (names LLVM may not know,
# checked only when it cannot list a CPU's features)
_AVX512_VNNI_CPUS = ("cascadelake", "cooperlake", "icelake", "tigerlake", "sapphirerapids", "graniterapids",
                     "emeraldrapids", "rocketlake", "znver4", "znver5")
_AVX_VNNI_CPUS = ("alderlake", "raptorlake", "meteorlake", "arrowlake", "lunarlake", "gracemont", "sierraforest",
                  "grandridge", "clearwaterforest", "pantherlake")
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
    vnni: bool = False       # x86 vpdpbusd (int8 kernels): AVX-512 VNNI with VL on an avx512 isa, else AVX-VNNI
    wide_lanes: int = 0      # float32 lanes of the widest vectors, when wider than ``vector_lanes`` (AVX-512: 16)
    # the widest vectors at full rate: a core with two 512-bit multiply-add units (Intel's AVX-512 server
    # cores, Zen 5) retires twice the lanes of 256-bit code per cycle; Zen 4 splits 512-bit ops in halves
    wide_at_full_rate: bool = False

    def widened(self) -> "TargetTraits":
        """The same target with its widest vectors (channel blocks of ``wide_lanes``), or itself."""
        if self.wide_lanes <= self.vector_lanes:
            return self
        return TargetTraits(self.isa, self.wide_lanes, self.vector_registers, self.l1_bytes, self.l2_bytes,
                            self.dotprod, self.vnni, wide_at_full_rate=self.wide_at_full_rate)

    def for_matmuls(self) -> "TargetTraits":
        """The traits the matmul kernels (and their weight panels) use: the widest vectors on a core
        that runs them at full rate, else these. On an Intel Xeon (two 512-bit units), 1 thread:
        PP-OCRv6 rec's 40x120 by 120x18710 classifier einsum 2.28 -> 1.52 ms in 16 lanes and panels of
        32 columns (onnxruntime's whole MatMul 1.2 ms; the einsum's slice to 18,710 columns 0.33 more)."""
        return self.widened() if self.wide_at_full_rate else self

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


# LLVM feature name -> /proc/cpuinfo flag, for the vector features the kernels' code may use. A
# virtual machine can hide some of them from a CPU LLVM knows by name (an AVX-512 Zen 4 reported
# with AVX2 only): code built for the name alone then dies of an illegal instruction.
_X86_VECTOR_FEATURES = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
                        "avxvnni": "avx_vnni", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
                        "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile"}


def hidden_host_features(cpu: str, flags: set[str] | None = None) -> list[str]:
    """``-feature`` attributes for the vector features ``cpu`` implies that this machine does not
    report (x86 Linux; an empty list elsewhere or when nothing is hidden)."""
    import tvm

    from sculpt.backends.host_cpu import cpu_flags, is_x86

    if flags is None:
        if not is_x86():
            return []
        flags = cpu_flags()
    if not flags:
        return []
    implied = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(
        tvm.target.Target({"kind": "llvm", "mcpu": cpu}))}
    return [f"-{feature}" for feature, flag in _X86_VECTOR_FEATURES.items()
            if feature in implied and flag not in flags]


def host_target(target) -> dict:
    """The target as a dict; a host llvm target without mcpu/mattr gets the host CPU as mcpu, less
    any vector feature this machine hides (``hidden_host_features``)."""
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
        hidden = hidden_host_features(cpu)
        if hidden:
            d["mattr"] = hidden
    return d


def _llvm_features(d: dict) -> set[str] | None:
    """The features LLVM enables for an x86 llvm target dict (its mcpu and mattr), or None."""
    import tvm

    try:
        return {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(d))}
    except Exception:  # noqa: BLE001 - an LLVM without this CPU: fall back to the names
        return None


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
    features = _llvm_features(d) if d["kind"] == "llvm" and (cpu or mattr) else None
    if features is not None:
        avx512, avx2 = "avx512f" in features, "avx2" in features and "fma" in features
        avx512_vnni = "avx512vnni" in features and "avx512vl" in features
        avx_vnni = "avxvnni" in features
    else:
        avx512 = "-avx512f" not in mattr and ("+avx512f" in mattr or any(cpu.startswith(c) for c in _AVX512_CPUS))
        avx2 = "-avx2" not in mattr and ("+avx2" in mattr or any(cpu.startswith(c) for c in _AVX2_CPUS))
        avx512_vnni = "-avx512vnni" not in mattr and (
            "+avx512vnni" in mattr or any(cpu.startswith(c) for c in _AVX512_VNNI_CPUS))
        avx_vnni = "-avxvnni" not in mattr and ("+avxvnni" in mattr or any(cpu.startswith(c) for c in _AVX_VNNI_CPUS))
    if avx512:
        # 256-bit vectors with AVX-512's 32 registers: channel blocks of 8 divide the channel counts of
        # mobile nets (24, 40, 72, 120) that blocks of 16 leave NCHW. Measured on an AMD EPYC (Zen 4)
        # against 16 lanes, 9 models, 1 thread: geometric mean 0.88 vs 0.90 of onnxruntime's time
        # (PP-OCR cls 0.45 vs 0.60, shufflenet 1.30 vs 1.62; resnet50 1.09 vs 1.02). README, "AVX-512".
        # The convs of a model whose channels are multiples of 16 take 16 (lane_policy.conv_traits_for).
        return TargetTraits("avx512", 8, 32, 32 * 1024, 1024 * 1024, vnni=avx512_vnni or avx_vnni, wide_lanes=16,
                            wide_at_full_rate=not cpu.startswith("znver4"))
    if avx2:
        return TargetTraits("avx2", 8, 16, 32 * 1024, 512 * 1024, vnni=avx_vnni)
    return TargetTraits("sse", 4, 16, 32 * 1024, 256 * 1024)
