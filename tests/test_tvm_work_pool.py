"""sculpt's work-stealing CPU pool (runner/work_pool.cc, sculpt.backends.tvm.work_pool): every chunk of
every parallel loop runs exactly once, on however many threads; a model's loops run on it in Python
and in the deploy runner and compute what onnxruntime does."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sculpt.backends.tvm import thread_policy, work_pool

# A parallel loop through the pool's C entry point, its chunks recorded by a Python callback (the
# callback takes the GIL, so chunks run one at a time here; the claims still race between threads).
_DRIVER = textwrap.dedent("""
    import ctypes, random, sys
    from sculpt.backends.tvm import work_pool
    lib = work_pool.pool_library()

    class Env(ctypes.Structure):
        _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]

    Lambda = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)
    launch = lib.sculpt_pool_launch
    launch.argtypes = [Lambda, ctypes.c_void_p, ctypes.c_int]
    threads = lib.sculpt_pool_threads()
    ran = []
    record = Lambda(lambda task, env, cdata: ran.append((task, env.contents.num_task)) or 0)
    rng = random.Random(0)
    for _ in range(int(sys.argv[1])):
        ran.clear()
        asked = rng.choice([0, 0, 1, 3, 7, 50])
        assert launch(record, None, asked) == 0
        total = ran[0][1]
        assert all(n == total for _, n in ran), ran
        assert sorted(t for t, _ in ran) == list(range(total)), (asked, ran)
        assert total == (asked or (threads * 4 if threads > 1 else 1)), (asked, total, threads)

    def nested(task, env, cdata):  # a launch from inside a chunk runs alone, as one chunk
        inner = []
        assert launch(Lambda(lambda t, e, c: inner.append((t, e.contents.num_task)) or 0), None, 0) == 0
        return 0 if inner == [(0, 1)] else 1

    keep = Lambda(nested)
    assert launch(keep, None, 0) == 0
    failing = Lambda(lambda task, env, cdata: 1 if task == env.contents.num_task - 1 else 0)
    assert launch(failing, None, 0) == -1
    print("threads", threads)
""")


@pytest.mark.parametrize("threads, spin_us", [(2, "200"), (4, "0"), (1, "200")])
def test_every_chunk_of_every_loop_runs_once(threads, spin_us):
    env = {**os.environ, "SCULPT_POOL_THREADS": str(threads), "SCULPT_POOL_SPIN_US": spin_us}
    done = subprocess.run([sys.executable, "-c", _DRIVER, "400"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["threads", str(threads)]


# The caller and the worker both pinned to one core (the kernel's wake-up placement beside the waker):
# the worker, at its next loop, moves off the caller's core when /proc/loadavg (here a file standing in
# for it) shows a core to spare, and stays when it shows none.
_SPREAD_DRIVER = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    from sculpt.backends.tvm import work_pool
    lib = work_pool.pool_library()
    sched_getcpu = ctypes.CDLL(None).sched_getcpu

    class Env(ctypes.Structure):
        _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]

    Lambda = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)
    launch = lib.sculpt_pool_launch
    launch.argtypes = [Lambda, ctypes.c_void_p, ctypes.c_int]
    before = set(os.listdir("/proc/self/task"))
    assert lib.sculpt_pool_threads() == 2  # starts the pool: its worker is a thread of this process
    workers = [int(t) for t in set(os.listdir("/proc/self/task")) - before]
    assert len(workers) == 1, workers
    caller = threading.get_native_id()
    core = min(os.sched_getaffinity(0))
    for thread in [caller] + workers:  # the caller and the worker on one core
        os.sched_setaffinity(thread, {core})
    seen = []
    record = Lambda(lambda task, env, cdata: seen.append((threading.get_native_id(), sched_getcpu())) or 0)
    lib.sculpt_pool_moves_off_caller.restype = ctypes.c_long
    deadline = time.monotonic() + 20  # on a loaded machine the worker may wait long for its core
    for launches in range(1, 100000):
        time.sleep(0.001)
        assert launch(record, None, 64) == 0
        if launches >= 200 and (lib.sculpt_pool_moves_off_caller() or time.monotonic() > deadline
                                or sys.argv[1] == "stays"):
            break
    print(core, lib.sculpt_pool_moves_off_caller())
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.parametrize("runnable, moves_expected", [(1, True), (9, False)])
def test_a_worker_beside_its_caller_moves_off_its_core_when_another_is_idle(tmp_path, runnable, moves_expected):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.10 0.10 0.10 {runnable}/100 1234\n")
    env = {**os.environ, "SCULPT_POOL_THREADS": "2", "SCULPT_POOL_LOADAVG": str(loadavg)}
    done = subprocess.run([sys.executable, "-c", _SPREAD_DRIVER, "moves" if moves_expected else "stays"], env=env,
                          capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    core, moves = done.stdout.split()
    # once moved, a worker gets its own affinity back when its threads are preempted (a loaded machine,
    # as CI's), so the count of moves is what is deterministic, not where the worker ends up
    assert (int(moves) > 0) == moves_expected, done.stdout


def test_the_policy_names_the_pool_and_others_keep_tvms():
    assert thread_policy.runtime_env("stealing", 2) == {
        "TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0", "SCULPT_THREAD_POOL": "stealing",
        "TVM_NUM_THREADS": "2"}
    assert thread_policy.uses_work_pool("stealing")
    assert not thread_policy.uses_work_pool("shared") and not thread_policy.uses_work_pool("dedicated")
    executable = object()
    assert work_pool.vm_module(executable, "shared") is executable  # TVM's pool: nothing loaded


INPUT = (1, 8, 96, 96)  # large enough that the kernels split their loops over threads


def _conv_model():
    from sculpt.backends.tvm.kernels import onnx_cases as cases

    return cases.conv_model(cases.CONV_GRID[:4], INPUT)


def _tensors(value) -> list[np.ndarray]:
    return [value.numpy()] if hasattr(value, "numpy") else [t for v in value for t in _tensors(v)]


def test_a_models_parallel_loops_run_on_the_pool_and_match_onnxruntime(tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from sculpt.backends.tvm import build, import_to_relax
    from sculpt.ir.model import Model

    proto = _conv_model()
    x = np.random.default_rng(0).random(INPUT).astype(np.float32)
    references = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    executable = build(import_to_relax(Model(proto)), "llvm", kernels="sculpt")

    path = tmp_path / "model.so"
    executable.export_library(str(path))
    module = tvm.runtime.load_module(str(path))
    loaded = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    slot = ctypes.c_void_p.in_dll(loaded, work_pool.SLOT)
    tvms = slot.value
    assert work_pool.install(path)
    pool_launch = ctypes.cast(work_pool.pool_library().sculpt_pool_launch, ctypes.c_void_p).value
    assert slot.value == pool_launch != tvms  # the library's loops now launch on sculpt's pool

    for runnable in (module, work_pool.vm_module(executable, "stealing")):
        vm = relax.VirtualMachine(runnable, tvm.cpu())
        for _ in range(3):
            got = _tensors(vm["main"](tvm.runtime.tensor(x)))
            assert len(got) == len(references) == 4
            for g, r in zip(got, references):
                np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_install_refuses_a_library_that_is_not_loaded(tmp_path):
    from sculpt.backends.tvm.runtime_libs import ToolchainError

    with pytest.raises(ToolchainError, match="not loaded in this process"):
        work_pool.install(tmp_path / "absent.so")


def test_an_artifact_compiled_for_the_pool_runs_on_it_in_the_deploy_runner(tmp_path, capsys):
    import json

    import onnx
    import onnxruntime as ort

    from sculpt.backends.tvm.artifact import load_artifact
    from sculpt.backends.tvm.deploy import run_artifact
    from sculpt.backends.tvm.runner import run_runner
    from sculpt.cli import main

    proto = _conv_model()
    path = tmp_path / "grid.onnx"
    onnx.save(proto, str(path))
    out = tmp_path / "grid.so"
    assert main(["compile", str(path), "-o", str(out), "--thread-policy", "stealing", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["runtime"]["thread_policy"] == "stealing"
    assert manifest["runtime"]["env"]["SCULPT_THREAD_POOL"] == "stealing"
    artifact = load_artifact(out)
    name = artifact.inputs[0].name
    x = np.random.default_rng(1).random(artifact.inputs[0].shape).astype(np.float32)
    references = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: x})
    run = run_artifact(artifact, {name: x}, runs=3, threads=2)
    assert len(run.outputs) == len(references) == 4
    for got, reference in zip(run.outputs.values(), references):
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    # the runner says whose pool ran the loops: sculpt's under this policy, TVM's under shared
    np.save(tmp_path / "x.npy", x)
    for policy, pool in (("stealing", "sculpt"), ("shared", "tvm")):
        env = thread_policy.runtime_env(policy, 2)
        result = run_runner(artifact.library, artifact.arch, [tmp_path / "x.npy"], None, runs=2, env=env)
        assert result.thread_pool == pool


@pytest.mark.parametrize("with_barrier", [False, True])
def test_a_library_whose_loops_synchronize_keeps_tvms_pool(tmp_path, with_barrier):
    """A stand-in for a TVM library: the slots the runtime fills, with or without the barrier's."""
    source = tmp_path / "lib.cc"
    source.write_text('extern "C" { void* __TVMBackendParallelLaunch = (void*)1;'
                      + (' void* __TVMBackendParallelBarrier = (void*)1;' if with_barrier else '') + ' }\n')
    path = tmp_path / "lib.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    library = ctypes.CDLL(str(path))
    slot = ctypes.c_void_p.in_dll(library, work_pool.SLOT)
    assert work_pool.install(path) is not with_barrier
    pool_launch = ctypes.cast(work_pool.pool_library().sculpt_pool_launch, ctypes.c_void_p).value
    assert slot.value == (1 if with_barrier else pool_launch)


# Chunks that keep their thread busy for a while, in C (a Python callback would hold the GIL and run
# the chunks one at a time): chunk `task` spins for nanoseconds[min(task, 1)] (cdata) and counts itself.
_BUSY_CHUNKS_C = """
#include <time.h>
static long long now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int runs[4096];
int busy_chunk(int task, void* env, void* cdata) {
  long long end = now_ns() + ((long long*)cdata)[task > 0 ? 1 : 0];
  while (now_ns() < end) {}
  __atomic_fetch_add(&runs[task], 1, __ATOMIC_RELAXED);
  return 0;
}
"""

# argv: the chunks library, tasks per loop, the spin of chunk 0 and of the others (us), seconds at
# least. The caller shares its core with a busy process, the worker has the other. Prints launches
# and the loops whose caller yielded its core.
_LOADED_DRIVER = textwrap.dedent("""
    import ctypes, os, subprocess, sys, threading, time
    from sculpt.backends.tvm import work_pool
    lib = work_pool.pool_library()
    chunks = ctypes.CDLL(sys.argv[1])
    tasks, first_us, rest_us, seconds = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    lib.sculpt_pool_caller_yields.restype = ctypes.c_long
    lib.sculpt_pool_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    before = set(os.listdir("/proc/self/task"))
    assert lib.sculpt_pool_threads() == 2
    workers = [int(t) for t in set(os.listdir("/proc/self/task")) - before]
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(threading.get_native_id(), {cores[0]})
    for w in workers:
        os.sched_setaffinity(w, {cores[1]})
    spinner = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {%d}); exec('while True: pass')" % cores[0]])
    try:
        time.sleep(0.3)
        spins = (ctypes.c_longlong * 2)(first_us * 1000, rest_us * 1000)
        runs = (ctypes.c_int * 4096).in_dll(chunks, "runs")
        fn = ctypes.cast(chunks.busy_chunk, ctypes.c_void_p)
        launches, end = 0, time.monotonic() + seconds
        while time.monotonic() < end or launches < 50:
            assert lib.sculpt_pool_launch(fn, ctypes.cast(spins, ctypes.c_void_p), tasks) == 0
            launches += 1
            assert list(runs[:tasks]) == [launches] * tasks, (launches, list(runs[:tasks]))  # each chunk once
    finally:
        spinner.kill()
    print(launches, lib.sculpt_pool_caller_yields())
""")


def _busy_chunks(tmp_path):
    source = tmp_path / "chunks.c"
    source.write_text(_BUSY_CHUNKS_C)
    path = tmp_path / "chunks.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    return path


def _loaded_run(tmp_path, *args, **env):
    done = subprocess.run([sys.executable, "-c", _LOADED_DRIVER, str(_busy_chunks(tmp_path)), *map(str, args)],
                          env={**os.environ, "SCULPT_POOL_THREADS": "2", **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(v) for v in done.stdout.split()]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_caller_waiting_for_a_chunk_about_to_end_polls_rather_than_yield_its_core(tmp_path):
    # the worker's chunk outlasts the caller's by ~0.4 ms; a yield would hand the caller's core to the
    # busy process beside it until the next tick
    # (measured here: 0 of ~2000 loops; with 2 more busy processes anywhere, 3-4%)
    launches, yields = _loaded_run(tmp_path, 2, 100, 500, 2.0)
    polling = yields / launches
    assert polling <= 0.2, (launches, yields)
    # the same with the old 200 polls (SCULPT_POOL_CALLER_POLL_US=0) shows the scenario makes the caller
    # wait (here 96% of the loops yielded; with 2 more busy processes, 28-37%)
    launches, yields = _loaded_run(tmp_path, 2, 100, 500, 2.0, SCULPT_POOL_CALLER_POLL_US="0")
    assert yields / launches >= max(0.15, 3 * polling), (launches, yields, polling)

