"""Tuning with MetaSchedule: search schedules for the model's kernels, keep the best in a database
beside the artifact, and build with it. A later compile of the same model and target reuses every
task already in the database (no new trials for them).

The recipe that works with apache-tvm 0.27 (see DESIGN.md): apache-tvm-ffi 0.1.14 (0.1.15 crashes
when TIR is saved as JSON), a builder that calls ``tvm.driver.build`` directly (the default one
imports ``tvm.s_tir.tensor_intrin``, ≈19 s per build) and at least one trial per task (a task
without a record stays naive).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sculpt.backends.tvm.targets import NamedTarget
from sculpt.common import one_line
from sculpt.errors import OptionError, SculptError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"


class TuningError(SculptError):
    """Tuning could not run (no way to measure the target, a broken database)."""


@dataclass
class TuningReport:
    """What a tuned compile did: tasks found, tasks tuned now, tasks taken from the database."""

    database: str
    tasks: int = 0
    tasks_tuned: int = 0
    tasks_reused: int = 0
    trials: int = 0  # candidates measured in this compile
    trials_requested: int = 0
    seconds: float = 0.0
    measured_on: str = "local"
    strategy: str = "evolutionary"
    reused_task_names: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"database": self.database, "tasks": self.tasks, "tasks_tuned": self.tasks_tuned,
                "tasks_reused": self.tasks_reused, "trials": self.trials,
                "trials_requested": self.trials_requested, "seconds": round(self.seconds, 3),
                "measured_on": self.measured_on, "strategy": self.strategy}


@dataclass(frozen=True)
class RemoteDevice:
    """A device registered at a TVM RPC tracker under ``key``."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_sec: int = 120

    @classmethod
    def parse(cls, address: str, key: str | None) -> "RemoteDevice":
        host, sep, port = str(address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"--rpc '{address}': give the tracker as HOST:PORT, like 127.0.0.1:9190")
        if not key:
            raise OptionError("--rpc needs --device-key KEY (the key the device's RPC server registered with)")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"{self.key}@{self.tracker_host}:{self.tracker_port}"


def database_dir_for(artifact: Path) -> Path:
    """Where the tuning database of an artifact lives: ``<artifact stem>.tuning/`` beside it."""
    return artifact.with_name(artifact.stem + ".tuning")


def build_for_measurement(mod, target, _params, *, strip_layout_rewrite: bool = True):
    """The builder's build function: ``tvm.driver.build`` without importing the tensor intrinsics."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if strip_layout_rewrite:
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def export_for_measurement(mod, *, cc: str | None = None) -> str:
    """The builder's export function: a shared library linked by ``cc`` (the target's compiler)."""
    path = os.path.join(tempfile.mkdtemp(prefix="sculpt-ms-"), "candidate.so")
    if cc:
        mod.export_library(path, cc=cc)
    else:
        mod.export_library(path)
    return path


def _progress_callback(on_trials: Callable[[int], None]):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class _CountTrials(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            on_trials(len(runner_results))

    return _CountTrials()


def _has_record(database, task, target) -> bool:
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


def tune_and_build(mod, target: NamedTarget, trials: int, database_dir: Path, *,
                   device: RemoteDevice | None = None, seed: int = 0, strategy: str = "evolutionary",
                   on_start: Callable[[int], None] | None = None,
                   on_trials: Callable[[int], None] | None = None):
    """Tune the tasks of ``mod`` missing from ``database_dir`` with about ``trials`` trials in all
    (at least one per task), then build with the database. Returns (VM executable, TuningReport).

    Measurement runs on this machine for the host target, otherwise on ``device`` over RPC. The
    database is updated as a whole: a failed or interrupted tuning leaves the previous one intact."""
    from tvm.s_tir import meta_schedule as ms

    if trials < 0:
        raise OptionError(f"--tune takes a number of trials >= 0, got {trials}")
    if strategy not in SEARCH_STRATEGIES:
        raise OptionError(f"unknown search strategy '{strategy}' (choose from {', '.join(SEARCH_STRATEGIES)})")
    if target.is_cross and device is None and trials > 0:
        raise TuningError(f"tuning for '{target.name}' measures candidates on the device: give --rpc HOST:PORT "
                          "--device-key KEY (a TVM RPC tracker with the device registered)")
    start = time.perf_counter()
    tvm_target = tuning_target(target)
    database_dir = Path(database_dir)
    report = TuningReport(str(database_dir), trials_requested=trials,
                          measured_on=str(device) if device else "local", strategy=strategy)
    tasks = [t for t in ms.relax_integration.extract_tasks(fused_for_tuning(mod, tvm_target), tvm_target)
             if not t.dispatched[0].attrs or not t.dispatched[0].attrs.get("tirx.is_scheduled", False)]
    report.tasks = len(tasks)

    parent = database_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{database_dir.name}."))
    try:
        for name in (WORKLOAD_FILE, RECORD_FILE):
            if (database_dir / name).is_file():
                shutil.copy2(database_dir / name, staging / name)
        database = ms.database.JSONDatabase(str(staging / WORKLOAD_FILE), str(staging / RECORD_FILE),
                                            module_equality="structural")
        pending = [t for t in tasks if not _has_record(database, t, tvm_target)]
        reused = [t for t in tasks if t not in pending]
        report.tasks_reused = len(reused)
        report.reused_task_names = [t.task_name for t in reused]
        if pending and trials > 0:
            per_task = max(1, trials // len(pending))
            total = per_task * len(pending)
            if on_start:
                on_start(total)
            counted = [0]

            def count(n: int) -> None:
                counted[0] += n
                if on_trials:
                    on_trials(n)

            _run_search(ms, pending, tvm_target, target, database, per_task, total, device, seed, count,
                        SEARCH_STRATEGIES[strategy])
            report.trials = counted[0]
            report.tasks_tuned = sum(1 for t in pending if _has_record(database, t, tvm_target))
        executable = _build_with_database(mod, tvm_target, database)
        _replace_dir(staging, database_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return executable, report


SEARCH_STRATEGIES = {
    # MetaSchedule's cost-model-guided search: each measured candidate is the best of a population the
    # cost model ranked, so even one trial per task is an informed pick (slower search, better code)
    "evolutionary": "evolutionary",
    # candidates sampled at random from the design space: far cheaper, for smoke tests of the flow
    "random": "replay-trace",
}


def import_tensor_intrinsics(depth: int = 6) -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext does on its first use) quickly.

    Each of its ~500 TVMScript functions calls ``inspect.stack()``, which looks up the module of every
    frame on the stack; for frames of frozen modules (the import machinery) that is a scan of all of
    ``sys.modules``. Deep in a large process (pytest, the CLI with onnx and onnxruntime loaded) the
    import took over two minutes here. The parser only reads the innermost frames (the decorated
    function's definer and its caller), so while importing, ``inspect.stack`` stops after ``depth``."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    full_stack = inspect.stack

    def shallow_stack(context: int = 1):
        frames = []
        frame = sys._getframe(1)
        while frame is not None and len(frames) < depth:
            info = inspect.getframeinfo(frame, context)
            frames.append(inspect.FrameInfo(frame, *info))
            frame = frame.f_back
        return frames

    inspect.stack = shallow_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = full_stack


def _run_search(ms, pending, tvm_target, target: NamedTarget, database, per_task: int, total: int,
                device: RemoteDevice | None, seed: int, count, strategy: str) -> None:
    import_tensor_intrinsics()
    with tempfile.TemporaryDirectory(prefix="sculpt-tune-") as work_dir:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            pending, work_dir, seed=seed, num_threads="physical", strategy=strategy)
        builder = ms.builder.LocalBuilder(
            f_build=build_for_measurement,
            f_export=functools.partial(export_for_measurement, cc=target.cross_compiler),
            max_workers=1)
        if device is None:
            runner = ms.runner.LocalRunner()
        else:
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=device.tracker_host, tracker_port=device.tracker_port,
                                               tracker_key=device.key,
                                               session_timeout_sec=device.session_timeout_sec),
                max_workers=1)
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(count)]
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=total,
                           max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task),
                           builder=builder, runner=runner, database=database, measure_callbacks=callbacks)


DEFAULT_DEVICE_CORES = 4  # a cross target without "num-cores": a typical big cluster of a phone or a Pi


def tuning_target(target: NamedTarget):
    """The TVM target for tuning: MetaSchedule needs "num-cores" on the CPU part (the physical cores of
    this machine for the host, else the target's own or 4)."""
    import tvm

    spec = dict(target.spec)
    cpu = dict(target.host_spec)
    if "num-cores" not in cpu:
        if target.is_cross:
            cpu["num-cores"] = DEFAULT_DEVICE_CORES
        else:
            import psutil

            cpu["num-cores"] = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if target.is_opencl:
        spec["host"] = cpu
    else:
        spec = cpu
    return tvm.target.Target(spec)


def fused_for_tuning(mod, tvm_target):
    """The module as ``compile_relax`` prepares it before it applies the database (legalized and fused),
    so that the tasks extracted here have the workload keys it will look up."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = relax_pipeline.library_dispatch_passes(tvm_target)
    except (ValueError, AttributeError):
        dispatch = []
    passes = [*dispatch, relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def _build_with_database(mod, tvm_target, database):
    from tvm.s_tir import meta_schedule as ms

    from sculpt.backends.tvm.relax_import import TVMImportError

    try:
        return ms.relax_integration.compile_relax(database, mod, tvm_target, params=None)
    except Exception as e:
        raise TVMImportError(f"TVM build with the tuning database failed: {one_line(e)}") from None


def _replace_dir(new: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def database_record_count(database_dir: Path) -> int:
    """Tuning records stored in a database folder (one JSON line each)."""
    path = Path(database_dir) / RECORD_FILE
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())
