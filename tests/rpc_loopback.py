"""A TVM RPC tracker and RPC servers ("devices") on loopback, as separate processes, for the tests that
measure on remote devices."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

KEY = "sculpt-loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_devices(port: int, key: str = KEY) -> int:
    from tvm import rpc

    try:
        summary = rpc.connect_tracker("127.0.0.1", port).summary()
    except Exception:
        return 0
    return int(summary.get("queue_info", {}).get(key, {}).get("free", 0))


@contextlib.contextmanager
def loopback_tracker(servers: int = 1, key: str = KEY, timeout_s: float = 240) -> Iterator[str]:
    """``HOST:PORT`` of a tracker with ``servers`` RPC servers registered under ``key``; all stopped after."""
    port = free_port()
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], **quiet)]
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the loopback RPC tracker did not start") from None
                time.sleep(0.5)
        for _ in range(servers):
            procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                           "--tracker", f"127.0.0.1:{port}", "--key", key], **quiet))
        while free_devices(port, key) < servers:
            if time.time() > deadline:
                raise RuntimeError(f"{servers} loopback RPC server(s) did not register within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
