"""TVM backend (Apache TVM 0.27, Relax). Imported lazily: ``import sculpt`` does not load TVM."""

from sculpt.backends.tvm import thread_policy
from sculpt.backends.tvm.relax_import import build, import_to_relax, run_relax

# TVM's thread pool reads its configuration once, at its first parallel call: give it sculpt's default
# policy (not pinned, not spinning: thread_policy) unless the user set those variables
thread_policy.apply(thread_policy.DEFAULT_POLICY, override=False)

__all__ = ["build", "import_to_relax", "run_relax", "thread_policy"]
