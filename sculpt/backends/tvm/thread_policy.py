"""How the CPU thread pool of a TVM build behaves when the cores are shared with other processes.

TVM's runtime pool (libtvm_runtime) pins one worker per core and, after each parallel loop, spins
300,000 yields before it sleeps. On a dedicated core that saves a wake-up; on a phone, where other
apps always run, a pinned spinning worker competes with them for the same core and the model's
latency collapses (PP-OCRv4 rec, 2 threads, both cores busy with other processes: 5 -> 118 ms).

Three policies:

- ``stealing`` (the default): the library's parallel loops run on sculpt's own pool
  (``work_pool``, ``runner/work_pool.cc``): each loop in several chunks per thread, a thread runs its
  own chunks and then those of a late thread that it has not started, so a thread that a busy core
  delays no longer stalls every loop (``SCULPT_THREAD_POOL=stealing``; TVM's pool, unused then, as in
  ``shared``).
- ``shared``: TVM's pool with workers not pinned (``TVM_BIND_THREADS=0``) and not spinning
  (``TVM_THREAD_POOL_SPIN_COUNT=0``): a worker that has nothing to do sleeps at once, and the OS
  places it on whichever core is free; each thread has one fixed share of every loop.
- ``dedicated``: TVM's own behaviour (pinned, spinning) for a device that runs nothing else.

The pool reads these variables once, when it starts (at the first parallel call of the process), so
they must be in the environment before that: ``sculpt.backends.tvm`` sets the default policy's
variables at import unless the user set them; ``sculpt bench`` and the deploy runner set them
from the policy asked for (the artifact's manifest records the one it was compiled to expect).
"""

from __future__ import annotations

import os
from typing import Mapping

from sculpt.errors import OptionError

POLICIES: dict[str, dict[str, str]] = {
    "stealing": {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0", "SCULPT_THREAD_POOL": "stealing"},
    "shared": {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "0", "SCULPT_THREAD_POOL": "tvm"},
    "dedicated": {"TVM_BIND_THREADS": "1", "TVM_THREAD_POOL_SPIN_COUNT": "300000", "SCULPT_THREAD_POOL": "tvm"},
}
DEFAULT_POLICY = "stealing"


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise OptionError(f"unknown thread policy '{policy}' (choose from {', '.join(POLICIES)})")
    return policy


def uses_work_pool(policy: str) -> bool:
    """Whether ``policy`` runs a library's parallel loops on sculpt's pool (installed after loading)."""
    return POLICIES[check_policy(policy)].get("SCULPT_THREAD_POOL") == "stealing"


def default_threads() -> int:
    """Threads for this machine: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def runtime_env(policy: str = DEFAULT_POLICY, threads: int | None = None) -> dict[str, str]:
    """The environment variables that give TVM's pool ``policy`` (and ``threads`` workers, if given)."""
    env = dict(POLICIES[check_policy(policy)])
    if threads is not None:
        if threads < 1:
            raise OptionError(f"threads must be >= 1, got {threads}")
        env["TVM_NUM_THREADS"] = str(threads)
    return env


def apply(policy: str = DEFAULT_POLICY, threads: int | None = None, *,
          environ: Mapping[str, str] | None = None, override: bool = True) -> dict[str, str]:
    """Put ``runtime_env(policy, threads)`` into this process's environment (before TVM's pool starts:
    see the module docstring). ``override=False`` keeps variables the user already set. Returns what
    is now in force for those variables."""
    target = os.environ if environ is None else environ
    for key, value in runtime_env(policy, threads).items():
        if override or key not in target:
            target[key] = value
    return {key: target[key] for key in runtime_env(policy, threads)}


def manifest_entry(policy: str = DEFAULT_POLICY) -> dict:
    """What an artifact's manifest records: the policy it expects and the variables that give it."""
    return {"thread_policy": check_policy(policy), "env": dict(POLICIES[policy])}
