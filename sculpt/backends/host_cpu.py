"""What this machine's CPU offers, as the kernel code it runs can use it (x86 Linux: /proc/cpuinfo).

A CPU's name does not settle it: a virtual machine can present an AVX-512 CPU with its AVX-512
features hidden, and code built for the name alone then dies of an illegal instruction."""

from __future__ import annotations

import platform


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str] | None:
    """The feature flags the kernel reports for this CPU (Linux), or None where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def fused_int8_saturates() -> bool:
    """True on an x86 CPU without VNNI (AVX2, or AVX-512 without VNNI): there onnxruntime's fused
    QLinearConv/QLinearMatMul multiply uint8 activations by int8 weights in int16 pair sums
    (vpmaddubsw), which saturate with 8-bit weights, so a QDQ model's outputs in onnxruntime differ
    from its graph as written. ``qdq:weight_bits=7`` keeps the sums in range."""
    if not is_x86():
        return False
    flags = cpu_flags()
    return flags is not None and not ({"avx512_vnni", "avx_vnni"} & flags)
