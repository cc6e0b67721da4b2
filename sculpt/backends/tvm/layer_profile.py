"""Where a host build's time goes: every kernel (fused TIR function) the Relax VM calls, timed per call.

The VM calls an instrument before and after each call instruction; the time between the two is the
call's. Per function: the calls per run, the median time of a run's calls, the share of the run, and
the kernel the sculpt schedule rule gave it (``KernelDecision.kind``: conv2d_blocked, conv2d,
conv2d_1x1, depthwise, matmul, pool, injective, reduce; ``-`` for a function it did not schedule).
The VM's own bookkeeping (allocations, shape checks) is one row, ``(runtime)``."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Sequence

RUNTIME_ROW = "(runtime)"


@dataclass
class LayerTime:
    func: str
    kernel: str
    calls: int  # per run
    ms: float  # per run (median over the runs)
    share: float  # of the sum over the rows

    def as_dict(self) -> dict:
        return asdict(self)


def profile_layers(executable, args: Sequence, decisions: Sequence = (), *, runs: int = 5,
                   warmup: int = 1) -> list[LayerTime]:
    """Per-function times of ``runs`` runs of ``main`` on this machine (slowest first). ``executable``:
    a Relax executable or a module loaded from one (work_pool.vm_module); ``args``: the input tensors
    (tvm.runtime.Tensor); ``decisions``: the KernelDecisions of the build."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    for _ in range(warmup):
        vm["main"](*args)
    per_run: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    started: dict[str, float] = {}

    def instrument(func, symbol, before_run, ret_value, *call_args):
        now = time.perf_counter()
        name = RUNTIME_ROW if str(symbol).startswith("vm.builtin.") else str(symbol)
        if before_run:
            started[name] = now
        else:
            per_run[-1][name] = per_run[-1].get(name, 0.0) + (now - started.pop(name, now)) * 1e3
            if len(per_run) == 1:
                calls[name] = calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(max(1, runs)):
        per_run.append({})
        vm["main"](*args)
    kinds = {d.func: d.kind for d in decisions}
    medians = {name: statistics.median(run.get(name, 0.0) for run in per_run) for name in calls}
    total = sum(medians.values()) or 1.0
    rows = [LayerTime(name, "-" if name == RUNTIME_ROW else kinds.get(name, "-"), calls[name], ms, ms / total)
            for name, ms in medians.items()]
    return sorted(rows, key=lambda r: -r.ms)
