"""onnxruntime against TVM builds of the same model, measured in one process, in alternating rounds
(medians of medians), with the TVM outputs checked against onnxruntime's.

TVM runs in this process for the host target, under qemu through the deploy runner for an ARM
target without a device (latency of the emulator, flagged), or on a device over RPC.
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from sculpt import runtime
from sculpt.backends.tvm.targets import NamedTarget, get_target
from sculpt.errors import OptionError
from sculpt.ir.model import Model


def build_supports(keyword: str) -> bool:
    """Whether ``relax_import.build`` takes ``keyword`` (e.g. ``kernels``, added by the fast-kernels work)."""
    from sculpt.backends.tvm.relax_import import build

    return keyword in inspect.signature(build).parameters


@dataclass
class Variant:
    """One TVM build to measure: a label for the report and how to build it."""

    label: str  # the JSON key: tvm_ms, tvm_default_ms, tvm_sculpt_ms, tvm_tuned_ms
    build_options: dict = field(default_factory=dict)
    tune: bool = False


def variants_for(kernels: str | None, tuned: bool) -> list[Variant]:
    if kernels in (None, ""):
        variants = [Variant("tvm_ms")]
    elif kernels == "both":
        variants = [Variant("tvm_default_ms", {"kernels": "default"}), Variant("tvm_sculpt_ms", {"kernels": "sculpt"})]
    else:
        variants = [Variant(f"tvm_{kernels}_ms", {"kernels": kernels})]
    if variants[0].build_options and not build_supports("kernels"):
        raise OptionError("--kernels: this TVM backend has no kernel choice yet (relax_import.build takes no "
                          "'kernels' option)")
    if tuned:  # MetaSchedule schedules TVM's own legalized operators (the kernels option does not apply)
        variants.append(Variant("tvm_tuned_ms", {}, tune=True))
    return variants


# a pause before each runtime's batch of runs: onnxruntime's pool keeps its threads spinning for a
# while after a run, and a TVM worker woken meanwhile shares a core with them. Measured on this
# machine (2 threads, the kernel benchmark interleaving both runtimes): SqueezeNet's TVM build 9.9 ms
# right after onnxruntime's runs, 6.8 ms after a 0.2 s pause; onnxruntime's own time did not change
RUNTIME_SETTLE_S = 0.2


def benchmark(model_path, target: str | NamedTarget = "host", *, input_shapes=None, runs: int = 20,
              warmup: int = 3, rounds: int = 3, threads: int | None = None, kernels: str | None = None,
              tune_trials: int = 0, tuning_database: Path | None = None, device=None, sparse: str | None = None,
              tune_strategy: str = "evolutionary", thread_policy: str | None = None, layers: bool = False,
              seed: int = 0, progress: Callable[[str], None] | None = None,
              on_tuning_start=None, on_trials=None) -> dict:
    """Median latency (ms) of onnxruntime and of each TVM build, plus the TVM builds' max relative error
    against onnxruntime. Keys: ort_ms, tvm_ms (or tvm_default_ms/tvm_sculpt_ms), tvm_tuned_ms when
    tuning, speedup_* (ort_ms / tvm_*), ...; tvm_skipped ({variant label: reason}) for the builds TVM
    could not import or compile (onnxruntime is measured all the same)."""
    from sculpt.backends.tvm.artifact import compile_model, input_tensor_specs, prepare_model
    from sculpt.backends.tvm.deploy import random_feeds
    from sculpt.backends.tvm.relax_import import TVMImportError

    for name, value, low in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--rounds", rounds, 1)):
        if value < low:
            raise OptionError(f"{name} must be >= {low}, got {value}")
    if threads is not None and threads < 1:
        raise OptionError(f"--threads must be >= 1, got {threads}")
    target = get_target(target)
    if target.is_opencl and device is None:
        raise OptionError(f"benchmarking '{target.name}' needs the GPU: give --rpc HOST:PORT --device-key KEY")
    from sculpt.backends.tvm import thread_policy as pool

    threads = threads or pool.default_threads()
    policy = pool.check_policy(thread_policy or pool.DEFAULT_POLICY)
    # read when TVM's thread pool starts: a bench run in a process whose pool already runs keeps the old
    pool.apply(policy, threads)
    tuned = bool(tune_trials) or tuning_database is not None
    variants = variants_for(kernels, tuned)
    if layers and (target.is_cross or device is not None):
        raise OptionError(f"--layers times each kernel on this machine; '{target.name}' does not run here")

    model = Model.load(model_path)
    work, _ = prepare_model(model, input_shapes)
    inputs = input_tensor_specs(work)
    feeds = random_feeds(inputs, seed)
    ordered = [feeds[s.name] for s in inputs]
    session = runtime.make_session(work, threads=threads)
    # the errors are against what the graph defines: for a QDQ model the graph as written, not the
    # int8 kernels the timed session fuses it into (runtime.reference_session)
    qdq = runtime.is_qdq_model(work)
    reference = runtime.run(work, feeds, session=runtime.reference_session(work) if qdq else session)
    output_names = [o.name for o in work.graph.output]

    runners: dict[str, Callable[[], tuple[float, list[np.ndarray]]]] = {}
    builds: dict = {}
    result: dict = {"model": str(model_path), "target": target.name,
                    "inputs": {s.name: s.shape for s in inputs}, "threads": threads,
                    "thread_policy": policy, "runs": runs,
                    "rounds": rounds, "measured_on": _where(target, device),
                    "errors_against": "the QDQ graph as written (onnxruntime unoptimized)" if qdq else "onnxruntime"}
    for variant in variants:
        if progress:
            progress(f"compiling {variant.label.removesuffix('_ms')} for {target.name}")
        start = time.perf_counter()
        try:
            compiled = compile_model(work, target, canonicalize=False, build_options=variant.build_options,
                                     tune_trials=tune_trials if variant.tune else 0,
                                     tuning_database=tuning_database if variant.tune else None, device=device,
                                     tune_strategy=tune_strategy,
                                     sparse=sparse, on_tuning_start=on_tuning_start, on_trials=on_trials)
        except TVMImportError as e:  # onnxruntime is still measured; the result says why TVM is not
            result.setdefault("tvm_skipped", {})[variant.label] = str(e)
            continue
        result[variant.label.replace("_ms", "_compile_s")] = round(time.perf_counter() - start, 2)
        if compiled.tuning is not None:
            result["tuning"] = compiled.tuning.as_dict()
        runners[variant.label] = _runner(compiled, target, device, ordered, runs, warmup, threads, policy)
        builds[variant.label] = compiled

    samples: dict[str, list[float]] = {"ort_ms": []}
    samples.update({label: [] for label in runners})
    last_outputs: dict[str, list[np.ndarray]] = {}
    for r in range(rounds):
        if progress:
            progress(f"measuring, round {r + 1}/{rounds}")
        time.sleep(RUNTIME_SETTLE_S)
        samples["ort_ms"].append(runtime.median_latency_ms(session, feeds, runs=runs, warmup=warmup))
        for label, run in runners.items():
            time.sleep(RUNTIME_SETTLE_S)
            ms, outputs = run()
            samples[label].append(ms)
            last_outputs[label] = outputs
    for label, values in samples.items():
        result[label] = round(statistics.median(values), 4)
    for label in runners:
        result[label.replace("tvm", "speedup", 1).removesuffix("_ms")] = round(result["ort_ms"] / result[label], 3)
        errors = [runtime.output_error(n, np.asarray(got), np.asarray(reference[n]))
                  for n, got in zip(output_names, last_outputs[label])]
        result[label.replace("_ms", "_max_rel_error")] = max((e.max_rel for e in errors), default=0.0)
    if layers:
        import tvm

        from sculpt.backends.tvm.layer_profile import profile_layers
        from sculpt.backends.tvm.work_pool import vm_module

        result["layers"] = {}
        for label, compiled in builds.items():
            if progress:
                progress(f"timing each kernel of {label.removesuffix('_ms')}")
            args = [tvm.runtime.tensor(a, tvm.cpu()) for a in ordered]
            rows = profile_layers(vm_module(compiled.executable, policy), args, compiled.kernels,
                                  runs=max(3, min(runs, 10)))
            result["layers"][label] = [r.as_dict() for r in rows]
    return result


def compile_for_timing(model: Model, target: str | NamedTarget = "host"):
    """``model``'s build for ``target`` with sculpt's kernels (canonicalized first), for ``load_timer``."""
    from sculpt.backends.tvm.artifact import compile_model, prepare_model

    work, _ = prepare_model(model)
    return compile_model(work, get_target(target), canonicalize=False)


def load_timer(compiled, feeds: Mapping[str, np.ndarray], *, device=None, session=None, runs: int = 10,
               warmup: int = 1, threads: int = 1) -> Callable[[], float]:
    """A function timing one round (the median ms of ``runs`` runs) of a ``compile_for_timing`` build: here,
    or on ``device`` (in ``session``, an RPC session already holding that device, if given)."""
    ordered = [np.ascontiguousarray(feeds[spec.name]) for spec in compiled.inputs]
    if device is not None:
        from sculpt.backends.tvm.rpc import remote_timer

        timer = remote_timer(compiled.executable, compiled.target, device, ordered, runs=runs, warmup=warmup,
                             session=session)
        return lambda: timer().median_ms
    from sculpt.backends.tvm.thread_policy import DEFAULT_POLICY

    run = _runner(compiled, compiled.target, None, ordered, runs, warmup, threads, DEFAULT_POLICY)
    return lambda: run()[0]


def _where(target: NamedTarget, device) -> str:
    if device is not None:
        return f"rpc:{device}"
    if target.is_cross:
        return f"qemu-{target.arch} (emulated: not the device's speed)"
    return f"this machine ({platform.machine()})"


def _runner(compiled, target: NamedTarget, device, ordered, runs: int, warmup: int, threads: int, policy: str):
    """A function returning (median ms, outputs) for one round of ``runs`` runs of a build."""
    if device is not None:
        from sculpt.backends.tvm.rpc import remote_timer

        timer = remote_timer(compiled.executable, target, device, ordered, runs=runs, warmup=warmup)

        def remote():
            timed = timer()
            return timed.median_ms, timed.outputs

        return remote
    if target.is_cross:
        return _emulated_runner(compiled, ordered, runs, warmup, threads, policy)
    import tvm
    from tvm import relax

    from sculpt.backends.tvm.rpc import time_vm
    from sculpt.backends.tvm.work_pool import vm_module

    dev = tvm.cpu()
    vm = relax.VirtualMachine(vm_module(compiled.executable, policy), dev)
    args = [tvm.runtime.tensor(a, dev) for a in ordered]

    def local():
        timed = time_vm(vm, dev, args, runs, warmup)
        return timed.median_ms, timed.outputs

    return local


def _emulated_runner(compiled, ordered, runs: int, warmup: int, threads: int, policy: str):
    import tempfile

    from sculpt.backends.tvm.artifact import export_artifact
    from sculpt.backends.tvm.deploy import run_artifact

    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="sculpt-bench-")
    atexit.register(shutil.rmtree, folder, True)
    artifact = export_artifact(compiled, Path(folder) / "model.so", source_model=None, thread_policy=policy)
    feeds = {spec.name: value for spec, value in zip(compiled.inputs, ordered)}

    def emulated():
        run = run_artifact(artifact, feeds, runs=runs, warmup=warmup, threads=threads)
        return run.median_ms, list(run.outputs.values())

    return emulated
