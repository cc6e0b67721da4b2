"""Remote devices through TVM's RPC tracker: run and time a build on a device registered under a key.

On the device: ``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``; somewhere both
reach: ``python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190``. sculpt uploads the exported
library, loads it in the device's Relax VM, and measures there.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from sculpt.backends.tvm.runtime_libs import ToolchainError
from sculpt.backends.tvm.targets import NamedTarget
from sculpt.backends.tvm.tune import RemoteDevice
from sculpt.common import one_line


class RemoteError(ToolchainError):
    """The tracker or the device could not be reached, or the device failed to run the build."""


@dataclass
class TimedRun:
    median_ms: float
    times_ms: list[float]
    outputs: list[np.ndarray]


def time_vm(vm, device, args: Sequence, runs: int, warmup: int) -> TimedRun:
    """Median of ``runs`` timed calls of ``main`` (each run timed on its own), after ``warmup`` calls."""
    for _ in range(warmup):
        vm["main"](*args)
    vm.set_input("main", *args)
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=runs)
    result = timer("main")
    times = [float(t) * 1e3 for t in result.results]
    outputs = _flatten(vm["main"](*args))
    return TimedRun(statistics.median(times), times, outputs)


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [leaf for item in value for leaf in _flatten(item)]


def connect_tracker(device: RemoteDevice):
    """The tracker, checked to have a device registered under ``device.key``."""
    import socket

    from tvm import rpc

    try:  # TVM's own connect retries for a minute; a tracker that is not there should fail now
        socket.create_connection((device.tracker_host, device.tracker_port), timeout=10).close()
    except OSError as e:
        raise RemoteError(f"--rpc {device.tracker_host}:{device.tracker_port}: cannot reach the RPC tracker "
                          f"({e.strerror or e})") from None
    try:
        tracker = rpc.connect_tracker(device.tracker_host, device.tracker_port)
    except Exception as e:
        raise RemoteError(f"--rpc {device.tracker_host}:{device.tracker_port}: cannot reach the RPC tracker "
                          f"({one_line(e, 200)})") from None
    try:
        queues = tracker.summary().get("queue_info", {})
    except Exception as e:
        raise RemoteError(f"--rpc {device.tracker_host}:{device.tracker_port}: the tracker did not answer "
                          f"({one_line(e, 200)})") from None
    if device.key not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise RemoteError(f"--device-key {device.key}: no device registered under this key at "
                          f"{device.tracker_host}:{device.tracker_port} (registered keys: {known})")
    return tracker


def request_session(device: RemoteDevice, timeout_sec: int | None = None):
    """An RPC session with a device of ``device.key`` from the tracker, ended by the device after
    ``timeout_sec`` (default: the device's ``session_timeout_sec``; 0: kept as long as it is used)."""
    tracker = connect_tracker(device)
    try:
        timeout = device.session_timeout_sec if timeout_sec is None else timeout_sec  # 0: kept alive
        return tracker.request(device.key, priority=1, session_timeout=timeout, max_retry=3)
    except Exception as e:
        raise RemoteError(f"--device-key {device.key}: the tracker at {device.tracker_host}:{device.tracker_port} "
                          f"gave no device ({one_line(e, 200)})") from None


def probe(device: RemoteDevice) -> None:
    """Fail now, with a one-line error, when the tracker is unreachable or has no device of the key."""
    connect_tracker(device)


def free_devices(device: RemoteDevice) -> int:
    """How many devices of ``device.key`` the tracker has free now (its summary's queue)."""
    tracker = connect_tracker(device)
    queue = tracker.summary().get("queue_info", {}).get(device.key, {})
    return int(queue.get("free", 0))


def remote_timer(executable, target: NamedTarget, device: RemoteDevice, args: Sequence[np.ndarray], *,
                 runs: int = 10, warmup: int = 1, session=None) -> Callable[[], TimedRun]:
    """Export ``executable`` for ``target``, upload it to ``device`` and load it there once; the returned
    function runs and times it on the device (``runs`` timed runs after ``warmup``) each time it is called.
    ``session``: an RPC session already holding one of the key's devices (else one is requested)."""
    from tvm import relax

    session = session if session is not None else request_session(device)
    with tempfile.TemporaryDirectory(prefix="sculpt-rpc-") as tmp:
        # a name of its own: a session that loads several builds must not overwrite a loaded library
        path = os.path.join(tmp, f"model-{os.path.basename(tmp)}.so")
        cc = target.cross_compiler
        if cc:
            executable.export_library(path, cc=cc)
        else:
            executable.export_library(path)
        try:
            session.upload(path)
            library = session.load_module(os.path.basename(path))
            dev = session.cl(0) if target.is_opencl else session.cpu(0)
            vm = relax.VirtualMachine(library, dev)
            remote_args = [_to_device(a, dev) for a in args]
        except Exception as e:
            raise RemoteError(f"the device {device} could not load the build: {one_line(e, 300)}") \
                from None

    def run() -> TimedRun:
        try:
            return time_vm(vm, dev, remote_args, runs, warmup)
        except Exception as e:
            raise RemoteError(f"the device {device} failed to run the build: {one_line(e, 300)}") \
                from None

    run.session = session  # keeps the session open as long as the timer lives
    return run


def _to_device(array: np.ndarray, dev):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array), dev)
