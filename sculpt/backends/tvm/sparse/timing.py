"""Measuring kernels on the host, and the cost model used where the target cannot be measured here.

Timings are medians over ``repeat`` rounds of the mean of ``number`` calls (TVM's time_evaluator);
every kernel of one decision is compiled in one module and timed in the same process, so they are
compared as ratios measured together.
"""

from __future__ import annotations

import platform
from typing import Mapping, Sequence

import numpy as np


def as_target(target):
    """A tvm Target from a kind name (``"llvm"``), a JSON dict, or a Target."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        return tvm.target.Target({"kind": target})
    return tvm.target.Target(dict(target))


def host_target():
    """The llvm target of this machine's CPU (``mcpu`` set: the kernels rely on its vector width;
    features the machine hides are turned off, as in ``kernels.host_target``)."""
    import tvm

    from sculpt.backends.tvm.kernels.target_traits import host_target as host_target_dict

    return tvm.target.Target(host_target_dict("llvm"))


def runs_on_host(target) -> bool:
    """True when code built for ``target`` runs on this machine's CPU (an llvm target for this
    architecture), so the kernels can be measured here."""
    target = as_target(target)
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "")) if "mtriple" in target.attrs else ""
    machine = platform.machine().lower()
    if not triple:
        return True
    arch = triple.split("-")[0].lower()
    return arch == machine or (arch in ("x86_64", "amd64") and machine in ("x86_64", "amd64"))


def time_functions(funcs: Mapping[str, object], args: Mapping[str, Sequence[np.ndarray]], target, *,
                   number: int = 10, repeat: int = 5) -> dict[str, float]:
    """Compile the PrimFuncs ``funcs`` (name → PrimFunc) together for ``target`` and time each on its
    ``args`` (numpy arrays, the output buffer last). Returns name → median milliseconds."""
    import tvm

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    lib = tvm.compile(mod, target=as_target(target)).jit()
    dev = tvm.cpu()
    out = {}
    for name in funcs:
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args[name]]
        res = lib.time_evaluator(name, dev, number=number, repeat=repeat)(*tensors)
        out[name] = float(np.median(res.results)) * 1e3
    return out


def run_function(func, args: Sequence[np.ndarray], target) -> np.ndarray:
    """Compile one PrimFunc for a host-runnable target, run it on ``args`` (output buffer last, its
    contents ignored) and return the output."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=as_target(target)).jit()
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    lib["main"](*tensors)
    return tensors[-1].numpy()


# ------------------------------------------------------------------ cost model
# Efficiency of the BSR kernel relative to the dense kernel per stored MAC, by block rows R: the
# sparse kernel takes about density / efficiency of the dense kernel's time. Fitted to the kernel
# measurements of tools/sparse_benchmark.py on this machine (AMD EPYC, AVX-512; PP-OCR layer shapes),
# which also prints how often the model's decisions agree with measured ones.
BLOCK_EFFICIENCY = {1: 0.35, 4: 0.7, 8: 0.9, 16: 0.85}


def predicted_speedup(block_rows: int, density: float) -> float:
    """Predicted dense time / sparse time of a layer whose stored blocks are ``density`` of all blocks."""
    eff = BLOCK_EFFICIENCY.get(block_rows, min(BLOCK_EFFICIENCY.values()))
    return eff / max(density, 1e-6)
