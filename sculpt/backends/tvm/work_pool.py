"""sculpt's work-stealing CPU pool (runner/work_pool.cc) for TVM libraries loaded in this process.

TVM's generated code calls the parallel-launch function that a loaded library holds in its
``__TVMBackendParallelLaunch`` pointer. The deploy runner links the pool in and points that slot at
it after loading an artifact; in Python the pool is a small shared library built once per source
into the sculpt cache (with the same C++ compiler as the deploy runner), and :func:`load` loads an
executable through a file (an in-memory build's code is JIT-compiled, and its slot is out of reach)
and installs the pool in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from sculpt.backends.tvm.runtime_libs import ToolchainError, build_into_cache, cache_dir, require_tool

SOURCE = Path(__file__).with_name("runner") / "work_pool.cc"
SLOT = "__TVMBackendParallelLaunch"

_library: ctypes.CDLL | None = None


def _build() -> Path:
    cxx = require_tool("g++", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + b"\0" + cxx.encode()).hexdigest()[:16]
    return build_into_cache(cache_dir() / "work_pool" / f"libsculpt_work_pool-{key}.so",
                            lambda output: [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", str(SOURCE), "-o", output,
                                            "-lpthread", "-ldl"],
                            "sculpt's thread pool")


def pool_library() -> ctypes.CDLL:
    """The pool, built on first use and loaded once per process."""
    global _library
    if _library is None:
        _library = ctypes.CDLL(str(_build()))
        _library.sculpt_pool_threads.restype = ctypes.c_int
        _library.sculpt_pool_install_library.argtypes = [ctypes.c_char_p]
    return _library


def install(library_path: str | os.PathLike) -> bool:
    """Point the parallel loops of a library that the TVM runtime has already loaded at the pool.
    False (TVM's pool kept) when the library has no parallel loops, or loops with a barrier inside
    (the pool runs chunks independently). The pool's own ``sculpt_pool_install_library`` decides, as
    in the deploy runner."""
    status = pool_library().sculpt_pool_install_library(os.fsencode(library_path))
    if status == -1:
        raise ToolchainError(f"{library_path}: not loaded in this process (load it with the TVM runtime first)")
    if status == -2:
        raise ToolchainError(f"{library_path}: the TVM runtime has not filled {SLOT} yet")
    return status == 1


def threads() -> int:
    """The pool's thread count (starts the pool: its settings are read then, see work_pool.cc)."""
    return int(pool_library().sculpt_pool_threads())


def load(executable):
    """A TVM module of ``executable`` (a Relax executable from ``tvm.compile``) whose parallel loops
    run on the pool: exported to a temporary library, loaded, the pool installed, the file removed."""
    import tvm

    with tempfile.TemporaryDirectory(prefix="sculpt-pool-") as folder, _without_scope_chatter():
        path = os.path.join(folder, "model.so")
        executable.export_library(path)
        module = tvm.runtime.load_module(path)
        install(path)
    return module


# TVM 0.27's VM executable logs one warning line per memory scope it saves or loads
_CHATTER = ("Warning: Scope Saving:", "Warning: Scope Loaded:")


@contextlib.contextmanager
def _without_scope_chatter():
    """Runs the block with the process's stderr (fd 2) caught, then passes on all but TVM's
    scope-saving chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(c in line for c in _CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def vm_module(executable, policy: str):
    """What ``relax.VirtualMachine`` should run for thread policy ``policy``: the executable itself (TVM's
    pool), or, for a policy on sculpt's pool, the executable loaded through a file with the pool installed."""
    from sculpt.backends.tvm.thread_policy import uses_work_pool

    return load(executable) if uses_work_pool(policy) else executable
